"""Retention: prune folds history before TS into a baseline; every later as_of stays exact (the oracle:
copies of the live tables read at each instant), earlier ones raise. Real PostgreSQL with the worker."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pytest
import sqlalchemy as sa

import bemi_tt
from capture.errors import ChainError, ConfigurationError
from capture.export import export_parquet
from capture.prune import prune_changes
from capture.verify import verify_changes, verify_export
from capture.worker import run as capture

TABLES = {"users": ("id", "name", "age", "score"), "tags": ("id", "label"), "log": ("line",)}


def _now(engine: sa.Engine) -> datetime:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()  # type: ignore[no-any-return]


def _live(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """The oracle: every tracked table as it is now, as sorted tuples of its columns in attnum order."""
    out = {}
    with engine.connect() as conn:
        for table in TABLES:
            rows = conn.execute(sa.select(sa.text("*")).select_from(sa.table(table))).all()
            out[table] = sorted((tuple(r) for r in rows), key=repr)
    return out


def _answer(table: str, ts: datetime, source: str) -> list[tuple[Any, ...]]:
    frame = bemi_tt.as_of(table, ts, source=source)
    frame = frame.reset_index() if frame.index.name is not None or isinstance(frame.index, pd.MultiIndex) \
        else frame
    frame = frame[[c for c in frame.columns if c != "index"]]
    rows = []
    for record in frame.astype(object).to_dict("records"):
        rows.append(tuple(None if v is None or v is pd.NA or (isinstance(v, float) and v != v) else
                          (int(v) if hasattr(v, "item") and not isinstance(v, str) else v)
                          for v in record.values()))
    return sorted(rows, key=repr)


def _step(engine: sa.Engine, *statements: str) -> None:
    with bemi_tt.context(step=statements[0][:20]), engine.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))


@pytest.fixture
def history(engine: sa.Engine, dsn: str) -> list[tuple[datetime, dict[str, list[tuple[Any, ...]]]]]:
    return workload(engine, dsn)


def workload(engine: sa.Engine, dsn: str) -> list[tuple[datetime, dict[str, list[tuple[Any, ...]]]]]:
    """A workload with key updates, deletes, a TRUNCATE, a keyless table and an added column; the oracle
    read after each transaction."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE users (id int PRIMARY KEY, name text, age int)"))
        conn.execute(sa.text("CREATE TABLE tags (id int PRIMARY KEY, label text)"))
        conn.execute(sa.text("CREATE TABLE log (line text)"))
        conn.execute(sa.text("INSERT INTO users VALUES (1, 'Ann', 30), (2, 'Bob', 40), (3, 'Cy', 50)"))
    bemi_tt.install(engine)
    capture(dsn, once=True)
    steps = [
        ("INSERT INTO tags VALUES (1, 'a'), (2, 'b')", "INSERT INTO log VALUES ('one'), ('two'), ('two')"),
        ("UPDATE users SET age = 31 WHERE id = 1", "DELETE FROM users WHERE id = 3",
         "DELETE FROM log WHERE line = 'one'"),
        ("UPDATE users SET id = 20 WHERE id = 2", "TRUNCATE tags", "INSERT INTO tags VALUES (3, 'c')"),
        ("ALTER TABLE users ADD COLUMN score int DEFAULT 5", "INSERT INTO users VALUES (4, 'Di', 60, 7)"),
        ("UPDATE users SET name = 'Anne' WHERE id = 1", "UPDATE log SET line = 'three' WHERE line = 'two'"),
        ("INSERT INTO users VALUES (5, 'Ed', 70, 1)", "DELETE FROM users WHERE id = 20",
         "INSERT INTO tags VALUES (4, 'd')"),
    ]
    out = [(_now(engine), _live(engine))]
    for statements in steps:
        _step(engine, *statements)
        out.append((_now(engine), _live(engine)))
    capture(dsn, once=True)
    return out


