"""plot_activity draws changes over time per table or context value; activity() holds the counts."""

from __future__ import annotations

import pytest
from timetravel_history import TODO_COLUMNS, History

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
