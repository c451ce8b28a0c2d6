"""The one time parser: datetime (naive means UTC), ISO strings, pandas Timestamps; clear errors."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

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
    ],
)
def test_to_utc_accepts_every_documented_form(value: object) -> None:
    parsed = to_utc(value)
    assert parsed == INSTANT and str(parsed.tz) == "UTC" and parsed.unit == "us"


def test_to_utc_takes_a_date_as_its_midnight_utc() -> None:
    assert to_utc(date(2026, 11, 27)) == pd.Timestamp("2026-11-27T00:00:00Z")


@pytest.mark.parametrize(
    "value,message",
    [
        pytest.param("yesterday-ish", "'yesterday-ish' is not an ISO 8601 time", id="garbage"),
        pytest.param("", "is empty", id="empty"),
        pytest.param(None, "None is not a time", id="none"),
        pytest.param(1700000000, "1700000000 \\(int\\) is not a time", id="epoch-number"),
        pytest.param(True, "True is not a time", id="bool"),
        pytest.param(pd.NaT, "NaT", id="nat"),
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
