"""``bemi_tt.duckdb()``: SQL users get the same answers as the DataFrame API, on every source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from timetravel_history import TODO_COLUMNS, History
from timetravel_sources import Make, build_source

from bemi_tt.duckdb_macros import duckdb, register_as_of
from bemi_tt.errors import ConfigurationError
from bemi_tt.sources import connect
from bemi_tt.timetravel import as_of


def _history() -> tuple[History, list]:
    h = History()
    h.columns("todo", TODO_COLUMNS)
    row1 = {"id": 1, "task": "Sleep", "done": False, "price": Decimal("1.50"), "due": None}
    row2 = {"id": 2, "task": "Eat", "done": True, "price": None, "due": "2026-03-01T08:00:00+00:00"}
    times = [h.create("todo", "1", row1, {"user_id": 1}), h.create("todo", "2", row2, {"user_id": 2})]
    times.append(h.update("todo", "1", row1, {**row1, "task": "Nap"}, {"user_id": 1}))
    times.append(h.update("todo", "20", row2, {**row2, "id": 20}, {"user_id": 3}))  # key update
    times.append(h.delete("todo", "1", {**row1, "task": "Nap"}))
    times.append(h.truncate("todo"))
    times.append(h.create("todo", "5", {**row1, "id": 5}))
    return h, times


def test_as_of_macro_returns_the_same_rows_as_the_python_api(make: Make) -> None:
    h, times = _history()
    source = make(h)
    con = duckdb(source)
    for t in times:
        expected = as_of("todo", t, source=source)
        rows = con.sql("SELECT primary_key, \"row\" FROM as_of('todo', ?)", params=[t]).fetchall()
        assert [int(k) for k, _ in rows] == sorted(int(k) for k in expected.index)
        for key, row in rows:
            values = json.loads(row, parse_float=Decimal)
            assert values["task"] == expected.loc[int(key), "task"]


def test_typed_macro_has_the_python_api_dtypes_values(make: Make) -> None:
    h, times = _history()
    source = make(h)
    con = duckdb(source)
    frame = con.sql("SELECT * FROM as_of_todo(?) ORDER BY id", params=[times[3]]).df()
    expected = as_of("todo", times[3], source=source).reset_index()
    assert list(frame.columns) == list(expected.columns)
    assert list(frame["id"]) == list(expected["id"]) == [1, 20]
    assert list(frame["task"]) == list(expected["task"])
    assert frame["price"].iloc[0] == expected["price"].iloc[0] == Decimal("1.50")
    assert frame["due"].iloc[1] == expected["due"].iloc[1]


def test_changes_view_and_history_macro_follow_commit_order(make: Make) -> None:
    h, _ = _history()
    con = duckdb(make(h))
    assert con.sql("SELECT count(*) FROM changes").fetchall() == [(len(h.changes),)]
    ops = [r[0] for r in con.sql("SELECT operation FROM history('public.todo', '1')").fetchall()]
    assert ops == ["CREATE", "UPDATE", "DELETE"]
    assert con.sql("SELECT count(*) FROM changes_schemas").fetchall() == [(1,)]


def test_duckdb_uses_the_default_source_set_by_connect(tmp_path: Path) -> None:
    h, times = _history()
    memory = build_source("memory", h.changes, h.schemas)
    connect(memory)
    try:
        assert duckdb().sql("SELECT count(*) FROM as_of('todo', ?)", params=[times[2]]).fetchall() == [(2,)]
    finally:
        connect(None)


# -- the whole database as of a time: one view per tracked table --------------------------------------------
WITH_POINTS = [*TODO_COLUMNS, {"name": "points", "type": "bigint", "type_oid": 20, "key": False, "fill": 3}]
TAG_COLUMNS = [
    {"name": "todo_id", "type": "integer", "type_oid": 23, "key": True},
    {"name": "tag", "type": "text", "type_oid": 25, "key": True},
    {"name": "weight", "type": "numeric(6,3)", "type_oid": 1700, "key": False},
]


def _two_tables() -> tuple[History, list]:
    """``todo`` (a delete, a key update, a column added with a fill, a TRUNCATE) and ``app.tags`` (a
    composite key), interleaved; the times to look at."""
    h, times = _history()
    h.columns("tags", TAG_COLUMNS, schema="app")
    times.append(h.create("tags", '[5,"home"]', {"todo_id": 5, "tag": "home", "weight": Decimal("0.500")},
                          schema="app"))
    times.append(h.columns("todo", WITH_POINTS))
    times.append(h.create("todo", "6", {**_row5(6), "points": 9}))
    times.append(h.update("todo", "5", _row5(5), {**_row5(5), "task": "Run", "points": 3}))
    times.append(h.create("tags", '[6,"work"]', {"todo_id": 6, "tag": "work", "weight": None}, schema="app"))
    return h, times


def _row5(key: int) -> dict:
    return {"id": key, "task": "Sleep", "done": False, "price": Decimal("1.50"), "due": None}


def _same_cells(rows: list[tuple], expected) -> None:  # type: ignore[no-untyped-def]
    import pandas as pd

    assert len(rows) == len(expected)
    for got, want in zip(rows, expected.itertuples(index=False, name=None), strict=True):
        for a, b in zip(got, want, strict=True):
            if b is None or b is pd.NA or b is pd.NaT:
                assert a is None
            else:
                assert a == b, (got, want)


def test_duckdb_as_of_gives_every_tracked_table_as_a_view_equal_to_as_of(make: Make) -> None:
    h, times = _two_tables()
    source = make(h)
    for t in [*times, h.between(times[4])]:
        con = duckdb(source, as_of=t)
        for view, table in (("todo", "todo"), ("public.todo", "todo"), ("app.tags", "app.tags"),
                            ("tags", "app.tags")):
            try:
                expected = as_of(table, t, source=source).reset_index()
            except ConfigurationError:  # before the table's history starts: no view either
                assert con.sql(
                    "SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                    params=[view.split(".")[-1]],
                ).fetchall() == [(0,)]
                continue
            frame = con.sql(f"SELECT * FROM {view}")
            assert frame.columns == list(expected.columns), (view, t)
            keys = [c["name"] for c in (TAG_COLUMNS if table == "app.tags" else TODO_COLUMNS) if c.get("key")]
            rows = con.sql(f"SELECT * FROM {view} ORDER BY {', '.join(keys)}").fetchall()
            _same_cells(rows, expected.sort_values(keys))


def test_duckdb_as_of_views_join_at_one_point_of_history(make: Make) -> None:
    h, times = _two_tables()
    source = make(h)
    con = duckdb(source, as_of=times[-1])
    joined = con.sql(
        "SELECT t.id, t.task, t.points, g.tag FROM todo t JOIN app.tags g ON g.todo_id = t.id ORDER BY t.id"
    ).fetchall()
    assert joined == [(5, "Run", 3, "home"), (6, "Sleep", 9, "work")]
    before_points = duckdb(source, as_of=times[7])
    assert "points" not in before_points.sql("SELECT * FROM todo").columns  # added later


def test_register_as_of_names_the_view_and_refuses_unknown_tables(make: Make) -> None:
    h, times = _two_tables()
    source = make(h)
    con = duckdb(source)
    assert register_as_of(con, "todo", times[2], name="todo_then") == '"todo_then"'
    rows = con.sql("SELECT id, task FROM todo_then ORDER BY id").fetchall()
    assert rows == [(1, "Nap"), (2, "Eat")]
    with pytest.raises(ConfigurationError, match="unknown or ambiguous table 'nope'"):
        register_as_of(con, "nope", times[2])
    with pytest.raises(ConfigurationError, match="did not exist"):
        register_as_of(con, "app.tags", times[0])


def test_duckdb_connection_shows_times_in_utc_whatever_the_machines_time_zone() -> None:
    # DuckDB takes its session time zone from the process's; as_of answers in UTC, so must the macros
    code = (
        "import bemi_tt; con = bemi_tt.duckdb(bemi_tt.InMemorySource([], [])); "
        "print(con.sql(\"SELECT current_setting('TimeZone')\").fetchall()[0][0])"
    )
    env = {**os.environ, "TZ": "Asia/Tokyo"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, "UTC"), out.stderr
