"""``plot_activity``: a timeline of changes per table or per context value, for notebooks (matplotlib).

matplotlib is imported only when a plot is drawn; it ships in the ``[plot]`` extra.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from bemi_tt.timetravel import audit
from capture.errors import ConfigurationError

__all__ = ["activity", "plot_activity"]

_FREQUENCIES = ("auto", "s", "min", "h", "D", "W")


def _pick_frequency(times: pd.Series) -> str:
    if times.empty:
        return "D"
    span = times.max() - times.min()
    for freq, limit in (
        ("s", pd.Timedelta(minutes=2)),
        ("min", pd.Timedelta(hours=2)),
        ("h", pd.Timedelta(days=3)),
        ("D", pd.Timedelta(days=120)),
    ):
        if span <= limit:
            return freq
    return "W"


def activity(
    table: str | None = None,
    since: Any = None,
    until: Any = None,
    *,
    by: str = "table",
    freq: str = "auto",
    source: Any = None,
    **context_filters: Any,
) -> pd.DataFrame:
    """Changes counted per time bucket (rows) and per ``by`` value (columns): ``by`` is ``"table"``,
    ``"operation"`` or a context key such as ``"user_id"``."""
    if not isinstance(by, str) or not by:
        raise ConfigurationError(f"by must be 'table', 'operation' or a context key, got {by!r}")
    if freq not in _FREQUENCIES:
        raise ConfigurationError(f"freq {freq!r} is not one of {list(_FREQUENCIES)!r}")
    feed = audit(table, since, until, source=source, **context_filters)
    if by == "table":
        groups = pd.Series(
            [
                t if sch == "public" else f"{sch}.{t}"
                for sch, t in zip(feed["schema"], feed["table"], strict=True)
            ],
            index=feed.index,
            dtype=object,
        )
    elif by in feed.columns and by not in ("committed_at", "before", "after", "changed"):
        groups = feed[by].map(lambda v: "(none)" if v is None else str(v))
    else:
        groups = pd.Series(["(none)"] * len(feed), index=feed.index, dtype=object)
    step = _pick_frequency(feed["committed_at"]) if freq == "auto" else freq
    times = feed["committed_at"].dt.tz_convert("UTC")
    if step == "W":
        buckets = times.dt.tz_localize(None).dt.to_period("W").dt.start_time.dt.tz_localize("UTC")
    else:
        buckets = times.dt.floor(step)
    counts = pd.crosstab(buckets.rename("committed_at"), groups.astype(str).rename(by))
    return counts.sort_index()


def plot_activity(
    table: str | None = None,
    since: Any = None,
    until: Any = None,
    *,
    by: str = "table",
    freq: str = "auto",
    source: Any = None,
    ax: Any = None,
    **context_filters: Any,
) -> Any:
    """Stacked bars of changes over time per table (or per ``by`` value); returns the matplotlib Axes."""
    counts = activity(table, since, until, by=by, freq=freq, source=source, **context_filters)
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigurationError("plot_activity needs matplotlib: pip install 'bemi-tt[plot]'") from exc
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.5))
    bottom = None
    labels = [t.strftime("%Y-%m-%d %H:%M:%S") for t in counts.index]
    positions = range(len(counts))
    for column in counts.columns:
        ax.bar(positions, counts[column].to_numpy(), bottom=bottom, label=str(column))
        bottom = counts[column].to_numpy() if bottom is None else bottom + counts[column].to_numpy()
    step = max(1, len(labels) // 8)
    ax.set_xticks(list(positions)[::step], labels[::step], rotation=30, ha="right")
    ax.set_ylabel("changes")
    ax.set_title("changes per " + ("table" if by == "table" else by))
    if len(counts.columns):
        ax.legend(title=by, fontsize="small")
    return ax