def test_prune_keeps_every_later_as_of_exact_and_refuses_earlier_times(
    engine: sa.Engine, dsn: str, history: list[tuple[datetime, dict[str, list[tuple[Any, ...]]]]]
) -> None:
    cut_at = history[4][0]  # after the ALTER: older rows take the fill
    with psycopg.connect(dsn) as conn:
        before_count = conn.execute("SELECT count(*) FROM changes").fetchone()
    pruned = prune_changes(dsn, before=cut_at)
    assert pruned.horizon is not None and pruned.folded > 0
    with psycopg.connect(dsn) as conn:
        after_count = conn.execute("SELECT count(*) FROM changes").fetchone()
        first = conn.execute("SELECT min(committed_at) FROM changes").fetchone()
    assert after_count is not None and before_count is not None and after_count[0] < before_count[0]
    assert first is not None and first[0] == cut_at
    for ts, live in history[4:]:
        for table in TABLES:
            assert _answer(table, ts, dsn) == live[table], (table, ts)
    for ts, _ in history[:4]:
        with pytest.raises(ConfigurationError, match=cut_at.isoformat().replace("+", r"\+")):
            bemi_tt.as_of("users", ts, source=dsn)
    with pytest.raises(ConfigurationError, match="before the history"):
        bemi_tt.diff("users", history[1][0], history[5][0], source=dsn)
    verified = verify_changes(dsn)
    assert verified.horizon is not None and "was pruned" in str(verified)

    # the worker carries on; a second prune later; everything still exact and verified
    with bemi_tt.context(step="after"), engine.begin() as conn:
        conn.execute(sa.text("UPDATE users SET age = 99 WHERE id = 4"))
        conn.execute(sa.text("DELETE FROM log"))
    later = (_now(engine), _live(engine))
    capture(dsn, once=True)
    assert prune_changes(dsn, before=history[5][0]).horizon is not None
    for ts, live in [*history[5:], later]:
        for table in TABLES:
            assert _answer(table, ts, dsn) == live[table], (table, ts)
    verify_changes(dsn)


def test_an_export_made_after_a_prune_starts_at_the_baseline_and_verifies(
    dsn: str, history: list[tuple[datetime, dict[str, list[tuple[Any, ...]]]]], tmp_path: Path
) -> None:
    old = tmp_path / "old"
    export_parquet(dsn, str(old), progress=False)
    prune_changes(dsn, before=history[3][0])
    fresh = tmp_path / "fresh"
    export_parquet(dsn, str(fresh), progress=False)
    export_parquet(dsn, str(old), progress=False)  # the older export keeps its longer history
    for ts, live in history[3:]:
        for table in TABLES:
            assert _answer(table, ts, str(fresh)) == live[table]
            assert _answer(table, ts, str(old)) == live[table]
    assert verify_export(str(fresh)).horizon is not None
    assert verify_export(str(old)).horizon is None
    with pytest.raises(ConfigurationError, match="before the history"):
        bemi_tt.as_of("users", history[1][0], source=str(fresh))


def test_an_altered_baseline_row_is_caught(dsn: str, history: list[tuple[datetime, Any]]) -> None:
    prune_changes(dsn, before=history[3][0])
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE changes SET after = jsonb_set(after, '{age}', '18')"
                     " WHERE operation = 'SNAPSHOT' AND primary_key = '1'")
    with pytest.raises(ChainError, match="pruning horizon"):
        verify_changes(dsn)


def test_a_deleted_baseline_row_is_caught(dsn: str, history: list[tuple[datetime, Any]]) -> None:
    prune_changes(dsn, before=history[3][0])
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM changes WHERE operation = 'SNAPSHOT' AND primary_key = '1'")
    with pytest.raises(ChainError, match="baseline"):
        verify_changes(dsn)


def test_pruning_everything_keeps_the_worker_chain_and_verify(
    engine: sa.Engine, dsn: str, history: list[tuple[datetime, dict[str, list[tuple[Any, ...]]]]]
) -> None:
    now = _now(engine)
    pruned = prune_changes(dsn, before=now)
    assert pruned.horizon is not None
    for table in TABLES:
        assert _answer(table, now, dsn) == history[-1][1][table]
    verify_changes(dsn)
    _step(engine, "INSERT INTO users VALUES (6, 'Flo', 20, 0)")
    capture(dsn, once=True)
    verify_changes(dsn)
    assert _answer("users", _now(engine), dsn) == _live(engine)["users"]


def test_prune_again_at_the_same_time_does_nothing(dsn: str, history: list[tuple[datetime, Any]]) -> None:
    prune_changes(dsn, before=history[3][0])
    assert prune_changes(dsn, before=history[3][0]).horizon is None
    assert prune_changes(dsn, before=history[2][0]).horizon is None


def test_prune_refuses_a_time_without_a_zone_or_in_the_future(dsn: str, history: list[tuple[datetime, Any]]
                                                              ) -> None:
    with pytest.raises(ConfigurationError, match="no time zone"):
        bemi_tt.prune(dsn, before=history[3][0].replace(tzinfo=None))
    with pytest.raises(ConfigurationError, match="in the future"):
        bemi_tt.prune(dsn, before="2999-01-01T00:00:00Z")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM changes WHERE operation = 'SNAPSHOT'"
                            " AND context ? '_bemi_baseline'").fetchone() == (0,)
