"""PostgreSQL column types → pandas dtypes, and typed JSON rows (as ``changes.after`` holds them) → columns.

The mapping (one place, used by ``as_of``, ``diff``, ``history``, ``blame`` and the typed DuckDB macros):
``smallint/integer/bigint`` → ``Int16/Int32/Int64``; ``boolean`` → ``boolean``; ``real/double precision`` →
``float32/float64``; ``numeric(p,s)`` → ``pd.ArrowDtype(pa.decimal128(p, s))`` (exact, vectorised; scalars
come out as ``decimal.Decimal``), unconstrained ``numeric`` → ``object`` of exact ``decimal.Decimal`` (no
fixed scale fits every value); ``timestamp with time zone`` → ``datetime64[us, UTC]``; ``timestamp`` →
``datetime64[us]`` (BC years as astronomical years: 44 BC is -43); ``date``/``time`` → ``object`` of
``datetime.date``/``datetime.time``; ``json/jsonb`` → ``object`` of dicts/lists; arrays → ``object`` of
lists; ``bytea`` → ``object`` of ``bytes``; a domain → its base type (``base_type`` in ``changes_schemas``);
text, uuid, enums, intervals and the rest → ``string``.

Every value PostgreSQL can store stays distinguishable; where the usual dtype cannot hold a column's values
the column (only that one) takes a dtype that can: floats holding NaN → ``double[pyarrow]``/``float[pyarrow]``
(NULL is ``<NA>``, NaN is NaN; in ``float64`` NaN would mean NULL); numerics holding NaN or ±Infinity →
``object`` of ``Decimal``; timestamps holding ``infinity``/``-infinity`` or years past 294246 → ``object``
of ``pd.Timestamp``, such values kept as PostgreSQL's text (``"infinity"``); dates that ``datetime.date``
cannot hold (infinity, BC) stay their text too.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, time
from decimal import Decimal
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

__all__ = [
    "ColumnType",
    "column_type",
    "frame_from_json",
    "infer_type",
    "parse_json",
    "spec_type",
    "typed_rows",
    "typed_series",
]

_PARAMS = re.compile(r"\([^)]*\)")


@dataclass(frozen=True)
class ColumnType:
    """How one PostgreSQL type becomes a pandas column."""

    pg_type: str
    dtype: Any  # the pandas dtype of the column
    arrow: pa.DataType | None  # fast path: what the Arrow JSON reader parses it as (None: Python path)
    convert: Callable[[Any], Any]  # Python path: JSON value (floats as Decimal) → Python value
    duck: str | None = None  # DuckDB path: SQL turning ``{v}`` (the value's JSON text) into the type
    sql: str | None = None  # SQL users' cast (the typed macros) when it differs from ``duck``

    @property
    def macro(self) -> str | None:
        """The DuckDB SQL of the typed ``as_of_<table>`` macros: DuckDB's own types, infinity included."""
        return self.sql if self.sql is not None else self.duck


#: DataFrame path: a value DuckDB would cast into something pandas cannot hold as it is (infinity, BC
#: years) raises, so that Python types the frame (``frame_from_json``) and the value stays distinct.
_DUCK_GUARD = (
    "CASE WHEN {{v}} IN ('infinity', '-infinity') OR ends_with({{v}}, ' BC') "
    "THEN error('bemi_tt: a value for the Python path') ELSE {cast} END"
)


#: SQL path: PostgreSQL's " BC" timestamps as DuckDB's (whose CAST ignores " BC" and reads 44 BC as 44 AD):
#: the BC date, plus the time of day, minus the offset (naive result; UTC for timestamptz)
_SQL_BC = (
    "CAST(CAST(regexp_extract({v}, '^([0-9]+-[0-9]+-[0-9]+)', 1) || ' (BC)' AS DATE) AS TIMESTAMP)"
    " + CAST(regexp_extract({v}, 'T([0-9:.]+)', 1) AS INTERVAL)"
    " - coalesce(CAST(nullif(ltrim(regexp_extract({v}, '([+-][0-9:]+) BC$', 1), '+'), '') AS INTERVAL),"
    " INTERVAL 0 SECOND)"
)


def _decimal(v: Any) -> Any:
    return v if isinstance(v, Decimal) else Decimal(str(v))


def _float(v: Any) -> float:
    return float(v)


