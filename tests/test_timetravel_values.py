"""Every value PostgreSQL can store stays distinguishable in as_of/diff/history/blame, on every source kind,
and table names resolve exactly (dots, quotes); end to end from a real table through the worker."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pytest
import sqlalchemy as sa
from timetravel_history import History
from timetravel_sources import Make

from bemi_tt.duckdb_macros import duckdb as bemi_duckdb
from bemi_tt.sources import ParquetSource, PostgresSource
from bemi_tt.timetravel import as_of, blame, diff, history
from bemi_tt.triggers import install
from capture.errors import ConfigurationError
from capture.export import export_parquet
from capture.worker import run as capture

WEIRD_COLUMNS = [
    {"name": "id", "type": "integer", "type_oid": 23, "key": True},
    {"name": "ts", "type": "timestamp without time zone", "type_oid": 1114, "key": False},
    {"name": "tz", "type": "timestamp with time zone", "type_oid": 1184, "key": False},
    {"name": "n", "type": "numeric", "type_oid": 1700, "key": False},
    {"name": "n2", "type": "numeric(10,2)", "type_oid": 1700, "key": False},
    {"name": "f", "type": "double precision", "type_oid": 701, "key": False},
    {"name": "d", "type": "date", "type_oid": 1082, "key": False},
]

#: id → the row's JSON values, as ``changes.after`` holds them (what to_jsonb gives)
WEIRD_ROWS: dict[int, dict[str, Any]] = {
    1: {"ts": "infinity", "tz": "infinity", "n": "NaN", "n2": "NaN", "f": "NaN", "d": "infinity"},
    2: {
        "ts": "-infinity",
        "tz": "-infinity",
        "n": "Infinity",
        "n2": Decimal("-3.00"),
        "f": "Infinity",
        "d": "-infinity",
    },
    3: {
        "ts": "0044-03-15T12:00:00 BC",
        "tz": "0044-03-15T12:00:00+00:00 BC",
        "n": Decimal("1.5"),
        "n2": Decimal("2.25"),
        "f": "-Infinity",
        "d": "0044-03-15 BC",
    },
    4: {"ts": None, "tz": None, "n": None, "n2": None, "f": None, "d": None},
    5: {
        "ts": "2026-01-31T12:00:00",
        "tz": "2026-01-31T12:00:00+00:00",
        "n": Decimal("7"),
        "n2": Decimal("1.00"),
        "f": 0.5,
        "d": "2026-01-31",
    },
}


def _weird(h: History) -> None:
    h.columns("weird", WEIRD_COLUMNS)
    for i, row in WEIRD_ROWS.items():
        h.create("weird", str(i), {"id": i, **row})


def _kind(value: Any) -> Any:
    """A value reduced to what tells it apart: NULL, NaN, the infinities, or the value itself."""
    if value is None or value is pd.NA or value is pd.NaT:
        return "NULL"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, Decimal) and value.is_nan():
        return "NaN"
    return value


def test_as_of_keeps_infinite_and_bc_timestamps_apart_from_null(make: Make) -> None:
    h = History()
    _weird(h)
    frame = as_of("weird", h.clock, source=make(h))
    for column in ("ts", "tz"):
        assert frame[column].dtype == object  # pandas' datetime64 holds no infinity: the column says so
        assert frame.loc[1, column] == "infinity" and frame.loc[2, column] == "-infinity"
        assert frame.loc[4, column] is None
    bc = frame.loc[3, "ts"]
    assert isinstance(bc, pd.Timestamp) and (bc.year, bc.month, bc.day, bc.hour) == (-43, 3, 15, 12)
    assert frame.loc[3, "tz"] == pd.Timestamp(bc).tz_localize("UTC")
    assert frame.loc[5, "tz"] == pd.Timestamp("2026-01-31T12:00:00+00:00")
    assert frame.loc[1, "d"] == "infinity" and frame.loc[2, "d"] == "-infinity" and frame.loc[4, "d"] is None


def test_as_of_keeps_bc_timestamps_in_the_usual_dtype(make: Make) -> None:
    h = History()
    h.columns("weird", WEIRD_COLUMNS[:3])
    h.create("weird", "1", {"id": 1, "ts": "4713-01-01T00:00:00 BC", "tz": "0001-01-01T00:00:00+00:00 BC"})
    h.create("weird", "2", {"id": 2, "ts": None, "tz": "2026-01-01T00:00:00+00:00"})
    frame = as_of("weird", h.clock, source=make(h))
    assert str(frame["ts"].dtype) == "datetime64[us]" and str(frame["tz"].dtype) == "datetime64[us, UTC]"
    assert frame.loc[1, "ts"].year == -4712 and frame.loc[1, "tz"].year == 0
    assert frame.loc[2, "ts"] is pd.NaT


def test_as_of_keeps_numeric_nan_and_infinities(make: Make) -> None:
    h = History()
    _weird(h)
    frame = as_of("weird", h.clock, source=make(h))
    for column in ("n", "n2"):
        assert frame[column].dtype == object
        assert isinstance(frame.loc[1, column], Decimal) and frame.loc[1, column].is_nan()
        assert frame.loc[4, column] is None
    assert frame.loc[2, "n"] == Decimal("Infinity") and frame.loc[2, "n2"] == Decimal("-3.00")
    assert frame.loc[3, "n2"] == Decimal("2.25") and frame.loc[5, "n"] == Decimal("7")


def test_as_of_keeps_float_null_and_nan_apart(make: Make) -> None:
    h = History()
    _weird(h)
    h.columns("plain", [WEIRD_COLUMNS[0], WEIRD_COLUMNS[5]])
    h.create("plain", "1", {"id": 1, "f": None})
    h.create("plain", "2", {"id": 2, "f": "Infinity"})
    source = make(h)
    f = as_of("weird", h.clock, source=source)["f"]
    assert str(f.dtype) == "double[pyarrow]"
    assert f.isna().tolist() == [False, False, False, True, False]  # only the NULL is missing
    assert math.isnan(f.loc[1]) and f.loc[2] == math.inf and f.loc[3] == -math.inf and f.loc[5] == 0.5
    # decided per column: without a NaN, float64 (NaN there is NULL) is exact and stays the dtype
    plain = as_of("plain", h.clock, source=source)["f"]
    assert plain.dtype == "float64" and math.isnan(plain.loc[1]) and plain.loc[2] == math.inf


def test_as_of_types_a_domain_by_its_base_type(make: Make) -> None:
    h = History()
    h.columns(
        "dom",
        [
            {"name": "id", "type": "integer", "type_oid": 23, "key": True},
            {"name": "qty", "type": "posint", "type_oid": 16400, "key": False, "base_type": "int4"},
            {"name": "tags", "type": "taglist", "type_oid": 16401, "key": False, "base_type": "_text"},
        ],
    )
    h.create("dom", "1", {"id": 1, "qty": 5, "tags": ["a", None]})
    h.create("dom", "2", {"id": 2, "qty": None, "tags": None})
    frame = as_of("dom", h.clock, source=make(h))
    assert frame["qty"].dtype == "Int32" and frame.loc[1, "qty"] == 5 and frame.loc[2, "qty"] is pd.NA
    assert frame.loc[1, "tags"] == ["a", None]


def test_diff_history_and_blame_tell_null_from_nan(make: Make) -> None:
    h = History()
    h.columns("weird", [WEIRD_COLUMNS[0], WEIRD_COLUMNS[3], WEIRD_COLUMNS[5]])
    t1 = h.create("weird", "1", {"id": 1, "n": None, "f": None})
    t2 = h.update("weird", "1", {"id": 1, "n": None, "f": None}, {"id": 1, "n": "NaN", "f": "NaN"})
    t3 = h.update("weird", "1", {"id": 1, "n": "NaN", "f": "NaN"}, {"id": 1, "n": "NaN", "f": "NaN"})
    source = make(h)
    changed = diff("weird", t1, t2, source=source)
    assert sorted(changed.index.get_level_values("column")) == ["f", "n"]
    assert {c: (_kind(r["old"]), _kind(r["new"])) for (_, c), r in changed.iterrows()} == {
        "f": ("NULL", "NaN"),
        "n": ("NULL", "NaN"),
    }
    assert diff("weird", t2, t3, source=source).empty  # NaN equals NaN, as in PostgreSQL
    versions = history("weird", 1, source=source)
    assert versions["changed"].tolist() == [["id", "n", "f"], ["n", "f"], []]
    assert versions["f"].isna().tolist() == [True, False, False]
    cells = blame("weird", source=source)
    assert {c: _kind(v) for (_, c), v in cells["value"].items()} == {"n": "NaN", "f": "NaN"}
    assert cells.loc[(1, "f"), "committed_at"] == pd.Timestamp(t2)


def test_typed_duckdb_macros_keep_infinity_bc_and_nan(make: Make) -> None:
    h = History()
    h.columns("weird", [c for c in WEIRD_COLUMNS if c["name"] in ("id", "ts", "tz", "f", "d")])
    for i, row in WEIRD_ROWS.items():
        h.create("weird", str(i), {"id": i, **{c: row[c] for c in ("ts", "tz", "f", "d")}})
    con = bemi_duckdb(make(h))
    con.execute("SET TimeZone = 'UTC'")
    rows = con.sql(
        "SELECT id, CAST(ts AS VARCHAR), CAST(tz AS VARCHAR), CAST(f AS VARCHAR), CAST(d AS VARCHAR) "
        f"FROM as_of_weird(TIMESTAMPTZ '{h.clock.isoformat()}') ORDER BY id"
    ).fetchall()
    assert rows == [
        (1, "infinity", "infinity", "nan", "infinity"),
        (2, "-infinity", "-infinity", "inf", "-infinity"),
        (3, "0044-03-15 (BC) 12:00:00", "0044-03-15 (BC) 12:00:00+00", "-inf", "0044-03-15 (BC)"),
        (4, None, None, None, None),
        (5, "2026-01-31 12:00:00", "2026-01-31 12:00:00+00", "0.5", "2026-01-31"),
    ]


# -- table names -------------------------------------------------------------------------------------------
def _dotted(h: History) -> None:
    h.create("my.table", "1", {"id": 1, "where": "public.my.table"})
    h.create("table", "1", {"id": 1, "where": "my.table"}, schema="my")
    h.create("a.b", "1", {"id": 1, "where": "x.a.b"}, schema="x")
    h.create('say "hi"', "1", {"id": 1, "where": 'public.say "hi"'})


#: how a user may write each table's name → the table it names
DOTTED_NAMES = [
    ('public."my.table"', "public.my.table"),
    ('"my.table"', "public.my.table"),
    ('"my"."table"', "my.table"),
    ('my."table"', "my.table"),
    ("x.a.b", "x.a.b"),
    ("a.b", "x.a.b"),
    ('x."a.b"', "x.a.b"),
    ('say "hi"', 'public.say "hi"'),
    ('public."say ""hi"""', 'public.say "hi"'),
]


