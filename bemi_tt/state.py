"""The rows of a table at a point of its history, as DuckDB finds them: the engine under ``as_of``.

A table's column sets come from ``changes_schemas`` (or are inferred from the rows when a source has
none); each key's last change up to a cut is one ``arg_max`` over ``(commit_position, ordinal)``; key
UPDATEs (the old key, read from ``before``) and TRUNCATEs remove the keys they made disappear. Order is
always commit order, never time: ``state_at(t)`` is the state after the longest prefix of the table's
commits whose ``committed_at <= t``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from bemi_tt.dtypes import (
    ColumnType,
    column_type,
    frame_from_json,
    infer_type,
    parse_json,
    spec_type,
    typed_rows,
    typed_series,
)
from bemi_tt.rule import DUCKDB, PRESENT, Rule
from bemi_tt.sources import Scope, Source, TableName, json_text
from capture.errors import ConfigurationError

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
def _quoted_parts(name: str) -> list[str] | None:
    """``public."my.table"`` → ``["public", "my.table"]``: a dotted list of identifiers, double-quoted ones
    with ``""`` for a quote, unquoted ones as written; None when ``name`` is not of that form."""
    parts: list[str] = []
    i = 0
    while True:
        if name.startswith('"', i):
            part, i = "", i + 1
            while True:
                close = name.find('"', i)
                if close < 0:
                    return None
                part += name[i:close]
                if name.startswith('"', close + 1):
                    part, i = part + '"', close + 2
                    continue
                i = close + 1
                break
        else:
            stop = name.find(".", i)
            part = name[i:] if stop < 0 else name[i:stop]
            if not part or '"' in part:
                return None
            i += len(part)
        parts.append(part)
        if i == len(name):
            return parts if len(parts) <= 2 else None
        if name[i] != ".":
            return None
        i += 1


def _identifier(text: str) -> str:
    return (
        text
        if text and '"' not in text and "." not in text and text.strip() == text
        else ('"' + text.replace('"', '""') + '"')
    )


def _readings(name: str) -> list[tuple[str | None, str]]:
    """Every (schema or None for any, table) that ``name`` can mean: the whole text as a table name, the
    text split at one of its dots, and the quoted-identifier reading (``public."my.table"``)."""
    readings: list[tuple[str | None, str]] = [(None, name)]
    readings += [(name[:i], name[i + 1 :]) for i, ch in enumerate(name) if ch == "."]
    quoted = _quoted_parts(name) if '"' in name else None
    if quoted is not None:
        readings.append((None, quoted[0]) if len(quoted) == 1 else (quoted[0], quoted[1]))
    return readings


def _matches(readings: list[tuple[str | None, str]], tables: list[TableName]) -> list[TableName]:
    found: list[TableName] = []
    for schema, bare in readings:
        for candidate in tables:
            if candidate[1] == bare and (schema is None or candidate[0] == schema) and candidate not in found:
                found.append(candidate)
    return found


def _pick(name: str, found: list[TableName]) -> TableName | None:
    """The one table ``found`` for ``name``; a bare name in several schemas means public's, as in
    PostgreSQL's default search path; None when ambiguous."""
    if len(found) == 1:
        return found[0]
    public = [c for c in found if c[0] == "public" and c[1] == name]
    if public and all(c[1] == name for c in found):
        return public[0]
    return None


def table_label(table: TableName, known: list[TableName] | None = None) -> str:
    """How errors name a table: ``todo`` (schema public), ``app.todo``, quoted where a name holds a dot or a
    quote (``public."my.table"``), fully quoted (``"my"."table"``) where a shorter label would also name
    another of the ``known`` tables; :func:`resolve_table` reads each label back to that one table."""
    schema, name = table
    if _identifier(schema) == schema and _identifier(name) == name:
        label = name if schema == "public" else f"{schema}.{name}"
    else:
        label = f"{_identifier(schema)}.{_identifier(name)}"
    if known is not None and _pick(label, _matches(_readings(label), known)) != table:
        label = '"' + schema.replace('"', '""') + '"."' + name.replace('"', '""') + '"'
    return label


