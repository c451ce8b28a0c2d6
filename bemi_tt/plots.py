"""``plot_activity``: a timeline of changes per table or per context value, for notebooks (matplotlib).

Activity is what people and jobs did: CREATE, UPDATE, DELETE and TRUNCATE. SNAPSHOT rows are the state of
the tables when tracking began, so they are never counted. Buckets are UTC intervals (``committed_at`` is
UTC); a bucket without a change is kept with zero counts, so gaps show as gaps on a real time axis.

matplotlib is imported only when a plot is drawn; it ships in the ``[plot]`` extra.
"""

from __future__ import annotations

from datetime import timezone
from typing import Any

import pandas as pd

from bemi_tt.arguments import SourceLike, TimeLike
from bemi_tt.timetravel import audit
from capture.errors import ConfigurationError

__all__ = ["activity", "plot_activity"]

_FREQUENCIES = ("auto", "s", "min", "h", "D", "W")
_ACTIVITY = ("CREATE", "UPDATE", "DELETE", "TRUNCATE")
# an axis of more buckets than this is unreadable and costly: ask for a coarser frequency instead
_MAX_BUCKETS = 100_000


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


def _width(step: str) -> pd.Timedelta:
    """The length of one bucket of frequency ``step``."""
    return pd.Timedelta(days=7) if step == "W" else pd.Timedelta(1, unit=step)


def _operations(operation: Any) -> list[str]:
    """The operations to count: all activity by default; SNAPSHOT is refused (it is a baseline)."""
    if operation is None:
        return list(_ACTIVITY)
    ops = [operation] if isinstance(operation, str) else list(operation)
    if "SNAPSHOT" in ops:
        raise ConfigurationError(
            "operation 'SNAPSHOT' is not activity (SNAPSHOT rows are the rows that existed when tracking "
            "began): count CREATE, UPDATE, DELETE or TRUNCATE, or read SNAPSHOT rows with audit()"
        )
    return ops


def activity(
    table: str | None = None,
    since: TimeLike | None = None,
    until: TimeLike | None = None,
    *,
    by: str = "table",
    freq: str = "auto",
    operation: Any = None,
    source: SourceLike | None = None,
    **context_filters: Any,
) -> pd.DataFrame:
    """Changes counted per UTC time bucket (rows) and per ``by`` value (columns): ``by`` is ``"table"``,
    ``"operation"`` or a context key such as ``"user_id"``.

    The index holds every bucket from the first change to the last (tz-aware UTC bucket starts), zeros
    included; SNAPSHOT rows are not counted. ``operation`` narrows the count (default: all activity)."""
    if not isinstance(by, str) or not by:
        raise ConfigurationError(f"by must be 'table', 'operation' or a context key, got {by!r}")
    if freq not in _FREQUENCIES:
        raise ConfigurationError(f"freq {freq!r} is not one of {list(_FREQUENCIES)!r}")
    feed = audit(table, since, until, operation=_operations(operation), source=source, **context_filters)
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
        groups = feed[by].map(lambda v: "(none)" if v is None or v is pd.NA else str(v))
    else:
        groups = pd.Series(["(none)"] * len(feed), index=feed.index, dtype=object)
    times = feed["committed_at"].dt.tz_convert("UTC")
    step = _pick_frequency(times) if freq == "auto" else freq
    if step == "W":  # weeks start on Monday, 00:00 UTC
        days = times.dt.floor("D")
        buckets = days - pd.to_timedelta(days.dt.dayofweek, unit="D")
    else:
        buckets = times.dt.floor(step)
    counts = pd.crosstab(buckets.rename("committed_at"), groups.astype(str).rename(by))
    counts.attrs.update(feed.attrs)  # the source and how fresh it is, as on every answer
    counts.attrs["freq"] = step
    if counts.empty:
        return counts
    width = _width(step)
    first, last = counts.index.min(), counts.index.max()
    if (last - first) / width >= _MAX_BUCKETS:
        raise ConfigurationError(
            f"freq {step!r} gives more than {_MAX_BUCKETS} buckets from {first.isoformat()} to "
            f"{last.isoformat()}: pass a coarser freq (one of {list(_FREQUENCIES[1:])!r}) or a shorter "
            "since/until window"
        )
    # every bucket in the span, the empty ones as zeros: a quiet hour is part of the answer
    every = pd.date_range(first, last, freq=width, name="committed_at", unit="us")
    filled = counts.reindex(every, fill_value=0)
    filled.attrs = counts.attrs
    return filled


def plot_activity(
    table: str | None = None,
    since: TimeLike | None = None,
    until: TimeLike | None = None,
    *,
    by: str = "table",
    freq: str = "auto",
    operation: Any = None,
    source: SourceLike | None = None,
    ax: Any = None,
    **context_filters: Any,
) -> Any:
    """Stacked bars of changes over time per table (or per ``by`` value) on a UTC time axis; each bar
    spans its bucket, empty buckets included. Returns the matplotlib Axes."""
    counts = activity(
        table, since, until, by=by, freq=freq, operation=operation, source=source, **context_filters
    )
    try:
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigurationError("plot_activity needs matplotlib: pip install 'bemi-tt[plot]'") from exc
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.5))
    # tz-aware UTC datetimes: matplotlib's date converter places them on a real time axis
    starts = counts.index.to_pydatetime()
    width = _width(counts.attrs["freq"]) / pd.Timedelta(days=1)  # matplotlib's date unit is the day
    bottom = None
    for column in counts.columns:
        heights = counts[column].to_numpy()
        # a bar covers 90% of its bucket from the bucket's start, so bars of adjacent buckets stay apart
        ax.bar(starts, heights, width=width * 0.9, bottom=bottom, align="edge", label=str(column))
        bottom = heights if bottom is None else bottom + heights
    # labelled in UTC whatever matplotlib's timezone setting says (the counts are UTC buckets)
    locator = mdates.AutoDateLocator(tz=timezone.utc)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    formatter = mdates.ConciseDateFormatter(locator, tz=timezone.utc)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_formatter(formatter)
    ax.set_xlabel("commit time (UTC)")
    ax.set_ylabel("changes")
    ax.set_title("changes per " + ("table" if by == "table" else by))
    if len(counts.columns):
        ax.legend(title=by, fontsize="small")
    return ax
