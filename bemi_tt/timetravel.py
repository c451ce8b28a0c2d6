"""Time travel over ``changes``: ``as_of``, ``diff``, ``history``, ``blame`` (and ``audit``, ``changes``).

Every function reads one source (``source=``, else :func:`bemi_tt.connect`'s, else ``$BEMI_TT_SOURCE``),
lets DuckDB find the versions it needs (:mod:`bemi_tt.state`), and returns a plain pandas DataFrame typed
like the table (see :mod:`bemi_tt.dtypes`). Order is always commit order ``(commit_position, ordinal)``,
never time: ``as_of(t)`` is the state after the longest prefix of the table's commits whose
``committed_at <= t``.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from bemi_tt.arguments import KeyLike, SourceLike, TimeLike, check_key
from bemi_tt.dtypes import frame_from_json, parse_json
from bemi_tt.feed import _context_columns, audit, changes
from bemi_tt.origins import cell_origins, origin_of
from bemi_tt.rule import DUCKDB, MOVED, PRESENT, Rule
from bemi_tt.sources import Scope, Source, TableName, get_source, json_text
from bemi_tt.staleness import answer
from bemi_tt.state import (
    KEY_LOOKUP_LIMIT,
    Column,
    Layout,
    Relation,
    _columns_arg,
    _duck,
    _first,
    _infer_layout,
    check_gap,
    earlier_keys,
    key_eras,
    key_text,
    layout_at,
    load_lineage,
    load_relation,
    relation_at,
    renamed_columns,
    resolve_table,
    state_at,
)
from bemi_tt.timestamps import to_utc
from capture.errors import ConfigurationError

__all__ = ["as_of", "audit", "blame", "changes", "diff", "history"]

_NAT = np.iinfo(np.int64).min  # NaT as int64


@answer(now="ts")
def as_of(
    table: str,
    ts: TimeLike,
    *,
    key: KeyLike | None = None,
    columns: Sequence[str] | str | None = None,
    source: SourceLike | None = None,
) -> pd.DataFrame:
    """The rows of ``table`` after every transaction committed at or before ``ts``, indexed by primary key.

    ``ts``: datetime (naive means UTC), ISO 8601 string or pandas Timestamp. ``key=`` keeps one row,
    ``columns=`` some columns. Columns and dtypes are those the table had at ``ts``.
    """
    src = get_source(source)
    name = resolve_table(src, table)
    when = to_utc(ts)
    relation = relation_at(src, name, when)  # the relation the name denotes at ``ts``
    key = check_key(src, name, key, ts=when) if key is not None else None
    con = _duck()
    wanted: str | None = None
    if key is not None:
        layout = layout_at(list(relation.versions), when) or Layout(())
        wanted = key_text(layout, key) if layout.keys or isinstance(key, str) else str(key)
    state = state_at(src, name, when, key=wanted, con=con, relation=relation)
    frame = state.frame
    picked = _columns_arg(columns, state.layout)
    return frame[picked] if picked is not None else frame


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or value is pd.NaT


def _nan(value: Any) -> bool:
    return (isinstance(value, float) and value != value) or (isinstance(value, Decimal) and value.is_nan())


def _same(a: Any, b: Any) -> bool:
    """Equal as PostgreSQL compares them: NULL only equals NULL, NaN equals NaN (float and numeric)."""
    if _missing(a) or _missing(b):
        return _missing(a) and _missing(b)
    if _nan(a) or _nan(b):
        return _nan(a) and _nan(b)
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


def _nan_is_null(frame: pd.DataFrame) -> set[str]:
    """The columns whose dtype shows NULL as NaN (numpy floats; a float column holding NaN is Arrow)."""
    return {c for c, t in frame.dtypes.items() if isinstance(t, np.dtype) and t.kind == "f"}


def _plain(value: Any, nan_is_null: bool = False) -> Any:
    """A cell as diff/blame return it: None for NULL, every other value as the frame holds it."""
    if _missing(value) or (nan_is_null and isinstance(value, float) and value != value):
        return None
    return value


def _gone_events(con: duckdb.DuckDBPyConnection, rel: str, layout: Layout) -> dict[str, tuple[Any, ...]]:
    """Per key, the last change that removed it (DELETE, key UPDATE away, or TRUNCATE)."""
    gone = Rule(DUCKDB, tuple(layout.keys), moved=MOVED).gone(rel)
    query = gone.with_("last_gone", gone.select).then(
        "SELECT g.k, c.operation, epoch_us(c.committed_at), CAST(c.context AS VARCHAR),\n"
        "       c.commit_position, c.ordinal\n"
        f"FROM last_gone g JOIN {rel} c ON c.commit_position = g.cp AND c.ordinal = g.o"
    )
    out = {row[0]: row[1:] for row in con.execute(query.sql()).fetchall()}
    truncate = con.sql(
        f"SELECT operation, epoch_us(committed_at), CAST(context AS VARCHAR), commit_position, ordinal "
        f"FROM {rel} WHERE operation = 'TRUNCATE' ORDER BY commit_position DESC, ordinal DESC "
        "LIMIT 1"
    ).fetchall()
    truncate = _first(truncate)
    if truncate is not None:
        out = {k: v for k, v in out.items() if (v[3], v[4]) > (truncate[3], truncate[4])}
        out[""] = truncate
    return out


def _rows_of(state: Any, wanted: set[str]) -> dict[str, tuple[Any, ...]]:
    """``primary_key`` text → (index, *values) of the state's rows whose key is in ``wanted`` (only those
    rows are turned into Python values)."""
    keys = state.key_texts
    picked = [i for i, k in enumerate(keys.tolist()) if k in wanted]
    rows = state.frame.iloc[picked].itertuples(index=True, name=None)
    return {str(keys[i]): row for i, row in zip(picked, rows, strict=True)}


@answer(now="t2")
def diff(table: str, t1: TimeLike, t2: TimeLike, *, source: SourceLike | None = None) -> pd.DataFrame:
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
    then, now = relation_at(src, name, start), relation_at(src, name, end)
    same = then.oid == now.oid and then.simple and now.simple
    only = _changed_keys(src, name, start, end, con) if same else None
    old = state_at(src, name, start, only=only, con=con, name="c1", relation=then)
    new = state_at(src, name, end, only=only, con=con, name="c2", relation=now)
    if then.oid is not None and then.oid == now.oid:  # one relation: a renamed column is the same column
        renames = renamed_columns(now, start, end)
        old.frame = old.frame.rename(columns=renames)
        old.frame.index = old.frame.index.rename(
            [renames.get(str(n), n) for n in old.frame.index.names]
            if isinstance(old.frame.index, pd.MultiIndex)
            else renames.get(str(old.frame.index.name), old.frame.index.name)
        )
    layout = new.layout
    if not layout.keys and not layout.inferred:
        return _keyless_diff(src, name, old, new, end, con, now)
    old_cols = ["__index__", *old.frame.columns]
    new_cols = ["__index__", *new.frame.columns]
    all_cols = list(dict.fromkeys([*new.frame.columns, *old.frame.columns]))
    # a key whose row comes from the same change at both times is unchanged (unless the columns changed)
    old_at = dict(zip(old.keys, old.positions, strict=True))
    new_at = dict(zip(new.keys, new.positions, strict=True))
    touched = [
        k
        for k in dict.fromkeys([*new.keys, *old.keys])
        if old_cols != new_cols or old_at.get(k) != new_at.get(k)
    ]
    if not touched:
        return _indexed_cells([], layout, "diff")
    wanted = set(touched)
    old_rows = _rows_of(old, wanted)
    new_rows = _rows_of(new, wanted)
    origins = cell_origins(src, name, layout, end, con, keys=touched, relation=now)
    gone = _gone_events(con, '"o"', layout) if set(old_rows) - set(new_rows) else {}
    records: list[dict[str, Any]] = []
    old_nan, new_nan = _nan_is_null(old.frame), _nan_is_null(new.frame)
    old_pos = {c: i for i, c in enumerate(old_cols)}
    new_pos = {c: i for i, c in enumerate(new_cols)}
    for k in touched:  # an unchanged row gives no cell (every column compares the same)
        o_row, n_row = old_rows.get(k), new_rows.get(k)
        index = (n_row or o_row)[0]  # type: ignore[index]
        change = "added" if o_row is None else "removed" if n_row is None else "changed"
        if change == "removed":
            event = gone.get(k) or gone.get("")
            removal = (event[0], event[1], event[2]) if event else (None, None, None)
        for col in all_cols:
            before = after = None
            if o_row is not None and col in old_pos:
                before = _plain(o_row[old_pos[col]], col in old_nan)
            if n_row is not None and col in new_pos:
                after = _plain(n_row[new_pos[col]], col in new_nan)
            if change == "changed" and _same(before, after):
                continue
            if change == "removed":
                op, at, ctx = removal
            else:
                origin = origin_of(origins, layout, k, col)
                op, at, ctx = (origin[2], origin[3], origin[4]) if origin else (None, None, None)
            records.append(
                {
                    "__index__": index,
                    "column": col,
                    "change": change,
                    "old": before,
                    "new": after,
                    "operation": op,
                    "committed_at": at,
                    "__ctx__": ctx,
                }
            )
    return _indexed_cells(records, layout, "diff")


def _changed_keys(
    source: Source, table: TableName, start: pd.Timestamp, end: pd.Timestamp, con: duckdb.DuckDBPyConnection
) -> list[str] | None:
    """The keys a change between the cuts at ``start`` and ``end`` touched (their old keys too), or None
    when the whole table must be compared (a TRUNCATE or a column change between, no primary key, or too
    many keys): ``diff`` then reads only those keys' changes."""
    versions = list(relation_at(source, table, end).versions)
    layout = layout_at(versions, end)
    if layout is None or not layout.keys or layout != layout_at(versions, start):
        return None
    first = source.cut(table, start)
    if first is None:
        return []  # nothing committed after ``start``
    window = Scope(
        table=table,
        until=end,
        start=first,
        columns=("primary_key", "operation", "commit_position", "ordinal", MOVED),
    )
    source.load(con, "window", window)
    if con.execute("SELECT count(*) FROM \"window\" WHERE operation = 'TRUNCATE'").fetchall() != [(0,)]:
        return None
    moves = Rule(DUCKDB, tuple(layout.keys), moved=MOVED).moves('"window"')
    rows = con.execute(
        'SELECT DISTINCT k FROM (SELECT primary_key AS k FROM "window" WHERE primary_key IS NOT NULL\n'
        f"UNION ALL SELECT k FROM ({moves}))"
    ).fetchall()
    keys = sorted(str(r[0]) for r in rows)
    return keys if len(keys) <= KEY_LOOKUP_LIMIT else None


