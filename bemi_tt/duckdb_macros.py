"""``bemi_tt.duckdb()``: a DuckDB connection with a ``changes`` view and the time-travel operations in SQL.

    con = bemi_tt.duckdb()
    con.sql("SELECT * FROM as_of('todo', TIMESTAMPTZ '2026-11-27 10:00:00+00')")   -- primary_key, row (JSON)
    con.sql("SELECT * FROM as_of_todo(TIMESTAMPTZ '2026-11-27 10:00:00+00')")     -- typed columns
    con.sql("SELECT * FROM history('todo', '1')")

The macros run the same SQL as :func:`bemi_tt.as_of` (``timetravel.latest_sql``), so SQL users get the same
rows; the typed ``as_of_<table>`` macros type columns by the same mapping as the DataFrame path, as DuckDB
holds them (timestamp infinity and BC years included; domains by their base type; json, arrays, bytea and
numerics beyond 15 digits stay JSON there: exact values need the Python path).
"""

from __future__ import annotations

import json
import re
from typing import Any

import duckdb as _duckdb
import pyarrow as pa
import pyarrow.compute as pc

from bemi_tt.arguments import SourceLike
from bemi_tt.rule import DUCKDB, Query, Rule
from bemi_tt.sources import get_source
from bemi_tt.state import Layout, layout_at, versions_of

__all__ = ["duckdb"]

_MATCH = '(c."table" = tbl OR c."schema" || \'.\' || c."table" = tbl)'
_OLD_KEY = (
    "CASE WHEN len(__keys) = 1 THEN json_extract_string(before, '/' || __keys[1]) "
    "WHEN len(__keys) > 1 THEN CAST(to_json(list_transform(__keys, lambda x: json_extract(before, '/' || x)))"
    " AS VARCHAR) END"
)
#: the fills a row last changed before its columns were added takes, as a JSON object (NULL: none)
_FILLS = (
    "(SELECT json_group_object(f.name, json(f.fill)) FROM bemi_tt_fills f"
    ' WHERE (f."table" = tbl OR f."schema" || \'.\' || f."table" = tbl)'
    " AND f.committed_at <= CAST(ts AS TIMESTAMPTZ) AND (present.cp, present.o) < (f.cp, f.o))"
)


def _macros() -> list[str]:
    # the rule's pieces over the changes of ``tbl`` up to the prefix cut at ``ts``
    present = Rule(DUCKDB, (), _OLD_KEY).present("scoped", "CAST(after AS VARCHAR)")
    query = (
        Query()
        .with_(
            "c0",
            'SELECT c.*, (SELECT k.keys FROM bemi_tt_keys k WHERE (k."table" = tbl\n'
            '    OR k."schema" || \'.\' || k."table" = tbl) LIMIT 1) AS __keys\n'
            f"FROM changes c WHERE {_MATCH}",
        )
        .with_("cut", Rule(DUCKDB).cut("c0", "CAST(ts AS TIMESTAMPTZ)"))
        .with_("scoped", "SELECT c0.* FROM c0, cut WHERE cut.p IS NULL OR c0.commit_position < cut.p")
    )
    for name, body in present.ctes:
        query = query.with_(name, body)
    query = query.with_("present", present.select).then(
        f"SELECT k AS primary_key, CAST(coalesce(json_merge_patch(payload, {_FILLS}), payload) AS JSON)"
        ' AS "row", cp AS commit_position, o AS ordinal\nFROM present ORDER BY k'
    )
    return [
        f"CREATE OR REPLACE MACRO as_of(tbl, ts) AS TABLE {query.sql()}",
        f"""CREATE OR REPLACE MACRO history(tbl, key) AS TABLE
            SELECT c.* FROM changes c WHERE {_MATCH} AND c.primary_key = CAST(key AS VARCHAR)
            ORDER BY c.commit_position, c.ordinal""",
        f"""CREATE OR REPLACE MACRO table_changes(tbl) AS TABLE
            SELECT c.* FROM changes c WHERE {_MATCH} ORDER BY c.commit_position, c.ordinal""",
    ]


