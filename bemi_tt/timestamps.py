"""The one parser for time arguments: ``datetime`` (naive means UTC), ISO 8601 strings, pandas Timestamps."""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Any

import pandas as pd

from capture.errors import ConfigurationError

__all__ = ["TimeLike", "to_utc"]

#: What every time argument of the analysis API accepts.
TimeLike = datetime | date | str | pd.Timestamp


def to_utc(value: Any, name: str = "ts") -> pd.Timestamp:
    """``value`` as a tz-aware UTC ``pd.Timestamp`` with microsecond resolution; naive input is UTC."""
    if isinstance(value, bool) or value is None:
        raise ConfigurationError(
            f"{name}={value!r} is not a time: pass a datetime, an ISO 8601 string or a pandas Timestamp"
        )
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ConfigurationError(
                f"{name}={value!r} is empty: pass an ISO 8601 time such as '2026-01-31T12:00:00+00:00'"
            )
        if text.lower() in ("now", "today"):  # pandas reads these as *local* naive times: be explicit
            now = pd.Timestamp.now(tz="UTC")
            return now.floor("D") if text.lower() == "today" else now.as_unit("us")
        try:
            parsed = pd.Timestamp(text)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"{name}={value!r} is not an ISO 8601 time ({exc}); write it like '2026-01-31T12:00:00+00:00'"
            ) from None
    elif isinstance(value, (pd.Timestamp, datetime)):
        parsed = pd.Timestamp(value)
    elif isinstance(value, date):
        parsed = pd.Timestamp(datetime(value.year, value.month, value.day))
    else:
        raise ConfigurationError(
            f"{name}={value!r} ({type(value).__name__}) is not a time: pass a datetime, "
            "an ISO 8601 string or a pandas Timestamp"
        )
    if parsed is pd.NaT or pd.isna(parsed):
        raise ConfigurationError(f"{name}={value!r} is not a time (NaT): pass a real instant")
    if parsed.tzinfo is None:
        parsed = parsed.tz_localize(timezone.utc)
    return parsed.tz_convert("UTC").as_unit("us")