def _keyless_diff(
    source: Source,
    table: TableName,
    old: Any,
    new: Any,
    end: pd.Timestamp,
    con: duckdb.DuckDBPyConnection,
    relation: Relation,
) -> pd.DataFrame:
    """``diff`` of a table without a primary key: rows pair by content (a row kept from the same change at
    both times is unchanged); a new row made by an UPDATE whose ``before`` is a vanished row is that row
    changed; every cell carries the change that made it (for a vanished row: the change that removed it)."""
    load_relation(
        source,
        con,
        "kd",
        Scope(
            table=table,
            until=end,
            columns=("operation", "before", "after", "context", "commit_position", "ordinal", "committed_at"),
        ),
        relation,
        end,
    )
    kept = set(old.keys) & set(new.keys)
    removed = [i for i, k in enumerate(old.keys) if k not in kept]
    added = [i for i, k in enumerate(new.keys) if k not in kept]
    changes = {
        f"{cp}:{o}": (op, at, ctx, before, after, (cp, o))
        for op, at, ctx, before, after, cp, o in con.sql(
            "SELECT operation, epoch_us(committed_at), CAST(context AS VARCHAR), CAST(before AS VARCHAR),"
            " CAST(after AS VARCHAR), commit_position, ordinal FROM kd ORDER BY commit_position, ordinal"
        ).fetchall()
    }
    texts = {i: changes[old.keys[i]][4] for i in removed if old.keys[i] in changes}
    used: set[str] = set()
    records: list[dict[str, Any]] = []
    old_rows = list(old.frame.itertuples(index=False, name=None))
    new_rows = list(new.frame.itertuples(index=False, name=None))
    unpaired = list(removed)
    cols = list(new.frame.columns)
    for j in added:
        k = new.keys[j]
        op, at, ctx, before, _, _ = changes[k]
        match = next((i for i in unpaired if op == "UPDATE" and texts.get(i) == before), None)
        if match is not None:
            unpaired.remove(match)
            used.add(k)
        for c, col in enumerate(cols):
            after_value = _plain(new_rows[j][c])
            before_value = _plain(old_rows[match][c]) if match is not None and col in old.frame else None
            if match is not None and _same(before_value, after_value):
                continue
            records.append(
                {
                    "__index__": k,
                    "column": col,
                    "change": "changed" if match is not None else "added",
                    "old": before_value,
                    "new": after_value,
                    "operation": op,
                    "committed_at": at,
                    "__ctx__": ctx,
                }
            )
    for i in unpaired:  # the first later DELETE/UPDATE whose before is the row (or a TRUNCATE) removed it
        k = old.keys[i]
        position = changes[k][5] if k in changes else (0, 0)
        event = next(
            (
                (key, v)
                for key, v in changes.items()
                if v[5] > position
                and key not in used
                and (v[0] == "TRUNCATE" or (v[0] in ("UPDATE", "DELETE") and v[3] == texts.get(i)))
            ),
            None,
        )
        if event is not None and event[1][0] != "TRUNCATE":
            used.add(event[0])
        op, at, ctx = (event[1][0], event[1][1], event[1][2]) if event else (None, None, None)
        for c, col in enumerate(old.frame.columns):
            records.append(
                {
                    "__index__": k,
                    "column": col,
                    "change": "removed",
                    "old": _plain(old_rows[i][c]),
                    "new": None,
                    "operation": op,
                    "committed_at": at,
                    "__ctx__": ctx,
                }
            )
    return _indexed_cells(records, new.layout, "diff")


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
    # committed_at arrives as epoch microseconds (None: unknown)
    micros = np.array(
        [_NAT if r["committed_at"] is None else r["committed_at"] for r in records], dtype=np.int64
    ).view("datetime64[us]")
    frame["committed_at"] = pd.Series(micros, index=index).dt.tz_localize("UTC")
    for c in ("change", "operation"):
        if c in frame:
            frame[c] = frame[c].astype(pd.StringDtype())
    return _context_columns(frame, [r["__ctx__"] for r in records])