def resolve_table(source: Source, table: str) -> TableName:
    """A table name → ``(schema, table)``, exactly: ``todo`` (any schema, public first), ``schema.todo``,
    a name holding dots as it is (``my.table``) or quoted (``public."my.table"``); unknown or ambiguous
    names are a :class:`ConfigurationError` listing the names that work."""
    if isinstance(table, str) and "\x00" in table:
        raise ConfigurationError(
            f"table {table!r} holds a NUL character, which no PostgreSQL name can: pass the table's name, "
            "such as 'todo' or 'public.todo'"
        )
    if not isinstance(table, str) or not table.strip():
        raise ConfigurationError(f"table must be a table name such as 'todo' or 'public.todo', got {table!r}")
    name = table.strip() if table.strip() != table and not source.tables(table) else table
    readings = _readings(name)
    # ask the source only about the table names the text can mean (an index lookup each on PostgreSQL)
    tables = sorted({t for bare in dict.fromkeys(b for _, b in readings) for t in source.tables(bare)})
    found = _matches(readings, tables)
    picked = _pick(name, found)
    if picked is not None:
        return picked
    if found:
        every = source.tables()
        raise ConfigurationError(
            f"table {table!r} is ambiguous: it names {', '.join(table_label(c, every) for c in found)}; "
            "pass one of these"
        )
    every = source.tables()
    known = ", ".join(table_label(t, every) for t in every) or "none"
    raise ConfigurationError(f"unknown table {table!r}: the source has changes for: {known}")


@dataclass(frozen=True)
class Column:
    """A column as ``changes_schemas`` describes it at some point of history."""

    name: str
    kind: ColumnType
    key: bool
    since: tuple[int, int] | None  # rows last changed before this took ``fill`` (column added later)
    fill: str | None  # JSON text
    since_at: pd.Timestamp | None = None  # when the ALTER that added it (the fill's event) committed


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
    return versions_of(source.schemas(table))


def versions_of(raw: pa.Table) -> list[Version]:
    """The column sets of rows of ``changes_schemas`` (one table's), in commit order."""
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
        since_at: pd.Timestamp | None = None
        fill: str | None = None
        for i in range(len(valid) - 1, -1, -1):
            found = next((c for c in valid[i][2] if c["name"] == name), None)
            if found is None:
                break
            if i == 0:
                since, since_at, fill = None, None, None
            else:
                since, since_at = valid[i][0], valid[i][1]
                fill = json.dumps(found["fill"]) if "fill" in found else None
        if since is not None and all(any(c["name"] == name for c in v[2]) for v in valid):
            since = since_at = None
        columns.append(Column(name, spec_type(spec), bool(spec.get("key")), since, fill, since_at))
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


# -- the SQL that finds current versions: composed from the rule ------------------------------------
def _pointer(name: str) -> str:
    return "'/" + name.replace("~", "~0").replace("/", "~1").replace("'", "''") + "'"


def latest_sql(rel: str, old_key: str, payload: str = "after", _updates: str = "") -> str:
    """SELECT k, cp, o, payload of every key present after all of ``rel``'s changes, where ``old_key`` is a
    column or expression holding each UPDATE's old key (the PostgreSQL source's callback)."""
    return Rule(DUCKDB, (), old_key).present(rel, payload).sql()


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


