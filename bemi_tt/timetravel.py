"""Time travel over ``changes``: ``as_of``, ``diff``, ``history``, ``audit``, ``blame``, ``changes``.

Every function reads one source (``source=``, else :func:`bemi_tt.connect`'s, else ``$BEMI_TT_SOURCE``),
lets DuckDB find the versions it needs, and returns a plain pandas DataFrame typed like the table
(see :mod:`bemi_tt.dtypes`). Order is always commit order ``(commit_position, ordinal)``, never time:
``as_of(t)`` is the state after the longest prefix of the table's commits whose ``committed_at <= t``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from bemi_tt.dtypes import (
    ColumnType,
    column_type,
    duck_select,
    frame_from_arrow,
    frame_from_json,
    infer_type,
    parse_json,
)
from bemi_tt.sources import PostgresSource, Scope, Source, TableName, get_source, json_text
from bemi_tt.timestamps import to_utc
from capture.errors import ConfigurationError

__all__ = ["as_of", "audit", "blame", "changes", "diff", "history"]

#: Operations after which a row exists.
PRESENT = ("CREATE", "UPDATE", "SNAPSHOT")


_shared: duckdb.DuckDBPyConnection | None = None
_shared_lock = threading.Lock()


def _duck() -> duckdb.DuckDBPyConnection:
    """A fresh connection to one in-process DuckDB database (opening a database per call costs ~50 ms);
    temporary views and registered Arrow tables are private to each connection."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = duckdb.connect()
        return _shared.cursor()


# -- tables and their columns -----------------------------------------------------------------------
def resolve_table(source: Source, table: str) -> TableName:
    """``"todo"`` or ``"schema.todo"`` → ``(schema, table)``; unknown or ambiguous names are errors."""
    if not isinstance(table, str) or not table.strip():
        raise ConfigurationError(f"table must be a table name such as 'todo' or 'public.todo', got {table!r}")
    name = table.strip()
    schema, dot, bare = name.partition(".")
    candidates = source.tables(bare if dot else name)
    if dot:
        candidates = [c for c in candidates if c[0] == schema]
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        public = [c for c in candidates if c[0] == "public"]
        if public:
            return public[0]
        raise ConfigurationError(
            f"table {table!r} is ambiguous: it exists in schemas "
            f"{sorted(c[0] for c in candidates)!r}; write it as 'schema.{name}'"
        )
    known = ", ".join(f"{s}.{t}" if s != "public" else t for s, t in source.tables()) or "none"
    raise ConfigurationError(f"unknown table {table!r}: the source has changes for: {known}")


@dataclass(frozen=True)
class Column:
    """A column as ``changes_schemas`` describes it at some point of history."""

    name: str
    kind: ColumnType
    key: bool
    since: tuple[int, int] | None  # rows last changed before this took ``fill`` (column added later)
    fill: str | None  # JSON text


@dataclass(frozen=True)
class Layout:
    """The columns of a table at a point of history (or inferred from the rows when no schema exists)."""

    columns: tuple[Column, ...]
    inferred: bool = False

    @property
    def keys(self) -> list[str]:
        return [c.name for c in self.columns if c.key]

    @property
    def values(self) -> list[Column]:
        return [c for c in self.columns if not c.key]


#: A column set of a table: ((commit_position, ordinal), committed_at, columns).
Version = tuple[tuple[int, int], pd.Timestamp, list[dict[str, Any]]]


def _versions(source: Source, table: TableName) -> list[Version]:
    raw = source.schemas(table)
    out = []
    for cp, o, at, cols in zip(
        raw["commit_position"].to_pylist(),
        raw["ordinal"].to_pylist(),
        raw["committed_at"].to_pylist(),
        raw["columns"].to_pylist(),
        strict=False,
    ):
        out.append(((int(cp), int(o)), pd.Timestamp(at), json.loads(cols)))
    out.sort(key=lambda v: v[0])
    return out


def layout_at(versions: list[Version], ts: pd.Timestamp | None) -> Layout | None:
    """The column set valid at ``ts`` (None: the latest), or None when the source has no column sets."""
    valid = [v for v in versions if ts is None or v[1] <= ts]
    if not valid:
        return None
    current = valid[-1][2]
    columns = []
    for spec in current:
        name = spec["name"]
        since: tuple[int, int] | None = None
        fill: str | None = None
        for i in range(len(valid) - 1, -1, -1):
            found = next((c for c in valid[i][2] if c["name"] == name), None)
            if found is None:
                break
            if i == 0:
                since, fill = None, None
            else:
                since = valid[i][0]
                fill = json.dumps(found["fill"]) if "fill" in found else None
        if since is not None and all(any(c["name"] == name for c in v[2]) for v in valid):
            since = None
        columns.append(Column(name, column_type(spec["type"]), bool(spec.get("key")), since, fill))
    return Layout(tuple(columns))


