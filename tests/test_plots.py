"""plot_activity draws changes over time per table or context value; activity() holds the counts."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from timetravel_history import START, TODO_COLUMNS, History

from bemi_tt.plots import activity, plot_activity
from bemi_tt.sources import InMemorySource
from capture.errors import ConfigurationError


def _source() -> InMemorySource:
    h = History()
    h.columns("todo", TODO_COLUMNS)
    for i in range(6):
        h.create("todo", str(i), {"id": i, "task": "t"}, {"user_id": i % 2})
    h.create("users", "1", {"id": 1}, {"user_id": 1})
    h.create("users", "2", {"id": 2})
    return InMemorySource(h.changes, h.schemas)


def test_activity_counts_changes_per_table_and_bucket() -> None:
    counts = activity(source=_source(), freq="min")
    assert list(counts.columns) == ["todo", "users"]
    assert counts["todo"].sum() == 6 and counts["users"].sum() == 2


def test_activity_by_context_key_counts_each_value() -> None:
    counts = activity("todo", by="user_id", freq="D", source=_source())
    assert counts.to_dict("list") == {"0": [3], "1": [3]}


def test_activity_rejects_an_unknown_frequency() -> None:
    with pytest.raises(ConfigurationError, match="freq 'fortnight'"):
        activity(source=_source(), freq="fortnight")


def test_plot_activity_draws_one_bar_series_per_table() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = plot_activity(source=_source())
    try:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["todo", "users"]
        assert len(ax.containers) == 2
        assert sum(bar.get_height() for bar in ax.containers[0]) == 6
    finally:
        plt.close(ax.figure)


def _gapped_source() -> InMemorySource:
    """Two changes at 00:00:01 and one at 00:03:01 (UTC): the minutes 00:01 and 00:02 have no change."""
    h = History()
    h.columns("todo", TODO_COLUMNS)
    h.create("todo", "1", {"id": 1, "task": "a"})
    h.create("todo", "2", {"id": 2, "task": "b"})
    h.clock += timedelta(minutes=3) - timedelta(seconds=2)
    h.create("todo", "3", {"id": 3, "task": "c"})
    return InMemorySource(h.changes, h.schemas)


def _bar_starts(ax: Any) -> list[datetime]:
    import matplotlib.dates as mdates

    return [mdates.num2date(bar.get_x(), tz=timezone.utc) for bar in ax.containers[0]]


def test_plot_activity_x_axis_is_utc_time_whatever_matplotlib_timezone() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"timezone": "Asia/Tokyo"}):  # a local setting must not shift the axis
        ax = plot_activity(source=_gapped_source(), freq="min")
        try:
            units = ax.xaxis.get_units()  # matplotlib's date converter keeps the plotted values' tzinfo
            assert units is not None and units.utcoffset(None) == timedelta(0)
            assert _bar_starts(ax)[0] == START.replace(second=0)
            assert ax.format_xdata(ax.containers[0][0].get_x()) == "2026-01-01 00:00:00"
            assert "UTC" in ax.get_xlabel()
        finally:
            plt.close(ax.figure)


def test_activity_and_plot_keep_empty_buckets_as_zeros() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = activity(source=_gapped_source(), freq="min")
    assert counts["todo"].tolist() == [2, 0, 0, 1]
    assert counts.index.tolist() == [START.replace(second=0) + timedelta(minutes=m) for m in range(4)]
    ax = plot_activity(source=_gapped_source(), freq="min")
    try:
        assert [bar.get_height() for bar in ax.containers[0]] == [2, 0, 0, 1]
        assert _bar_starts(ax) == counts.index.tolist()
    finally:
        plt.close(ax.figure)


def test_snapshot_rows_are_not_counted_as_activity() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = History()
    h.columns("todo", TODO_COLUMNS)
    h.columns("users", TODO_COLUMNS[:1])
    h.begin()  # the baseline taken when tracking began: rows that existed, not changes anyone made
    for i in range(5):
        h.create("todo", str(i), {"id": i, "task": "old"}, operation="SNAPSHOT")
    h.create("users", "1", {"id": 1}, operation="SNAPSHOT")
    h.commit()
    h.clock += timedelta(days=30)
    h.update("todo", "1", {"id": 1, "task": "old"}, {"id": 1, "task": "new"}, {"user_id": 7})
    h.create("todo", "9", {"id": 9, "task": "t"}, {"user_id": 7})
    source = InMemorySource(h.changes, h.schemas)

    counts = activity(source=source, freq="D")
    assert counts.to_dict("list") == {"todo": [2]}  # one day, not 31 days from the baseline
    assert activity(source=source, by="operation", freq="D").to_dict("list") == {"CREATE": [1], "UPDATE": [1]}
    ax = plot_activity(source=source, by="user_id")
    try:
        assert sum(bar.get_height() for c in ax.containers for bar in c) == 2
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["7"]
    finally:
        plt.close(ax.figure)
    with pytest.raises(ConfigurationError, match="SNAPSHOT"):
        activity(source=source, operation="SNAPSHOT")