def _typed_macro(schema: str, table: str, layout: Layout) -> str | None:
    name = f"as_of_{table}"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return None  # table names that are not plain identifiers: use as_of('schema.table', ts)
    selects = []
    for col in layout.columns:
        pointer = "'/" + col.name.replace("~", "~0").replace("/", "~1").replace("'", "''") + "'"
        quoted = '"' + col.name.replace('"', '""') + '"'
        duck = col.kind.macro
        text = f'json_extract_string("row", {pointer})'
        # JSON null is SQL NULL; typed where DuckDB holds the type, JSON otherwise
        expr = (
            duck.format(v=text)
            if duck
            else f'CASE WHEN {text} IS NOT NULL THEN json_extract("row", {pointer}) END'
        )
        if col.since_at is not None:  # no value before the column existed
            since = f"TIMESTAMPTZ '{col.since_at.isoformat()}'"
            expr = f"CASE WHEN CAST(ts AS TIMESTAMPTZ) >= {since} THEN {expr} END"
        selects.append(f"{expr} AS {quoted}")
    qualified = f"{schema}.{table}".replace("'", "''")
    return (
        f"CREATE OR REPLACE MACRO {name}(ts) AS TABLE SELECT {', '.join(selects)} "
        f"FROM as_of('{qualified}', ts)"
    )


def duckdb(source: SourceLike | None = None) -> _duckdb.DuckDBPyConnection:
    """A new DuckDB connection over ``source`` (default: the one set by ``bemi_tt.connect``) with views
    ``changes`` and ``changes_schemas`` and the macros ``as_of``, ``as_of_<table>``, ``history``,
    ``table_changes``."""
    src = get_source(source)
    con = _duckdb.connect()
    # read as queries scan it: PostgreSQL streams ``changes`` per query instead of copying it up front
    src.lazy(con, "changes")
    schemas = src.schemas()
    con.register("changes_schemas", schemas)
    latest: dict[tuple[str, str], tuple[tuple[int, int], list[dict[str, Any]]]] = {}
    for row in schemas.to_pylist():
        key = (row["schema"], row["table"])
        position = (row["commit_position"], row["ordinal"])
        if key not in latest or latest[key][0] < position:
            latest[key] = (position, json.loads(row["columns"]))
    keys = pa.table(
        {
            "schema": pa.array([k[0] for k in latest], pa.string()),
            "table": pa.array([k[1] for k in latest], pa.string()),
            "keys": pa.array(
                [[c["name"] for c in cols if c.get("key")] for _, cols in latest.values()],
                pa.list_(pa.string()),
            ),
        }
    )
    con.register("bemi_tt_keys", keys)
    con.execute(
        'CREATE TEMP TABLE bemi_tt_fills ("schema" VARCHAR, "table" VARCHAR, name VARCHAR, cp BIGINT,'
        " o INTEGER, committed_at TIMESTAMPTZ, fill VARCHAR)"
    )
    fills: list[tuple[str, str, str, int, int, Any, str]] = []
    layouts: dict[tuple[str, str], Layout] = {}
    for schema, table in latest:
        mine = pc.and_(pc.equal(schemas["schema"], schema), pc.equal(schemas["table"], table))
        layout = layout_at(versions_of(schemas.filter(mine)), None)
        if layout is None:
            continue
        layouts[(schema, table)] = layout
        for col in layout.columns:
            if col.since is not None and col.fill is not None:
                fills.append((schema, table, col.name, col.since[0], col.since[1], col.since_at, col.fill))
    if fills:
        con.executemany("INSERT INTO bemi_tt_fills VALUES (?, ?, ?, ?, ?, ?, ?)", fills)
    for statement in _macros():
        con.execute(statement)
    for (schema, table), layout in layouts.items():
        typed = _typed_macro(schema, table, layout)
        if typed is not None:
            con.execute(typed)
    return con
