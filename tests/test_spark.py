"""``bemi_tt.spark``: Spark answers equal the pandas API's on the same export (Parquet and Delta).

One local SparkSession serves the whole module (its start takes 10-40 s). Skipped when pyspark (the
``[spark]`` extra) or Java is missing.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from timetravel_history import TODO_COLUMNS, History
from timetravel_sources import build_source

from bemi_tt.sources import ParquetSource
from bemi_tt.timetravel import as_of, diff, history

pyspark = pytest.importorskip("pyspark", reason="pyspark is not installed: pip install -e '.[spark]'")
if shutil.which("java") is None:
    pytest.skip("no java on PATH: Spark needs a JVM (Java 17)", allow_module_level=True)

from bemi_tt import spark as bt  # noqa: E402

WITH_POINTS = [*TODO_COLUMNS, {"name": "points", "type": "bigint", "type_oid": 20, "key": False, "fill": 3}]
TAG_COLUMNS = [
    {"name": "todo_id", "type": "integer", "type_oid": 23, "key": True},
    {"name": "tag", "type": "text", "type_oid": 25, "key": True},
    {"name": "weight", "type": "numeric(6,3)", "type_oid": 1700, "key": False},
]


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("bemi_tt tests")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        # tiny data: one partition per shuffle, no re-planning, no code generation (compiling each new
        # query's code costs more than running it)
        .config("spark.sql.shuffle.partitions", "1")
        .config("spark.sql.adaptive.enabled", "false")
        .config("spark.sql.codegen.wholeStage", "false")
        .config("spark.sql.codegen.factoryMode", "NO_CODEGEN")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def _row(key: int, task: str, **more: Any) -> dict[str, Any]:
    return {"id": key, "task": task, "done": False, "price": Decimal("1.50"), "due": None, **more}


def _history() -> tuple[History, list[Any]]:
    """A delete, a key update (2 → 20), a TRUNCATE, a column added with a fill, a composite-key table."""
    h = History()
    h.columns("todo", TODO_COLUMNS)
    h.columns("tags", TAG_COLUMNS, schema="app")
    two = {"id": 2, "task": "Eat", "done": True, "price": None, "due": "2026-03-01T08:00:00.123456+05:30"}
    times = [h.create("todo", "1", _row(1, "Sleep"), {"user_id": 1}), h.create("todo", "2", two)]
    times.append(h.update("todo", "1", _row(1, "Sleep"), _row(1, "Nap"), {"user_id": 1}))
    times.append(h.update("todo", "20", two, {**two, "id": 20}, {"user_id": 3}))  # key update
    times.append(h.create("todo", "3", _row(3, "Cook", price=Decimal("12345678.90"))))
    times.append(h.delete("todo", "1", _row(1, "Nap"), {"user_id": 4}))
    times.append(
        h.create(
            "tags", '[3,"home"]', {"todo_id": 3, "tag": "home", "weight": Decimal("0.500")}, schema="app"
        )
    )
    times.append(h.columns("todo", WITH_POINTS))  # rows 20 and 3 take the fill
    times.append(
        h.update(
            "todo",
            "3",
            _row(3, "Cook", price=Decimal("12345678.90"), points=3),
            _row(3, "Bake", price=Decimal("12345678.90"), points=8),
            {"user_id": 5},
        )
    )
    times.append(h.truncate("todo"))
    times.append(h.create("todo", "5", _row(5, "Run", points=None)))
    return h, times


def _export(kind: str, dsn: str, tmp_path: Path) -> tuple[History, list[Any], str]:
    h, times = _history()
    source = build_source(kind, h.changes, h.schemas, dsn=dsn, tmp_path=tmp_path)
    assert isinstance(source, ParquetSource)
    return h, times, source.directory


@pytest.fixture(params=["parquet", "delta"])
def any_export(request: pytest.FixtureRequest, dsn: str, tmp_path: Path) -> tuple[History, list[Any], str]:
    """The history exported as Parquet, and as Delta (read from the table's current file list)."""
    return _export(request.param, dsn, tmp_path)


@pytest.fixture
def export(dsn: str, tmp_path: Path) -> tuple[History, list[Any], str]:
    return _export("parquet", dsn, tmp_path)


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or value is pd.NaT


def _equal(got: Any, want: Any) -> bool:
    if _missing(want) or _missing(got):
        return _missing(want) and _missing(got)
    return bool(got == want)


def _aware(value: Any) -> Any:
    # collect() gives TIMESTAMP values as naive datetimes in the driver's local zone
    return value.astimezone(timezone.utc) if isinstance(value, datetime) and value.tzinfo is None else value


def _rows(frame: Any, order: list[str] | None = None) -> list[dict[str, Any]]:
    """A Spark DataFrame's rows as Python values (times tz-aware), sorted by ``order``."""
    rows = [{k: _aware(v) for k, v in row.asDict().items()} for row in frame.collect()]
    return rows if order is None else sorted(rows, key=lambda r: tuple(str(r[c]) for c in order))


def _same(got: list[dict[str, Any]], want: pd.DataFrame) -> None:
    assert len(got) == len(want), (got, want)
    assert list(got[0]) == list(want.columns) if got else True
    for g, (_, w) in zip(got, want.iterrows(), strict=True):
        bad = {c: (g[c], w[c]) for c in want.columns if not _equal(g[c], w[c])}
        assert not bad, (g, bad)


def test_spark_as_of_equals_as_of_at_every_time(
    spark: Any, any_export: tuple[History, list[Any], str]
) -> None:
    h, times, path = any_export
    # after the key update, the delete and a composite key's row; before the added column's first write;
    # after the TRUNCATE
    for t in (times[6], h.between(times[7]), times[-1]):
        for table, spec in (
            ("todo", WITH_POINTS if t >= times[7] else TODO_COLUMNS),
            ("app.tags", TAG_COLUMNS),
        ):
            keys = [c["name"] for c in spec if c.get("key")]
            want = as_of(table, t, source=path).reset_index()[[c["name"] for c in spec]]  # table's order
            want = want.sort_values(keys, key=lambda s: s.astype(str)).reset_index(drop=True)
            _same(_rows(bt.as_of(spark, path, table, t), keys), want)
    # typed from the schema record: exact decimals, instants in UTC, the fill of an added column
    early = bt.as_of(spark, path, "todo", times[8])
    types = dict(early.dtypes)
    assert types["price"] == "decimal(10,2)" and types["due"] == "timestamp" and types["points"] == "bigint"
    rows = {r["id"]: r for r in _rows(early)}
    assert rows[20]["points"] == 3 and rows[3]["points"] == 8 and rows[3]["price"] == Decimal("12345678.90")
    assert rows[20]["due"] == pd.Timestamp("2026-03-01T02:30:00.123456Z")


def test_spark_diff_equals_diff(spark: Any, export: tuple[History, list[Any], str]) -> None:
    _, times, path = export
    # a window with the key update and the delete; one with the added column, the TRUNCATE and after
    for t1, t2 in ((times[0], times[5]), (times[5], times[-1])):
        want = diff("todo", t1, t2, source=path).reset_index()
        want = want.sort_values(["id", "column"], key=lambda s: s.astype(str)).reset_index(drop=True)
        got = _rows(bt.diff(spark, path, "todo", t1, t2), ["id", "column"])
        assert len(got) == len(want) > 0 and list(got[0]) == list(want.columns)
        for g, (_, w) in zip(got, want.iterrows(), strict=True):
            for c in ("id", "column", "change", "operation", "committed_at"):
                assert _equal(g[c], w[c]), (c, g, w)
            for c in ("old", "new", *want.columns[want.columns.get_loc("committed_at") + 1 :]):
                assert g[c] == bt._json(w[c]), (c, g, w)  # JSON text of the same value


def test_spark_history_follows_a_key_update_like_history(
    spark: Any, export: tuple[History, list[Any], str]
) -> None:
    _, _, path = export
    for key in (20, 3):  # renamed from 2, then filled and truncated; filled, updated and truncated
        want = history("todo", key, source=path)
        got = _rows(bt.history(spark, path, "todo", key))
        assert len(got) == len(want) and list(got[0]) == list(want.columns)
        for g, (_, w) in zip(got, want.iterrows(), strict=True):
            for c in want.columns:
                if c == "changed":
                    assert g[c] == list(w[c])
                elif c == "user_id":  # a context key: JSON text
                    assert g[c] == bt._json(w[c])
                else:
                    assert _equal(g[c], w[c]), (c, g[c], w[c])


def test_register_as_of_makes_every_table_a_view_at_one_point(
    spark: Any, export: tuple[History, list[Any], str]
) -> None:
    _, times, path = export
    views = bt.register_as_of(spark, path, times[8])
    assert views == {"todo": "public.todo", "tags": "app.tags"}
    joined = spark.sql(
        "SELECT t.id, t.task, t.points, g.weight FROM todo t JOIN tags g ON g.todo_id = t.id"
    ).collect()
    assert [tuple(r) for r in joined] == [(3, "Bake", 8, Decimal("0.500"))]
    assert bt.register_as_of(spark, path, times[0]) == {"todo": "public.todo", "tags": "app.tags"}


@pytest.mark.parametrize(("kind", "earlier"), [("timestamptz", False), ("boolean", False),
                                               ("composite-timestamptz", False), ("int", True)])
def test_spark_as_of_after_an_update_of_the_key_equals_as_of_for_every_key_type(
    spark: Any, dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, earlier: bool
) -> None:
    """The old key of a key UPDATE is the worker's ``before_primary_key``: a timestamp or boolean key's JSON
    text in ``before`` is not its ``primary_key`` text, and the moved row showed twice. Files of an earlier
    release (no such column) still read the old key from ``before``."""
    from test_key_moves import _export_of_an_earlier_release, _key_table

    from capture.export import export_parquet

    times, values = _key_table(dsn, kind, "DEFAULT")
    path = tmp_path / "export"
    if earlier:
        _export_of_an_earlier_release(dsn, path, "parquet", monkeypatch)
    else:
        export_parquet(dsn, str(path), progress=False)
    for ts, expected in zip(times, values, strict=True):
        got = sorted(r["v"] for r in _rows(bt.as_of(spark, str(path), "k", ts)))
        assert got == expected == sorted(as_of("k", ts, source=str(path))["v"]), (kind, ts)