@answer()
def blame(table: str, key: KeyLike | None = None, *, source: SourceLike | None = None) -> pd.DataFrame:
    """For every current row (or the one ``key``) and column: the value, and the change and context
    that last set it. Indexed by the key and ``column``."""
    src = get_source(source)
    name = resolve_table(src, table)
    relation = relation_at(src, name, None)
    key = check_key(src, name, key) if key is not None else None
    con = _duck()
    wanted = None
    if key is not None:
        known = layout_at(list(relation.versions), None) or Layout(())
        wanted = key_text(known, key) if known.keys or isinstance(key, str) else str(key)
    state = state_at(src, name, None, con=con, key=wanted, relation=relation)
    layout = state.layout
    origins = cell_origins(
        src, name, layout, None, con, keys=None if wanted is None else [wanted], relation=relation
    )
    cols = ["__index__", *state.frame.columns]
    nan_null = _nan_is_null(state.frame)
    records = []
    for k, row in zip(state.keys, state.frame.itertuples(index=True, name=None), strict=False):
        if wanted is not None and k != wanted:
            continue
        values = dict(zip(cols, row, strict=False))
        for col in state.frame.columns:
            origin = origin_of(origins, layout, k, col)
            op, at, ctx = (origin[2], origin[3], origin[4]) if origin else (None, None, None)
            records.append(
                {
                    "__index__": values["__index__"],
                    "column": col,
                    "value": _plain(values[col], col in nan_null),
                    "operation": op,
                    "committed_at": at,
                    "__ctx__": ctx,
                }
            )
    return _indexed_cells(records, layout, "blame")


