"""``changes()``, ``audit()`` and ``duckdb()`` on PostgreSQL read ``changes`` as a stream of Arrow batches
(no copy of the whole history first), with answers identical to the other sources'."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from timetravel_history import TODO_COLUMNS, History
from timetravel_sources import build_source

import bemi_tt
import bemi_tt.feed
from bemi_tt import audit, changes
from bemi_tt.errors import ConnectionFailedError
from bemi_tt.sources import InMemorySource, PostgresSource, Scope


def _history() -> History:
    h = History()
    h.columns("todo", TODO_COLUMNS)
    for key in range(1, 8):
        row = {"id": key, "task": f"t{key}", "done": False, "price": Decimal("1.50"), "due": None}
        # contexts whose keys differ from batch to batch: the columns are their union
        h.create("todo", str(key), row, {"user_id": key % 3} if key < 5 else {"job": f"j{key}"})
        h.update("todo", str(key), row, {**row, "done": True, "task": 'a "quoted"\nline'}, {"user_id": 2})
    h.delete("todo", "3", {"id": 3})
    h.truncate("todo", {"job": "reset"})
    return h


def _no_copy(*_: Any, **__: Any) -> Any:
    raise AssertionError("read the whole history into memory")


@pytest.mark.parametrize("batch_rows", [3, 65_536])
def test_changes_and_audit_on_postgresql_stream_in_batches_with_the_same_answer(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_rows: int
) -> None:
    h = _history()
    source = build_source("postgres", h.changes, h.schemas, dsn=dsn, tmp_path=tmp_path)
    oracle = InMemorySource(h.changes, h.schemas)
    monkeypatch.setattr(bemi_tt.feed, "BATCH_ROWS", batch_rows)
    monkeypatch.setattr(PostgresSource, "fetch", _no_copy)  # the stream, never one Arrow table of all
    for kwargs in ({}, {"table": "todo"}, {"operation": "UPDATE"}, {"since": h.changes[5]["committed_at"]}):
        pd.testing.assert_frame_equal(changes(source=source, **kwargs), changes(source=oracle, **kwargs))
        pd.testing.assert_frame_equal(audit(source=source, **kwargs), audit(source=oracle, **kwargs))
    pd.testing.assert_frame_equal(audit(source=source, user_id=2), audit(source=oracle, user_id=2))
    empty = changes(source=source, operation="SNAPSHOT")
    pd.testing.assert_frame_equal(empty, changes(source=oracle, operation="SNAPSHOT"))
    assert empty.empty


def test_a_stream_of_postgresql_changes_opens_no_query_until_read(dsn: str, tmp_path: Path) -> None:
    h = _history()
    source = build_source("postgres", h.changes, h.schemas, dsn=dsn, tmp_path=tmp_path)
    assert isinstance(source, PostgresSource)
    source.close()
    source.dsn = "host=/nonexistent dbname=nothing"  # a query would fail now: none may run
    unread = source.batches(Scope(table=("public", "todo")))
    assert unread.schema.names[:2] == ["id", "primary_key"]
    assert unread.schema.field("committed_at").type.tz == "UTC"
    with pytest.raises(ConnectionFailedError):  # the first batch runs the query
        unread.read_next_batch()


def test_duckdb_on_postgresql_copies_nothing_up_front_and_answers_as_before(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = _history()
    source = build_source("postgres", h.changes, h.schemas, dsn=dsn, tmp_path=tmp_path)
    ref = bemi_tt.duckdb(PostgresSource(dsn, mirror=True))  # a mirror copies every change up front
    monkeypatch.setattr(PostgresSource, "fetch", _no_copy)
    con = bemi_tt.duckdb(source)
    at = h.changes[9]["committed_at"]
    for query, params in (
        ("SELECT * FROM changes ORDER BY commit_position, ordinal", []),
        ("SELECT primary_key, CAST(\"row\" AS VARCHAR) FROM as_of('todo', ?) ORDER BY 1", [at]),
        ("SELECT * FROM as_of_todo(?) ORDER BY id", [at]),
        ("SELECT operation, primary_key FROM history('todo', '2')", []),
        ("SELECT count(*) FROM table_changes('todo')", []),
    ):
        assert con.execute(query, params).fetchall() == ref.execute(query, params).fetchall()
    assert con.execute("SELECT primary_key FROM changes LIMIT 1").fetchall()  # a scan stopped early
    assert con.execute("SELECT count(*) FROM changes").fetchall() == [(len(h.changes),)]  # and again