def test_as_of_reads_tables_whose_names_hold_dots_or_quotes(make: Make) -> None:
    h = History()
    _dotted(h)
    source = make(h)
    read = {name: as_of(name, h.clock, source=source)["where"].tolist() for name, _ in DOTTED_NAMES}
    assert read == {name: [where] for name, where in DOTTED_NAMES}


def test_every_table_an_error_lists_reads_back(make: Make) -> None:
    h = History()
    _dotted(h)
    source = make(h)
    with pytest.raises(ConfigurationError, match="unknown table 'nope'") as error:
        as_of("nope", h.clock, source=source)
    listed = str(error.value).split("the source has changes for: ", 1)[1]
    # my.table would also name public."my.table": the list spells it so that it names one table only
    labels = ['public."my.table"', '"my"."table"', 'x."a.b"', 'public."say ""hi"""']
    assert sorted(listed.split(", ")) == sorted(labels)
    for label in labels:
        assert len(as_of(label, h.clock, source=source)) == 1
    # "my.table" alone names both public."my.table" and my.table: an error naming both, never a guess
    with pytest.raises(
        ConfigurationError, match=r"'my\.table' is ambiguous.*public\.\"my\.table\", \"my\"\.\"table\""
    ):
        as_of("my.table", h.clock, source=source)


