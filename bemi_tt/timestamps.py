"""The one parser for time arguments: every form a person or a DataFrame hands over, as one UTC instant.

Accepted: ``datetime`` and ``pd.Timestamp`` (naive means UTC), ``date`` (its midnight UTC),
``np.datetime64`` (numpy's times are naive: UTC), ISO 8601 strings (``'2026-11-27T10:00:00+01:00'``,
``'2026-11-27'``, naive means UTC) and ``'now'``/``'today'`` (UTC, whatever the local time zone). Finer
than microseconds is cut down (floor) to the microsecond ``changes.committed_at`` holds, so a cut never
takes in a commit made after the time asked for. Anything else (numbers, time-of-day strings, NaT) is a
``ConfigurationError`` naming the argument and its value.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timezone
from typing import Any

import numpy as np
import pandas as pd

from capture.errors import ConfigurationError

__all__ = ["TimeLike", "to_utc"]

#: What every time argument of the analysis API accepts.
TimeLike = datetime | date | str | pd.Timestamp | np.datetime64

_FORMS = "a datetime, a date, an ISO 8601 string, 'now', a pandas Timestamp or a numpy datetime64"
# pandas reads a bare time of day as *today* in the local time zone: refuse it instead of guessing a date
_TIME_OF_DAY = re.compile(r"^T?\d{1,2}(:\d{2}){1,2}(\.\d+)?\s*(Z|UTC|[+-]\d{2}(:?\d{2})?)?$", re.IGNORECASE)


def _bad(name: str, value: Any, why: str) -> ConfigurationError:
    return ConfigurationError(f"{name}={value!r} {why}")


def _parse_text(value: str, name: str) -> pd.Timestamp:
    text = value.strip()
    if not text:
        raise _bad(name, value, "is empty: pass an ISO 8601 time such as '2026-01-31T12:00:00+00:00'")
    if text.lower() in ("now", "today"):  # pandas reads these as *local* naive times: be explicit
        now = pd.Timestamp.now(tz="UTC").as_unit("us")
        return now.floor("D") if text.lower() == "today" else now
    if _TIME_OF_DAY.match(text):
        raise _bad(name, value, "is a time of day without a date: write it like '2026-01-31T12:00:00+00:00'")
    try:
        return pd.Timestamp(text)
    except (ValueError, TypeError, OverflowError) as exc:
        raise _bad(
            name, value, f"is not an ISO 8601 time ({exc}); write it like '2026-01-31T12:00:00+00:00'"
        ) from None


def to_utc(value: Any, name: str = "ts") -> pd.Timestamp:
    """``value`` as a tz-aware UTC ``pd.Timestamp`` with microsecond resolution; naive input is UTC."""
    if isinstance(value, bool) or value is None:
        raise _bad(name, value, f"is not a time: pass {_FORMS}")
    try:
        if isinstance(value, str):
            parsed = _parse_text(value, name)
        elif isinstance(value, (pd.Timestamp, datetime, np.datetime64)):
            parsed = pd.Timestamp(value)
        elif isinstance(value, date):
            parsed = pd.Timestamp(datetime(value.year, value.month, value.day))
        elif isinstance(value, time):
            raise _bad(name, value, "is a time of day without a date: pass a datetime")
        else:
            raise _bad(name, value, f"({type(value).__name__}) is not a time: pass {_FORMS}")
    except (OverflowError, ValueError) as exc:
        if isinstance(exc, ConfigurationError):
            raise
        raise _bad(name, value, f"cannot be read as a time ({exc}): pass a real instant") from None
    if parsed is pd.NaT or pd.isna(parsed):
        raise _bad(name, value, "is not a time (NaT): pass a real instant")
    if parsed.unit == "ns":  # as_unit truncates toward zero, which rounds times before 1970 up
        parsed = parsed.floor("us")
    try:
        parsed = parsed.as_unit("us")
        if parsed.tzinfo is None:
            parsed = parsed.tz_localize(timezone.utc)
        return parsed.tz_convert("UTC")
    except (OverflowError, ValueError) as exc:  # out of the microsecond range (±292,000 years)
        raise _bad(
            name, value, f"is out of range ({exc}): pass a time within ±290,000 years of 1970"
        ) from None