def _infer_layout(keys: Sequence[str], afters: Sequence[str]) -> Layout:
    names: dict[str, str] = {}
    rows = [parse_json(a) for a in afters]
    for row in rows:
        for name, value in row.items():
            if name not in names or (
                names[name] == "text" and value is not None and not isinstance(value, str)
            ):
                names[name] = "text" if value is None else infer_type(value)
    key = next(
        (
            n
            for n in names
            if rows
            and all(
                r.get(n) is not None and (str(r[n]) if not isinstance(r[n], bool) else "") == k
                for r, k in zip(rows, keys, strict=False)
            )
        ),
        None,
    )
    # jsonb does not keep key order: sort the names so that every source gives the same columns
    return Layout(
        tuple(Column(n, column_type(names[n]), n == key, None, None) for n in sorted(names)), inferred=True
    )


# -- the SQL that finds current versions ------------------------------------------------------------
def _pointer(name: str) -> str:
    return "'/" + name.replace("~", "~0").replace("/", "~1").replace("'", "''") + "'"


def old_key_sql(keys: Sequence[str], column: str = "before") -> str:
    """SQL text of the key a ``before`` object holds, written like ``changes.primary_key``."""
    if not keys:
        return "NULL"
    if len(keys) == 1:
        return f"json_extract_string({column}, {_pointer(keys[0])})"
    parts = ", ".join(f"json_extract({column}, {_pointer(k)})" for k in keys)
    return f"CAST(to_json([{parts}]) AS VARCHAR)"


def updates_sql(keys: Sequence[str]) -> str:
    """The UPDATEs whose ``before`` may hold another key (a key UPDATE), without parsing every ``before``:
    jsonb text puts short names first, so ``{"id": <primary_key>,`` at the start proves the key is kept."""
    where = "operation = 'UPDATE' AND CAST(before AS VARCHAR) <> '{}'"
    if len(keys) == 1:
        name = json.dumps(keys[0], ensure_ascii=False).replace("'", "''")
        where += (
            f" AND NOT starts_with(CAST(before AS VARCHAR), '{{{name}: ' || primary_key || ',')"
            f" AND NOT starts_with(CAST(before AS VARCHAR), '{{{name}: ' || CAST(to_json(primary_key) AS"
            " VARCHAR) || ',')"
        )
    return where


def events_sql(rel: str, old_key: str, payload: str = "after") -> str:
    """One event per key and change: present (with ``payload``) or gone (DELETE, or the old key of a key
    UPDATE); TRUNCATE rows are kept apart in ``truncates``."""
    return f"""
        events AS (
            SELECT primary_key AS k, commit_position AS cp, ordinal AS o, operation AS op,
                   {payload} AS payload
            FROM {rel} WHERE operation <> 'TRUNCATE' AND primary_key IS NOT NULL
            UNION ALL
            SELECT ok, cp, o, 'DELETE', NULL FROM (
                SELECT {old_key} AS ok, primary_key AS pk, commit_position AS cp, ordinal AS o
                FROM {rel} WHERE operation = 'UPDATE' AND CAST(before AS VARCHAR) <> '{{}}'
            ) WHERE ok IS NOT NULL AND ok IS DISTINCT FROM pk
        ),
        truncates AS (SELECT max((commit_position, ordinal)) AS t FROM {rel} WHERE operation = 'TRUNCATE')"""


def latest_sql(
    rel: str,
    old_key: str,
    payload: str = "after",
    updates: str = "operation = 'UPDATE' AND CAST(before AS VARCHAR) <> '{}'",
) -> str:
    """SELECT k, cp, o, payload of every key present after all of ``rel``'s changes.

    One aggregate finds each key's last change; key UPDATEs (the old key, read from ``before``) and
    TRUNCATEs are two small side aggregates that remove the keys they made disappear."""
    return f"""
        WITH latest AS (
            SELECT primary_key AS k, max((commit_position, ordinal)) AS at,
                   arg_max_null(CASE WHEN operation = 'DELETE' THEN NULL ELSE {payload} END,
                                (commit_position, ordinal)) AS payload
            FROM {rel} WHERE primary_key IS NOT NULL GROUP BY primary_key
        ),
        moved AS (
            SELECT ok AS k, max((cp, o)) AS at FROM (
                SELECT {old_key} AS ok, primary_key AS pk, commit_position AS cp, ordinal AS o
                FROM {rel} WHERE {updates}
            ) WHERE ok IS NOT NULL AND ok IS DISTINCT FROM pk GROUP BY ok
        ),
        truncates AS (SELECT max((commit_position, ordinal)) AS t FROM {rel} WHERE operation = 'TRUNCATE')
        SELECT latest.k AS k, latest.at[1] AS cp, latest.at[2] AS o, latest.payload AS payload
        FROM latest LEFT JOIN moved ON moved.k = latest.k, truncates
        WHERE latest.payload IS NOT NULL AND (moved.at IS NULL OR latest.at > moved.at)
          AND (truncates.t IS NULL OR latest.at > truncates.t)"""


