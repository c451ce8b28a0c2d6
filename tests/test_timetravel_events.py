"""Contracts of the one rule on every source: schema fills are events of their ALTER, blame follows a key
update to the change that set each value, a table without a primary key diffs by content with the change
that made each difference, and every macro keeps SQL NULL and fills."""

from __future__ import annotations

from decimal import Decimal

import pandas as pd
from timetravel_history import TODO_COLUMNS, History
from timetravel_sources import Make

from bemi_tt.duckdb_macros import duckdb
from bemi_tt.timetravel import as_of, blame, diff, history

WITH_POINTS = [*TODO_COLUMNS, {"name": "points", "type": "bigint", "type_oid": 20, "key": False, "fill": 3}]


def _row(key: int, task: str) -> dict[str, object]:
    return {"id": key, "task": task, "done": False, "price": Decimal("1.50"), "due": None}


def _filled() -> tuple[History, dict[str, object]]:
    """Rows 1 and 2 exist when ``points`` is added with a fill of 3; row 2 is renamed afterwards."""
    h = History()
    t: dict[str, object] = {}
    h.columns("todo", TODO_COLUMNS)
    t["created"] = h.create("todo", "1", _row(1, "a"), {"user_id": 1})
    h.create("todo", "2", _row(2, "b"), {"user_id": 2})
    t["added"] = h.columns("todo", WITH_POINTS)
    t["renamed"] = h.update("todo", "2", _row(2, "b"), {**_row(2, "bb"), "points": 3}, {"user_id": 7})
    return h, t


def test_history_shows_a_fill_from_its_alter_on_every_later_version(make: Make) -> None:
    h, t = _filled()
    source = make(h)
    frame = history("todo", 1, source=source)
    assert list(frame["operation"]) == ["CREATE", "ALTER"]
    assert pd.isna(frame["points"].iloc[0])  # the column did not exist yet
    assert frame["points"].iloc[1] == 3 and frame["changed"].iloc[1] == ["points"]
    assert frame["valid_from"].iloc[1] == pd.Timestamp(t["added"])
    assert frame["task"].iloc[1] == "a"
    two = history("todo", 2, source=source)
    assert list(two["operation"]) == ["CREATE", "ALTER", "UPDATE"] and list(two["points"].iloc[1:]) == [3, 3]
    assert two["changed"].iloc[2] == ["task"]


def test_diff_credits_a_fill_to_the_alter_that_added_the_column(make: Make) -> None:
    h, t = _filled()
    d = diff("todo", t["created"], t["renamed"], source=make(h))
    points = d.xs("points", level="column")
    assert set(points["operation"]) == {"ALTER"}
    assert set(points["committed_at"]) == {pd.Timestamp(t["added"])}
    assert d.loc[(2, "task"), "operation"] == "UPDATE" and d.loc[(2, "task"), "user_id"] == 7


def test_blame_credits_a_fill_to_the_alter_and_later_values_to_their_change(make: Make) -> None:
    h, t = _filled()
    frame = blame("todo", source=make(h))
    assert frame.loc[(1, "points"), "operation"] == "ALTER"
    assert frame.loc[(1, "points"), "committed_at"] == pd.Timestamp(t["added"])
    assert frame.loc[(1, "points"), "value"] == 3
    assert frame.loc[(2, "points"), "operation"] == "ALTER"  # the UPDATE kept the filled value
    assert frame.loc[(2, "task"), "operation"] == "UPDATE"
    assert frame.loc[(1, "task"), "operation"] == "CREATE"


def test_blame_after_a_key_update_credits_each_cell_to_the_change_that_set_it(make: Make) -> None:
    h = History()
    h.columns("todo", TODO_COLUMNS)
    h.create("todo", "1", _row(1, "a"), {"user_id": 1})
    h.update("todo", "1", _row(1, "a"), _row(1, "renamed"), {"user_id": 2})
    h.update("todo", "10", _row(1, "renamed"), _row(10, "renamed"), {"user_id": 3})
    source = make(h)
    frame = blame("todo", source=source)
    assert frame.loc[(10, "task"), "user_id"] == 2
    assert frame.loc[(10, "price"), "user_id"] == 1 and frame.loc[(10, "price"), "operation"] == "CREATE"
    one = blame("todo", key=10, source=source)
    assert one.loc[(10, "task"), "user_id"] == 2


