"""capture/sink.py against a real server: chunked COPY in one open statement, errors, rollback."""

from __future__ import annotations

from datetime import datetime, timezone

import psycopg
import pytest

from capture.sink import Sink
from capture.stitch import ChangeRow, SchemaChange

WHEN = datetime(2026, 11, 27, 10, 0, tzinfo=timezone.utc)


def change(commit: int, ordinal: int, after: str = '{"id":1}') -> ChangeRow:
    return ChangeRow("1", "t", "CREATE", "{}", after, "{}", WHEN, "public", "db", 7, commit, commit, ordinal)


def test_chunks_and_schema_writes_between_them_all_commit_in_order(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        sink = Sink(conn, "s", chunk_rows=3)
        sink.setup()
        for i in range(10):
            sink.write(change(100, i, f'{{"id":{i},"s":"a\\\\b\\tc"}}'))
            if i == 4:
                sink.write_schema(SchemaChange("public", "t", 100, 4, WHEN, "[]"))
        sink.mark(100, 108, WHEN)
        assert sink.commit() == (100, 108)
        sink.close()
        rows = conn.execute("SELECT ordinal, after->>'s' FROM changes ORDER BY id").fetchall()
    assert rows == [(i, "a\\b\tc") for i in range(10)]


def test_a_copy_error_surfaces_and_the_sink_works_after_rollback(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        sink = Sink(conn, "s", chunk_rows=2)
        sink.setup()
        with pytest.raises(psycopg.errors.UniqueViolation):
            for i in (0, 1, 1, 2, 3):  # a duplicate (commit_position, ordinal) in the second chunk
                sink.write(change(100, i))
            sink.mark(100, 108, WHEN)
            sink.commit()
        sink.rollback()
        for i in range(5):
            sink.write(change(200, i))
        sink.mark(200, 208, WHEN)
        assert sink.commit() == (200, 208)
        sink.close()
        counts = conn.execute("SELECT commit_position, count(*) FROM changes GROUP BY 1").fetchall()
    assert counts == [(200, 5)]
