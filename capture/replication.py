"""Streaming logical replication over psycopg 3's libpq layer (``START_REPLICATION … LOGICAL``).

psycopg 3's high-level API cannot drive a CopyBoth exchange (psycopg issue #71), but ``psycopg.pq``
can: a ``replication=database`` connection sends ``START_REPLICATION SLOT s LOGICAL 0/0 (proto_version
'1', publication_names 'p', messages 'true')``, its result is ``COPY_BOTH``, and then both sides exchange
CopyData messages (PostgreSQL docs, "Streaming Replication Protocol"):

- ``w`` XLogData from the server: start LSN, server WAL end, server clock, one pgoutput message;
- ``k`` primary keepalive from the server: WAL end, server clock, whether a reply is requested now;
- ``r`` standby status update from us: write, flush and apply LSNs, our clock, whether we want a reply.

Exactly once: the server moves the slot's ``confirmed_flush_lsn`` to the FLUSH position of a status
update, so the reader only ever reports as flushed what the caller passed to :meth:`StreamReader.confirm`
(the worker calls it after the destination committed). The write position is what was received.
Restarting from the slot (``0/0`` means "from confirmed_flush_lsn") re-sends every transaction whose
commit was not confirmed.

Keeping the connection alive: the server ends a connection that sends nothing for
``wal_sender_timeout`` (60 s by default). Keepalives that request a reply are answered as soon as they
are read, and a status update goes out every ``status_interval`` seconds (10 s, like pg_recvlogical) —
also while the caller is busy between batches (a long destination write), from a small thread that
shares the connection under a lock and never reads from it (so the socket stays the only buffer and a
huge transaction streams in bounded memory).

Batches and ``upto``: :meth:`StreamReader.peek_batches` has the shape of
:meth:`capture.source.SlotReader.peek_batches` — lists of ``(lsn, pgoutput bytes)`` — and ends once
every transaction committed before ``upto`` was yielded: after a Commit whose end LSN is at or past
``upto``, or after a keepalive outside a transaction whose WAL end is (the server's sent position: all
it decoded before that point is on the wire ahead of the keepalive). While waiting, the reader asks
the server for such a keepalive (a status update with the reply flag). So ``--once`` maps onto
streaming as: note ``pg_current_wal_flush_lsn()`` at start and read with that as ``upto``. A batch
generator closed before its end (the caller stopped mid-way) cannot know what the caller used of its
last batch: the next call reconnects and restarts from the slot, exactly like the next SQL peek.
Each call is self-contained like a peek: the walsender sends a table's Relation message once per
connection, so the reader replays the cached one (with its Type messages) before the table's first
change in every later call, and gives Relation and Type messages (sent at 0/0) the LSN of the change
they precede, as the SQL functions do.

Errors: a lost connection raises ``psycopg.OperationalError`` (the worker's reconnect path); a missing
slot ``SlotLostError``, a slot another process streams ``SlotInUseError``; other server errors as
psycopg's class for their SQLSTATE.
"""

from __future__ import annotations

import selectors
import struct
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Protocol

import psycopg
from psycopg import pq
from psycopg.conninfo import make_conninfo

from capture.errors import ConfigurationError, DecodeError, SlotInUseError, SlotLostError
from capture.source import quote_ident

__all__ = [
    "ChangeReader",
    "Keepalive",
    "StandbyStatus",
    "StreamReader",
    "XLogData",
    "decode_copy_message",
    "encode_copy_message",
    "pg_clock",
]

#: Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
_PG_EPOCH_US = 946_684_800_000_000
_XLOG = struct.Struct(">cQQq")  # 'w', start, wal end, clock, then the payload
_KEEPALIVE = struct.Struct(">cQqB")  # 'k', wal end, clock, reply requested
_STATUS = struct.Struct(">cQQQqB")  # 'r', write, flush, apply, clock, reply requested
_COMMIT_END = struct.Struct(">Q")  # pgoutput Commit: 'C', flags (1), commit lsn (8), end lsn (8), time (8)
_W, _K, _R = b"w", b"k", b"r"
_BEGIN, _COMMIT, _RELATION, _TYPE, _TRUNCATE_KIND = (ord(c) for c in "BCRYT")
_CHANGES = frozenset(ord(c) for c in "IUDT")
_OID = struct.Struct(">I")
_LSN = struct.Struct(">Q")
_W_BYTE, _K_BYTE = ord("w"), ord("k")
#: First bytes of the messages the fast path takes: row changes (Insert, Update, Delete) and Messages.
_FAST = frozenset(ord(c) for c in "IUDM")
#: How often a reader waiting for data asks the server where it is (a reply-requested status update).
_ASK_EVERY = 1.0
#: How long closing waits for the server to end the stream (and release the slot).
_CLOSE_WAIT = 5.0