def _values(series: pd.Series) -> list[Any]:
    """A column's values as :func:`typed_series` takes them: None for NULL (NaN is NULL only in float64)."""
    if isinstance(series.dtype, np.dtype) and series.dtype.kind == "f":
        return [None if v != v else v for v in series.tolist()]
    return [None if v is None or v is pd.NA or v is pd.NaT else v for v in series.tolist()]


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
            fill = (
                None
                if column.fill is None
                else frame_from_json(['{"v":' + column.fill + "}"], [("v", column.kind)])["v"].iloc[0]
            )
            values = [fill if old else v for v, old in zip(_values(frame[column.name]), stale, strict=True)]
            frame[column.name] = typed_series(values, column.kind).set_axis(frame.index)
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
    only: Sequence[str] | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
    name: str = "c",
) -> State:
    """Load ``table``'s changes up to ``ts`` (None: all) and compute the typed rows present then; ``key``
    or ``only`` (``primary_key`` texts) keep those rows, and only what decides them is read."""
    con = con or _duck()
    versions = _versions(source, table)
    layout = layout_at(versions, ts)
    keys = layout.keys if layout else []
    scope = Scope(
        table=table,
        until=ts,
        columns=("primary_key", "operation", "before", "after", "commit_position", "ordinal"),
    )
    wanted = [key] if key is not None else list(only) if only is not None else None
    if wanted is not None and keys:  # a key lookup: DuckDB pushes the key filter into its scan and
        # aggregate; a source that can reads only the keys' changes, TRUNCATEs and moves away
        keyed = replace(scope, keys=tuple(wanted), key_columns=tuple(keys))
        source.load(con, name, keyed if "keys" in source.pushdown else scope)
        if len(wanted) <= 1000:  # literals: DuckDB pushes them into the scan and the aggregate
            keep = f"latest.k IN ({', '.join(_sql_text(k) for k in wanted) or 'NULL'})"
        else:
            con.register(f"{name}_wanted", pa.table({"k": pa.array(wanted, pa.string())}))
            keep = f'latest.k IN (SELECT k FROM "{name}_wanted")'
        query = Rule(DUCKDB, tuple(keys)).present(f'"{name}"', keep=keep).sql()
        key = None
    elif layout is not None and not keys:  # a table without a primary key: rows are matched by content
        source.load(con, name, scope)
        con.register(f"{name}_keyless", _keyless_rows(con, f'"{name}"'))
        query = f'SELECT * FROM "{name}_keyless"'
    elif "present" in source.pushdown:  # the source finds the present rows itself (PostgreSQL)
        source.present(con, f"{name}_latest", scope, keys)
        query = f'SELECT * FROM "{name}_latest"'
    else:
        source.load(con, name, scope)
        query = Rule(DUCKDB, tuple(keys)).present(f'"{name}"').sql()
    if key is not None:
        query = f"SELECT * FROM ({query}) WHERE k = {_sql_text(key)}"
    if layout is not None:  # typed column by column in DuckDB (Arrow or Python only where needed)
        rows, frame = typed_rows(con, query, [(c.name, c.kind) for c in layout.columns])
        if ts is not None and rows.num_rows == 0:
            _check_start(source, table, ts, versions)
        return _typed(layout, rows, frame)
    rows = con.sql(query).to_arrow_table()
    if ts is not None and rows.num_rows == 0:
        _check_start(source, table, ts, versions)
    afters = [str(a) for a in rows["payload"].to_pylist()]
    layout = _infer_layout([str(k) for k in rows["k"].to_pylist()], afters)
    frame = frame_from_json(afters, [(c.name, c.kind) for c in layout.columns])
    assert layout is not None
    return _typed(layout, rows, frame)


#: Up to this many keys, a lookup reads only what decides them; more read the whole table.
KEY_LOOKUP_LIMIT = 10_000


def load_lineage(
    source: Source,
    con: duckdb.DuckDBPyConnection,
    name: str,
    scope: Scope,
    keys: Sequence[str],
    layout: Layout,
) -> set[str]:
    """Load into view ``name`` the changes in ``scope`` that decide ``keys`` and every key they were moved
    from or to (followed until no key UPDATE adds one); returns those keys. Too many keys, a table without
    a known key, or a source without the ``"keys"`` push-down load the whole ``scope`` (an empty set)."""
    if not layout.keys or len(keys) > KEY_LOOKUP_LIMIT or "keys" not in source.pushdown:
        source.load(con, name, scope)
        return set()
    rule = Rule(DUCKDB, tuple(layout.keys))
    names, rel = set(keys), '"' + name.replace('"', '""') + '"'
    for _ in range(100):
        source.load(con, name, replace(scope, keys=tuple(sorted(names)), key_columns=rule.keys))
        moved = con.sql(f"SELECT k, to_k FROM ({rule.moves(rel)})").fetchall()
        grown = names | {k for pair in moved if pair[0] in names or pair[1] in names for k in pair}
        if grown == names:
            return names
        if len(grown) > KEY_LOOKUP_LIMIT:
            break
        names = grown
    source.load(con, name, scope)
    return set()


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
    first = source.first_commit(table)
    starts = [first] if first is not None else []
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