@dataclass
class State:
    """A table's rows at a cut: the typed frame (indexed by key, sorted) and, aligned with its rows, each
    row's ``primary_key`` text and the position of the change that produced it."""

    layout: Layout
    frame: pd.DataFrame
    key_texts: np.ndarray[Any, Any]
    cps: np.ndarray[Any, Any]
    ordinals: np.ndarray[Any, Any]

    @property
    def keys(self) -> list[str]:
        return [str(k) for k in self.key_texts]

    @property
    def positions(self) -> list[tuple[int, int]]:
        return list(zip(self.cps.tolist(), self.ordinals.tolist(), strict=True))


def _first(rows: list[Any]) -> Any:
    return rows[0] if rows else None


def _typed(layout: Layout, rows: pa.Table, frame: pd.DataFrame) -> State:
    """Apply column fills (rows last changed before a column was added), index by the key and sort."""
    keys = rows["k"].to_numpy(zero_copy_only=False)
    cps = rows["cp"].to_numpy(zero_copy_only=False).astype(np.int64)
    ordinals = rows["o"].to_numpy(zero_copy_only=False).astype(np.int64)
    for column in layout.columns:
        if column.since is None:
            continue
        stale = (cps < column.since[0]) | ((cps == column.since[0]) & (ordinals < column.since[1]))
        if stale.any():
            mask = pd.Series(stale, index=frame.index)
            fill = (
                None
                if column.fill is None
                else frame_from_json(['{"v":' + column.fill + "}"], [("v", column.kind)])["v"].iloc[0]
            )
            series = frame[column.name].copy()
            if fill is None:
                series = series.where(~mask, None if series.dtype == object else pd.NA)
            else:
                series = series.astype(object).where(~mask, fill).astype(series.dtype)
            frame[column.name] = series
    key_names = layout.keys
    if key_names:
        frame = frame.set_index(key_names if len(key_names) > 1 else key_names[0])
    elif not layout.inferred:  # no primary key: rows in commit order of their last change
        order = np.lexsort((ordinals, cps))
        frame, keys, cps, ordinals = frame.iloc[order], keys[order], cps[order], ordinals[order]
        frame.index = pd.RangeIndex(len(frame))
        return State(layout, frame, keys, cps, ordinals)
    else:
        frame.index = pd.Index(pd.array(keys, dtype=pd.StringDtype()), name="primary_key")
    if not frame.index.is_monotonic_increasing:
        order = frame.index.argsort()
        frame, keys, cps, ordinals = frame.iloc[order], keys[order], cps[order], ordinals[order]
    return State(layout, frame, keys, cps, ordinals)


def state_at(
    source: Source,
    table: TableName,
    ts: pd.Timestamp | None,
    *,
    key: str | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
    name: str = "c",
) -> State:
    """Load ``table``'s changes up to ``ts`` (None: all) and compute the typed rows present then."""
    con = con or _duck()
    versions = _versions(source, table)
    layout = layout_at(versions, ts)
    keys = layout.keys if layout else []
    scope = Scope(
        table=table,
        until=ts,
        columns=("primary_key", "operation", "before", "after", "commit_position", "ordinal"),
    )
    if layout is not None and not keys:  # a table without a primary key: rows are matched by content
        source.load(con, name, scope)
        con.register(f"{name}_keyless", _keyless_rows(con, f'"{name}"'))
        query = f'SELECT * FROM "{name}_keyless"'
    elif isinstance(source, PostgresSource) and not source.mirror:
        source.latest(con, f"{name}_latest", scope, keys, latest_sql)
        query = f'SELECT * FROM "{name}_latest"'
    else:
        source.load(con, name, scope)
        query = latest_sql(f'"{name}"', old_key_sql(keys), "after", updates_sql(keys))
    if key is not None:
        query = f"SELECT * FROM ({query}) WHERE k = {_sql_text(key)}"
    frame: pd.DataFrame | None = None
    typed = duck_select([(c.name, c.kind) for c in layout.columns], "payload") if layout else None
    if typed is not None and layout is not None:
        inner, outer = typed
        try:
            rows = con.sql(
                f"SELECT k, cp, o{', ' + outer if outer else ''} FROM "
                f"(SELECT k, cp, o, {inner} FROM ({query}))"
            ).to_arrow_table()
            frame = frame_from_arrow(rows, [(c.name, c.kind) for c in layout.columns])
        except (duckdb.ConversionException, duckdb.InvalidInputException):
            frame = None  # a value DuckDB cannot cast ("NaN" numeric, BC dates): the Python path decides
    if frame is None:
        rows = con.sql(query).to_arrow_table()
    if ts is not None and rows.num_rows == 0:
        _check_start(source, table, ts, versions)
    if frame is None:
        afters = [str(a) for a in rows["payload"].to_pylist()]
        if layout is None:
            layout = _infer_layout([str(k) for k in rows["k"].to_pylist()], afters)
        frame = frame_from_json(afters, [(c.name, c.kind) for c in layout.columns])
    assert layout is not None
    return _typed(layout, rows, frame)


