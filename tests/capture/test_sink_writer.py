"""capture/sink.py's queued commits (``commit(wait=False)``): a position is reported once its COMMIT held."""

from __future__ import annotations

from datetime import datetime, timezone

import psycopg
import pytest

from capture.sink import Sink
from capture.stitch import ChangeRow

WHEN = datetime(2026, 11, 27, 10, 0, tzinfo=timezone.utc)


def change(commit: int, ordinal: int) -> ChangeRow:
    return ChangeRow(
        "1", "t", "CREATE", "{}", '{"id":1}', "{}", WHEN, "public", "db", 7, commit, commit, ordinal
    )


def test_queued_commits_report_their_positions_in_order_once_committed(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        sink = Sink(conn, "s", chunk_rows=2)
        sink.setup()
        for commit in (100, 200):
            for i in range(3):
                sink.write(change(commit, i))
            sink.mark(commit, commit + 8, WHEN)
            assert sink.commit(wait=False) is None
        sink.write(change(300, 0))  # written meanwhile, into the next destination transaction
        sink.mark(300, 308, WHEN)
        assert sink.commit() == (300, 308)
        assert sink.take_committed() == [(100, 108), (200, 208)]
        assert sink.take_committed() == []
        sink.close()
        with psycopg.connect(dsn) as other:
            counts = other.execute("SELECT commit_position, count(*) FROM changes GROUP BY 1 ORDER BY 1")
            position = other.execute("SELECT commit_position, end_position FROM changes_positions").fetchone()
            assert counts.fetchall() == [(100, 3), (200, 3), (300, 1)]
    assert position == (300, 308)


def test_a_queued_commit_that_fails_is_raised_and_never_reported(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        sink = Sink(conn, "s", chunk_rows=2)
        sink.setup()
        for i in (0, 1, 1):  # a duplicate (commit_position, ordinal): the COPY fails on the writer thread
            sink.write(change(100, i))
        sink.mark(100, 108, WHEN)
        sink.commit(wait=False)
        with pytest.raises(psycopg.errors.UniqueViolation):
            sink.wait()
        assert sink.take_committed() == []
        sink.rollback()
        sink.close()
        with psycopg.connect(dsn) as other:
            assert other.execute("SELECT count(*) FROM changes_positions").fetchone() == (0,)
            assert other.execute("SELECT count(*) FROM changes").fetchone() == (0,)