def _str(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


#: PostgreSQL's JSON text of a timestamp: ISO 8601, years beyond 9999, an offset of up to seconds, " BC"
_PG_TIMESTAMP = re.compile(
    r"(\d{4,})-(\d\d)-(\d\d)T(\d\d:\d\d:\d\d(?:\.\d{1,6})?)"
    r"(?:([+-])(\d\d)(?::(\d\d))?(?::(\d\d))?)?( BC)?"
)


def _pg_timestamp(v: Any, utc: bool) -> Any:
    """A timestamp's JSON text → ``pd.Timestamp`` (us, UTC when ``utc``), BC as astronomical years
    (44 BC is year -43); the text itself when pandas cannot hold it ('infinity', '-infinity', years past
    294246), so such a value never looks like NULL."""
    if not isinstance(v, str):
        return v
    if v[4:5] == "-" and v[10:11] == "T" and not v.endswith(" BC"):  # four-digit years: pandas parses
        try:
            parsed = pd.Timestamp(v)
            return (parsed.tz_convert("UTC") if utc else parsed).as_unit("us")
        except (ValueError, TypeError, OverflowError):
            pass
    match = _PG_TIMESTAMP.fullmatch(v)
    if match is None:
        return v
    year = int(match[1]) if match[9] is None else 1 - int(match[1])
    sign = "-" if year < 0 else ""
    try:
        # numpy parses any year but wraps silently past its range: the year read back proves it held
        instant = np.datetime64(f"{sign}{abs(year):04d}-{match[2]}-{match[3]}T{match[4]}", "us")
        if match[5] is not None:
            offset = int(match[6]) * 3600 + int(match[7] or 0) * 60 + int(match[8] or 0)
            instant = instant - np.timedelta64(offset if match[5] == "+" else -offset, "s")
        parsed = pd.Timestamp(instant)
    except (ValueError, OverflowError):
        return v
    if abs(parsed.year - year) > 1:  # an offset moves it a year at most; a wrap moves it far
        return v
    return parsed.tz_localize("UTC") if utc else parsed


def _timestamp_tz(v: Any) -> Any:
    return _pg_timestamp(v, True)


def _timestamp(v: Any) -> Any:
    return _pg_timestamp(v, False)


def _date(v: Any) -> Any:
    try:
        return date.fromisoformat(v)
    except (ValueError, TypeError):
        return v


def _time(v: Any) -> Any:
    try:
        return time.fromisoformat(v)
    except (ValueError, TypeError):
        return v


def _bytes(v: Any) -> Any:
    return bytes.fromhex(v[2:]) if isinstance(v, str) and v.startswith("\\x") else v


def _json_value(v: Any) -> Any:
    """Nested json/jsonb: numbers as Python parses them (floats), like psycopg's json loader."""
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    return v


def column_type(pg_type: str) -> ColumnType:
    """The :class:`ColumnType` of a ``format_type`` text such as ``numeric(10,2)`` or ``integer[]``."""
    text = pg_type.strip().lower()
    if text.endswith("[]"):
        element = column_type(text[:-2])
        elem_convert = element.convert
        if element.dtype == "datetime64[us, UTC]" or element.dtype == "datetime64[us]":

            def elem_convert(v: Any, _c: Callable[[Any], Any] = element.convert) -> Any:
                value = _c(v)
                if isinstance(value, pd.Timestamp) and value.year >= 1:
                    return value.to_pydatetime()
                return value  # BC (no datetime holds it) stays a Timestamp, infinity its text

        def convert_array(v: Any) -> Any:
            if isinstance(v, list):
                return [
                    None if x is None else convert_array(x) if isinstance(x, list) else elem_convert(x)
                    for x in v
                ]
            return v

        return ColumnType(pg_type, object, None, convert_array)
    precision = 0
    params = _PARAMS.search(text)
    base = _PARAMS.sub("", text).strip()
    if base in ("smallint", "int2"):
        return ColumnType(pg_type, pd.Int16Dtype(), pa.int16(), int, "CAST({v} AS SMALLINT)")
    if base in ("integer", "int", "int4"):
        return ColumnType(pg_type, pd.Int32Dtype(), pa.int32(), int, "CAST({v} AS INTEGER)")
    if base in ("bigint", "int8"):
        return ColumnType(pg_type, pd.Int64Dtype(), pa.int64(), int, "CAST({v} AS BIGINT)")
    if base in ("boolean", "bool"):
        return ColumnType(pg_type, pd.BooleanDtype(), pa.bool_(), bool, "CAST({v} AS BOOLEAN)")
    if base in ("real", "float4"):
        return ColumnType(pg_type, np.dtype("float32"), pa.float32(), _float, "CAST({v} AS REAL)")
    if base in ("double precision", "float8", "float"):
        return ColumnType(pg_type, np.dtype("float64"), pa.float64(), _float, "CAST({v} AS DOUBLE)")
    if base in ("numeric", "decimal"):
        arrow = None
        if params:
            parts = [p.strip() for p in params.group(0)[1:-1].split(",")]
            precision = int(parts[0])
            scale = int(parts[1]) if len(parts) > 1 else 0
            if precision <= 38 and 0 <= scale <= precision:
                arrow = pa.decimal128(precision, scale)
        # DuckDB reads JSON numbers as doubles: exact only up to 15 significant digits
        duck = (
            f"CAST({{v}} AS DECIMAL({precision}, {scale}))" if arrow is not None and precision <= 15 else None
        )
        dtype = pd.ArrowDtype(arrow) if arrow is not None else object
        return ColumnType(pg_type, dtype, arrow, _decimal, duck)
    if base in ("timestamp with time zone", "timestamptz"):
        return ColumnType(
            pg_type,
            "datetime64[us, UTC]",
            pa.timestamp("us", tz="UTC"),
            _timestamp_tz,
            _DUCK_GUARD.format(cast="CAST({v} AS TIMESTAMPTZ)"),
            f"CASE WHEN ends_with({{v}}, ' BC') THEN timezone('UTC', {_SQL_BC}) "
            "ELSE CAST({v} AS TIMESTAMPTZ) END",
        )
    if base in ("timestamp without time zone", "timestamp"):
        return ColumnType(
            pg_type,
            "datetime64[us]",
            pa.timestamp("us"),
            _timestamp,
            _DUCK_GUARD.format(cast="CAST({v} AS TIMESTAMP)"),
            f"CASE WHEN ends_with({{v}}, ' BC') THEN {_SQL_BC} ELSE CAST({{v}} AS TIMESTAMP) END",
        )
    if base == "date":
        return ColumnType(
            pg_type,
            object,
            None,
            _date,
            _DUCK_GUARD.format(cast="CAST({v} AS DATE)"),
            "CAST(CASE WHEN ends_with({v}, ' BC') THEN replace({v}, ' BC', ' (BC)') ELSE {v} END AS DATE)",
        )
    if base in ("time without time zone", "time"):
        return ColumnType(pg_type, object, None, _time)
    if base in ("json", "jsonb"):
        return ColumnType(pg_type, object, None, _json_value)
    if base == "bytea":
        return ColumnType(pg_type, object, None, _bytes)
    return ColumnType(pg_type, pd.StringDtype(), pa.string(), _str, "{v}")


def spec_type(spec: Mapping[str, Any]) -> ColumnType:
    """The :class:`ColumnType` of one ``changes_schemas`` column: a domain by its base type (the worker
    records ``base_type`` for domain columns), every other type by its ``format_type`` text."""
    base = spec.get("base_type")
    if not base:
        return column_type(str(spec["type"]))
    base = str(base)  # a pg_type typname: arrays are "_int4"
    return column_type(f"{base[1:]}[]" if base.startswith("_") else base)


def infer_type(value: Any) -> str:
    """A PostgreSQL type name for a JSON value, used when a source has no column types for a table."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "bigint"
    if isinstance(value, Decimal):
        return "numeric"
    if isinstance(value, float):
        return "double precision"
    if isinstance(value, (dict, list)):
        return "jsonb"
    return "text"


def parse_json(text: str) -> Any:
    """Typed JSON text → Python, numbers with a fraction as exact ``Decimal``."""
    return json.loads(text, parse_float=Decimal)


def _has_nan(values: Sequence[Any]) -> bool:
    return any(isinstance(v, float) and v != v for v in values)


def _python_column(rows: Sequence[dict[str, Any]], name: str, kind: ColumnType) -> pd.Series:
    """One column through Python; the usual dtype unless a value would be lost in it (decided per column)."""
    convert = kind.convert
    values = [None if (v := row.get(name)) is None else convert(v) for row in rows]
    return typed_series(values, kind)


def typed_series(values: Sequence[Any], kind: ColumnType) -> pd.Series:
    """Python values (None for NULL) → the column of ``kind``'s dtype, or, when that dtype cannot hold some
    value apart from NULL, a column that can: ``double[pyarrow]`` for floats with NaN (NULL is ``<NA>``),
    ``object`` for numerics with NaN and timestamps with infinity or years past 294246 (kept as text)."""
    if isinstance(kind.dtype, pd.ArrowDtype):
        if any(isinstance(v, Decimal) and not v.is_finite() for v in values):
            return pd.Series(values, dtype=object)  # NaN, Infinity: no Arrow decimal holds them
        try:
            return pd.Series(pd.array(values, dtype=kind.dtype))
        except (pa.ArrowInvalid, TypeError, ValueError):
            return pd.Series(values, dtype=object)  # NaN, Infinity: no Arrow decimal holds them
    if kind.dtype is object:
        return pd.Series(values, dtype=object)  # NULL is None; Decimal('NaN') stays itself
    if isinstance(kind.dtype, str) and kind.dtype.startswith("datetime64"):
        if any(v is not None and not isinstance(v, pd.Timestamp) for v in values):
            return pd.Series(values, dtype=object)
        # through numpy: pandas turns tz-aware Timestamps outside the nanosecond range into wrong years
        nat = np.datetime64("NaT", "us")
        stamps = pd.Series(np.array([nat if v is None else v.as_unit("us").asm8 for v in values], "M8[us]"))
        return stamps.dt.tz_localize("UTC") if kind.dtype == "datetime64[us, UTC]" else stamps
    if isinstance(kind.dtype, np.dtype):
        if _has_nan(values):  # float64 shows NULL as NaN: Arrow keeps NULL and NaN apart
            nan_kept = pa.array(values, type=kind.arrow, from_pandas=False)
            return pd.Series(pd.arrays.ArrowExtensionArray(nan_kept))
        return pd.Series([np.nan if v is None else v for v in values], dtype=kind.dtype)
    return pd.Series(pd.array(values, dtype=kind.dtype))


_MAPPER = {
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.bool_(): pd.BooleanDtype(),
    pa.string(): pd.StringDtype(),
    pa.large_string(): pd.StringDtype(),
}


def _arrow_columns(lines: bytes, fields: list[tuple[str, ColumnType]]) -> dict[str, pd.Series]:
    schema = pa.schema([pa.field(name, kind.arrow) for name, kind in fields if kind.arrow is not None])
    table = pajson.read_json(
        io.BytesIO(lines),
        parse_options=pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
    )
    out: dict[str, pd.Series] = {}
    for name, kind in fields:
        column = table[name]
        if pa.types.is_decimal(column.type):
            out[name] = pd.Series(pd.arrays.ArrowExtensionArray(column.cast(kind.arrow)))
        elif pa.types.is_timestamp(column.type):
            out[name] = pd.Series(column.to_pandas(coerce_temporal_nanoseconds=False)).astype(kind.dtype)
        else:
            out[name] = pd.Series(column.to_pandas(types_mapper=_MAPPER.get)).astype(kind.dtype)
    return out


def frame_from_json(afters: Sequence[str], columns: Sequence[tuple[str, ColumnType]]) -> pd.DataFrame:
    """A DataFrame with one typed column per ``(name, type)`` from JSON object texts (absent keys → NULL).

    Arrow's JSON reader parses the columns it can (numerics exactly, at the column's scale); the rest,
    and everything when Arrow refuses a value (``"NaN"``, ``"infinity"``), go through Python.
    """
    fast = [(n, k) for n, k in columns if k.arrow is not None]
    slow = [(n, k) for n, k in columns if k.arrow is None]
    result: dict[str, pd.Series] = {}
    if fast and afters:
        try:
            result = _arrow_columns("\n".join(afters).encode(), fast)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            slow = list(columns)
    elif fast:
        slow = list(columns)
    if slow:
        rows = [parse_json(a) for a in afters]
        for name, kind in slow:
            result[name] = _python_column(rows, name, kind)
    frame = pd.DataFrame({name: result[name] for name, _ in columns}, index=pd.RangeIndex(len(afters)))
    return frame


def duck_select(columns: Sequence[tuple[str, ColumnType]], payload: str) -> tuple[str, str] | None:
    """SQL select-list extracting the typed columns from the JSON text ``payload``, or None when some
    column needs Python (exact numerics beyond 15 digits, arrays, json, bytea, time)."""
    if any(kind.duck is None for _, kind in columns):
        return None
    if not columns:
        return f"{payload} AS __j", ""
    paths = ", ".join(
        "'/" + name.replace("~", "~0").replace("/", "~1").replace("'", "''") + "'" for name, _ in columns
    )
    parts = []
    for i, (name, kind) in enumerate(columns, start=1):
        expr = (kind.duck or "{v}").format(v=f"__j[{i}]")
        parts.append(f'{expr} AS "{name.replace(chr(34), chr(34) * 2)}"')
    return f"json_extract_string({payload}, [{paths}]) AS __j", ", ".join(parts)


def frame_from_arrow(table: pa.Table, columns: Sequence[tuple[str, ColumnType]]) -> pd.DataFrame:
    """The typed frame from DuckDB's Arrow result of :func:`duck_select` columns."""
    out: dict[str, pd.Series] = {}
    for name, kind in columns:
        column = table[name]
        if pa.types.is_decimal(column.type):
            out[name] = pd.Series(pd.arrays.ArrowExtensionArray(column.cast(kind.arrow)))
        elif pa.types.is_date(column.type):
            out[name] = pd.Series(column.to_pylist(), dtype=object)
        elif pa.types.is_floating(column.type) and pc.any(pc.is_nan(column)).as_py():
            out[name] = pd.Series(pd.arrays.ArrowExtensionArray(column.cast(kind.arrow)))
        elif pa.types.is_timestamp(column.type):
            series = pd.Series(column.to_pandas(coerce_temporal_nanoseconds=False))
            if kind.dtype == "datetime64[us, UTC]":
                series = series.dt.tz_convert("UTC")
            out[name] = series.astype(kind.dtype)
        else:
            out[name] = pd.Series(column.to_pandas(types_mapper=_MAPPER.get)).astype(kind.dtype)
    return pd.DataFrame(out, index=pd.RangeIndex(table.num_rows))