def _keyless_rows(con: duckdb.DuckDBPyConnection, rel: str) -> pa.Table:
    """Rows of a table without a primary key, replayed in commit order: an UPDATE or DELETE (whose
    ``before`` is the whole old row, REPLICA IDENTITY FULL) replaces or removes one row equal to it."""
    changes = con.sql(
        f"SELECT operation, CAST(before AS VARCHAR), CAST(after AS VARCHAR), commit_position, ordinal "
        f"FROM {rel} ORDER BY commit_position, ordinal"
    ).fetchall()
    live: dict[str, list[tuple[int, int]]] = {}
    for operation, before, after, cp, o in changes:
        if operation == "TRUNCATE":
            live.clear()
            continue
        if operation in ("UPDATE", "DELETE"):
            stack = live.get(before)
            if stack:
                stack.pop()
                if not stack:
                    del live[before]
        if operation in PRESENT:
            live.setdefault(after, []).append((cp, o))
    rows = sorted((position, after) for after, positions in live.items() for position in positions)
    return pa.table(
        {
            "k": pa.array([f"{cp}:{o}" for (cp, o), _ in rows], pa.string()),
            "cp": pa.array([cp for (cp, _), _ in rows], pa.int64()),
            "o": pa.array([o for (_, o), _ in rows], pa.int32()),
            "payload": pa.array([after for _, after in rows], pa.string()),
        }
    )


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _check_start(source: Source, table: TableName, ts: pd.Timestamp, versions: list[Version]) -> None:
    con = _duck()
    source.load(con, "all_times", Scope(table=table, columns=("committed_at",)))
    row = _first(con.sql('SELECT min(committed_at) FROM "all_times"').fetchall())
    starts = [pd.Timestamp(row[0])] if row and row[0] is not None else []
    starts += [v[1] for v in versions]
    if starts and ts < min(starts):
        raise ConfigurationError(
            f"ts {ts.isoformat()} is before the history of {table[0]}.{table[1]} starts "
            f"({min(starts).isoformat()}): pass a later time"
        )


def key_text(layout: Layout, key: Any) -> str:
    """A user's key (a scalar, a tuple for composite keys, or a dict of key columns) as ``primary_key``."""
    names = layout.keys
    if isinstance(key, dict):
        missing = [n for n in names if n not in key]
        if missing:
            raise ConfigurationError(f"key {key!r} lacks key columns {missing!r}")
        key = tuple(key[n] for n in names) if len(names) > 1 else key[names[0]]
    if isinstance(key, (tuple, list)):
        if len(names) > 1 and len(key) != len(names):
            raise ConfigurationError(f"key {key!r} has {len(key)} values; the key of this table is {names!r}")
        if len(key) == 1:
            key = key[0]
        else:
            return json_text(list(key))
    if isinstance(key, str):
        return key
    if key is None or (isinstance(key, float) and key != key):
        raise ConfigurationError(f"key {key!r} is not a key value: pass the primary key of one row")
    if isinstance(key, bool):
        return "true" if key else "false"
    if hasattr(key, "item") and not isinstance(key, (int, float)):
        key = key.item()
    return str(key)


def _columns_arg(columns: Any, layout: Layout) -> list[str] | None:
    if columns is None:
        return None
    if isinstance(columns, str):
        columns = [columns]
    wanted = list(columns)
    known = [c.name for c in layout.values]
    bad = [c for c in wanted if c not in known]
    if bad:
        raise ConfigurationError(f"unknown columns {bad!r}: the table has {known!r}")
    return wanted


# -- public API ------------------------------------------------------------------------------------------
def as_of(
    table: str, ts: Any, *, key: Any = None, columns: Sequence[str] | str | None = None, source: Any = None
) -> pd.DataFrame:
    """The rows of ``table`` after every transaction committed at or before ``ts``, indexed by primary key.

    ``ts``: datetime (naive means UTC), ISO 8601 string or pandas Timestamp. ``key=`` keeps one row,
    ``columns=`` some columns. Columns and dtypes are those the table had at ``ts``.
    """
    src = get_source(source)
    name = resolve_table(src, table)
    when = to_utc(ts)
    con = _duck()
    wanted: str | None = None
    if key is not None:
        layout = layout_at(_versions(src, name), when) or Layout(())
        wanted = key_text(layout, key) if layout.keys or isinstance(key, str) else str(key)
    state = state_at(src, name, when, key=wanted, con=con)
    frame = state.frame
    picked = _columns_arg(columns, state.layout)
    return frame[picked] if picked is not None else frame


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and value != value


def _same(a: Any, b: Any) -> bool:
    if _missing(a) or _missing(b):
        return _missing(a) and _missing(b)
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


