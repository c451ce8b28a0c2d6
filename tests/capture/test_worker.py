"""capture/worker.py against a real server: set-up, batches, restarts, signals, errors, status."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from worker_helpers import run_module, set_context

from capture.errors import (
    ConfigurationError,
    ConnectionFailedError,
    PrivilegeError,
    SlotInUseError,
    SlotLostError,
)
from capture.worker import resolve_dsn, run, status


def rows(dsn: str, query: str = "") -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            'SELECT "table", operation, primary_key, before::text, after::text, context::text FROM changes '
            + query
            + " ORDER BY commit_position, ordinal"
        ).fetchall()


def test_once_captures_changes_with_context_and_exact_types(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE todo (id int PRIMARY KEY, title text, price numeric(30,10), done bool)")
    run(dsn, once=True)
    with psycopg.connect(dsn) as conn:
        set_context(conn, {"user_id": 7, "endpoint": "/todo"})
        conn.execute("INSERT INTO todo VALUES (1, 'a', 12345678901234567890.0123456789, false)")
        conn.commit()
        conn.execute("UPDATE todo SET done = true WHERE id = 1")
        conn.execute("DELETE FROM todo WHERE id = 1")
        conn.commit()
    stats = run(dsn, once=True)
    assert (stats.changes, stats.transactions) == (3, 2)
    got = rows(dsn)
    assert [(t, op, pk) for t, op, pk, *_ in got] == [
        ("todo", "CREATE", "1"),
        ("todo", "UPDATE", "1"),
        ("todo", "DELETE", "1"),
    ]
    after = json.loads(str(got[0][4]), parse_float=Decimal)
    assert after["price"] == Decimal("12345678901234567890.0123456789")
    assert json.loads(str(got[0][5])) == {"user_id": 7, "endpoint": "/todo"}
    assert json.loads(str(got[1][5])) == {}


def test_running_again_writes_nothing_twice(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO t SELECT generate_series(1, 50)")
    assert run(dsn, once=True).changes == 50
    assert run(dsn, once=True).changes == 0
    assert len(rows(dsn)) == 50


def test_a_large_transaction_is_written_in_chunks_as_one_unit(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 12000) g")
        conn.execute("INSERT INTO t VALUES (0, 'after')")
    stats = run(dsn, once=True, batch_changes=100)
    assert (stats.changes, stats.transactions, stats.batches) == (12001, 2, 2)
    with psycopg.connect(dsn) as conn:
        ordinals = conn.execute(
            "SELECT min(ordinal), max(ordinal), count(DISTINCT commit_position) FROM changes"
        ).fetchone()
    assert ordinals == (0, 11999, 2)


def test_partitions_are_recorded_under_their_root(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE m (id int, r text, PRIMARY KEY (id, r)) PARTITION BY LIST (r)")
        conn.execute("CREATE TABLE m_a PARTITION OF m FOR VALUES IN ('a')")
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE m_b PARTITION OF m FOR VALUES IN ('b')")  # created after the start
        conn.execute("INSERT INTO m VALUES (1, 'a'), (2, 'b')")
    run(dsn, once=True)
    assert [(t, pk) for t, _, pk, *_ in rows(dsn)] == [("m", '[1,"a"]'), ("m", '[2,"b"]')]


def test_tables_created_later_are_captured(dsn: str) -> None:
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE late (id int PRIMARY KEY)")
        conn.execute("INSERT INTO late VALUES (1)")
    run(dsn, once=True)
    assert [(t, op) for t, op, *_ in rows(dsn)] == [("late", "CREATE")]


def test_destination_database_receives_changes_and_source_has_no_changes_table(
    dsn: str,
    pg_server,
    database: str,  # type: ignore[no-untyped-def]
) -> None:
    other = f"{database}_dest"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other)))
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
            conn.execute("INSERT INTO t VALUES (1)")
        destination = pg_server.dsn(other)
        stats = run(dsn, destination=destination, once=True)
        assert stats.snapshot_rows == 1
        assert [op for _, op, *_ in rows(destination)] == ["SNAPSHOT"]
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT to_regclass('changes')").fetchone() == (None,)
        assert status(dsn, destination=destination)["changes"] == 1
    finally:
        with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(other)))


def test_status_reports_lag_and_warns_when_inactive(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (1)")
    before = status(dsn)
    assert isinstance(before["lag_bytes"], int) and before["lag_bytes"] > 0
    assert before["active"] is False
    assert any("inactive" in w for w in before["warnings"])  # type: ignore[union-attr]
    run(dsn, once=True)
    after = status(dsn)
    assert after["changes"] == 1
    assert after["last_captured_commit"] is not None
    assert status(dsn, slot="nope")["warnings"]


def test_a_dropped_slot_stops_the_worker_with_slot_lost(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (1)")
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                     " WHERE database = current_database()")  # the database's own slot
    with pytest.raises(SlotLostError, match="--snapshot"):
        run(dsn, once=True)
    run(dsn, once=True, snapshot=True)  # the documented way out: a new slot and a fresh snapshot
    assert [op for _, op, *_ in rows(dsn)] == ["CREATE", "SNAPSHOT"]


def test_a_role_without_replication_gets_the_fix_in_one_line(dsn: str, database: str) -> None:
    role = f"{database}_plain"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        plain = psycopg.conninfo.make_conninfo(dsn, user=role)
        with pytest.raises(ConfigurationError, match=f"ALTER ROLE {role} REPLICATION"):
            run(plain, once=True)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_resolve_dsn_reads_the_seed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BEMI_TT_DSN", raising=False)
    for name, value in {
        "DB_HOST": "db.example",
        "DB_PORT": "6543",
        "DB_NAME": "app",
        "DB_USER": "u",
        "DB_PASSWORD": "s3cret",
    }.items():
        monkeypatch.setenv(name, value)
    params = psycopg.conninfo.conninfo_to_dict(resolve_dsn(None))
    assert params == {
        "host": "db.example",
        "port": "6543",
        "dbname": "app",
        "user": "u",
        "password": "s3cret",
    }
    monkeypatch.setenv("BEMI_TT_DSN", "dbname=other")
    assert resolve_dsn(None) == "dbname=other"
    assert resolve_dsn("dbname=given") == "dbname=given"


def test_resolve_dsn_without_any_setting_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BEMI_TT_DSN", "DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigurationError, match="BEMI_TT_DSN"):
        resolve_dsn(None)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"batch_changes": 0}, id="batch"),
        pytest.param({"slot": ""}, id="slot"),
        pytest.param({"export_every": -1}, id="export-every"),
        pytest.param({"snapshot": "yes"}, id="snapshot"),
    ],
)
def test_bad_arguments_are_rejected_before_connecting(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        run("dbname=never_used", **kwargs)  # type: ignore[arg-type]


def _wait_for(dsn: str, query: str, worker: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            try:
                if conn.execute(query).fetchone() == (True,):
                    return
            except psycopg.errors.UndefinedTable:
                pass
            assert worker.poll() is None, worker.communicate()[1]
            assert time.monotonic() < deadline, f"timed out waiting for {query}"
            time.sleep(0.05)


def test_sigterm_finishes_the_batch_and_exits_zero(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    worker = subprocess.Popen(
        [sys.executable, "-m", "capture", "--dsn", dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(
            dsn,
            "SELECT to_regclass('changes_positions') IS NOT NULL AND EXISTS (SELECT FROM changes_positions)",
            worker,
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO t SELECT generate_series(1, 100)")
        _wait_for(dsn, "SELECT count(*) = 100 FROM changes", worker)
        os.kill(worker.pid, signal.SIGTERM)
        out, err = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, err
    assert "captured 100 changes" in out
    assert "password" not in err.lower()


def test_python_m_capture_reports_errors_in_one_line() -> None:
    result = run_module("--dsn", "host=/nonexistent-dir dbname=x connect_timeout=1", "--once", timeout=60)
    assert result.returncode != 0


def test_worker_reconnects_after_its_connections_are_killed(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    run(dsn, once=True)
    stop = threading.Event()
    errors: list[BaseException] = []

    def background() -> None:
        try:
            run(dsn, stop=stop)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=background)
    thread.start()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (1)")
            _wait_until(conn, "SELECT count(*) = 1 FROM changes")
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
            assert killed is not None and killed[0] >= 2
            conn.execute("INSERT INTO t VALUES (2)")
            _wait_until(conn, "SELECT count(*) = 2 FROM changes")
    finally:
        stop.set()
        thread.join(60)
    assert not errors


class _Records(logging.Handler):
    """Collects the capture logger's messages, so a test can wait for and read them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def count(self, prefix: str) -> int:
        return sum(m.startswith(prefix) for m in self.messages)

    def wait_for(self, prefix: str, count: int) -> None:
        deadline = time.monotonic() + 60
        while self.count(prefix) < count:
            assert time.monotonic() < deadline, f"timed out waiting for {count} x {prefix!r}: {self.messages}"
            time.sleep(0.05)