@answer()
def history(table: str, key: KeyLike, *, source: SourceLike | None = None) -> pd.DataFrame:
    """Every version of one row in commit order: ``operation``, ``committed_at``, ``valid_from``/``valid_to``
    (SCD type 2), ``changed`` (columns whose value changed), the row's values and its context keys.

    Key UPDATEs are followed: the row's versions under its earlier and later keys are included.
    """
    src = get_source(source)
    name = resolve_table(src, table)
    if key is None:
        raise ConfigurationError("history() needs the key of one row, e.g. history('todo', 1)")
    key = check_key(src, name, key)
    relation = relation_at(src, name, None)
    check_gap(relation, None, name)
    versions = list(relation.versions)
    layout = layout_at(versions, None)
    con = _duck()
    if layout is None:
        load_relation(src, con, "h", Scope(table=name), relation)
        sample = con.execute(
            "SELECT primary_key, CAST(after AS VARCHAR) FROM h WHERE operation IN "
            "('CREATE', 'UPDATE', 'SNAPSHOT') LIMIT 1000"
        ).fetchall()
        layout = _infer_layout([s[0] for s in sample], [s[1] for s in sample])
        wanted = key_text(layout, key)
    else:  # only the row's changes under each key it had, and the TRUNCATEs
        wanted = key_text(layout, key)
        load_lineage(src, con, "h", Scope(table=name), [wanted], layout, relation)
    rule = Rule(DUCKDB, tuple(layout.keys), moved=MOVED)
    old_key = rule.old_key_of()
    # follow the row through key updates, in both directions
    moves = [(pk, old) for old, pk, _, _ in con.sql(rule.moves("h")).fetchall()]
    names = {wanted}
    for _ in range(100):
        grown = set(names)
        for pk, old in moves:
            if pk in grown or old in grown:
                grown |= {pk, old}
        if grown == names:
            break
        names = grown
    names |= earlier_keys(con, "h", key_eras(relation, None), layout, names)  # before a primary key change
    con.register("h_names", pa.table({"k": pa.array(sorted(names), pa.string())}))
    rows = con.sql(f"""
        SELECT primary_key, {old_key} AS old_key, operation, commit_position, ordinal, committed_at,
               CAST(before AS VARCHAR), CAST(after AS VARCHAR), CAST(context AS VARCHAR)
        FROM h WHERE primary_key IN (SELECT k FROM h_names) OR operation = 'TRUNCATE'
        ORDER BY commit_position, ordinal""").fetchall()
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
    picked = _with_fills(picked, layout)
    afters = [r[7] if r[2] in PRESENT or r[2] == "ALTER" else "{}" for r in picked]
    full = layout.columns
    values = frame_from_json(afters, [(c.name, c.kind) for c in full])
    changed: list[list[str]] = []
    previous: dict[str, Any] | None = None
    for i, r in enumerate(picked):
        row = {c.name: values[c.name].iloc[i] for c in full}
        if r[2] not in PRESENT and r[2] != "ALTER":
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


def _with_fills(picked: list[Any], layout: Layout) -> list[Any]:
    """The row's versions with one ``ALTER`` version per schema change that filled added columns while the
    row existed: the previous values plus the fills (a fill is an event of its ALTER, not of older rows)."""
    alters: dict[tuple[int, int], list[Column]] = {}
    for column in layout.columns:
        if column.since is not None and column.since_at is not None:
            alters.setdefault(column.since, []).append(column)
    if not alters:
        return picked
    out: list[Any] = []
    pending = sorted(alters)
    for r in [*picked, None]:
        while pending and (r is None or (r[3], r[4]) > pending[0]):
            since = pending.pop(0)
            last = out[-1] if out else None
            if last is None or (last[2] not in PRESENT and last[2] != "ALTER"):
                continue  # the row did not exist when the column was added
            row = parse_json(last[7])
            for column in alters[since]:
                if column.name not in row:
                    row[column.name] = None if column.fill is None else parse_json(column.fill)
            at = alters[since][0].since_at
            out.append((last[0], None, "ALTER", since[0], since[1], at, "{}", json_text(row), "{}"))
        if r is not None:
            out.append(r)
    return out
