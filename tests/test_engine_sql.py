"""Golden SQL of the engine: the rule's pieces as each dialect composes them, the origins query and the
macros, compared with files in tests/snapshots/ (as ibis does). A deliberate change regenerates them:

    BEMI_TT_UPDATE_SNAPSHOTS=1 .venv/bin/pytest tests/test_engine_sql.py

Beside the text, the PostgreSQL composition is run on PostgreSQL and must give the DuckDB answer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import duckdb
import pandas as pd
import psycopg
import pytest
from timetravel_history import TODO_COLUMNS, History
from timetravel_sources import write_changes

from bemi_tt.duckdb_macros import _macros
from bemi_tt.origins import origins_query
from bemi_tt.rule import DUCKDB, POSTGRES, Rule
from bemi_tt.sources import InMemorySource, PostgresSource, Scope
from bemi_tt.sources.base import segments_condition
from bemi_tt.state import layout_at, versions_of

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("BEMI_TT_UPDATE_SNAPSHOTS") == "1"


def _layout_with_fill():  # type: ignore[no-untyped-def]
    h = History()
    h.columns("todo", TODO_COLUMNS)
    h.columns("todo", [*TODO_COLUMNS, {"name": "points", "type": "bigint", "type_oid": 20, "fill": 3}])
    return layout_at(versions_of(InMemorySource([], h.schemas).schemas(("public", "todo"))), None)


CASES: dict[str, Callable[[], str]] = {
    "present_duckdb_one_key": lambda: Rule(DUCKDB, ("id",)).present('"c"').sql(),
    "present_duckdb_composite_key": lambda: Rule(DUCKDB, ("a", "b")).present('"c"').sql(),
    "present_postgres_one_key": lambda: Rule(POSTGRES, ("id",)).present("t").sql(),
    "present_postgres_composite_key": lambda: Rule(POSTGRES, ("a", "b")).present("t").sql(),
    "events_duckdb": lambda: Rule(DUCKDB, ("id",)).events('"o"').sql(),
    "gone_duckdb": lambda: Rule(DUCKDB, ("id",)).gone('"o"').sql(),
    "gone_postgres": lambda: Rule(POSTGRES, ("id",)).gone("t").sql(),
    "origins_todo_with_fill": lambda: origins_query(_layout_with_fill(), '"o"', None, '"o_lineage"').sql(),
    "macro_as_of": lambda: _macros()[0],
    "postgres_key_lookup": lambda: _postgres_key_lookup(),
    # the schema record applied: images renamed by attnum per era, rows re-keyed after a key change, one
    # relation's changes under each name it had
    "shaped_duckdb_rename": lambda: Rule(DUCKDB).shaped(
        '"c__named"',
        ["primary_key", "before", "after", "commit_position"],
        [(None, (7, 0), (("title", "label"),))],
    ),
    "rebased_duckdb_composite_key": lambda: Rule(DUCKDB, ("a", "b")).rebased('"c__key0__present"'),
    "segments_condition": lambda: segments_condition(
        [("public", "todo", None, (7, 0)), ("public", "tasks", (7, 0), None)], lambda v: f"'{v}'"
    ),
}


def _postgres_key_lookup() -> str:
    """What a key lookup asks PostgreSQL: the key's changes and the TRUNCATEs by the table index, the key
    UPDATEs away from it, all before the time cut found by the ("table", committed_at) index."""
    scope = Scope(
        table=("public", "todo"),
        until=pd.Timestamp("2026-01-01T00:00:00Z"),
        columns=("primary_key", "operation"),
        keys=("1",),
        key_columns=("id",),
    )
    return PostgresSource("dbname=x").query(scope).as_string(None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_generated_sql_matches_its_snapshot(name: str) -> None:
    text = CASES[name]().rstrip() + "\n"
    path = SNAPSHOTS / f"{name}.sql"
    if UPDATE or not path.exists():
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs: run with BEMI_TT_UPDATE_SNAPSHOTS=1 if deliberate"


def _history() -> History:
    h = History()
    h.columns("todo", TODO_COLUMNS)
    row = {"id": 1, "task": "a", "done": False, "price": None, "due": None}
    h.create("todo", "1", row)
    h.create("todo", "2", {**row, "id": 2})
    h.create("todo", "3", {**row, "id": 3})
    h.update("todo", "30", {**row, "id": 3}, {**row, "id": 30})  # key update: 3 is gone
    h.delete("todo", "2", {**row, "id": 2})
    h.truncate("todo")
    h.create("todo", "4", {**row, "id": 4, "task": "after"})
    h.update("todo", "40", {**row, "id": 4, "task": "after"}, {**row, "id": 40, "task": "moved"})
    h.create("todo", "5", {**row, "id": 5})
    h.update("todo", "5", {**row, "id": 5}, {**row, "id": 5, "task": "kept"})
    return h


def test_postgres_composition_gives_the_duckdb_answer(dsn: str) -> None:
    h = _history()
    write_changes(dsn, h.changes, h.schemas)
    rule_pg, rule_duck = Rule(POSTGRES, ("id",)), Rule(DUCKDB, ("id",))
    with psycopg.connect(dsn) as conn:
        pg = conn.execute(
            "WITH t AS (SELECT * FROM changes WHERE \"table\" = 'todo') "
            f"SELECT k, cp, o, payload::text FROM ({rule_pg.present('t').sql()}) p ORDER BY k"
        ).fetchall()
        gone_pg = conn.execute(
            f"WITH t AS (SELECT * FROM changes) SELECT * FROM ({rule_pg.gone('t').sql()}) g ORDER BY k"
        ).fetchall()
    con = duckdb.connect()
    con.register("c", InMemorySource(h.changes, h.schemas).changes)
    duck = con.sql(f"SELECT k, cp, o FROM ({rule_duck.present('c').sql()}) ORDER BY k").fetchall()
    assert [r[:3] for r in pg] == duck == [("40", 90, 0), ("5", 110, 0)]
    assert '"kept"' in pg[1][3]
    gone_duck = con.sql(f"SELECT * FROM ({rule_duck.gone('c').sql()}) ORDER BY k").fetchall()
    assert gone_pg == gone_duck == [("2", 60, 0), ("3", 50, 0), ("4", 90, 0)]
