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

from bemi_tt.dtypes import spec_type
from bemi_tt.sources import Scope, get_source
from bemi_tt.state import latest_sql

__all__ = ["duckdb"]

_MATCH = '(c."table" = tbl OR c."schema" || \'.\' || c."table" = tbl)'
_OLD_KEY = (
    "CASE WHEN len(__keys) = 1 THEN json_extract_string(before, '/' || __keys[1]) "
    "WHEN len(__keys) > 1 THEN CAST(to_json(list_transform(__keys, lambda x: json_extract(before, '/' || x)))"
    " AS VARCHAR) END"
)


def _macros() -> list[str]:
    scoped = f"""
        WITH c0 AS (SELECT c.*, (SELECT k.keys FROM bemi_tt_keys k WHERE (k."table" = tbl
                                 OR k."schema" || '.' || k."table" = tbl) LIMIT 1) AS __keys
                    FROM changes c WHERE {_MATCH}),
        cut AS (SELECT coalesce(min(commit_position) FILTER (WHERE committed_at > CAST(ts AS TIMESTAMPTZ)),
                                9223372036854775807) AS p FROM c0),
        scoped AS (SELECT c0.* FROM c0, cut WHERE c0.commit_position < cut.p)"""
    latest = latest_sql("scoped", _OLD_KEY, "CAST(after AS VARCHAR)")
    return [
        f"""CREATE OR REPLACE MACRO as_of(tbl, ts) AS TABLE {scoped}
            SELECT k AS primary_key, CAST(payload AS JSON) AS "row", cp AS commit_position, o AS ordinal
            FROM ({latest}) ORDER BY k""",
        f"""CREATE OR REPLACE MACRO history(tbl, key) AS TABLE
            SELECT c.* FROM changes c WHERE {_MATCH} AND c.primary_key = CAST(key AS VARCHAR)
            ORDER BY c.commit_position, c.ordinal""",
        f"""CREATE OR REPLACE MACRO table_changes(tbl) AS TABLE
            SELECT c.* FROM changes c WHERE {_MATCH} ORDER BY c.commit_position, c.ordinal""",
    ]


def _typed_macro(schema: str, table: str, columns: list[dict[str, Any]]) -> str | None:
    name = f"as_of_{table}"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return None  # table names that are not plain identifiers: use as_of('schema.table', ts)
    selects = []
    for col in columns:
        pointer = "'/" + col["name"].replace("~", "~0").replace("/", "~1").replace("'", "''") + "'"
        quoted = '"' + col["name"].replace('"', '""') + '"'
        duck = spec_type(col).macro
        value = f'json_extract_string("row", {pointer})'
        expr = duck.format(v=value) if duck else f'json_extract("row", {pointer})'
        selects.append(f"{expr} AS {quoted}")
    qualified = f"{schema}.{table}".replace("'", "''")
    return (
        f"CREATE OR REPLACE MACRO {name}(ts) AS TABLE SELECT {', '.join(selects)} "
        f"FROM as_of('{qualified}', ts)"
    )


def duckdb(source: Any = None) -> _duckdb.DuckDBPyConnection:
    """A new DuckDB connection over ``source`` (default: the one set by ``bemi_tt.connect``) with views
    ``changes`` and ``changes_schemas`` and the macros ``as_of``, ``as_of_<table>``, ``history``,
    ``table_changes``."""
    src = get_source(source)
    con = _duckdb.connect()
    src.load(con, "changes", Scope())
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
    for statement in _macros():
        con.execute(statement)
    for (schema, table), (_, columns) in latest.items():
        typed = _typed_macro(schema, table, columns)
        if typed is not None:
            con.execute(typed)
    return con