def _plain(value: Any) -> Any:
    return None if _missing(value) else value


def _context_columns(frame: pd.DataFrame, contexts: Sequence[str | None]) -> pd.DataFrame:
    """Add one column per context key (``context.<key>`` when the name is taken)."""
    parsed = [parse_json(c) if c else {} for c in contexts]
    names: dict[str, None] = {}
    for ctx in parsed:
        for k in ctx if isinstance(ctx, dict) else ():
            names.setdefault(k, None)
    columns = {}
    for k in names:
        label = k if k not in frame.columns else f"context.{k}"
        columns[label] = pd.Series(
            [ctx.get(k) if isinstance(ctx, dict) else None for ctx in parsed], index=frame.index, dtype=object
        )
    return pd.concat([frame, pd.DataFrame(columns, index=frame.index)], axis=1) if columns else frame


def _origins(
    source: Source,
    table: TableName,
    layout: Layout,
    ts: pd.Timestamp | None,
    con: duckdb.DuckDBPyConnection,
    name: str = "o",
) -> dict[tuple[str, str], tuple[Any, ...]]:
    """For every present (key, column): the change that last set its value (cp, o, op, committed_at, ctx)."""
    source.load(
        con,
        name,
        Scope(
            table=table,
            until=ts,
            columns=(
                "primary_key",
                "operation",
                "before",
                "after",
                "context",
                "commit_position",
                "ordinal",
                "committed_at",
            ),
        ),
    )
    rel = f'"{name}"'
    old_key = old_key_sql(layout.keys)
    query = f"""
        WITH {events_sql(rel, old_key, "after")},
        births AS (
            SELECT k, max((cp, o)) FILTER (WHERE op NOT IN ('CREATE', 'UPDATE', 'SNAPSHOT')) AS gone
            FROM events GROUP BY k
        ),
        versions AS (
            SELECT c.primary_key AS k, c.commit_position AS cp, c.ordinal AS o, c.operation AS op,
                   c.committed_at,
                   CAST(c.context AS VARCHAR) AS context, CAST(c.after AS VARCHAR) AS after
            FROM {rel} c JOIN births b ON b.k = c.primary_key, truncates
            WHERE c.operation IN ('CREATE', 'UPDATE', 'SNAPSHOT')
              AND (b.gone IS NULL OR (c.commit_position, c.ordinal) > b.gone)
              AND (truncates.t IS NULL OR (c.commit_position, c.ordinal) > truncates.t)
        ),
        cells AS (
            SELECT k, cp, o, op, committed_at, context, col,
                   CAST(json_extract(after, '/' || replace(replace(col, '~', '~0'), '/', '~1')) AS VARCHAR)
                       AS val
            FROM versions, unnest(json_keys(after)) AS u(col)
        ),
        marked AS (
            SELECT *, lag(val) OVER w AS prev, row_number() OVER w AS n FROM cells
            WINDOW w AS (PARTITION BY k, col ORDER BY cp, o)
        )
        SELECT k, col, arg_max({{'cp': cp, 'o': o, 'op': op, 'committed_at': committed_at,
                                 'context': context}}, (cp, o)) AS v FROM marked
        WHERE n = 1 OR val IS DISTINCT FROM prev GROUP BY k, col"""
    out = {}
    for k, col, v in con.execute(query).fetchall():
        out[(k, col)] = (v["cp"], v["o"], v["op"], pd.Timestamp(v["committed_at"]), v["context"])
    return out


def _gone_events(con: duckdb.DuckDBPyConnection, rel: str, layout: Layout) -> dict[str, tuple[Any, ...]]:
    """Per key, the last change that removed it (DELETE, key UPDATE away, or TRUNCATE)."""
    old_key = old_key_sql(layout.keys)
    query = f"""
        WITH gone AS (
            SELECT primary_key AS k, commit_position AS cp, ordinal AS o FROM {rel} WHERE operation = 'DELETE'
            UNION ALL
            SELECT ok, cp, o FROM (
                SELECT {old_key} AS ok, primary_key AS pk, commit_position AS cp, ordinal AS o
                FROM {rel} WHERE operation = 'UPDATE' AND CAST(before AS VARCHAR) <> '{{}}')
            WHERE ok IS NOT NULL AND ok IS DISTINCT FROM pk
        )
        SELECT g.k, c.operation, c.committed_at, CAST(c.context AS VARCHAR), c.commit_position, c.ordinal
        FROM (SELECT k, max((cp, o)) AS at FROM gone GROUP BY k) g
        JOIN {rel} c ON (c.commit_position, c.ordinal) = g.at"""
    out = {row[0]: row[1:] for row in con.execute(query).fetchall()}
    truncate = con.sql(
        f"SELECT operation, committed_at, CAST(context AS VARCHAR), commit_position, ordinal "
        f"FROM {rel} WHERE operation = 'TRUNCATE' ORDER BY commit_position DESC, ordinal DESC "
        "LIMIT 1"
    ).fetchall()
    truncate = _first(truncate)
    if truncate is not None:
        out = {k: v for k, v in out.items() if (v[3], v[4]) > (truncate[3], truncate[4])}
        out[""] = truncate
    return out