class ChangeReader(Protocol):
    """What the worker reads a slot through: the SQL-function peek or the streaming protocol."""

    def peek_batches(self, upto: int) -> Iterator[list[tuple[int, bytes]]]:
        """Lists of ``(lsn, pgoutput bytes)`` of the transactions committed before ``upto``."""
        ...

    def close(self) -> None:
        """End the current read (and release what it holds)."""
        ...


@dataclass(frozen=True)
class XLogData:
    """``w``: one pgoutput message and where it is in the WAL."""

    start: int
    wal_end: int
    clock: int
    payload: bytes


@dataclass(frozen=True)
class Keepalive:
    """``k``: the server's WAL end (its sent position for logical decoding); ``reply`` asks for an answer."""

    wal_end: int
    clock: int
    reply: bool


@dataclass(frozen=True)
class StandbyStatus:
    """``r``: the client's write/flush/apply positions; the server confirms the slot up to ``flush``."""

    write: int
    flush: int
    apply: int
    clock: int
    reply: bool


CopyMessage = XLogData | Keepalive | StandbyStatus


def pg_clock(now: float | None = None) -> int:
    """Microseconds since 2000-01-01 UTC (the protocol's clock) for ``now`` (default: the time now)."""
    return int((time.time() if now is None else now) * 1_000_000) - _PG_EPOCH_US


def decode_copy_message(data: bytes | bytearray | memoryview) -> CopyMessage:
    """Parse one CopyData message of the replication stream (either direction)."""
    data = bytes(data)
    if not data:
        raise DecodeError("empty replication message", 0)
    kind = data[:1]
    try:
        if kind == _W:
            _, start, wal_end, clock = _XLOG.unpack_from(data)
            return XLogData(start, wal_end, clock, data[_XLOG.size :])
        if kind == _K:
            if len(data) != _KEEPALIVE.size:
                raise DecodeError(f"keepalive of {len(data)} bytes, expected {_KEEPALIVE.size}", 0)
            _, wal_end, clock, reply = _KEEPALIVE.unpack(data)
            return Keepalive(wal_end, clock, bool(reply))
        if kind == _R:
            if len(data) != _STATUS.size:
                raise DecodeError(f"status update of {len(data)} bytes, expected {_STATUS.size}", 0)
            _, write, flush, apply, clock, reply = _STATUS.unpack(data)
            return StandbyStatus(write, flush, apply, clock, bool(reply))
    except struct.error as exc:
        raise DecodeError(f"truncated replication message {kind!r} of {len(data)} bytes: {exc}", 0) from None
    raise DecodeError(f"unknown replication message type {kind!r}", 0)


def encode_copy_message(message: CopyMessage) -> bytes:
    """The wire bytes of ``message`` (the inverse of :func:`decode_copy_message`)."""
    if isinstance(message, XLogData):
        return _XLOG.pack(_W, message.start, message.wal_end, message.clock) + message.payload
    if isinstance(message, Keepalive):
        return _KEEPALIVE.pack(_K, message.wal_end, message.clock, int(message.reply))
    return _STATUS.pack(_R, message.write, message.flush, message.apply, message.clock, int(message.reply))