@pytest.mark.parametrize("bad", ["to\x00do", "public.\x00", "\x00"])
def test_table_names_with_nul_are_configuration_errors_naming_them(make: Make, bad: str) -> None:
    h = History()
    _dotted(h)
    source = make(h)
    calls = (
        lambda name: as_of(name, h.clock, source=source),
        lambda name: history(name, 1, source=source),
        lambda name: diff(name, h.clock, h.clock, source=source),
        lambda name: blame(name, source=source),
    )
    for call in calls:
        with pytest.raises(ConfigurationError, match=re.escape(repr(bad)) + ".*NUL"):
            call(bad)
        for empty in ("", "   "):
            with pytest.raises(ConfigurationError, match=re.escape(repr(empty))):
                call(empty)


# -- end to end ----------------------------------------------------------------------------------------------
LIVE_TABLE = """
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE odd (
    id integer PRIMARY KEY,
    ts timestamp, tz timestamptz, n numeric, n2 numeric(10,2), f float8, r real, qty posint, d date
)"""

LIVE_VALUES = [
    "(1, 'infinity', 'infinity', 'NaN', 'NaN', 'NaN', 'NaN', 1, 'infinity')",
    "(2, '-infinity', '-infinity', '-Infinity', -3.00, 'Infinity', '-Infinity', 2, '-infinity')",
    "(3, '0044-03-15 12:00 BC', '0044-03-15 12:00+00 BC', 1.5, 2.25, '-Infinity', 1.5, 3, '0044-03-15 BC')",
    "(4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
    "(5, '2026-01-31 12:00', '2026-01-31 12:00+05:30', 7, 1.00, 0.5, 0.25, 5, '2026-01-31')",
]


