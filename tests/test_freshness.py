"""Every answer says how fresh it is (``attrs``), ``freshness()`` tells how far capture lags, and answers
about "now" warn when the worker is behind — never for a source that cannot know (no slot)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pandas as pd
import psycopg
import pytest
import sqlalchemy as sa
from psycopg.conninfo import make_conninfo
from timetravel_history import TODO_COLUMNS, History
from timetravel_sources import Make, write_changes

import bemi_tt
from bemi_tt import staleness
from bemi_tt.sources import ParquetSource, PostgresSource
from bemi_tt.staleness import describe_source, freshness
from bemi_tt.timetravel import as_of, audit, blame, changes, diff, history
from capture.errors import SourceError, StaleWarning
from capture.export import export_parquet
from capture.source import default_slot_name
from capture.worker import run as capture


def _todo(h: History) -> dict[str, datetime]:
    h.columns("todo", TODO_COLUMNS)
    row = {"id": 1, "task": "Sleep", "done": False, "price": None, "due": None}
    times = {"created": h.create("todo", "1", row, {"user_id": 1})}
    times["updated"] = h.update("todo", "1", row, {**row, "task": "Eat"}, {"user_id": 2})
    times["other"] = h.create("note", "9", {"id": 9}, {"user_id": 3})  # the last commit is another table's
    return times


def _answers(source: object, t: dict[str, datetime]) -> dict[str, pd.DataFrame]:
    return {
        "as_of": as_of("todo", t["created"], source=source),
        "as_of-key-columns": as_of("todo", "now", key=1, columns=["task"], source=source),
        "diff": diff("todo", t["created"], t["updated"], source=source),
        "diff-empty": diff("todo", t["updated"], t["other"], source=source),
        "history": history("todo", 1, source=source),
        "blame": blame("todo", source=source),
        "audit": audit("todo", user_id=2, source=source),
        "audit-empty": audit("todo", user_id=99, source=source),
        "changes": changes(source=source),
    }


def test_every_answer_carries_its_source_and_the_commit_time_it_is_complete_through(make: Make) -> None:
    h = History()
    t = _todo(h)
    source = make(h)
    kind = {
        "InMemorySource": "memory",
        "PostgresSource": "postgresql",
        "ParquetSource": "parquet",
        "DeltaSource": "delta",
    }
    for name, frame in _answers(source, t).items():
        assert frame.attrs["complete_through"] == pd.Timestamp(t["other"]), name
        assert frame.attrs["source"].split()[0] == kind[type(source).__name__], name


def test_an_empty_source_is_complete_through_nothing(make: Make) -> None:
    h = History()
    h.columns("todo", TODO_COLUMNS)
    frame = as_of("todo", "now", source=make(h))
    assert frame.empty and frame.attrs["complete_through"] is None


def test_freshness_of_a_source_without_a_slot_is_unknown_and_now_never_warns(make: Make) -> None:
    h = History()
    t = _todo(h)
    source = make(h)
    fresh = freshness(source)
    assert fresh.complete_through == pd.Timestamp(t["other"])
    assert fresh.behind is None and fresh.pending_transactions is None
    if isinstance(source, ParquetSource):  # the watermark's age: the export cannot see the database
        assert fresh.lag_seconds is not None
        assert fresh.lag_seconds >= (fresh.checked_at - pd.Timestamp(t["other"])).total_seconds() - 1
    else:
        assert fresh.lag_seconds is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_of("todo", "now", source=source)
        blame("todo", source=source)


def test_the_source_in_attrs_never_holds_a_password(dsn: str, tmp_path: Path) -> None:
    h = History()
    t = _todo(h)
    write_changes(dsn, h.changes, h.schemas)
    secret = "s3cr3t-Pa55"
    frame = as_of("todo", t["other"], source=make_conninfo(dsn, password=secret))
    assert secret not in frame.attrs["source"] and "postgresql " in frame.attrs["source"]
    url = f"postgresql://postgres:{secret}@db.example:5432/shop"
    assert describe_source(PostgresSource(url)) == "postgresql postgres@db.example:5432/shop"
    remote = ParquetSource(f"s3://AKIAKEY:{secret}@bucket/export?secret_key={secret}&region=eu-west-1")
    assert secret not in describe_source(remote) and "bucket/export" in describe_source(remote)


# -- with the real capture worker ----------------------------------------------------------------------
@pytest.fixture
def todo(engine: sa.Engine, dsn: str) -> Iterator[sa.Table]:
    table = sa.Table(
        "todo",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("task", sa.Text, nullable=False),
    )
    table.metadata.create_all(engine)
    bemi_tt.install(engine)
    capture(dsn, once=True)  # creates the slot; tracking begins
    with bemi_tt.context(user_id=1), engine.begin() as conn:
        conn.execute(table.insert().values(id=1, task="Sleep"))
    capture(dsn, once=True)
    yield table


def _clock(engine: sa.Engine) -> datetime:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()  # type: ignore[no-any-return]


def _last_captured(dsn: str) -> pd.Timestamp:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT committed_at FROM changes ORDER BY commit_position DESC, ordinal DESC LIMIT 1"
        ).fetchone()
    assert row is not None
    return pd.Timestamp(row[0])


def test_caught_up_worker_is_not_behind_though_its_own_writes_left_wal_unconfirmed(
    dsn: str, database: str, todo: sa.Table
) -> None:
    fresh = freshness(dsn)
    assert fresh.behind is False and fresh.pending_transactions == 0 and fresh.lag_seconds == 0.0
    assert fresh.slot == default_slot_name(database) and fresh.lag_bytes is not None and fresh.lag_bytes > 0
    assert fresh.complete_through == _last_captured(dsn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = as_of("todo", "now", source=dsn)
    assert frame.attrs["complete_through"] == _last_captured(dsn)


def test_as_of_now_warns_while_a_commit_waits_for_the_worker_and_stops_once_captured(
    engine: sa.Engine, dsn: str, todo: sa.Table
) -> None:
    before = _clock(engine)
    with engine.begin() as conn:
        conn.execute(todo.insert().values(id=2, task="Eat"))
    after = _clock(engine)

    fresh = freshness(dsn)
    assert fresh.behind is True and fresh.pending_transactions == 1
    assert fresh.oldest_pending_at is not None and before <= fresh.oldest_pending_at <= after
    assert fresh.lag_seconds is not None and fresh.lag_seconds >= 0
    assert fresh.complete_through is not None and fresh.complete_through < pd.Timestamp(before)
    with pytest.warns(StaleWarning, match=r"as_of\('todo', ts='now'\) misses changes: .* behind by 1 "):
        frame = as_of("todo", "now", source=dsn)
    assert list(frame.index) == [1]  # the answer indeed lacks row 2
    for call in (
        lambda: diff("todo", before, "now", source=dsn),
        lambda: blame("todo", source=dsn),
        lambda: history("todo", 1, source=dsn),
    ):
        with pytest.warns(StaleWarning):
            call()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_of("todo", before, source=dsn)  # every commit up to then is captured
        audit(source=dsn)  # feeds say how far they reach in attrs and do not warn
        changes(source=dsn)

    capture(dsn, once=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(as_of("todo", "now", source=dsn).index) == [1, 2]
    assert freshness(dsn).behind is False


def test_a_pending_schema_change_counts_as_behind(engine: sa.Engine, dsn: str, todo: sa.Table) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE todo ADD COLUMN note text"))
    assert freshness(dsn).behind is True


def test_a_role_that_cannot_decode_the_slot_gets_unknown_and_no_warning(
    engine: sa.Engine, dsn: str, database: str, todo: sa.Table, make_role: Callable[[str, str], str]
) -> None:
    role = make_role("reader", "")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'GRANT SELECT ON changes, changes_schemas, changes_positions TO "{role}"')
    with engine.begin() as conn:
        conn.execute(todo.insert().values(id=2, task="Eat"))
    reader = make_conninfo(dsn, user=role)
    fresh = freshness(reader)
    assert fresh.behind is None and fresh.slot == default_slot_name(database) and "REPLICATION" in fresh.note
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_of("todo", "now", source=reader)
    # a role that may not even read the worker's positions still gets its answer
    analyst = make_role("analyst", "")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'GRANT SELECT ON changes, changes_schemas TO "{analyst}"')
    other = make_conninfo(dsn, user=analyst)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(as_of("todo", "now", source=other).index) == [1]
    fresh = freshness(other)
    assert fresh.behind is None and "permission denied" in fresh.note


def test_a_backlog_beyond_the_decode_window_is_unknown_not_caught_up(
    engine: sa.Engine, dsn: str, todo: sa.Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    with engine.begin() as conn:
        conn.execute(todo.insert().values(id=2, task="Eat"))
    monkeypatch.setattr(staleness, "DECODE_WINDOW", 1)
    fresh = freshness(dsn)
    assert fresh.behind is None and "not decoded" in fresh.note


def test_a_parquet_export_is_complete_through_its_watermark(
    engine: sa.Engine, dsn: str, todo: sa.Table, tmp_path: Path
) -> None:
    export_parquet(dsn, str(tmp_path / "export"), progress=False)
    exported = _last_captured(dsn)
    with engine.begin() as conn:
        conn.execute(todo.insert().values(id=2, task="Eat"))
    capture(dsn, once=True)
    frame = as_of("todo", "now", source=tmp_path / "export")
    assert frame.attrs["complete_through"] == exported < _last_captured(dsn)
    assert list(frame.index) == [1]
    fresh = freshness(ParquetSource(tmp_path / "export"))
    assert fresh.complete_through == exported and fresh.behind is None and fresh.lag_seconds is not None
    export_parquet(dsn, str(tmp_path / "export"), progress=False, compact=True)  # one compacted file
    assert freshness(ParquetSource(tmp_path / "export")).complete_through == _last_captured(dsn)


def test_a_damaged_export_file_is_named_by_freshness_and_the_answer(dsn: str, tmp_path: Path) -> None:
    h = History()
    _todo(h)
    write_changes(dsn, h.changes, h.schemas)
    export_parquet(dsn, str(tmp_path / "export"), progress=False)
    (damaged,) = (tmp_path / "export").glob("relation=public.note/*/*.parquet")  # holds the watermark
    damaged.write_bytes(b"not parquet at all")
    export = tmp_path / "export"
    for call in (lambda: freshness(export), lambda: as_of("todo", "now", source=export)):
        with pytest.raises(SourceError, match=re.escape(damaged.name)):
            call()