def diff(table: str, t1: Any, t2: Any, *, source: Any = None) -> pd.DataFrame:
    """The net difference of ``table`` between ``t1`` and ``t2``: one row per added, removed or changed cell.

    Indexed by the key and ``column``; ``change`` is ``added``/``removed``/``changed``; ``old``/``new`` hold
    the values; ``operation``, ``committed_at`` and the context keys say which change produced ``new``
    (for removed rows: the change that removed the row).
    """
    src = get_source(source)
    name = resolve_table(src, table)
    start, end = to_utc(t1, "t1"), to_utc(t2, "t2")
    if end < start:
        raise ConfigurationError(f"t2 {end.isoformat()} is before t1 {start.isoformat()}: swap them")
    con = _duck()
    old = state_at(src, name, start, con=con, name="c1")
    new = state_at(src, name, end, con=con, name="c2")
    layout = new.layout
    old_rows = dict(zip(old.keys, old.frame.itertuples(index=True, name=None), strict=False))
    new_rows = dict(zip(new.keys, new.frame.itertuples(index=True, name=None), strict=False))
    old_cols = ["__index__", *old.frame.columns]
    new_cols = ["__index__", *new.frame.columns]
    all_cols = list(dict.fromkeys([*new.frame.columns, *old.frame.columns]))
    origins = (
        _origins(src, name, layout, end, con)
        if old.keys != new.keys or old.positions != new.positions
        else {}
    )
    gone = _gone_events(con, '"o"', layout) if origins or set(old_rows) - set(new_rows) else {}
    records: list[dict[str, Any]] = []
    for k in list(dict.fromkeys([*new.keys, *old.keys])):
        o_row = dict(zip(old_cols, old_rows[k], strict=False)) if k in old_rows else None
        n_row = dict(zip(new_cols, new_rows[k], strict=False)) if k in new_rows else None
        if (
            o_row is not None
            and n_row is not None
            and old_cols == new_cols
            and all(_same(a, b) for a, b in zip(old_rows[k], new_rows[k], strict=False))
        ):
            continue
        index = (n_row or o_row)["__index__"]  # type: ignore[index]
        change = "added" if o_row is None else "removed" if n_row is None else "changed"
        for col in all_cols:
            before = o_row.get(col) if o_row else None
            after = n_row.get(col) if n_row else None
            if change == "changed" and _same(before, after):
                continue
            if change == "removed":
                event = gone.get(k) or gone.get("")
                op, at, ctx = (event[0], event[1], event[2]) if event else (None, None, None)
            else:
                origin = origins.get((k, col))
                op, at, ctx = (origin[2], origin[3], origin[4]) if origin else (None, None, None)
            records.append(
                {
                    "__index__": index,
                    "column": col,
                    "change": change,
                    "old": _plain(before),
                    "new": _plain(after),
                    "operation": op,
                    "committed_at": at,
                    "__ctx__": ctx,
                }
            )
    return _indexed_cells(records, layout, "diff")


def _indexed_cells(records: list[dict[str, Any]], layout: Layout, what: str) -> pd.DataFrame:
    keys = layout.keys or ["primary_key"]
    index_rows = [(*(r["__index__"] if len(keys) > 1 else (r["__index__"],)), r["column"]) for r in records]
    index = (
        pd.MultiIndex.from_tuples(index_rows, names=[*keys, "column"])
        if records
        else pd.MultiIndex.from_arrays([[] for _ in [*keys, "column"]], names=[*keys, "column"])
    )
    columns = (
        ["change", "old", "new", "operation", "committed_at"]
        if what == "diff"
        else ["value", "operation", "committed_at"]
    )
    data = {c: pd.Series([r[c] for r in records], index=index, dtype=object) for c in columns}
    frame = pd.DataFrame(data, index=index)
    frame["committed_at"] = pd.to_datetime(frame["committed_at"], utc=True).astype("datetime64[us, UTC]")
    for c in ("change", "operation"):
        if c in frame:
            frame[c] = frame[c].astype(pd.StringDtype())
    return _context_columns(frame, [r["__ctx__"] for r in records])


def blame(table: str, key: Any = None, *, source: Any = None) -> pd.DataFrame:
    """For every current row (or the one ``key``) and column: the value, and the change and context
    that last set it. Indexed by the key and ``column``."""
    src = get_source(source)
    name = resolve_table(src, table)
    con = _duck()
    state = state_at(src, name, None, con=con)
    layout = state.layout
    wanted = None if key is None else key_text(layout, key)
    origins = _origins(src, name, layout, None, con)
    cols = ["__index__", *state.frame.columns]
    records = []
    for k, row in zip(state.keys, state.frame.itertuples(index=True, name=None), strict=False):
        if wanted is not None and k != wanted:
            continue
        values = dict(zip(cols, row, strict=False))
        for col in state.frame.columns:
            origin = origins.get((k, col))
            op, at, ctx = (origin[2], origin[3], origin[4]) if origin else (None, None, None)
            records.append(
                {
                    "__index__": values["__index__"],
                    "column": col,
                    "value": _plain(values[col]),
                    "operation": op,
                    "committed_at": at,
                    "__ctx__": ctx,
                }
            )
    return _indexed_cells(records, layout, "blame")