def _live(conn: psycopg.Connection[Any]) -> dict[int, dict[str, str | None]]:
    """The live table's values as PostgreSQL's own text (timestamptz in UTC), by id."""
    conn.execute("SET TimeZone = 'UTC'")
    cur = conn.execute(
        "SELECT id, ts::text, tz::text, n::text, n2::text, f::text, r::text, qty::text, d::text FROM odd"
    )
    names = [d.name for d in cur.description or []]
    return {row[0]: dict(zip(names[1:], row[1:], strict=True)) for row in cur.fetchall()}


def _as_text(value: Any, column: str) -> str | None:
    """An as_of value written as PostgreSQL writes the column's text (for value-by-value comparison)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, pd.Timestamp):
        year = value.year
        v = value  # strftime refuses years before 1: the parts, as PostgreSQL writes them
        text = f"{year if year > 0 else 1 - year:04d}-{v.month:02d}-{v.day:02d} "
        text += f"{v.hour:02d}:{v.minute:02d}:{v.second:02d}"
        if column == "tz":
            text += "+00"
        return text + (" BC" if year <= 0 else "")
    if isinstance(value, float):
        return {math.inf: "Infinity", -math.inf: "-Infinity"}.get(
            value, "NaN" if math.isnan(value) else repr(value)
        )
    if isinstance(value, Decimal):
        return {"Infinity": "Infinity", "-Infinity": "-Infinity"}.get(str(value), str(value))
    return str(value)


def test_end_to_end_as_of_equals_the_live_table_value_by_value(
    dsn: str, engine: sa.Engine, tmp_path: Path
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(LIVE_TABLE)
        conn.execute("INSERT INTO odd VALUES " + LIVE_VALUES[0] + ", " + LIVE_VALUES[1])
    install(engine)
    capture(dsn, once=True)  # rows 1 and 2 are SNAPSHOT changes
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO odd VALUES " + ", ".join(LIVE_VALUES[2:]))  # WAL changes
        conn.execute("UPDATE odd SET f = 'NaN' WHERE id = 4 RETURNING 1").fetchall()
        conn.execute("UPDATE odd SET f = NULL WHERE id = 4")
        live = _live(conn)
    capture(dsn, once=True)
    export_parquet(dsn, str(tmp_path / "export"), progress=False)
    later = pd.Timestamp.now(tz="UTC") + pd.Timedelta(seconds=1)
    for source in (PostgresSource(dsn), ParquetSource(tmp_path / "export")):
        frame = as_of("odd", later, source=source)
        assert frame["qty"].dtype == "Int32", source
        assert sorted(frame.index) == sorted(live), source
        for key, row in live.items():
            got = {c: _as_text(frame.loc[key, c], c) for c in row}
            assert got == row, f"row {key} from {source}"


def test_a_value_duckdb_cannot_cast_sends_only_its_column_through_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Vectorized typing: an ``infinity`` timestamp needs the Python path for its column alone; the
    integer, text and numeric columns stay typed inside DuckDB."""
    import bemi_tt.dtypes as dtypes
    from bemi_tt.sources import InMemorySource

    h = History()
    h.columns(
        "t",
        [
            {"name": "id", "type": "integer", "type_oid": 23, "key": True},
            {"name": "name", "type": "text", "type_oid": 25, "key": False},
            {"name": "price", "type": "numeric(10,2)", "type_oid": 1700, "key": False},
            {"name": "at", "type": "timestamp with time zone", "type_oid": 1184, "key": False},
        ],
    )
    h.create("t", "1", {"id": 1, "name": "a", "price": Decimal("1.50"), "at": "infinity"})
    h.create("t", "2", {"id": 2, "name": "b", "price": None, "at": "2026-01-01T00:00:00+00:00"})
    through_python: list[str] = []
    python_column = dtypes._python_column

    def spy(rows: Any, name: str, kind: Any) -> Any:
        through_python.append(name)
        return python_column(rows, name, kind)

    monkeypatch.setattr(dtypes, "_python_column", spy)
    frame = as_of("t", h.clock, source=InMemorySource(h.changes, h.schemas))
    assert through_python == ["at"]
    assert frame.loc[1, "at"] == "infinity" and frame.loc[2, "at"] == pd.Timestamp("2026-01-01", tz="UTC")
    assert str(frame["price"].dtype) == "decimal128(10, 2)[pyarrow]" and frame.loc[1, "price"] == Decimal(
        "1.50"
    )
    assert str(frame["name"].dtype) == "string"
