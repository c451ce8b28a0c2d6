"""The streaming replication reader (capture/replication.py) and the worker on it, against a real server.

The reader tests create their own publication and pgoutput slot in the test's fresh database and read
it with ``START_REPLICATION`` through psycopg's libpq layer; nothing is mocked. The worker's
exactly-once, crash and randomized tests (test_exactly_once.py, test_randomized.py, ...) run on the
streaming reader, the worker's default.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Iterator

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from capture.errors import ConfigurationError, DecodeError, SlotInUseError, SlotLostError
from capture.pgoutput import Begin, Commit, Insert, Message, Relation, decode
from capture.replication import (
    ChangeReader,
    Keepalive,
    StandbyStatus,
    StreamReader,
    XLogData,
    decode_copy_message,
    encode_copy_message,
)
from capture.source import SlotReader
from capture.worker import run

PUB = "p_stream"
SESSION = "-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3 -c IntervalStyle=postgres"


@pytest.fixture
def slot(database: str) -> str:
    """The test's slot (slot names are cluster-wide: named after the test's database)."""
    return f"s_{database}"


@pytest.fixture
def admin(dsn: str, slot: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute(f"CREATE PUBLICATION {PUB} FOR ALL TABLES")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        yield conn
        # a walsender lingers a moment after its client left: drop the slot once it is released, so
        # dropping the database does not race with it
        wait_until(lambda: slot_released(conn, slot), "the slot to be released")
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))


def slot_released(conn: psycopg.Connection, slot: str) -> bool:
    row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    return row is not None and row[0] is None


def flushed(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint").fetchone()
    assert row is not None
    return int(row[0])


def confirmed_flush(conn: psycopg.Connection) -> int:
    """The slot's confirmed_flush_lsn (the only slot in the test's database)."""
    row = conn.execute(
        "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots"
        " WHERE database = current_database()"
    ).fetchone()
    assert row is not None
    return int(row[0])


def read_all(reader: StreamReader, upto: int) -> list[tuple[int, bytes]]:
    return [row for batch in reader.peek_batches(upto) for row in batch]


def transactions(rows: list[tuple[int, bytes]]) -> list[list[object]]:
    """Decoded messages grouped by transaction (Begin .. Commit)."""
    out: list[list[object]] = []
    for _lsn, data in rows:
        message = decode(data)
        if isinstance(message, Begin):
            out.append([])
        out[-1].append(message)
    return out


def wait_until(check: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_every_change_of_a_workload_arrives_in_order_and_decodes(
    dsn: str, slot: str, admin: psycopg.Connection
) -> None:
    with psycopg.connect(dsn, autocommit=True) as app:
        for i in range(20):
            with app.transaction():
                app.execute("INSERT INTO t VALUES (%s, %s)", (i, f"v{i}"))
                app.execute("SELECT pg_logical_emit_message(true, 'bemi', %s)", (f'{{"n": {i}}}',))
                app.execute("UPDATE t SET v = v || '!' WHERE id = %s", (i,))
        app.execute("DELETE FROM t WHERE id < 5")
    upto = flushed(admin)
    with StreamReader(dsn, slot, PUB, options=SESSION, batch=7) as reader:
        rows = read_all(reader, upto)
    streamed = transactions(rows)
    assert len(streamed) == 21
    for i, txn in enumerate(streamed[:20]):
        kinds = [type(m).__name__ for m in txn if not isinstance(m, Relation)]
        assert kinds == ["Begin", "Insert", "Message", "Update", "Commit"]
        insert = next(m for m in txn if isinstance(m, Insert))
        assert insert.new[1] == f"v{i}".encode()
        message = next(m for m in txn if isinstance(m, Message))
        assert message.content == f'{{"n": {i}}}'.encode()
    assert [type(m).__name__ for m in streamed[20]] == ["Begin"] + ["Delete"] * 5 + ["Commit"]
    lsns = [lsn for lsn, _ in rows]
    assert lsns == sorted(lsns)
    # the same messages, byte for byte, as the SQL-function peek reads
    with psycopg.connect(dsn) as peek_conn:
        peeked = [row for batch in SlotReader(peek_conn, slot, PUB).peek_batches(upto) for row in batch]
    assert [d for _, d in peeked] == [d for _, d in rows]
    assert [lsn for lsn, _ in peeked] == lsns


def test_both_readers_satisfy_one_reader_protocol(dsn: str, slot: str, admin: psycopg.Connection) -> None:
    def drain(reader: ChangeReader, upto: int) -> int:
        try:
            return sum(len(batch) for batch in reader.peek_batches(upto))
        finally:
            reader.close()

    admin.execute("INSERT INTO t VALUES (1, 'a')")
    upto = flushed(admin)
    with psycopg.connect(dsn) as peek_conn:
        assert drain(SlotReader(peek_conn, slot, PUB), upto) == drain(StreamReader(dsn, slot, PUB), upto) == 4


def test_the_slot_never_passes_what_the_caller_confirmed_and_the_rest_is_sent_again(
    dsn: str, slot: str, admin: psycopg.Connection
) -> None:
    for i in range(10):
        admin.execute("INSERT INTO t VALUES (%s, 'x')", (i,))
    upto = flushed(admin)
    start = confirmed_flush(admin)
    reader = StreamReader(dsn, slot, PUB, batch=1, status_interval=0.2)
    commits: list[Commit] = []
    for batch in reader.peek_batches(upto):
        for _lsn, data in batch:
            message = decode(data)
            if isinstance(message, Commit):
                commits.append(message)
                if len(commits) == 4:
                    reader.confirm(message.end_lsn)
        # the status thread and keepalive answers run meanwhile: they never report more than confirmed
        assert confirmed_flush(admin) in (start, commits[3].end_lsn if len(commits) >= 4 else start)
        time.sleep(0.05)
    assert len(commits) == 10
    wait_until(lambda: confirmed_flush(admin) == commits[3].end_lsn, "the confirmed position to arrive")
    time.sleep(0.5)  # several status intervals pass: the slot stays where the caller confirmed
    assert confirmed_flush(admin) == commits[3].end_lsn
    # kill the reader mid-stream (no CopyDone): the server ends its walsender
    admin.execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    )
    wait_until(lambda: slot_released(admin, slot), "the slot to be released")
    with pytest.raises(psycopg.OperationalError):
        read_all(reader, upto + 1_000_000)
    reader.close()
    assert confirmed_flush(admin) == commits[3].end_lsn
    with StreamReader(dsn, slot, PUB) as again:
        resent = [m for _, d in read_all(again, upto) if isinstance(m := decode(d), Commit)]
    assert [c.end_lsn for c in resent] == [c.end_lsn for c in commits[4:]]


def test_every_call_carries_the_relation_messages_of_its_tables_like_a_peek(
    dsn: str, slot: str, admin: psycopg.Connection
) -> None:
    admin.execute("CREATE TABLE u (id int PRIMARY KEY)")
    admin.execute("INSERT INTO t VALUES (1, 'a')")
    with StreamReader(dsn, slot, PUB) as reader:
        first = read_all(reader, flushed(admin))
        reader.confirm(decode(first[-1][1]).end_lsn)  # type: ignore[union-attr]
        admin.execute("INSERT INTO u VALUES (1)")
        admin.execute("INSERT INTO t VALUES (2, 'b')")
        admin.execute("UPDATE t SET v = 'c'")
        upto = flushed(admin)
        second = read_all(reader, upto)
        wait_until(lambda: confirmed_flush(admin) == reader.confirmed, "the confirmation to arrive")
    # a SQL peek from the confirmed position reads the same bytes at the same LSNs
    with psycopg.connect(dsn) as peek_conn:
        peeked = [row for batch in SlotReader(peek_conn, slot, PUB).peek_batches(upto) for row in batch]
    assert second == peeked
    kinds = [chr(d[0]) for _, d in second]
    # u's Relation arrived from the server; t's was replayed before t's first change of this call only
    assert kinds == ["B", "R", "I", "C", "B", "R", "I", "C", "B", "U", "U", "C"]


def test_an_abandoned_batch_generator_restarts_from_the_slot(
    dsn: str, slot: str, admin: psycopg.Connection
) -> None:
    for i in range(3):
        admin.execute("INSERT INTO t VALUES (%s, 'x')", (i,))
    upto = flushed(admin)
    with StreamReader(dsn, slot, PUB, batch=2) as reader:
        batches = reader.peek_batches(upto)
        first = next(batches)
        batches.close()  # the caller stopped mid-way: it may not have used all of `first`
        rows = read_all(reader, upto)
    assert rows[: len(first)] == first
    assert len(rows) == 10  # three transactions of three messages and one Relation


def test_keepalive_replies_keep_the_connection_alive_past_a_short_wal_sender_timeout(
    dsn: str, slot: str, admin: psycopg.Connection
) -> None:
    # wal_sender_timeout is per connection (user-settable since PostgreSQL 12): 1 s for this walsender only
    reader = StreamReader(dsn, slot, PUB, options="-c wal_sender_timeout=1s", status_interval=0.3)
    with reader:
        admin.execute("INSERT INTO t VALUES (1, 'a')")
        assert len(read_all(reader, flushed(admin))) == 4
        pid = admin.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
        # the caller is busy elsewhere (a long destination write) for several timeouts: the status thread
        # keeps the connection alive without reading
        time.sleep(3.5)
        # then the reader waits on an idle server for several timeouts: keepalives are answered
        target = flushed(admin)
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            read_all(reader, target)
            target += 1  # a position the idle server only reports on request
        admin.execute("INSERT INTO t VALUES (2, 'b')")
        rows = read_all(reader, flushed(admin))
        assert [type(decode(d)).__name__ for _, d in rows] == ["Begin", "Relation", "Insert", "Commit"]
        assert (
            admin.execute(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
            == pid
        )


def test_a_100k_row_transaction_streams_in_bounded_memory(
    dsn: str, slot: str, admin: psycopg.Connection
) -> None:
    admin.execute("INSERT INTO t SELECT g, repeat('x', 300) FROM generate_series(1, 100000) g")
    upto = flushed(admin)
    count = size = 0
    tracemalloc.start()
    try:
        with StreamReader(dsn, slot, PUB, batch=1000) as reader:
            for batch in reader.peek_batches(upto):
                count += len(batch)
                size += sum(len(d) for _, d in batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 100_003
    assert size > 30_000_000
    assert peak < 8_000_000  # a few batches at most, never the transaction


def test_once_mapping_ends_on_an_idle_server_at_the_position_noted_at_start(
    dsn: str, slot: str, admin: psycopg.Connection
) -> None:
    admin.execute("INSERT INTO t VALUES (1, 'a')")
    with StreamReader(dsn, slot, PUB) as reader:
        assert len(read_all(reader, flushed(admin))) == 4
        # nothing new committed: the server's keepalive (asked for) shows it is past the position
        assert read_all(reader, flushed(admin)) == []


def test_a_missing_slot_is_slot_lost_and_a_busy_slot_is_in_use(
    dsn: str, slot: str, admin: psycopg.Connection
) -> None:
    with pytest.raises(SlotLostError, match="nope"):
        read_all(StreamReader(dsn, "nope", PUB), 1)
    with StreamReader(dsn, slot, PUB) as first:
        read_all(first, flushed(admin))
        with pytest.raises(SlotInUseError, match=slot):
            read_all(StreamReader(dsn, slot, PUB), 1)


def test_close_ends_the_stream_with_copy_done_and_releases_the_slot(
    dsn: str, slot: str, admin: psycopg.Connection
) -> None:
    reader = StreamReader(dsn, slot, PUB)
    admin.execute("INSERT INTO t VALUES (1, 'a')")
    rows = read_all(reader, flushed(admin))
    reader.confirm(decode(rows[-1][1]).end_lsn)  # type: ignore[union-attr]
    reader.close()
    assert slot_released(admin, slot)  # the server ended the COPY and released the slot before close returned
    assert confirmed_flush(admin) == decode(rows[-1][1]).end_lsn  # type: ignore[union-attr]


lsns = st.integers(0, 2**64 - 1)
clocks = st.integers(-(2**63), 2**63 - 1)
copy_messages = st.one_of(
    st.builds(XLogData, lsns, lsns, clocks, st.binary(max_size=64)),
    st.builds(Keepalive, lsns, clocks, st.booleans()),
    st.builds(StandbyStatus, lsns, lsns, lsns, clocks, st.booleans()),
)


@given(copy_messages)
def test_replication_messages_round_trip_through_bytes(message: XLogData | Keepalive | StandbyStatus) -> None:
    data = encode_copy_message(message)
    assert decode_copy_message(data) == message
    assert encode_copy_message(decode_copy_message(data)) == data


@given(st.binary(max_size=40))
def test_malformed_replication_messages_are_decode_errors(data: bytes) -> None:
    try:
        message = decode_copy_message(data)
    except DecodeError:
        return
    assert encode_copy_message(message) == data


# -- the worker on the streaming path ----------------------------------------------------------------


def worker_rows(dsn: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT primary_key, operation FROM changes WHERE operation <> 'SNAPSHOT'"
            " ORDER BY commit_position, ordinal"
        ).fetchall()


def test_the_worker_switches_between_the_sql_and_the_streaming_reader_without_loss_or_duplicates(
    dsn: str,
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE w (id int PRIMARY KEY)")
    run(dsn, once=True, reader="sql")
    expected = []
    for round_, reader in enumerate(["stream", "sql", "stream", "stream", "sql"]):
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(3):
                conn.execute("INSERT INTO w VALUES (%s)", (round_ * 10 + i,))
                expected.append((str(round_ * 10 + i), "CREATE"))
        assert run(dsn, once=True, reader=reader).changes == 3
        assert worker_rows(dsn) == expected
    with psycopg.connect(dsn, autocommit=True) as conn:
        # the streaming worker confirmed (through status updates) what it wrote: nothing is retained
        row = conn.execute(
            "SELECT confirmed_flush_lsn >= pg_current_wal_flush_lsn() - 1024 * 1024, active_pid"
            " FROM pg_replication_slots WHERE database = current_database()"
        ).fetchone()
    assert row == (True, None)


def test_a_streaming_run_in_batches_confirms_the_slot_past_the_last_written_commit(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE w (id int PRIMARY KEY)")
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(30):
            conn.execute("INSERT INTO w VALUES (%s)", (i,))
    stats = run(dsn, once=True, batch_changes=10)
    assert stats.changes == 30 and stats.batches >= 3
    with psycopg.connect(dsn) as conn:
        slot = conn.execute(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint, slot_name FROM pg_replication_slots"
            " WHERE database = current_database()"
        ).fetchone()
        assert slot is not None
        end = conn.execute(
            "SELECT end_position FROM changes_positions WHERE slot = %s", (slot[1],)
        ).fetchone()
    assert end is not None and slot is not None and slot[0] >= end[0]


@pytest.mark.parametrize("reader", ["streaming", "", None, "SQL"])
def test_an_unknown_reader_is_rejected_before_connecting(reader: object) -> None:
    with pytest.raises(ConfigurationError, match="reader must be 'stream' or 'sql'"):
        run("postgresql://nobody@127.0.0.1:1/none", once=True, reader=reader)  # type: ignore[arg-type]