@contextmanager
def _capture_log() -> Iterator[_Records]:
    logger = logging.getLogger("capture")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextmanager
def _worker_in_background(dsn: str, **kwargs: object) -> Iterator[_Records]:
    """``run(dsn)`` in a thread until the block ends; yields its log once it is capturing."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def background() -> None:
        try:
            run(dsn, stop=stop, **kwargs)  # type: ignore[arg-type]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with _capture_log() as log:
        thread = threading.Thread(target=background)
        thread.start()
        try:
            log.wait_for("capturing ", 1)
            yield log
        finally:
            stop.set()
            thread.join(60)
    assert not errors


def test_reconnect_backoff_starts_again_after_a_successful_reconnect(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    run(dsn, once=True)
    with _worker_in_background(dsn) as log, psycopg.connect(dsn, autocommit=True) as conn:
        for reconnects in (1, 2):  # each loss follows a successful reconnect
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            log.wait_for("capturing ", 1 + reconnects)
        conn.execute("INSERT INTO t VALUES (1)")
        _wait_until(conn, "SELECT count(*) = 1 FROM changes")
    delays = [
        float(m.group(1)) for m in (re.search(r"reconnecting in ([\d.]+) s", x) for x in log.messages) if m
    ]
    assert delays == [0.5, 0.5], log.messages


def test_a_second_worker_on_the_same_slot_is_told_the_slot_is_in_use_with_its_pid(dsn: str) -> None:
    run(dsn, once=True)
    with _worker_in_background(dsn), psycopg.connect(dsn, autocommit=True) as conn:
        others = (
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        worker_pids = {int(r[0]) for r in conn.execute(others).fetchall()}
        in_use = r"slot 'bemi_tt_\w+' is in use by another capture worker"  # the database's own slot
        with pytest.raises(SlotInUseError, match=in_use) as info:
            run(dsn, once=True)
        assert info.value.pid in worker_pids
        assert f"pid {info.value.pid}" in str(info.value)
    run(dsn, once=True)  # the first one stopped: the slot is free again


def test_a_role_without_create_on_the_database_gets_the_grant_to_run(dsn: str, database: str) -> None:
    role = f"{database}_nocreate"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN REPLICATION").format(sql.Identifier(role)))
    try:
        worker = psycopg.conninfo.make_conninfo(dsn, user=role)
        with pytest.raises(PrivilegeError, match=f"GRANT CREATE ON DATABASE {database} TO {role}"):
            run(worker, once=True)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.parametrize("slot", ["Bad-Name", "UPPER", "x" * 64, "with space"])
def test_an_invalid_slot_name_is_rejected_before_connecting(slot: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid replication slot name"):
        run("dbname=never_used", slot=slot, once=True)
    with pytest.raises(ConfigurationError, match="invalid replication slot name"):
        status("dbname=never_used", slot=slot)


def test_status_on_an_unreachable_database_is_a_connection_error_without_the_password() -> None:
    dsn = "host=/nonexistent-socket-dir dbname=x user=u password=StatusSecret42"
    with pytest.raises(ConnectionFailedError, match="cannot connect to the database u@/nonexistent") as info:
        status(dsn)
    assert "StatusSecret42" not in str(info.value)


def _wait_until(conn: psycopg.Connection, query: str) -> None:
    deadline = time.monotonic() + 60
    while conn.execute(query).fetchone() != (True,):
        assert time.monotonic() < deadline, f"timed out waiting for {query}"
        time.sleep(0.05)


def test_export_to_writes_the_parquet_dataset(dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
    run(dsn, once=True, export_to=str(tmp_path / "export"))
    assert list((tmp_path / "export").rglob("*.parquet"))


def test_tables_that_publishing_would_break_are_named_with_the_fix(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE keyless (v int)")
        conn.execute("CREATE TABLE keyed (id int PRIMARY KEY)")
    with caplog.at_level("WARNING", logger="capture"):
        run(dsn, once=True)
    [message] = [r.getMessage() for r in caplog.records if "replica identity" in r.getMessage()]
    assert "public.keyless" in message and "keyed," not in message and "REPLICA IDENTITY FULL" in message


def test_export_to_a_busy_directory_warns_and_keeps_capturing(
    dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import pyarrow.fs as pafs

    from capture.export.lock import open_lock

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
    directory = str(tmp_path / "export")
    with open_lock(directory, pafs.LocalFileSystem(), directory) as held, caplog.at_level("WARNING"):
        held.acquire(0)
        stats = run(dsn, once=True, export_to=directory)
    assert stats.snapshot_rows == 1
    assert any("export to" in r.getMessage() and "another export" in r.getMessage() for r in caplog.records)
    assert not list((tmp_path / "export").rglob("*.parquet"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (2)")
    assert run(dsn, once=True, export_to=directory).changes == 1  # the lock is free again: exported
    assert list((tmp_path / "export").rglob("*.parquet"))


def test_a_peek_whose_connection_was_terminated_closes_without_raising(dsn: str) -> None:
    from capture.source import SlotReader
    from capture.worker import _flushed

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    run(dsn, once=True, slot="bemi_tt")
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("INSERT INTO t SELECT generate_series(1, 100)")
        reader = SlotReader(psycopg.connect(dsn), "bemi_tt", "bemi_tt", fetch=10)
        batches = reader.peek_batches(_flushed(admin))
        assert next(batches)  # the peek is open, its server-side cursor half read
        admin.execute("SELECT pg_terminate_backend(%s)", (reader.conn.info.backend_pid,))
        batches.close()  # what a worker's teardown does after losing the connection
    assert reader.conn.closed
