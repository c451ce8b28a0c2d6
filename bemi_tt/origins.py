"""Which change set each cell: the origins under ``blame`` and ``diff``, composed from the rule.

A cell's origin is the last change of the row's current life whose value of that column differs from the
version before it. The life follows the row back across the key UPDATEs that made its key (a renumbering
sets only the key), and a value an added column's fill gave rows that existed then is the ALTER's: no
change before the ALTER sets that column, and a cell no change set since is credited to the ALTER.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from bemi_tt.rule import DUCKDB, MOVED, PRESENT, Query, Rule
from bemi_tt.sources import Scope, Source, TableName
from bemi_tt.state import Column, Layout, Relation, _pointer, _sql_text, load_lineage, load_relation

__all__ = ["Origin", "cell_origins", "origin_of", "origins_query"]

#: An origin: (commit_position, ordinal, operation, committed_at as epoch microseconds, context JSON).
Origin = tuple[Any, ...]


def _lineage(
    con: duckdb.DuckDBPyConnection, rule: Rule, rel: str
) -> list[tuple[str, str, tuple[int, int] | None, tuple[int, int] | None]]:
    """``(k, src, lo, hi)``: the versions of key ``src`` between positions ``lo`` and ``hi`` (exclusive,
    None: unbounded) belong to the current life of key ``k``, following ``k`` back across the key UPDATEs
    that made it (only keys such a move touched; every other key is its own lineage)."""
    moves = con.sql(rule.moves(rel)).fetchall()
    if not moves:
        return []
    arrivals: dict[str, list[tuple[tuple[int, int], str]]] = {}
    for old, new, cp, o in moves:
        arrivals.setdefault(new, []).append(((cp, o), old))
    involved = {m[0] for m in moves} | {m[1] for m in moves}
    con.register("lineage_keys", pa.table({"k": pa.array(sorted(involved), pa.string())}))
    removals: dict[str, list[tuple[int, int]]] = {}
    query = rule.gone(rel).then("SELECT k, cp, o FROM removals WHERE k IN (SELECT k FROM lineage_keys)")
    for k, cp, o in con.sql(query.sql()).fetchall():
        removals.setdefault(k, []).append((cp, o))

    def last_before(positions: list[tuple[int, int]], hi: tuple[int, int] | None) -> tuple[int, int] | None:
        earlier = [p for p in positions if hi is None or p < hi]
        return max(earlier) if earlier else None

    out: list[tuple[str, str, tuple[int, int] | None, tuple[int, int] | None]] = []
    for final in sorted({m[1] for m in moves}):
        src, hi = final, None
        for _ in range(len(moves) + 1):
            lo = last_before(removals.get(src, []), hi)
            out.append((final, src, lo, hi))
            came = [
                a for a in arrivals.get(src, []) if (lo is None or a[0] > lo) and (hi is None or a[0] < hi)
            ]
            if not came:
                break
            arrival = max(came)
            hi, src = arrival[0], arrival[1]
    return out


def cell_origins(
    source: Source,
    table: TableName,
    layout: Layout,
    ts: pd.Timestamp | None,
    con: duckdb.DuckDBPyConnection,
    name: str = "o",
    keys: Sequence[str] | None = None,
    relation: Relation | None = None,
) -> dict[tuple[str, str], Origin]:
    """For every present (key, column): the change that last set its value; across key UPDATEs the row's
    earlier keys count, and a value an added column's fill gave is the ALTER's (see :func:`origin_of`).
    ``keys`` limits the work to those primary keys (and reads only what decides them)."""
    scope = Scope(
        table=table,
        until=ts,
        columns=(
            "primary_key",
            MOVED,  # key moves from the worker's old key: no ``before`` image is read
            "operation",
            "after",
            "context",
            "commit_position",
            "ordinal",
            "committed_at",
        ),
    )
    if keys is None:
        if relation is not None:  # under every name it had, columns named as at ``ts``
            load_relation(source, con, name, scope, relation, ts)
        else:
            source.load(con, name, scope)
    else:
        load_lineage(source, con, name, scope, keys, layout, relation)
    rel = f'"{name}"'
    rule = Rule(DUCKDB, tuple(layout.keys), moved=MOVED)
    keys_rel = None
    if keys is not None:
        con.register(f"{name}_keys", pa.table({"k": pa.array(list(keys), pa.string())}))
        keys_rel = f'"{name}_keys"'
    lineage = _lineage(con, rule, rel)
    con.register(
        f"{name}_lineage",
        pa.table(
            {
                "k": pa.array([r[0] for r in lineage], pa.string()),
                "src": pa.array([r[1] for r in lineage], pa.string()),
                "lo": pa.array([r[2] for r in lineage], pa.struct([("cp", pa.int64()), ("o", pa.int32())])),
                "hi": pa.array([r[3] for r in lineage], pa.struct([("cp", pa.int64()), ("o", pa.int32())])),
            }
        ),
    )
    query = origins_query(layout, rel, keys_rel, f'"{name}_lineage"')
    names = [c.name for c in layout.columns]
    if not names:
        out = {}
        for k, col, v in con.execute(query.sql()).fetchall():
            out[(k, col)] = (v["cp"], v["o"], v["op"], v["committed_at"], v["context"])
        return out
    got = con.sql(query.sql()).to_arrow_table()
    columns = [got.column(j).to_pylist() for j in range(got.num_columns)]
    return {(k, names[i]): (cp, o, op, at, ctx) for k, i, cp, o, op, at, ctx in zip(*columns, strict=True)}


def _alter(column: Column) -> Origin | None:
    """The event of the ALTER that added ``column`` (its fill's origin), or None for an original column."""
    if column.since is None or column.since_at is None:
        return None
    micros = int(column.since_at.value // 1000)
    return (column.since[0], column.since[1], "ALTER", micros, "{}")


def origin_of(origins: dict[tuple[str, str], Origin], layout: Layout, k: str, col: str) -> Origin | None:
    """The change that set (k, col); a value no change set since its column was added is the ALTER's."""
    found = origins.get((k, col))
    if found is not None:
        return found
    column = next((c for c in layout.columns if c.name == col), None)
    return _alter(column) if column is not None else None


def origins_query(layout: Layout, rel: str, keys_rel: str | None, lineage_rel: str) -> Query:
    """The origins of the present rows of ``rel`` (only the keys in ``keys_rel``, a relation of ``k``):
    ``(k, i, cp, o, op, committed_at, context)`` per column ``i`` of ``layout`` (its columns unknown:
    ``(k, col, struct)`` per member). ``lineage_rel`` holds :func:`_lineage`'s moved keys."""
    present = ", ".join(f"'{op}'" for op in PRESENT)
    rule = Rule(DUCKDB, tuple(layout.keys), moved=MOVED)
    wanted = f" WHERE k IN (SELECT k FROM {keys_rel})" if keys_rel is not None else ""
    query = (
        rule.events(rel)
        .with_(
            "births",
            f"SELECT k, max((cp, o)) FILTER (WHERE op NOT IN ({present})) AS gone\n"
            f"FROM events{wanted} GROUP BY k",
        )
        .with_(
            "lineage",
            "SELECT k, k AS src, gone AS lo, NULL AS hi FROM births\n"
            f"    WHERE k NOT IN (SELECT k FROM {lineage_rel})\n"
            "UNION ALL SELECT l.k, l.src, CASE WHEN l.lo IS NOT NULL THEN (l.lo.cp, l.lo.o) END,\n"
            f"    CASE WHEN l.hi IS NOT NULL THEN (l.hi.cp, l.hi.o) END FROM {lineage_rel} l\n"
            "    WHERE l.k IN (SELECT k FROM births)",
        )
        .with_(
            "versions",
            "SELECT l.k AS k, c.commit_position AS cp, c.ordinal AS o, c.operation AS op,\n"
            "       epoch_us(c.committed_at) AS committed_at, CAST(c.context AS VARCHAR) AS context,\n"
            "       CAST(c.after AS VARCHAR) AS after\n"
            f"FROM {rel} c JOIN lineage l ON l.src = c.primary_key CROSS JOIN truncates\n"
            f"WHERE c.operation IN ({present})\n"
            "  AND (l.lo IS NULL OR (c.commit_position, c.ordinal) > l.lo)\n"
            "  AND (l.hi IS NULL OR (c.commit_position, c.ordinal) < l.hi)\n"
            "  AND (truncates.t IS NULL OR (c.commit_position, c.ordinal) > truncates.t)",
        )
    )
    names = [c.name for c in layout.columns]
    if not names:  # columns unknown: compare every member of each version
        return (
            query.with_(
                "cells",
                "SELECT k, cp, o, op, committed_at, context, col,\n"
                "       CAST(json_extract(after, '/' || replace(replace(col, '~', '~0'), '/', '~1'))"
                " AS VARCHAR) AS val\nFROM versions, unnest(json_keys(after)) AS u(col)",
            )
            .with_(
                "marked",
                "SELECT *, lag(val) OVER w AS prev, row_number() OVER w AS n FROM cells\n"
                "WINDOW w AS (PARTITION BY k, col ORDER BY cp, o)",
            )
            .then(
                "SELECT k, col, arg_max({'cp': cp, 'o': o, 'op': op, 'committed_at': committed_at,\n"
                "                        'context': context}, (cp, o)) AS v FROM marked\n"
                "WHERE n = 1 OR val IS DISTINCT FROM prev GROUP BY k, col"
            )
        )
    # known columns: one window over the versions, the columns compared side by side; before the ALTER
    # that added a column, rows hold its fill and no change there sets it (the ALTER did)
    paths = ", ".join(_pointer(n) for n in names)
    filled = []
    changed = []
    for i, column in enumerate(layout.columns, start=1):
        if column.since is None:
            filled.append(f"raw[{i}]")
            changed.append(f"(n = 1 OR v[{i}] IS DISTINCT FROM p[{i}]) AS ch{i}")
            continue
        since = f"({column.since[0]}, {column.since[1]})"
        fill = "NULL" if column.fill is None else f"CAST(CAST({_sql_text(column.fill)} AS JSON) AS VARCHAR)"
        filled.append(f"CASE WHEN (cp, o) < {since} THEN {fill} ELSE raw[{i}] END")
        changed.append(f"((cp, o) >= {since} AND (n = 1 OR v[{i}] IS DISTINCT FROM p[{i}])) AS ch{i}")
    picks = ", ".join(
        f"arg_max({{'cp': cp, 'o': o, 'op': op, 'committed_at': committed_at, 'context': context}}, "
        f"(cp, o)) FILTER (WHERE ch{i}) AS c{i}"
        for i in range(1, len(names) + 1)
    )
    structs = ", ".join(f"c{i}" for i in range(1, len(names) + 1))
    return (
        query.with_(
            "valued",
            "SELECT k, cp, o, op, committed_at, context,\n"
            f"       CAST(json_extract(after, [{paths}]) AS VARCHAR[]) AS raw FROM versions",
        )
        .with_("filled", f"SELECT *, [{', '.join(filled)}] AS v FROM valued")
        .with_(
            "marked",
            "SELECT *, lag(v) OVER w AS p, row_number() OVER w AS n FROM filled\n"
            "WINDOW w AS (PARTITION BY k ORDER BY cp, o)",
        )
        .with_("flagged", f"SELECT k, cp, o, op, committed_at, context, {', '.join(changed)} FROM marked")
        .with_("picked", f"SELECT k, {picks} FROM flagged GROUP BY k")
        .with_(
            "cells", f"SELECT k, unnest(range(0, {len(names)})) AS i, unnest([{structs}]) AS v FROM picked"
        )
        .then("SELECT k, i, v.cp, v.o, v.op, v.committed_at, v.context FROM cells WHERE v IS NOT NULL")
    )
