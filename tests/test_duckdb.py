"""``bemi_tt.duckdb()``: SQL users get the same answers as the DataFrame API, on every source."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from timetravel_history import TODO_COLUMNS, History
from timetravel_sources import Make, build_source

from bemi_tt.duckdb_macros import duckdb
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
