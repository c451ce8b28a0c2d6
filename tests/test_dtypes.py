"""bemi_tt.dtypes: the one mapping from PostgreSQL values (as ``to_jsonb`` writes them) to pandas columns."""

from __future__ import annotations

import json
import math
from datetime import date
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from timetravel_history import History

from bemi_tt.dtypes import column_type, frame_from_json, spec_type
from bemi_tt.sources import InMemorySource
from bemi_tt.timetravel import as_of

_CYCLE_DAYS = 146097  # days in 400 Gregorian years: the calendar repeats


def _epoch_us(year: int, month: int, day: int, micros_of_day: int) -> int:
    """Microseconds since 1970 of a proleptic Gregorian date (astronomical year, 0 = 1 BC), without numpy."""
    cycles = (year - 1) // 400  # moves the year into 1..400, where Python's date works
    days = date(year - 400 * cycles, month, day).toordinal() + cycles * _CYCLE_DAYS
    days -= date(1970, 1, 1).toordinal()
    return days * 86_400_000_000 + micros_of_day


def _pg_text(year: int, month: int, day: int, micros: int, offset: int | None) -> str:
    """A timestamp written as PostgreSQL's to_jsonb writes it (" BC" for year <= 0, offset ±HH:MM[:SS])."""
    seconds, us = divmod(micros, 1_000_000)
    text = f"{year if year > 0 else 1 - year:04d}-{month:02d}-{day:02d}T"
    text += f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    if us:
        text += f".{us:06d}".rstrip("0")
    if offset is not None:
        sign, size = ("+" if offset >= 0 else "-"), abs(offset)
        text += f"{sign}{size // 3600:02d}:{size // 60 % 60:02d}" + (f":{size % 60:02d}" if size % 60 else "")
    return text + (" BC" if year <= 0 else "")


@settings(max_examples=300, deadline=None)
@given(
    year=st.integers(-4712, 294_000),
    month=st.integers(1, 12),
    day=st.integers(1, 28),
    micros=st.integers(0, 86_400_000_000 - 1),
    offset=st.one_of(st.none(), st.integers(-15 * 3600, 15 * 3600)),
)
def test_every_timestamp_postgresql_writes_reads_back_as_the_same_instant(
    year: int, month: int, day: int, micros: int, offset: int | None
) -> None:
    text = _pg_text(year, month, day, micros, offset)
    kind = column_type("timestamp with time zone" if offset is not None else "timestamp without time zone")
    column = frame_from_json([json.dumps({"t": text}), "{}"], [("t", kind)])["t"]
    assert column.dtype == kind.dtype, text
    expected = _epoch_us(year, month, day, micros) - (offset or 0) * 1_000_000
    assert column.iloc[0].as_unit("us").asm8.view("i8") == expected, text
    assert column.iloc[1] is pd.NaT


@pytest.mark.parametrize("pg_type", ["timestamp without time zone", "timestamp with time zone"])
@pytest.mark.parametrize("special", ["infinity", "-infinity", "294276-12-31T23:59:59"])
def test_timestamps_pandas_cannot_hold_keep_their_text_in_an_object_column(
    pg_type: str, special: str
) -> None:
    aware = pg_type == "timestamp with time zone"
    if aware and special[0].isdigit():
        special += "+00:00"
    ordinary = "2026-01-01T00:00:00" + ("+00:00" if aware else "")
    column = frame_from_json(
        [json.dumps({"t": special}), '{"t": null}', json.dumps({"t": ordinary})],
        [("t", column_type(pg_type))],
    )["t"]
    assert column.dtype == object
    assert column.iloc[0] == special and column.iloc[1] is None
    assert isinstance(column.iloc[2], pd.Timestamp)


def _column(pg_type: str, values: list[Any]) -> pd.Series:
    rows = [json.dumps({"v": v}, default=str) if v is not None else "{}" for v in values]
    return frame_from_json(rows, [("v", column_type(pg_type))])["v"]


