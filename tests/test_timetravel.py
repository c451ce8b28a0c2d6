"""as_of, diff, history, audit, blame, changes: the same history on every source gives the same answers."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

import pandas as pd
import pyarrow as pa
import pytest
from timetravel_history import START, TODO_COLUMNS, History
from timetravel_sources import Make

from bemi_tt.timetravel import as_of, audit, blame, changes, diff, history
from capture.errors import ConfigurationError


def _todo(h: History) -> dict[str, datetime]:
    """Row 1 created then renamed; row 2 created then deleted; row 3 created later."""
    times = {}
    h.columns("todo", TODO_COLUMNS)
    row1 = {
        "id": 1,
        "task": "Sleep",
        "done": False,
        "price": Decimal("1.50"),
        "due": "2026-02-01T10:00:00+00:00",
    }
    times["created"] = h.create("todo", "1", row1, {"user_id": 187234, "endpoint": "/todo"})
    row2 = {"id": 2, "task": "Eat", "done": None, "price": None, "due": None}
    h.create("todo", "2", row2, {"user_id": 7})
    times["before_update"] = h.clock
    times["updated"] = h.update(
        "todo",
        "1",
        row1,
        {**row1, "task": "Sleep well", "done": True},
        {"user_id": 187234, "endpoint": "/todo/complete"},
    )
    times["deleted"] = h.delete("todo", "2", row2, {"user_id": 7, "endpoint": "/todo/2"})
    times["created3"] = h.create(
        "todo",
        "3",
        {"id": 3, "task": "Run", "done": False, "price": Decimal("10.00"), "due": None},
        {"user_id": 9},
    )
    return times


def test_as_of_returns_row_as_it_was_before_update(make: Make) -> None:
    h = History()
    t = _todo(h)
    source = make(h)
    old = as_of("todo", t["before_update"], source=source)
    new = as_of("todo", t["updated"], source=source)
    assert old.loc[1, "task"] == "Sleep" and not old.loc[1, "done"]
    assert new.loc[1, "task"] == "Sleep well" and new.loc[1, "done"]
    assert list(old.index) == [1, 2] and old.index.name == "id"


def test_as_of_dtypes_follow_the_postgresql_types(make: Make) -> None:
    h = History()
    t = _todo(h)
    frame = as_of("todo", t["created3"], source=make(h))
    assert str(frame.index.dtype) == "Int32"
    assert frame.dtypes.to_dict() == {
        "task": pd.StringDtype(),
        "done": pd.BooleanDtype(),
        "price": pd.ArrowDtype(pa.decimal128(10, 2)),
        "due": "datetime64[us, UTC]",
    }
    assert frame.loc[1, "price"] == Decimal("1.50") and isinstance(frame.loc[1, "price"], Decimal)
    assert frame.loc[1, "due"] == pd.Timestamp("2026-02-01T10:00:00Z")
    assert pd.isna(frame.loc[3, "due"])


def test_as_of_drops_deleted_rows_and_shows_later_inserts(make: Make) -> None:
    h = History()
    t = _todo(h)
    source = make(h)
    assert list(as_of("todo", t["deleted"], source=source).index) == [1]
    assert sorted(as_of("todo", t["created3"], source=source).index) == [1, 3]


def test_as_of_before_history_starts_says_when_it_starts(make: Make) -> None:
    h = History()
    _todo(h)
    source = make(h)
    with pytest.raises(
        ConfigurationError, match=r"before the history of public\.todo starts \(2026-01-01T00:00:01"
    ):
        as_of("todo", START, source=source)


def test_as_of_unknown_table_lists_the_known_ones(make: Make) -> None:
    h = History()
    _todo(h)
    h.create("users", "1", {"id": 1})
    with pytest.raises(ConfigurationError, match=r"unknown table 'nope'.*todo, users"):
        as_of("nope", h.clock, source=make(h))


def test_as_of_accepts_schema_qualified_names_and_naive_utc_times(make: Make) -> None:
    h = History()
    t = _todo(h)
    source = make(h)
    naive = t["updated"].replace(tzinfo=None)
    expected = as_of("todo", t["updated"], source=source)
    pd.testing.assert_frame_equal(as_of("public.todo", naive, source=source), expected)
    pd.testing.assert_frame_equal(as_of("todo", t["updated"].isoformat(), source=source), expected)
    pd.testing.assert_frame_equal(
        as_of("todo", pd.Timestamp(t["updated"]).tz_convert("Europe/Paris"), source=source), expected
    )


def test_as_of_key_returns_one_row_and_columns_selects(make: Make) -> None:
    h = History()
    t = _todo(h)
    source = make(h)
    one = as_of("todo", t["created3"], key=3, columns=["task"], source=source)
    assert list(one.index) == [3] and list(one.columns) == ["task"] and one.loc[3, "task"] == "Run"
    assert len(as_of("todo", t["created3"], key="3", source=source)) == 1
    with pytest.raises(ConfigurationError, match=r"unknown columns \['nope'\]"):
        as_of("todo", t["created3"], columns=["nope"], source=source)


def test_as_of_after_truncate_is_empty_then_new_rows_appear(make: Make) -> None:
    h = History()
    _todo(h)
    truncated = h.truncate("todo")
    later = h.create("todo", "5", {"id": 5, "task": "Again", "done": False, "price": None, "due": None})
    source = make(h)
    assert as_of("todo", truncated, source=source).empty
    assert list(as_of("todo", later, source=source).index) == [5]


def test_as_of_follows_a_key_update_and_the_old_key_disappears(make: Make) -> None:
    h = History()
    t = _todo(h)
    row3 = {"id": 3, "task": "Run", "done": False, "price": Decimal("10.00"), "due": None}
    moved = h.update("todo", "30", row3, {**row3, "id": 30})
    source = make(h)
    assert sorted(as_of("todo", t["created3"], source=source).index) == [1, 3]
    frame = as_of("todo", moved, source=source)
    assert sorted(frame.index) == [1, 30] and frame.loc[30, "task"] == "Run"


def test_as_of_orders_by_commit_position_not_by_timestamps(make: Make) -> None:
    """Two commits whose timestamps disagree with commit order: the later commit wins."""
    h = History()
    h.columns("todo", TODO_COLUMNS)
    h.create("todo", "1", {"id": 1, "task": "first", "done": False, "price": None, "due": None})
    stamp = h.clock
    h.update("todo", "1", {}, {"id": 1, "task": "second", "done": False, "price": None, "due": None})
    h.update("todo", "1", {}, {"id": 1, "task": "third", "done": False, "price": None, "due": None})
    h.changes[-2]["committed_at"] = stamp + timedelta(seconds=5)  # commit 2 stamped after commit 3
    source = make(h)
    assert as_of("todo", h.clock + timedelta(seconds=10), source=source).loc[1, "task"] == "third"
    # at commit 3's time, commit 2 (stamped later) has not happened: the prefix stops before it
    assert as_of("todo", h.clock, source=source).loc[1, "task"] == "first"


def test_as_of_snapshot_rows_are_rows_that_existed_when_tracking_began(make: Make) -> None:
    h = History()
    h.begin()
    h.columns("todo", TODO_COLUMNS)
    h.create(
        "todo", "1", {"id": 1, "task": "old", "done": True, "price": None, "due": None}, operation="SNAPSHOT"
    )
    began = h.commit()
    source = make(h)
    assert as_of("todo", began, source=source).loc[1, "task"] == "old"


def test_as_of_added_column_takes_its_fill_for_older_rows_and_dropped_column_goes(make: Make) -> None:
    h = History()
    t = _todo(h)
    with_points = [
        *TODO_COLUMNS,
        {"name": "points", "type": "bigint", "type_oid": 20, "key": False, "fill": 5},
    ]
    added = h.columns("todo", with_points)
    row3 = {"id": 3, "task": "Run", "done": False, "price": Decimal("10.00"), "due": None}
    updated = h.update("todo", "3", row3, {**row3, "points": 9})
    without_done = [c for c in with_points if c["name"] != "done"]
    dropped = h.columns("todo", without_done)
    source = make(h)
    assert "points" not in as_of("todo", t["created3"], source=source).columns
    at_add = as_of("todo", added, source=source)
    assert str(at_add["points"].dtype) == "Int64" and list(at_add["points"]) == [5, 5]
    assert list(as_of("todo", updated, source=source)["points"]) == [5, 9]
    assert list(as_of("todo", dropped, source=source).columns) == ["task", "price", "due", "points"]


def test_as_of_composite_key_gives_a_multiindex(make: Make) -> None:
    h = History()
    h.columns(
        "pairs",
        [
            {"name": "a", "type": "integer", "type_oid": 23, "key": True},
            {"name": "b", "type": "text", "type_oid": 25, "key": True},
            {"name": "v", "type": "integer[]", "type_oid": 1007, "key": False},
        ],
    )
    h.create("pairs", '[1,"x"]', {"a": 1, "b": "x", "v": [1, None, 3]})
    h.create("pairs", '[1,"y"]', {"a": 1, "b": "y", "v": None})
    moved = h.update("pairs", '[2,"y"]', {"a": 1, "b": "y", "v": None}, {"a": 2, "b": "y", "v": []})
    source = make(h)
    frame = as_of("pairs", moved, source=source)
    assert list(frame.index) == [(1, "x"), (2, "y")] and frame.index.names == ["a", "b"]
    assert frame.loc[(1, "x"), "v"] == [1, None, 3]
    assert len(as_of("pairs", moved, key=(2, "y"), source=source)) == 1


def test_as_of_latest_without_schema_rows_infers_columns_and_key(make: Make) -> None:
    h = History()
    h.create("loose", "1", {"id": 1, "name": "a", "n": 2})
    h.create("loose", "2", {"id": 2, "name": "b", "n": None})
    frame = as_of("loose", h.clock, source=make(h))
    assert list(frame.index) == [1, 2] and list(frame.columns) == ["n", "name"]  # sorted: jsonb loses order
    assert str(frame["n"].dtype) == "Int64"


def test_diff_of_a_time_with_itself_is_empty(make: Make) -> None:
    h = History()
    t = _todo(h)
    source = make(h)
    assert diff("todo", t["updated"], t["updated"], source=source).empty


def test_diff_reports_added_removed_and_changed_cells_with_their_context(make: Make) -> None:
    h = History()
    t = _todo(h)
    source = make(h)
    d = diff("todo", t["before_update"], t["created3"], source=source)
    changed = d.xs(1, level="id")
    assert set(changed.index) == {"task", "done"}
    assert changed.loc["task", "old"] == "Sleep" and changed.loc["task", "new"] == "Sleep well"
    assert changed.loc["task", "endpoint"] == "/todo/complete" and changed.loc["task", "user_id"] == 187234
    removed = d.xs(2, level="id")
    assert set(removed["change"]) == {"removed"} and set(removed["operation"]) == {"DELETE"}
    assert set(removed["endpoint"]) == {"/todo/2"}
    added = d.xs(3, level="id")
    assert set(added["change"]) == {"added"} and added.loc["task", "new"] == "Run"
    assert str(d["committed_at"].dtype) == "datetime64[us, UTC]"


def test_diff_rejects_t2_before_t1(make: Make) -> None:
    h = History()
    t = _todo(h)
    with pytest.raises(ConfigurationError, match=r"t2 .* is before t1"):
        diff("todo", t["updated"], t["created"], source=make(h))


def test_history_lists_every_version_with_validity_and_changed_columns(make: Make) -> None:
    h = History()
    t = _todo(h)
    h.delete("todo", "1", {"id": 1})
    frame = history("todo", 1, source=make(h))
    assert list(frame["operation"]) == ["CREATE", "UPDATE", "DELETE"]
    assert list(frame["task"].fillna("-")) == ["Sleep", "Sleep well", "-"]
    assert frame["changed"].iloc[1] == ["task", "done"]
    assert frame["valid_to"].iloc[0] == frame["valid_from"].iloc[1] == pd.Timestamp(t["updated"])
    assert pd.isna(frame["valid_to"].iloc[-1])
    assert list(frame["endpoint"].iloc[:2]) == ["/todo", "/todo/complete"]


def test_history_follows_the_row_across_a_key_update(make: Make) -> None:
    h = History()
    _todo(h)
    row3 = {"id": 3, "task": "Run", "done": False, "price": Decimal("10.00"), "due": None}
    h.update("todo", "30", row3, {**row3, "id": 30})
    frame = history("todo", 30, source=make(h))
    assert list(frame["id"]) == [3, 30] and list(frame["operation"]) == ["CREATE", "UPDATE"]
    assert frame["changed"].iloc[1] == ["id"]


def test_audit_filters_by_context_and_flattens_it(make: Make) -> None:
    h = History()
    _todo(h)
    source = make(h)
    mine = audit(user_id=187234, source=source)
    assert list(mine["operation"]) == ["CREATE", "UPDATE"]
    assert list(mine["endpoint"]) == ["/todo", "/todo/complete"]
    pd.testing.assert_frame_equal(audit(user_id="187234", source=source), mine)  # the CLI passes text
    assert list(audit("todo", operation="DELETE", source=source)["primary_key"]) == ["2"]
    assert mine["changed"].iloc[1] == ["task", "done"]


def test_audit_since_and_until_bound_the_commit_time(make: Make) -> None:
    h = History()
    t = _todo(h)
    frame = audit("todo", since=t["updated"], until=t["deleted"], source=make(h))
    assert list(frame["operation"]) == ["UPDATE", "DELETE"]


def test_changes_returns_the_feed_in_commit_order_with_exact_values(make: Make) -> None:
    h = History()
    _todo(h)
    feed = changes("todo", source=make(h))
    assert list(feed["commit_position"]) == sorted(feed["commit_position"])
    assert feed["after"].iloc[0]["price"] == Decimal("1.50")
    assert feed["context"].iloc[0]["user_id"] == 187234


def test_blame_names_the_change_that_set_each_current_value(make: Make) -> None:
    h = History()
    _todo(h)
    frame = blame("todo", source=make(h))
    assert frame.loc[(1, "task"), "endpoint"] == "/todo/complete"
    assert frame.loc[(1, "price"), "endpoint"] == "/todo"
    assert (
        frame.loc[(1, "price"), "operation"] == "CREATE" and frame.loc[(1, "task"), "operation"] == "UPDATE"
    )
    assert frame.loc[(1, "price"), "value"] == Decimal("1.50")
    one = frame.xs(3, level="id")
    assert set(one["user_id"]) == {9}


def test_blame_key_keeps_one_row(make: Make) -> None:
    h = History()
    _todo(h)
    frame = blame("todo", key=1, source=make(h))
    assert set(frame.index.get_level_values("id")) == {1}
    assert list(frame.index.get_level_values("column")) == ["task", "done", "price", "due"]


def test_as_of_table_without_primary_key_matches_rows_by_content(make: Make) -> None:
    h = History()
    h.columns(
        "log",
        [
            {"name": "msg", "type": "text", "type_oid": 25, "key": False},
            {"name": "n", "type": "integer", "type_oid": 23, "key": False},
        ],
    )
    h.create("log", None, {"msg": "a", "n": 1})
    h.create("log", None, {"msg": "a", "n": 1})  # a duplicate row
    h.create("log", None, {"msg": "b", "n": 2})
    updated = h.update("log", None, {"msg": "a", "n": 1}, {"msg": "a", "n": 5})
    deleted = h.delete("log", None, {"msg": "b", "n": 2})
    source = make(h)
    assert sorted(as_of("log", updated, source=source)["n"].tolist()) == [1, 2, 5]
    frame = as_of("log", deleted, source=source)
    assert sorted(frame["n"].tolist()) == [1, 5] and list(frame.index) == [0, 1]
