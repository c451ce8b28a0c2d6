"""The oracle: a seeded random workload runs on a real table, which is copied after chosen commits; the
real pipeline (triggers, capture worker, Parquet export) records it; ``as_of`` at each instant must equal
the copy — same rows, values and dtypes — on the PostgreSQL and the Parquet source."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pyarrow as pa
import pytest
import sqlalchemy as sa

try:
    from bemi_tt.triggers import install
    from capture.export import export_parquet
    from capture.worker import run as capture
except ImportError:  # pragma: no cover - the pipeline modules are built by other issues
    install = capture = export_parquet = None  # type: ignore[assignment]

from bemi_tt.sources import ParquetSource, PostgresSource
from bemi_tt.timetravel import as_of, diff

pytestmark = pytest.mark.skipif(
    install is None or capture is None or export_parquet is None,
    reason="needs bemi_tt.triggers, capture.worker and capture.export",
)

#: The dtype each column must have (docs: bemi_tt/dtypes.py), written out independently of the code.
DTYPES: dict[str, Any] = {
    "name": pd.StringDtype(),
    "qty": pd.Int64Dtype(),
    "price": pd.ArrowDtype(pa.decimal128(12, 3)),
    "seen": "datetime64[us, UTC]",
    "meta": object,
    "tags": object,
    "flag": pd.BooleanDtype(),
    "day": object,
    "blob": object,
    "ratio": "float64",
    "extra": pd.Int32Dtype(),
}
CREATE = """CREATE TABLE item (
    id integer PRIMARY KEY, name text, qty bigint, price numeric(12,3), seen timestamptz, meta jsonb,
    tags text[], flag boolean, day date, blob bytea, ratio double precision)"""


def _value(rng: random.Random, column: str) -> Any:
    if rng.random() < 0.15:
        return None
    if column == "name":
        return rng.choice(["a", "O'Brien", "naïve ✓", 'quote " and \\', "", "line\nbreak"])
    if column == "qty":
        return rng.choice([0, -1, 2**40, rng.randrange(1000)])
    if column == "price":
        return Decimal(rng.randrange(-(10**9), 10**9)) / 1000
    if column == "seen":
        return datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=rng.randrange(10**13))
    if column == "meta":
        return psycopg.types.json.Jsonb(
            rng.choice([{"a": 1}, {"n": [1, 2.5, None], "s": "x"}, [1, "two"], {}])
        )
    if column == "tags":
        return rng.choice([[], ["a"], ["b", None, 'c"d'], ["x,y", "{z}"]])
    if column == "flag":
        return rng.random() < 0.5
    if column == "day":
        return datetime(2026, 1, 1).date() + timedelta(days=rng.randrange(-1000, 1000))
    if column == "blob":
        return rng.randbytes(rng.randrange(5))
    if column == "ratio":
        return rng.choice([0.5, -1e-300, 1e300, 3.25, float("nan")])
    if column == "extra":
        return rng.randrange(100)
    raise AssertionError(column)


def _copy(conn: psycopg.Connection[Any]) -> tuple[datetime, pd.DataFrame]:
    """The table as it is now, typed as the contract says, and the instant it was read."""
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM item ORDER BY id")
        names = [d.name for d in cur.description or []]
        rows = cur.fetchall()
        now = conn.execute("SELECT clock_timestamp()").fetchone()
    assert now is not None
    data: dict[str, Any] = {}
    for i, name in enumerate(names[1:], start=1):
        values = [r[i] for r in rows]
        dtype = DTYPES[name]
        if dtype == "datetime64[us, UTC]":
            data[name] = pd.Series(pd.to_datetime(values, utc=True)).astype(dtype)
        elif dtype == "float64" and any(v != v for v in values if v is not None):
            # NaN and NULL both present would look alike in float64: Arrow keeps them apart
            nan_kept = pa.array(values, pa.float64(), from_pandas=False)
            data[name] = pd.Series(pd.arrays.ArrowExtensionArray(nan_kept))
        elif dtype == "float64":
            data[name] = pd.Series([float("nan") if v is None else v for v in values], dtype=dtype)
        elif dtype is object:
            data[name] = pd.Series(values, dtype=object)
        else:
            data[name] = pd.Series(pd.array(values, dtype=dtype))
    frame = pd.DataFrame(data)
    frame.index = pd.Index(pd.array([r[0] for r in rows], dtype="Int32"), name="id")
    return now[0], frame


def _workload(dsn: str, seed: int) -> list[tuple[datetime, pd.DataFrame]]:
    """Interleaved transactions on two connections (disjoint ids: no lock waits); copies after commits."""
    rng = random.Random(seed)
    copies = []
    columns = ["name", "qty", "price", "seen", "meta", "tags", "flag", "day", "blob", "ratio"]
    live: dict[int, set[int]] = {0: set(), 1: set()}  # ids by parity: connection 0 even, 1 odd
    next_id = [2, 1]
    with (
        psycopg.connect(dsn, autocommit=True) as watcher,
        psycopg.connect(dsn) as a,
        psycopg.connect(dsn) as b,
    ):
        conns = [a, b]

        def ops(side: int, count: int) -> None:
            conn = conns[side]
            for _ in range(count):
                choice = rng.random()
                ids = sorted(live[side])
                if choice < 0.45 or not ids:
                    new = next_id[side]
                    next_id[side] += 2
                    cols = ["id", *columns]
                    placeholders = ", ".join(["%s"] * len(cols))
                    conn.execute(
                        f"INSERT INTO item ({', '.join(cols)}) VALUES ({placeholders})",
                        [new, *(_value(rng, c) for c in columns)],
                    )
                    live[side].add(new)
                elif choice < 0.75:
                    col = rng.choice(columns)
                    conn.execute(
                        f"UPDATE item SET {col} = %s WHERE id = %s", [_value(rng, col), rng.choice(ids)]
                    )
                elif choice < 0.85:
                    old, new = rng.choice(ids), next_id[side]
                    next_id[side] += 2
                    conn.execute(
                        "UPDATE item SET id = %s, name = %s WHERE id = %s", [new, _value(rng, "name"), old]
                    )
                    live[side] = (live[side] - {old}) | {new}
                else:
                    victim = rng.choice(ids)
                    conn.execute("DELETE FROM item WHERE id = %s", [victim])
                    live[side].discard(victim)

        for round_ in range(36):
            if round_ == 12:
                watcher.execute("ALTER TABLE item ADD COLUMN extra integer DEFAULT 42")
                columns.append("extra")
            elif round_ == 24:
                watcher.execute("ALTER TABLE item DROP COLUMN tags")
                columns.remove("tags")
            elif round_ == 30:
                watcher.execute("TRUNCATE item")
                live[0].clear()
                live[1].clear()
            first = rng.randrange(2)
            ops(first, rng.randrange(1, 4))
            ops(1 - first, rng.randrange(1, 4))  # both transactions are open now
            order = [first, 1 - first] if rng.random() < 0.5 else [1 - first, first]
            for side in order:
                conns[side].commit()
                if rng.random() < 0.5:
                    copies.append(_copy(watcher))
        copies.append(_copy(watcher))
    return copies


@pytest.mark.parametrize("seed", [1, 2])
def test_as_of_equals_copies_of_the_table_taken_after_chosen_commits(
    dsn: str, engine: sa.Engine, tmp_path: Path, seed: int
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(CREATE)
        conn.execute("INSERT INTO item (id, name, qty) VALUES (100000, 'there before tracking', 1)")
    install(engine)
    capture(dsn, once=True)  # creates the slot; the existing row becomes a SNAPSHOT change
    copies = _workload(dsn, seed)
    capture(dsn, once=True)
    export_parquet(dsn, str(tmp_path / "export"), progress=False)
    sources = {"postgres": PostgresSource(dsn), "parquet": ParquetSource(tmp_path / "export")}
    assert copies, "the workload took no copies"
    for kind, source in sources.items():
        for when, expected in copies:
            actual = as_of("item", when, source=source)
            pd.testing.assert_frame_equal(actual, expected, obj=f"as_of({when.isoformat()}) on {kind}")
        when, _ = copies[len(copies) // 2]
        assert diff("item", when, when, source=source).empty
    latest = datetime.now(timezone.utc) + timedelta(seconds=1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        _, live = _copy(conn)
    pd.testing.assert_frame_equal(as_of("item", latest, source=sources["parquet"]), live)
    pd.testing.assert_frame_equal(as_of("item", latest, source=sources["postgres"]), live)