def history(table: str, key: Any, *, source: Any = None) -> pd.DataFrame:
    """Every version of one row in commit order: ``operation``, ``committed_at``, ``valid_from``/``valid_to``
    (SCD type 2), ``changed`` (columns whose value changed), the row's values and its context keys.

    Key UPDATEs are followed: the row's versions under its earlier and later keys are included.
    """
    src = get_source(source)
    name = resolve_table(src, table)
    if key is None:
        raise ConfigurationError("history() needs the key of one row, e.g. history('todo', 1)")
    versions = _versions(src, name)
    layout = layout_at(versions, None)
    con = _duck()
    src.load(con, "h", Scope(table=name))
    if layout is None:
        sample = con.execute(
            "SELECT primary_key, CAST(after AS VARCHAR) FROM h WHERE operation IN "
            "('CREATE', 'UPDATE', 'SNAPSHOT') LIMIT 1000"
        ).fetchall()
        layout = _infer_layout([s[0] for s in sample], [s[1] for s in sample])
    wanted = key_text(layout, key)
    old_key = old_key_sql(layout.keys)
    rows = con.execute(f"""
        SELECT primary_key, {old_key} AS old_key, operation, commit_position, ordinal, committed_at,
               CAST(before AS VARCHAR), CAST(after AS VARCHAR), CAST(context AS VARCHAR)
        FROM h ORDER BY commit_position, ordinal""").fetchall()
    # follow the row through key updates, in both directions
    names = {wanted}
    for _ in range(100):
        grown = set(names)
        for r in rows:
            if r[2] == "UPDATE" and r[1] is not None and r[1] != r[0] and (r[0] in grown or r[1] in grown):
                grown |= {r[0], r[1]}
        if grown == names:
            break
        names = grown
    picked = []
    exists = False
    for r in rows:
        mine = r[0] in names or (r[2] == "UPDATE" and r[1] in names)
        if r[2] == "TRUNCATE":
            mine = exists
        if not mine:
            continue
        exists = r[2] in PRESENT
        picked.append(r)
    afters = [r[7] if r[2] in PRESENT else "{}" for r in picked]
    full = layout.columns
    values = frame_from_json(afters, [(c.name, c.kind) for c in full])
    changed: list[list[str]] = []
    previous: dict[str, Any] | None = None
    for i, r in enumerate(picked):
        row = {c.name: values[c.name].iloc[i] for c in full}
        if r[2] not in PRESENT:
            changed.append([])
            previous = None
            continue
        changed.append([c for c in row if previous is None or not _same(previous[c], row[c])])
        previous = row
    when = pd.Series(pd.to_datetime([r[5] for r in picked], utc=True), dtype="datetime64[us, UTC]")
    frame = pd.DataFrame(
        {
            "operation": pd.Series([r[2] for r in picked], dtype=pd.StringDtype()),
            "committed_at": when,
            "valid_from": when,
            "valid_to": when.shift(-1),
            "changed": pd.Series(changed, dtype=object),
            "commit_position": pd.Series([r[3] for r in picked], dtype=pd.Int64Dtype()),
            "ordinal": pd.Series([r[4] for r in picked], dtype=pd.Int32Dtype()),
        }
    )
    frame = pd.concat([frame, values], axis=1)
    return _context_columns(frame, [r[8] for r in picked])


