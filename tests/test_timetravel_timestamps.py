"""The one time parser: datetime (naive means UTC), ISO strings, pandas Timestamps, numpy datetime64;
clear errors naming the value."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from bemi_tt.timestamps import to_utc
from capture.errors import ConfigurationError

INSTANT = pd.Timestamp("2026-11-27T10:00:00.123456Z")


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(datetime(2026, 11, 27, 10, 0, 0, 123456), id="naive-datetime-is-utc"),
        pytest.param(
            datetime(2026, 11, 27, 11, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1))), id="aware"
        ),
        pytest.param("2026-11-27T10:00:00.123456", id="naive-iso-is-utc"),
        pytest.param("2026-11-27 12:00:00.123456+02:00", id="iso-offset"),
        pytest.param("2026-11-27T10:00:00.123456Z", id="iso-z"),
        pytest.param(pd.Timestamp("2026-11-27T05:00:00.123456-05:00"), id="timestamp"),
        pytest.param(pd.Timestamp("2026-11-27T10:00:00.123456"), id="naive-timestamp"),
        pytest.param(np.datetime64("2026-11-27T10:00:00.123456"), id="numpy-us-is-utc"),
        pytest.param(np.datetime64("2026-11-27T10:00:00.123456789"), id="numpy-ns-floored"),
        pytest.param(pd.Timestamp("2026-11-27T10:00:00.123456999Z"), id="timestamp-ns-floored"),
        pytest.param("2026-11-27T10:00:00.1234569Z", id="iso-ns-floored"),
    ],
)
def test_to_utc_accepts_every_documented_form(value: object) -> None:
    parsed = to_utc(value)
    assert parsed == INSTANT and str(parsed.tz) == "UTC" and parsed.unit == "us"


def test_to_utc_takes_a_date_as_its_midnight_utc() -> None:
    assert to_utc(date(2026, 11, 27)) == pd.Timestamp("2026-11-27T00:00:00Z")
    assert to_utc(np.datetime64("2026-11-27")) == pd.Timestamp("2026-11-27T00:00:00Z")


def test_to_utc_cuts_nanoseconds_down_even_before_1970() -> None:
    """A cut never takes in a commit after the time asked for: 23:59:59.9999999 is not midnight."""
    late = np.datetime64("1969-12-31T23:59:59.999999900")
    assert to_utc(late) == pd.Timestamp("1969-12-31T23:59:59.999999Z")


def test_to_utc_keeps_numpy_times_beyond_the_nanosecond_range() -> None:
    far = np.datetime64("10000-01-01")
    assert to_utc(far) == pd.Timestamp(far).tz_localize("UTC") and to_utc(far).year == 10000


@pytest.mark.parametrize(
    "value,message",
    [
        pytest.param("yesterday-ish", "'yesterday-ish' is not an ISO 8601 time", id="garbage"),
        pytest.param("", "is empty", id="empty"),
        pytest.param(None, "None is not a time", id="none"),
        pytest.param(1700000000, "1700000000 \\(int\\) is not a time", id="epoch-number"),
        pytest.param(True, "True is not a time", id="bool"),
        pytest.param(pd.NaT, "NaT", id="nat"),
        pytest.param(np.datetime64("NaT"), "is not a time \\(NaT\\)", id="numpy-nat"),
        pytest.param("10:00", "'10:00' is a time of day without a date", id="time-of-day-text"),
        pytest.param("T10:00:00Z", "is a time of day without a date", id="time-of-day-iso"),
        pytest.param(time(10, 0), "is a time of day without a date", id="time-object"),
        pytest.param(np.datetime64("300000-01-01", "D"), "out of range", id="numpy-beyond-microseconds"),
    ],
)
def test_to_utc_rejects_non_times_naming_the_value(value: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        to_utc(value, "ts")


def test_now_is_the_current_utc_instant_whatever_the_local_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    try:
        before = pd.Timestamp.now(tz="UTC")
        parsed = to_utc("now")
        after = pd.Timestamp.now(tz="UTC")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert before <= parsed <= after and str(parsed.tz) == "UTC"
    assert to_utc("today") == before.floor("D")