class StreamReader:
    """Streams a logical slot with pgoutput; reports as flushed only what the caller confirmed.

    ``conninfo``: a libpq connection string of the source database (``replication=database`` is added).
    ``options``: session settings for the walsender (pgoutput formats values with them).
    ``batch``: most messages per yielded list. ``status_interval``: seconds between status updates.
    """

    def __init__(
        self,
        conninfo: str,
        slot: str,
        publication: str,
        *,
        options: str | None = None,
        batch: int = 5000,
        status_interval: float = 10.0,
        application_name: str = "bemi_tt_capture",
    ) -> None:
        for what, name in (("slot", slot), ("publication", publication)):
            if not isinstance(name, str) or not name:
                raise ConfigurationError(f"{what} must be a non-empty string, got {name!r}")
        if not isinstance(batch, int) or batch < 1:
            raise ConfigurationError(f"batch must be a positive integer, got {batch!r}")
        if not status_interval > 0:
            raise ConfigurationError(f"status_interval must be positive seconds, got {status_interval!r}")
        extra: dict[str, str] = {"replication": "database", "application_name": application_name}
        if options:
            extra["options"] = options
        self._conninfo = make_conninfo(conninfo, **extra)
        self.slot = slot
        self.publication = publication
        self.batch = batch
        self.status_interval = status_interval
        self._conn: pq.abc.PGconn | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._received = 0  # highest WAL position received (reported as written)
        self._confirmed = 0  # highest position the caller confirmed (reported as flushed)
        self._boundary = 0  # every transaction committed before this was yielded
        self._in_transaction = False
        self._last_status = 0.0
        self._dirty = False  # a batch generator was abandoned: restart from the slot
        # the Relation (with its Type) messages of this connection by relation OID, the Type messages
        # waiting for their Relation, and the relations whose Relation this peek_batches call yielded
        self._relations: dict[int, tuple[bytes, ...]] = {}
        self._types: list[bytes] = []
        self._sent: set[int] = set()
        self._unsent: set[int] = set()  # cached relations not yet yielded in this call (fast path if empty)
        self._selector: selectors.BaseSelector | None = None  # waits on this connection's socket

    # -- connection ---------------------------------------------------------------------------------

    @property
    def confirmed(self) -> int:
        """The highest position confirmed so far (what the slot may move to)."""
        return self._confirmed

    def start(self) -> None:
        """Open the stream now (else the first read does): connection and slot errors surface here."""
        self._connection()

    def _start(self) -> pq.abc.PGconn:
        conn = pq.PGconn.connect(self._conninfo.encode())
        if conn.status != pq.ConnStatus.OK:
            message = _text(conn.error_message)
            conn.finish()
            raise psycopg.OperationalError(f"cannot open a replication connection: {message}")
        command = (
            f"START_REPLICATION SLOT {quote_ident(self.slot)} LOGICAL 0/0 (proto_version '1', "
            f"publication_names '{_literal(quote_ident(self.publication))}', messages 'true')"
        )
        conn.send_query(command.encode())
        result = conn.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            error = self._error(conn, result)
            conn.finish()
            raise error
        self._conn = conn
        self._received = max(self._received, self._confirmed)
        self._boundary = self._confirmed
        self._in_transaction = False
        self._dirty = False
        self._relations.clear()
        self._types.clear()
        self._last_status = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._heartbeat, name="bemi_tt-replication-status", daemon=True
        )
        self._thread.start()
        return conn

    def _error(self, conn: pq.abc.PGconn, result: pq.abc.PGresult | None) -> Exception:
        """The exception for a failed command or a stream the server ended with an error."""
        if result is None or result.status not in (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.NONFATAL_ERROR):
            return psycopg.OperationalError(
                f"replication connection lost: {_text(conn.error_message) or 'the server closed it'}"
            )
        sqlstate = _text(result.error_field(pq.DiagnosticField.SQLSTATE))
        message = _text(result.error_message)
        if sqlstate == "42704":  # undefined_object: the slot does not exist
            return SlotLostError(f"replication slot {self.slot!r} vanished: {message}")
        if sqlstate == "55006":  # object_in_use: another process streams the slot
            return SlotInUseError(
                f"replication slot {self.slot!r} is in use by another process: {message}; "
                "run one reader per slot"
            )
        if sqlstate == "55000" and ("can no longer" in message or "invalidated" in message):
            return SlotLostError(f"replication slot {self.slot!r} can no longer be read: {message}")
        cls = psycopg.errors.lookup(sqlstate) if sqlstate else psycopg.OperationalError
        return cls(message)

    def _connection(self) -> pq.abc.PGconn:
        if self._dirty:
            self.close()
        if self._conn is None:
            return self._start()
        return self._conn

    # -- status updates ------------------------------------------------------------------------------

    def _send_status(self, conn: pq.abc.PGconn, reply: bool = False) -> None:
        """Send ``r`` (caller holds the lock): written = received, flushed = applied = confirmed."""
        status = StandbyStatus(
            write=max(self._received, self._confirmed),
            flush=self._confirmed,
            apply=self._confirmed,
            clock=pg_clock(),
            reply=reply,
        )
        if conn.put_copy_data(encode_copy_message(status)) != 1 or conn.flush() != 0:
            raise psycopg.OperationalError(f"replication connection lost: {_text(conn.error_message)}")
        self._last_status = time.monotonic()

    def _heartbeat(self) -> None:
        """Thread: a status update every ``status_interval`` while the reading thread is elsewhere."""
        while not self._stop.wait(min(self.status_interval / 2, 1.0)):
            if time.monotonic() - self._last_status < self.status_interval:
                continue
            if not self._lock.acquire(timeout=0.1):
                continue  # the reading thread holds the connection and sends its own updates
            try:
                conn = self._conn
                if conn is None or self._stop.is_set():
                    return
                try:
                    self._send_status(conn)
                except psycopg.OperationalError:
                    return  # the reading thread meets the same loss on its next read
            finally:
                self._lock.release()

    def confirm(self, lsn: int) -> None:
        """Report ``lsn`` as flushed: call only once the destination durably holds everything before it.

        Never moves backwards; sent at once, so the slot follows without waiting for the next interval.
        """
        if lsn <= self._confirmed:
            return
        self._confirmed = lsn
        with self._lock:
            if self._conn is not None and not self._dirty:
                self._send_status(self._conn)

    # -- reading -------------------------------------------------------------------------------------

    def peek_batches(self, upto: int) -> Generator[list[tuple[int, bytes]], None, None]:
        """Lists of up to ``batch`` ``(lsn, pgoutput bytes)`` until every commit before ``upto`` was yielded.

        A list is yielded as soon as no more data is at hand, so latency does not wait for a full batch.
        """
        conn = self._connection()
        self._sent.clear()
        self._unsent = set(self._relations)
        finished = False
        try:
            if self._boundary >= upto and not self._in_transaction:
                finished = True
                return
            while True:
                with self._lock:
                    rows, done = self._read(conn, upto)
                if rows:
                    yield rows
                if done:
                    finished = True
                    return
        finally:
            if not finished:
                # abandoned mid-way (or failed): what the caller did not use must come again
                self._dirty = True

    def _read(self, conn: pq.abc.PGconn, upto: int) -> tuple[list[tuple[int, bytes]], bool]:
        """Up to one batch of what is at hand (waiting for the first message); whether ``upto`` was met.

        The hot path (an XLogData with a row change) costs a call, a slice and an append; everything
        else (transaction bounds, Relation/Type messages, keepalives) takes the slow branch.
        """
        rows: list[tuple[int, bytes]] = []
        append = rows.append
        get = conn.get_copy_data
        lsn_at = _LSN.unpack_from
        header = _XLOG.size
        fast_kinds = _FAST
        batch = self.batch
        pending: list[int] = []  # rows still waiting for their LSN
        asked_at: float | None = None
        # the fast path is open while no row waits for its LSN and every cached Relation was replayed;
        # it leaves _received to _note (the last row's LSN is the highest received)
        fast = not self._unsent
        if time.monotonic() - self._last_status >= self.status_interval:
            self._send_status(conn)
        while len(rows) < batch or pending:
            size, data = get(1)
            if size > 0:
                if data[0] == _W_BYTE:
                    payload = bytes(data[header:])
                    start = lsn_at(data, 1)[0]
                    first = payload[0] if size > header else 0
                    if fast and start and first in fast_kinds:
                        append((start, payload))  # a row change of a table already described
                        continue
                    self._note(rows)
                    if start == 0:
                        # the walsender sends Relation and Type messages at 0/0; the SQL functions give
                        # them the LSN of the change they precede: patched when that change arrives
                        pending.append(len(rows))
                    else:
                        if first in _CHANGES and self._unsent:
                            self._replay_relations(rows, start, payload)
                        if pending:
                            for index in pending:
                                rows[index] = (start, rows[index][1])
                            pending.clear()
                        if start > self._received:
                            self._received = start
                    append((start, payload))
                    if first == _BEGIN:
                        self._in_transaction = True
                    elif first == _COMMIT and len(payload) >= 18:
                        self._in_transaction = False
                        end = _COMMIT_END.unpack_from(payload, 10)[0]
                        if end > self._boundary:
                            self._boundary = end
                        if end >= upto:
                            return rows, True
                    elif first == _TYPE:
                        self._types.append(payload)
                    elif first == _RELATION and len(payload) >= 5:
                        oid = _OID.unpack_from(payload, 1)[0]
                        self._relations[oid] = (*self._types, payload)
                        self._types.clear()
                        self._sent.add(oid)
                        self._unsent.discard(oid)
                    fast = not pending and not self._unsent
                elif data[0] == _K_BYTE:
                    _, wal_end, _clock, reply = _KEEPALIVE.unpack(bytes(data))
                    self._note(rows)
                    if wal_end > self._received:
                        self._received = wal_end
                    if reply:
                        self._send_status(conn)
                    if not self._in_transaction:
                        self._boundary = max(self._boundary, wal_end)
                        if wal_end >= upto:
                            return rows, True
                else:
                    raise DecodeError(f"unknown replication message type {bytes(data[:1])!r}", 0)
                continue
            if size == -1:  # the server ended the stream: its final result says why
                result = conn.get_result()
                raise self._error(conn, result)
            if size < -1:
                raise psycopg.OperationalError(f"replication connection lost: {_text(conn.error_message)}")
            self._note(rows)
            if rows and not pending:
                return rows, False  # nothing more at hand: hand over what we have
            # nothing at all: ask the server where it is (it answers with a keepalive), then wait
            now = time.monotonic()
            if now - self._last_status >= self.status_interval:
                self._send_status(conn)
            if asked_at is None or now - asked_at >= _ASK_EVERY:
                self._send_status(conn, reply=True)
                asked_at = now
            timeout = max(0.0, min(self.status_interval - (now - self._last_status), _ASK_EVERY))
            if self._selector is None:
                self._selector = selectors.DefaultSelector()
                self._selector.register(conn.socket, selectors.EVENT_READ)
            if self._selector.select(timeout):
                try:
                    conn.consume_input()
                except psycopg.OperationalError as exc:
                    raise psycopg.OperationalError(f"replication connection lost: {exc}") from None
        self._note(rows)
        return rows, False

    def _note(self, rows: list[tuple[int, bytes]]) -> None:
        """Record the last row's LSN as received (the highest so far: the fast path leaves it to this)."""
        if rows and rows[-1][0] > self._received:
            self._received = rows[-1][0]

    def _replay_relations(self, rows: list[tuple[int, bytes]], lsn: int, change: bytes) -> None:
        """Put the cached Relation (and Type) messages of ``change``'s tables before it, once per call.

        The walsender sends a table's Relation message once per connection; every SQL peek sends it again
        before the table's first change. Replaying it keeps each :meth:`peek_batches` call self-contained
        like a peek, so a consumer may start a fresh decoder state per call.
        """
        if change[0] == _TRUNCATE_KIND:
            if len(change) < 6:
                return
            count = _OID.unpack_from(change, 1)[0]
            oids = struct.unpack_from(f">{count}I", change, 6) if len(change) >= 6 + 4 * count else ()
        elif len(change) >= 5:
            oids = (_OID.unpack_from(change, 1)[0],)
        else:
            return
        for oid in oids:
            if oid in self._sent:
                continue
            cached = self._relations.get(oid)
            if cached is not None:
                rows.extend((lsn, message) for message in cached)
            self._sent.add(oid)
            self._unsent.discard(oid)

    # -- ending --------------------------------------------------------------------------------------

    def close(self) -> None:
        """End the stream with CopyDone and close the connection (a later read reconnects)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        with self._lock:
            conn, self._conn = self._conn, None
            self._dirty = False
            if self._selector is not None:
                self._selector.close()
                self._selector = None
            if conn is None:
                return
            try:
                if conn.status == pq.ConnStatus.OK:
                    if self._confirmed:
                        self._send_status(conn)
                    conn.put_copy_end()
                    conn.flush()
                    _await_copy_end(conn, time.monotonic() + _CLOSE_WAIT)
            except psycopg.OperationalError:
                pass  # closing a lost connection: nothing to tell the server
            finally:
                conn.finish()

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _await_copy_end(conn: pq.abc.PGconn, deadline: float) -> None:
    """Discard what is still in flight until the server ends the COPY too (or ``deadline`` passes).

    The walsender releases the slot when it leaves START_REPLICATION; waiting for that here means a
    reader started right after this one (a restart from the slot) finds the slot free.
    """
    while time.monotonic() < deadline:
        size, _ = conn.get_copy_data(1)
        if size > 0:
            continue
        if size < 0:  # the server's CopyDone (-1) or an error (-2): collect the command's results
            while conn.get_result() is not None:
                pass
            return
        with selectors.DefaultSelector() as sel:
            sel.register(conn.socket, selectors.EVENT_READ)
            if sel.select(max(0.0, deadline - time.monotonic())):
                conn.consume_input()


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace").strip() if value else ""


def _literal(text: str) -> str:
    """``text`` inside a single-quoted replication-command literal."""
    return text.replace("'", "''")