def _audit_frame(
    src: Source, table: str | None, since: Any, until: Any, operation: Any, filters: dict[str, Any]
) -> pd.DataFrame:
    name = resolve_table(src, table) if table is not None else None
    start = to_utc(since, "since") if since is not None else None
    end = to_utc(until, "until") if until is not None else None
    if start is not None and end is not None and end < start:
        raise ConfigurationError(f"until {end.isoformat()} is before since {start.isoformat()}: swap them")
    con = _duck()
    src.load(con, "a", Scope(table=name, since=start, until_time=end))
    where = ["TRUE"]
    params: list[Any] = []
    if start is not None:
        where.append("committed_at >= ?")
        params.append(start.to_pydatetime())
    if end is not None:
        where.append("committed_at <= ?")
        params.append(end.to_pydatetime())
    if operation is not None:
        ops = [operation] if isinstance(operation, str) else list(operation)
        bad = [o for o in ops if o not in ("CREATE", "UPDATE", "DELETE", "TRUNCATE", "SNAPSHOT")]
        if bad:
            raise ConfigurationError(
                f"operation {bad!r} is unknown: use CREATE, UPDATE, DELETE, TRUNCATE or SNAPSHOT"
            )
        where.append("operation IN (" + ", ".join("?" for _ in ops) + ")")
        params += ops
    for k, value in filters.items():
        path = "/" + k.replace("~", "~0").replace("/", "~1")
        if value is None:
            where.append(
                "json_extract(context, ?) IS NULL OR CAST(json_extract(context, ?) AS VARCHAR) = 'null'"
            )
            params += [path, path]
        elif isinstance(value, str):
            where.append("json_extract_string(context, ?) = ?")
            params += [path, value]
        else:
            where.append("CAST(json_extract(context, ?) AS VARCHAR) = CAST(CAST(? AS JSON) AS VARCHAR)")
            params += [path, json_text(value)]
    return con.execute(
        f"""
        SELECT committed_at, "schema", "table", operation, primary_key, CAST(before AS VARCHAR) AS before,
               CAST(after AS VARCHAR) AS after, CAST(context AS VARCHAR) AS context, transaction_id,
               commit_position, ordinal
        FROM a WHERE {" AND ".join(f"({w})" for w in where)} ORDER BY commit_position, ordinal""",
        params,
    ).fetch_df()


def changes(
    table: str | None = None,
    since: Any = None,
    until: Any = None,
    *,
    operation: Any = None,
    source: Any = None,
) -> pd.DataFrame:
    """The raw change feed in commit order, ``before``/``after``/``context`` as dicts (numbers exact)."""
    frame = _audit_frame(get_source(source), table, since, until, operation, {})
    for col in ("before", "after", "context"):
        frame[col] = pd.Series([parse_json(v) for v in frame[col]], index=frame.index, dtype=object)
    return _finish_feed(frame)


def _finish_feed(frame: pd.DataFrame) -> pd.DataFrame:
    frame["committed_at"] = pd.to_datetime(frame["committed_at"], utc=True).astype("datetime64[us, UTC]")
    for col in ("schema", "table", "operation", "primary_key"):
        frame[col] = frame[col].astype(pd.StringDtype())
    for col, dtype in (
        ("transaction_id", pd.Int64Dtype()),
        ("commit_position", pd.Int64Dtype()),
        ("ordinal", pd.Int32Dtype()),
    ):
        frame[col] = frame[col].astype(dtype)
    return frame.reset_index(drop=True)


def _column_order(src: Source) -> dict[TableName, dict[str, int]]:
    """Per table, the position of each column in its latest column set (jsonb does not keep key order)."""
    raw = src.schemas()
    latest: dict[TableName, tuple[tuple[int, int], str]] = {}
    for sch, tab, cp, o, cols in zip(
        raw["schema"].to_pylist(),
        raw["table"].to_pylist(),
        raw["commit_position"].to_pylist(),
        raw["ordinal"].to_pylist(),
        raw["columns"].to_pylist(),
        strict=True,
    ):
        if (sch, tab) not in latest or latest[(sch, tab)][0] < (cp, o):
            latest[(sch, tab)] = ((cp, o), cols)
    return {t: {c["name"]: i for i, c in enumerate(json.loads(cols))} for t, (_, cols) in latest.items()}


def audit(
    table: str | None = None,
    since: Any = None,
    until: Any = None,
    *,
    operation: Any = None,
    source: Any = None,
    **context_filters: Any,
) -> pd.DataFrame:
    """Who changed what, from where: changes in commit order with ``changed`` columns and the context keys
    as columns. ``audit(user_id=187234)`` keeps the changes made with that context value (a string filter
    also matches a number with the same text, as the CLI's ``--where user_id=187234`` does)."""
    src = get_source(source)
    frame = _audit_frame(src, table, since, until, operation, context_filters)
    befores = [parse_json(v) for v in frame["before"]]
    afters = [parse_json(v) for v in frame["after"]]
    order = _column_order(src)
    changed = []
    for sch, tab, op, b, a in zip(
        frame["schema"], frame["table"], frame["operation"], befores, afters, strict=True
    ):
        if op == "UPDATE" and b:
            names = [k for k in a if b.get(k, a[k]) != a[k] or k not in b]
        elif op in ("CREATE", "SNAPSHOT", "UPDATE"):
            names = list(a)
        elif op == "DELETE":
            names = list(b)
        else:
            names = []
        rank: dict[str, int] = order.get((sch, tab), {})
        changed.append(sorted(names, key=lambda n: (rank.get(n, len(rank)), n)))
    contexts = list(frame["context"])
    frame["before"] = pd.Series(befores, index=frame.index, dtype=object)
    frame["after"] = pd.Series(afters, index=frame.index, dtype=object)
    frame.insert(5, "changed", pd.Series(changed, index=frame.index, dtype=object))
    frame = _finish_feed(frame.drop(columns=["context"]))
    return _context_columns(frame, contexts)