def test_diff_of_a_table_without_a_primary_key_pairs_rows_by_content_with_their_change(make: Make) -> None:
    h = History()
    h.columns(
        "log",
        [
            {"name": "msg", "type": "text", "type_oid": 25, "key": False},
            {"name": "n", "type": "integer", "type_oid": 23, "key": False},
        ],
    )
    h.create("log", None, {"msg": "a", "n": 1})
    h.create("log", None, {"msg": "b", "n": 2})
    start = h.create("log", None, {"msg": "c", "n": 3})
    h.update("log", None, {"msg": "b", "n": 2}, {"msg": "b", "n": 20}, {"user_id": 5})
    h.delete("log", None, {"msg": "a", "n": 1}, {"user_id": 6})
    end = h.create("log", None, {"msg": "d", "n": 4}, {"user_id": 7})
    d = diff("log", start, end, source=make(h)).reset_index()
    by_change = {c: g for c, g in d.groupby("change")}
    assert set(by_change) == {"added", "removed", "changed"}
    changed = by_change["changed"]
    assert list(changed["column"]) == ["n"] and list(changed["old"]) == [2] and list(changed["new"]) == [20]
    assert list(changed["operation"]) == ["UPDATE"] and list(changed["user_id"]) == [5]
    removed = by_change["removed"]
    assert set(removed["operation"]) == {"DELETE"} and set(removed["user_id"]) == {6}
    assert set(removed["old"]) == {"a", 1}
    added = by_change["added"]
    assert set(added["operation"]) == {"CREATE"} and set(added["user_id"]) == {7}
    assert not d["committed_at"].isna().any()


def test_macros_return_fills_and_sql_null_and_no_column_before_it_existed(make: Make) -> None:
    h, t = _filled()
    h.create("todo", "3", {**_row(3, "c"), "price": None, "points": None})
    source = make(h)
    con = duckdb(source)
    rows = con.sql("SELECT id, points FROM as_of_todo(?) ORDER BY id", params=[h.clock]).fetchall()
    assert rows == [(1, 3), (2, 3), (3, None)]
    assert con.sql("SELECT count(*) FROM as_of_todo(?) WHERE price IS NULL", params=[h.clock]).fetchall() == [
        (1,)
    ]
    early = con.sql("SELECT id, points FROM as_of_todo(?) ORDER BY id", params=[t["created"]]).fetchall()
    assert early == [(1, None)]  # points did not exist yet: no fill shows
    raw = con.sql(
        "SELECT json_extract_string(\"row\", '/points') FROM as_of('todo', ?) ORDER BY primary_key",
        params=[h.clock],
    ).fetchall()
    assert raw == [("3",), ("3",), (None,)]
    assert as_of("todo", h.clock, source=source)["points"].tolist()[:2] == [3, 3]


def test_macros_give_sql_null_for_null_values_of_every_type(make: Make) -> None:
    h = History()
    h.columns(
        "items",
        [
            {"name": "id", "type": "integer", "type_oid": 23, "key": True},
            {"name": "discount", "type": "numeric", "type_oid": 1700, "key": False},
            {"name": "meta", "type": "jsonb", "type_oid": 3802, "key": False},
        ],
    )
    h.create("items", "1", {"id": 1, "discount": None, "meta": None})
    h.create("items", "2", {"id": 2, "discount": Decimal("0.25"), "meta": {"a": 1}})
    con = duckdb(make(h))
    nulls = con.sql(
        "SELECT id FROM as_of_items(?) WHERE discount IS NULL AND meta IS NULL", params=[h.clock]
    ).fetchall()
    assert nulls == [(1,)]