def test_float_nan_gets_an_arrow_column_while_ordinary_columns_keep_their_dtypes() -> None:
    with_nan = _column("double precision", ["NaN", None, 1.5, "-Infinity"])
    assert str(with_nan.dtype) == "double[pyarrow]"
    assert with_nan.isna().tolist() == [False, True, False, False] and math.isnan(with_nan.iloc[0])
    real = _column("real", ["NaN", None])
    assert str(real.dtype) == "float[pyarrow]" and real.isna().tolist() == [False, True]
    plain = _column("double precision", [None, 1.5, "Infinity"])
    assert plain.dtype == np.dtype("float64") and plain.iloc[2] == math.inf
    frame = frame_from_json(
        ['{"i": 1, "f": 0.5, "n": 1.25, "t": "2026-01-01T00:00:00+00:00", "d": "2026-01-01"}', "{}"],
        [
            ("i", column_type("integer")),
            ("f", column_type("double precision")),
            ("n", column_type("numeric(10,2)")),
            ("t", column_type("timestamp with time zone")),
            ("d", column_type("date")),
        ],
    )
    assert [str(t) for t in frame.dtypes] == [
        "Int32",
        "float64",
        "decimal128(10, 2)[pyarrow]",
        "datetime64[us, UTC]",
        "object",
    ]
    assert frame["d"].iloc[0] == date(2026, 1, 1) and frame["d"].iloc[1] is None


@pytest.mark.parametrize("pg_type", ["numeric", "numeric(10,2)"])
def test_numeric_nan_and_infinities_stay_decimals(pg_type: str) -> None:
    column = _column(pg_type, ["NaN", None, 1.25] + (["Infinity", "-Infinity"] if "(" not in pg_type else []))
    assert column.dtype == object
    assert column.iloc[0].is_nan() and column.iloc[1] is None and column.iloc[2] == Decimal("1.25")
    if "(" not in pg_type:
        assert column.iloc[3] == Decimal("Infinity") and column.iloc[4] == Decimal("-Infinity")


@pytest.mark.parametrize(
    ("base", "dtype"),
    [("int4", "Int32"), ("int8", "Int64"), ("numeric", "object"), ("timestamptz", "datetime64[us, UTC]")],
)
def test_a_domain_is_typed_by_its_base_type(base: str, dtype: str) -> None:
    spec = {"name": "v", "type": "public.my_domain", "type_oid": 16500, "base_type": base}
    assert _name(spec_type(spec).dtype) == dtype
    assert _name(spec_type({**spec, "base_type": f"_{base}"}).dtype) == "object"  # a domain over an array
    assert _name(spec_type({"name": "v", "type": "my_enum", "type_oid": 16501}).dtype) == "string"


def _name(dtype: Any) -> str:
    return str(pd.Series([], dtype=dtype).dtype)


def test_timestamp_arrays_keep_bc_and_infinity() -> None:
    column = _column("timestamp without time zone[]", [["infinity", "0044-03-15T12:00:00 BC", None]])
    first = column.iloc[0]
    assert first[0] == "infinity" and first[2] is None
    assert isinstance(first[1], pd.Timestamp) and first[1].year == -43


_stamps = st.tuples(
    st.integers(-4712, 294_000),
    st.integers(1, 12),
    st.integers(1, 28),
    st.integers(0, 86_400_000_000 - 1),
    st.one_of(st.none(), st.integers(-15 * 3600, 15 * 3600)),
)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.one_of(st.none(), _stamps), min_size=1, max_size=5))
def test_as_of_reads_every_timestamp_like_the_python_mapping(values: list[Any]) -> None:
    """The DuckDB path of as_of (casts, Arrow) gives each instant the Python mapping gives, or hands over."""
    columns = [
        {"name": "id", "type": "integer", "type_oid": 23, "key": True},
        {"name": "tz", "type": "timestamp with time zone", "type_oid": 1184, "key": False},
        {"name": "ts", "type": "timestamp without time zone", "type_oid": 1114, "key": False},
    ]
    rows = []
    for i, value in enumerate(values):
        tz = ts = None
        if value is not None:
            year, month, day, micros, offset = value
            tz = _pg_text(year, month, day, micros, offset or 0)
            ts = _pg_text(year, month, day, micros, None)
        rows.append({"id": i, "tz": tz, "ts": ts})
    h = History()
    h.columns("t", columns)
    for row in rows:
        h.create("t", str(row["id"]), row)
    frame = as_of("t", h.clock, source=InMemorySource(h.changes, h.schemas))
    expected = frame_from_json(
        [json.dumps(r) for r in rows], [("tz", spec_type(columns[1])), ("ts", spec_type(columns[2]))]
    )
    expected.index = pd.Index(pd.array(range(len(rows)), dtype="Int32"), name="id")
    pd.testing.assert_frame_equal(frame, expected)