def _cast_failures(
    con: Any, query: str, columns: Sequence[tuple[str, ColumnType]], payload: str
) -> set[str]:
    """The columns some value of which DuckDB cannot cast (``NaN`` numerics, infinity, BC years): each
    column's cast run alone over the rows of ``query`` (only after the casts of all columns failed)."""
    failed = set()
    for column in columns:
        picked = duck_select([column], payload)
        if picked is None or column[1].duck is None:
            continue
        inner, cast = picked[0], column[1].duck.format(v="__j[1]")
        try:
            con.sql(f"SELECT count({cast}) FROM (SELECT {inner} FROM ({query}))").fetchall()
        except (duckdb.ConversionException, duckdb.InvalidInputException):
            failed.add(column[0])
    return failed


def typed_rows(
    con: Any, query: str, columns: Sequence[tuple[str, ColumnType]]
) -> tuple[pa.Table, pd.DataFrame]:
    """Run ``query`` (``k, cp, o, payload``: a JSON object per row) and type ``columns`` column by column:
    inside DuckDB where it holds the type exactly, by Arrow's JSON reader or Python only for the columns
    that need it (exact numerics beyond 15 digits, json, arrays, bytea, times; and a column holding a value
    DuckDB cannot cast). Returns the rows (``k, cp, o``) and the typed frame."""
    in_duck = [(n, k) for n, k in columns if k.duck is not None]
    rows: pa.Table | None = None
    for _ in range(2):
        rest = [c for c in columns if c not in in_duck]
        picked = duck_select(in_duck, "payload") if in_duck else None
        inner, outer = picked if picked is not None else ("NULL AS __j", "")
        extra = (", payload" if rest else "") + (", " + outer if outer else "")
        try:
            rows = con.sql(
                f"SELECT k, cp, o{extra} FROM (SELECT k, cp, o, payload, {inner} FROM ({query}))"
            ).to_arrow_table()
            break
        except (duckdb.ConversionException, duckdb.InvalidInputException):
            failed = _cast_failures(con, query, in_duck, "payload")
            in_duck = [c for c in in_duck if c[0] not in failed] if failed else []
    assert rows is not None
    parts = frame_from_arrow(rows, in_duck) if in_duck else pd.DataFrame(index=pd.RangeIndex(rows.num_rows))
    if rest:
        slow = frame_from_json([str(a) for a in rows["payload"].to_pylist()], rest)
        parts = pd.concat([parts, slow], axis=1)
    frame = pd.DataFrame({name: parts[name] for name, _ in columns}, index=pd.RangeIndex(rows.num_rows))
    return rows, frame
