"""The capture loop: server checks, publication and slot set-up, snapshot, batches, signals, status.

A :class:`Worker` owns one run: its configuration, the position the destination committed, the
``--once`` target and the export schedule; a ``_Session`` (connections, reader, sink, catalog caches)
is rebuilt after each reconnect. One iteration reads everything committed up to the current flushed
WAL position (``--once``: the position noted at start), stitches it (capture/stitch.py) and writes it
(capture/sink.py), committing the destination every ``batch_changes`` changes at a transaction
boundary. Batch commits run on the sink's writer thread behind the batch's last COPY chunks while the
next batch is decoded; a position is confirmed to the slot only once its COMMIT succeeded, and each
read ends with everything committed. The slot is read with the streaming replication protocol
(capture/replication.py, the default: decoding overlaps writing, and each destination commit is
confirmed to the server with a standby status update) or, as the fallback where replication
connections are refused, with one peek call (capture/source.py) after which the slot is advanced.
Source transactions already recorded in ``changes_positions`` are skipped, so restarts after any
crash resume exactly where the last destination commit stopped.

Own tables: when the destination is the source database, the worker's tables
(:data:`capture.protocol.WORKER_TABLES` in the destination schema) are decoded by the all-tables
publication and ignored (see capture/source.py for why and what it costs).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from capture import source as src
from capture.ddl import ddl_tracking_installed, install_ddl_tracking
from capture.dsn import check_dsn, connect_error, database_error, describe, one_line, redact
from capture.errors import (
    BemiError,
    ConfigurationError,
    ConnectionFailedError,
    OperationalError,
    SlotInUseError,
    SlotLostError,
)
from capture.exclude import Exclusions, load_exclusions, recorded_exclusions
from capture.pgoutput import Begin, Commit, Relation, decode, format_lsn
from capture.protocol import CHANGES_TABLE, POSITIONS_TABLE, WORKER_TABLES
from capture.protocol import SCHEMA as TRACKING_SCHEMA
from capture.replication import ChangeReader, StreamReader
from capture.signing import ContextKey, KeyRing, keys_from_env
from capture.sink import Position, Sink
from capture.snapshot import discard_staged_snapshot, write_snapshot, write_staged_snapshot
from capture.stitch import NOT_HANDLED, ChangeRow, SchemaChange, Stitcher
from capture.values import TYPE_INFO_QUERY, TypeInfo, load_type_info, uses_composite

__all__ = ["CaptureStats", "Worker", "resolve_dsn", "run", "status"]

log = logging.getLogger("capture")

#: Session settings the value conversion relies on (capture/values.py).
SESSION_OPTIONS = "-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3 -c IntervalStyle=postgres"
_B, _C, _R, _I, _U, _D = (ord(c) for c in "BCRIUD")
_IDLE_MIN, _IDLE_MAX = 0.02, 0.5
_RETRY_MIN, _RETRY_MAX = 0.5, 30.0
#: PostgreSQL's rule for replication slot names (ReplicationSlotValidateName), checked before connecting.
_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")
#: First key of the advisory lock a worker holds on its slot (ASCII "BEMI"); the second is hashtext(slot).
_SLOT_LOCK_CLASS = 0x42454D49
#: How the slot is read: the streaming protocol (default) or the SQL functions (fallback).
READERS = ("stream", "sql")
#: How long a starting worker waits for the slot's lock: a killed worker's backend may linger a moment.
SLOT_LOCK_WAIT = "5s"


@dataclass
class CaptureStats:
    """What one ``run`` did."""

    changes: int = 0
    transactions: int = 0
    batches: int = 0
    snapshot_rows: int = 0
    skipped_transactions: int = 0
    last_commit_position: int | None = None
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = self.changes / self.seconds if self.seconds else 0.0
        return (
            f"captured {self.changes} changes in {self.transactions} transactions "
            f"({self.batches} batches, {self.snapshot_rows} snapshot rows) in {self.seconds:.1f} s"
            f" ({rate:,.0f} changes/s)"
        )


def resolve_dsn(dsn: str | None) -> str:
    """``dsn``, else ``BEMI_TT_DSN``, else ``DB_HOST``/``DB_PORT``/``DB_NAME``/``DB_USER``/``DB_PASSWORD``."""
    if dsn is not None:
        check_dsn(dsn)
        return dsn
    env = os.environ.get("BEMI_TT_DSN")
    if env:
        check_dsn(env, what="BEMI_TT_DSN")
        return env
    parts = {
        key: os.environ.get(f"DB_{name}")
        for key, name in (
            ("host", "HOST"),
            ("port", "PORT"),
            ("dbname", "NAME"),
            ("user", "USER"),
            ("password", "PASSWORD"),
        )
    }
    given = {k: v for k, v in parts.items() if v}
    if not given:
        raise ConfigurationError(
            "no database given: pass --dsn postgresql://user@host/db, or set BEMI_TT_DSN, or DB_HOST, "
            "DB_PORT, DB_NAME, DB_USER and DB_PASSWORD"
        )
    built = make_conninfo("", **given)
    check_dsn(built, what="DB_HOST/DB_PORT/DB_NAME/DB_USER/DB_PASSWORD")
    return built


def _describe(dsn: str) -> str:
    """Where ``dsn`` points, without its password (for logs)."""
    return describe(dsn)


def check_slot_name(slot: object) -> str:
    """``slot`` if PostgreSQL accepts it as a replication slot name, else ``ConfigurationError``."""
    if not isinstance(slot, str) or not _SLOT_NAME.match(slot):
        raise ConfigurationError(
            f"invalid replication slot name {slot!r}: use 1 to 63 lower-case letters, digits and "
            "underscores, e.g. --slot bemi_tt"
        )
    return slot


def session_options(dsn: str) -> str:
    """The dsn's own ``options`` followed by the settings value conversion needs."""
    try:
        own = conninfo_to_dict(dsn).get("options")
    except psycopg.ProgrammingError:
        check_dsn(dsn)  # raises the redacted ConfigurationError
        raise
    return f"{own} {SESSION_OPTIONS}" if own else SESSION_OPTIONS


def _connect(dsn: str, *, autocommit: bool) -> psycopg.Connection:
    """A connection to ``dsn``; failures are ``ConnectionFailedError``/``ConfigurationError``, redacted."""
    options = session_options(dsn)
    try:
        return psycopg.connect(dsn, autocommit=autocommit, options=options, connect_timeout=10)
    except psycopg.Error as exc:
        raise connect_error(exc, dsn) from None


def _lock_slot(conn: psycopg.Connection, slot: str) -> None:
    """Hold the slot's advisory lock for this session: one worker per slot, released when it disconnects.

    Without it two workers on one slot race on the destination and fail with raw constraint errors.
    """
    conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(SLOT_LOCK_WAIT)))
    try:
        conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (_SLOT_LOCK_CLASS, slot))
    except psycopg.errors.LockNotAvailable:
        row = conn.execute(
            "SELECT l.pid, a.client_addr::text FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND l.classid = %s::bigint::oid AND l.objid = (hashtext(%s)::bigint & 4294967295)::oid",
            (_SLOT_LOCK_CLASS, slot),
        ).fetchone()
        pid = int(row[0]) if row else None
        client = f", client {row[1]}" if row and row[1] else ""
        holder = f" (server process pid {pid}{client})" if pid else ""
        raise SlotInUseError(
            f"replication slot {slot!r} is in use by another capture worker{holder}: run one worker per "
            "slot, stop the other one or pass another --slot",
            pid,
        ) from None
    finally:
        conn.execute("RESET lock_timeout")


def _identity(conn: psycopg.Connection) -> tuple[Any, ...]:
    row = conn.execute("SELECT system_identifier, current_database() FROM pg_control_system()").fetchone()
    assert row is not None
    return tuple(row)


@contextmanager
def _signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set ``stop`` (finish the batch, exit 0) when running on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        log.info("signal %s: finishing the current batch", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class _Session:
    """Connections and state of one connected run (rebuilt after a reconnect)."""

    source_dsn: str
    destination_dsn: str
    slot: str
    publication: str
    schema: str
    batch_changes: int
    meta: psycopg.Connection
    reader: ChangeReader
    sink: Sink
    database: str
    own: frozenset[tuple[str, str]]
    type_info: dict[int, TypeInfo] = field(default_factory=dict)
    relations: dict[Relation, tuple[list[str] | None, list[str]]] = field(default_factory=dict)
    context_keys: KeyRing | None = None  # signed contexts are checked with these (capture/signing.py)
    #: Tables without a context trigger while others have one: their rows never take the context of
    #: another statement's message (a statement on them emits none). Updated in place by describe().
    untracked: set[tuple[str, str]] = field(default_factory=set)
    #: tables and columns never recorded (capture/exclude.py): the stored configuration at start, then
    #: each ``bemi_exclude`` message in stream order (the stitchers update this object in place)
    exclusions: Exclusions = field(default_factory=Exclusions)

    def load_untracked(self) -> None:
        rows = self.meta.execute(_UNTRACKED).fetchall()
        self.untracked.clear()
        self.untracked.update((str(r[0]), str(r[1])) for r in rows)

    @property
    def streaming(self) -> bool:
        """Whether the slot is read with the streaming protocol (else with the SQL functions)."""
        return isinstance(self.reader, StreamReader)

    def close(self) -> None:
        self.sink.close()
        reader = self.reader
        close_reader = reader.conn.close if isinstance(reader, src.SlotReader) else reader.close
        for close in (close_reader, self.sink.conn.close, self.meta.close):
            try:
                close()
            except Exception:  # pragma: no cover - closing a broken connection
                log.debug("error closing a connection", exc_info=True)

    def ignored(self, schema: str, table: str) -> bool:
        # schema bemi_tt holds tracking's own bookkeeping (bemi_tt.install), never application data
        return schema == TRACKING_SCHEMA or (schema, table) in self.own

    def load_types(self) -> None:
        # in place: stitchers and their encoders hold this mapping and read composite attributes from it
        self.type_info.update(load_type_info(self.meta.execute(TYPE_INFO_QUERY).fetchall()))

    def describe(self, rel: Relation) -> tuple[list[str] | None, list[str]]:
        """(primary key column names from the catalog or None, format_type text per column).

        Reloads the type catalog for a column of an unknown type and for every Relation message of a
        table with composite columns: pgoutput sends one at a table's first change in each peek (and
        after the table itself changes), never after ALTER TYPE, so this is when the worker catches up
        with attributes added, dropped or renamed since it last looked.
        """
        if any(c.type_oid not in self.type_info for c in rel.columns) or uses_composite(
            [c.type_oid for c in rel.columns], self.type_info
        ):
            self.load_types()
        known = self.relations.get(rel)
        if known is not None:
            return known
        self.load_untracked()  # a table seen for the first time (or changed): it may have lost its trigger
        row = self.meta.execute(
            "SELECT (SELECT array_agg(format_type(t.oid, t.mod) ORDER BY t.n)"
            "   FROM unnest(%s::oid[], %s::int[]) WITH ORDINALITY AS t(oid, mod, n)),"
            " (SELECT array_agg(a.attname::text ORDER BY k.n) FROM pg_index i,"
            "   unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)"
            "   JOIN pg_attribute a ON a.attnum = k.attnum"
            "   WHERE i.indrelid = %s AND i.indisprimary AND a.attrelid = %s)",
            ([c.type_oid for c in rel.columns], [c.type_modifier for c in rel.columns], rel.oid, rel.oid),
        ).fetchone()
        assert row is not None
        types = list(row[0] or [])
        result = (list(row[1]) if row[1] else None, types)
        self.relations[rel] = result
        return result


#: Tables (partitioned roots, as rows are recorded) without bemi_tt's context trigger or the original
#: package's row trigger, once bemi_tt is installed (before that, every context comes from messages the
#: application emits itself, and nothing is excluded).
_UNTRACKED = r"""
SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND NOT EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = c.oid
                  AND (t.tgname = 'bemi_tt_context' OR t.tgname LIKE '\_bemi\_row\_trigger\_%'))
  AND EXISTS (SELECT FROM pg_trigger t WHERE t.tgname = 'bemi_tt_context')
"""


def _open(worker: Worker, slot: str | None, snapshot: bool | None) -> _Session:
    """Connect, check the server, set up publication, slot, destination tables and the snapshot."""
    source_dsn, destination_dsn = worker.source_dsn, worker.destination_dsn
    publication, schema, reader, stats = worker.publication, worker.schema, worker.reader, worker.stats
    meta = _connect(source_dsn, autocommit=True)
    opened: list[psycopg.Connection] = [meta]
    stream: StreamReader | None = None
    try:
        src.check_server(meta)
        slot = src.resolve_slot(meta, slot)
        _lock_slot(meta, slot)
        row = meta.execute(
            "SELECT current_database(), rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert row is not None
        database, superuser = str(row[0]), bool(row[1])
        sink_conn = _connect(destination_dsn, autocommit=False)
        opened.append(sink_conn)
        sink = Sink(sink_conn, slot, schema=schema)
        try:
            sink.setup()
        except psycopg.errors.InsufficientPrivilege as exc:
            doing = f"creating the {CHANGES_TABLE} tables in schema {schema}"
            raise database_error(exc, doing, destination_dsn, role=_user(sink_conn)) from None
        same = _identity(meta) == _identity(sink_conn)
        sink_conn.rollback()
        own = (
            frozenset((schema, t) for t in WORKER_TABLES)
            if same
            else frozenset()
        )
        if src.ensure_publication(meta, publication):
            log.info("created publication %s", publication)
        added, left = src.publish_new_tables(meta, publication)
        if added:
            log.info("added to publication %s: %s", publication, ", ".join(added))
        if left:
            log.warning(
                "tables not in publication %s, so their changes are not captured: %s; run bemi-tt install"
                " as their owner (it adds them), or ALTER PUBLICATION %s ADD TABLE <table>;",
                publication, ", ".join(left[:10]) + (" ..." if len(left) > 10 else ""), publication,
            )
        unkeyed = src.tables_without_identity(meta)
        if unkeyed:
            log.warning(
                "tables without a primary key or replica identity cannot be updated or deleted from while"
                " published: %s; run ALTER TABLE <table> REPLICA IDENTITY FULL; for each"
                " (bemi-tt install does)",
                ", ".join(unkeyed[:10]) + (" ..." if len(unkeyed) > 10 else ""),
            )
        if not ddl_tracking_installed(meta):
            if superuser:
                install_ddl_tracking(meta)
                log.info("installed schema-change tracking (event triggers bemi_tt_ddl, bemi_tt_drop)")
            else:
                log.warning("schema-change tracking is not installed: run bemi-tt install as a superuser")
        position = sink.position()
        info = src.slot_info(meta, slot)
        if info is None and position is not None and not snapshot:
            raise SlotLostError(
                f"replication slot {slot!r} is gone but {_describe(destination_dsn)} holds changes captured "
                "through it: changes made meanwhile are lost; restart with --snapshot to create a new slot "
                "and record the current rows"
            )
        info, created = src.ensure_slot(meta, slot, database)
        if created:
            log.info("created replication slot %s at %s", slot, format_lsn(info.confirmed_flush))
        change_reader: ChangeReader
        if reader == "stream":
            # started here, so a server that refuses replication connections fails the start at once
            stream = StreamReader(source_dsn, slot, publication, options=session_options(source_dsn))
            stream.start()
            change_reader = stream
        else:
            reader_conn = _connect(source_dsn, autocommit=False)
            opened.append(reader_conn)
            change_reader = src.SlotReader(reader_conn, slot, publication)
        session = _Session(
            source_dsn,
            destination_dsn,
            slot,
            publication,
            schema,
            worker.batch_changes,
            meta,
            change_reader,
            sink,
            database,
            own,
            context_keys=worker.context_keys,
        )
        session.load_types()
        session.load_untracked()
        session.exclusions = load_exclusions(meta)
        first = position is None
        staged = None
        if snapshot is None and first and not created:
            # the slot and the snapshot bemi_tt.install took when tracking began (capture/snapshot.py)
            staged = write_staged_snapshot(
                meta, slot=slot, sink=sink, database=database, type_info=session.type_info,
                ignored=session.ignored, exclusions=session.exclusions,
            )
        elif not snapshot:
            discard_staged_snapshot(meta, slot)  # outdated: recorded already, or the slot is new
        if staged is not None:
            stats.snapshot_rows += staged[0]
            log.info("snapshot taken by install at %s: %d rows", format_lsn(staged[1]), staged[0])
        elif snapshot or (snapshot is None and first):
            worker.position = (position.commit_position, position.end_position) if position else (0, 0)
            drained: list[int] = []

            def drain_backlog(point: int) -> None:
                # the slot's transactions committed before the snapshot's point go first, in the same
                # destination transaction, so `changes` is inserted in (commit_position, ordinal) order
                if worker.drain(session, point, threading.Event(), below=point, commit=False):
                    drained.append(point)

            rows = write_snapshot(
                source_dsn,
                slot=slot,
                publication=publication,
                sink=sink,
                database=database,
                type_info=session.type_info,
                ignored=session.ignored,
                session_options=session_options(source_dsn),
                before_rows=drain_backlog,
                exclusions=session.exclusions,
            )
            if drained:
                worker.advance(session, drained[0])
            stats.snapshot_rows += rows
            log.info("snapshot: %d rows", rows)
        elif position is None:
            sink.commit(snapshot_position=None, initialize=True)  # first start without a snapshot
        return session
    except BaseException:
        if stream is not None:
            stream.close()
        for conn in opened:
            conn.close()
        raise


def _user(conn: psycopg.Connection) -> str:
    return src.quote_ident(conn.info.user)


class Worker:
    """One capture run: its configuration, the captured position, the ``--once`` target, the export schedule.

    ``position`` is the (commit, end) WAL position of the last source transaction the destination has
    committed: transactions at or below it are skipped when they are read again, and only positions the
    destination committed are ever confirmed to the slot (exactly once). A connected ``_Session`` is
    rebuilt after each reconnect; the worker outlives it.
    """

    def __init__(
        self,
        source_dsn: str,
        destination_dsn: str,
        *,
        slot: str | None,
        publication: str,
        schema: str,
        batch_changes: int,
        snapshot: bool | None,
        context_keys: KeyRing | None,
        reader: str,
        once: bool,
        stop: threading.Event,
        export_to: str | None,
        export_every: float,
    ) -> None:
        self.source_dsn = source_dsn
        self.destination_dsn = destination_dsn
        self.slot = slot
        self.publication = publication
        self.schema = schema
        self.batch_changes = batch_changes
        self.snapshot = snapshot
        self.context_keys = context_keys
        self.reader = reader
        self.once = once
        self.stop = stop
        self.export_to = export_to
        self.export_every = export_every
        self.stats = CaptureStats()
        self.position: tuple[int, int] = (0, 0)
        #: ``--once``: the source's flush position when the run first connected (kept across reconnects)
        self.target: int | None = None
        self._exported_at = time.monotonic()

    # -- the run -------------------------------------------------------------------------------------
    def run(self) -> CaptureStats:
        """Connect and capture until done (``once``) or stopped; reconnect after a lost connection."""
        started = time.monotonic()
        retry = _RETRY_MIN
        opened = False
        while not self.stop.is_set():
            session: _Session | None = None
            try:
                session = _open(self, self.slot, self.snapshot)
                self.snapshot = False  # done (or not wanted): never again after a reconnect
                opened = True
                retry = _RETRY_MIN  # connected again: the next loss starts the backoff from the beginning
                self.slot = session.slot  # resolved: a reconnect uses the same slot
                log.info(
                    "capturing %s (slot %s, publication %s) into %s",
                    _describe(self.source_dsn),
                    self.slot,
                    self.publication,
                    _describe(self.destination_dsn),
                )
                self.loop(session)
                break
            except (psycopg.OperationalError, ConnectionFailedError, SlotInUseError) as exc:
                # lost connections and failed reconnects are retried once capturing has started; a
                # lingering backend of our own lost session may still hold the slot's lock for a moment
                message = one_line(redact(exc, self.source_dsn, self.destination_dsn))
                if not opened:
                    if isinstance(exc, BemiError):
                        raise
                    raise ConnectionFailedError(
                        f"cannot start capturing {_describe(self.source_dsn)}: {message}"
                    ) from None
                log.warning("connection lost (%s); reconnecting in %.1f s", message, retry)
                if self.stop.wait(retry):
                    break
                retry = min(retry * 2, _RETRY_MAX)
            except psycopg.Error as exc:
                raise database_error(exc, "capturing", self.source_dsn) from None
            finally:
                if session is not None:
                    session.close()
        self.maybe_export(force=self.export_to is not None)
        self.stats.seconds = time.monotonic() - started
        return self.stats

    def loop(self, session: _Session) -> None:
        """Drain the slot up to the flushed position (``once``: the target), again and again."""
        position = session.sink.position()
        self.position = (position.commit_position, position.end_position) if position else (0, 0)
        if self.once and self.target is None:
            self.target = _flushed(session.meta)
        idle = _IDLE_MIN
        while not self.stop.is_set():
            info = src.slot_info(session.meta, session.slot)
            if info is None:
                raise SlotLostError(
                    f"replication slot {session.slot!r} vanished while capturing: changes may be lost"
                )
            src.check_slot(info, session.database)
            confirmed = _confirmed(session, info.confirmed_flush)
            if self.once:
                upto = self.target
                assert upto is not None
                if confirmed >= upto:
                    return
            else:
                upto = _flushed(session.meta)
            if upto <= confirmed:
                self.maybe_export()
                self.stop.wait(idle)
                idle = min(idle * 2, _IDLE_MAX)
                continue
            idle = _IDLE_MIN
            if self.drain(session, upto, self.stop):
                self.advance(session, upto)
            elif self.position[1]:
                self.advance(session, self.position[1])
            self.maybe_export()
            if self.once and _advance_done(session, upto):
                return

    # -- reading and writing -------------------------------------------------------------------------
    def drain(
        self,
        session: _Session,
        upto: int,
        stop: threading.Event,
        *,
        below: int | None = None,
        commit: bool = True,
    ) -> bool:
        """Read and write every transaction committed before ``upto``; True when the read was finished.

        ``below``: stop before the first transaction whose commit position is at or after it. ``commit``
        False writes everything in one destination transaction and leaves it open (for the snapshot).
        Batches are committed on the sink's writer thread while the next one is decoded; everything is
        committed (and confirmed) when this returns.
        """
        stitcher = Stitcher(
            session.database,
            session.type_info,
            session.sink.known_columns(),
            ignored_tables=set(session.own),
            context_keys=session.context_keys,
            exclusions=session.exclusions,
            recorded_exclusions=recorded_exclusions(session.sink.conn, session.sink.schemas),
        )
        stitcher.ignored_schemas.add(TRACKING_SCHEMA)
        stats = self.stats
        sink = session.sink
        batch = session.batch_changes
        skipping = False
        produced = False
        transactions = 0
        started = time.monotonic()
        committed_at: datetime | None = None
        marked = self.position
        done_before = self.position[0]
        feed = stitcher.feed
        untracked = session.untracked  # the same set, refreshed in place as relations are described
        to_row = stitcher.change
        from_data = stitcher.change_data
        write = sink.write
        batches = session.reader.peek_batches(upto)
        try:
            stopped = reached = False
            for rows in batches:
                self._confirm(session)  # batches the writer thread committed meanwhile
                for lsn, data in rows:
                    kind = data[0]
                    if skipping and kind != _B and kind != _C and kind != _R:
                        continue
                    if kind in (_I, _U, _D):
                        row = from_data(lsn, data)
                        if row is NOT_HANDLED:
                            row = to_row(lsn, decode(data))  # type: ignore[arg-type]
                        if row is not None:
                            produced = True
                            if untracked and (row.schema, row.table) in untracked:
                                row = row._replace(context="{}")
                            write(row)
                        continue
                    message = decode(data)
                    if kind == _R:
                        assert isinstance(message, Relation)
                        key, types = session.describe(message)
                        changes = stitcher.add_relation(
                            message,
                            primary_key=key,
                            type_names=types,
                            ignored=session.ignored(message.namespace, message.name),
                        )
                        if not skipping and changes:
                            produced = True
                            for change in changes:
                                sink.write_schema(change)
                        continue
                    if kind == _B:
                        assert isinstance(message, Begin)
                        if below is not None and message.final_lsn >= below:
                            stopped = reached = True
                            break
                        skipping = message.final_lsn <= done_before
                        if skipping:
                            stats.skipped_transactions += 1
                        produced = False
                        feed(lsn, message)
                        continue
                    if kind == _C:
                        assert isinstance(message, Commit)
                        feed(lsn, message)
                        # transactions touching only ignored tables leave no mark
                        if produced and not skipping:
                            committed_at = _when(message.commit_time)
                            sink.mark(message.commit_lsn, message.end_lsn, committed_at)
                            marked = (message.commit_lsn, message.end_lsn)
                            transactions += 1
                        if commit and transactions and (sink.pending >= batch or stop.is_set()):
                            # on the writer thread: the next batch is decoded while this one commits
                            self._commit(session, transactions, upto, started, committed_at, marked,
                                         wait=stop.is_set())
                            transactions = 0
                            started = time.monotonic()
                        if stop.is_set():
                            stopped = True
                            break
                        continue
                    for out in feed(lsn, message):
                        produced = True
                        if type(out) is ChangeRow:
                            if untracked and (out.schema, out.table) in untracked:
                                out = out._replace(context="{}")
                            write(out)
                        else:
                            assert isinstance(out, SchemaChange)
                            sink.write_schema(out)
                if stopped:
                    break
            finished = reached or not stopped
            if not commit:
                stats.changes += sink.pending
                stats.transactions += transactions
            elif transactions:
                self._commit(session, transactions, upto, started, committed_at, marked, wait=True)
            else:
                sink.wait()  # a queued commit that failed must fail this read (before "finished")
                self._confirm(session)
                sink.rollback()
        finally:
            if not session.streaming:
                session.reader.close()  # ends the peek's transaction: the slot cannot be advanced before
            elif isinstance(batches, Generator):
                batches.close()  # a stream stopped mid-way sends what the caller did not use again
        return finished

    def _commit(
        self,
        session: _Session,
        transactions: int,
        upto: int,
        started: float,
        committed_at: datetime | None,
        marked: tuple[int, int],
        *,
        wait: bool,
    ) -> None:
        """Commit the batch up to ``marked`` (``wait`` False: on the writer thread, confirmed later)."""
        count = session.sink.pending
        done = session.sink.commit(wait=wait)
        stats = self.stats
        stats.changes += count
        stats.transactions += transactions
        stats.batches += 1
        self._confirm(session, done)
        lag = (datetime.now(timezone.utc) - committed_at).total_seconds() if committed_at else 0.0
        elapsed = time.monotonic() - started
        log.info(
            "wrote %d changes in %d transactions up to %s (%.0f changes/s); lag %s bytes, %.3f s",
            count,
            transactions,
            format_lsn(marked[0]),
            count / elapsed if elapsed > 0 else 0.0,
            max(upto - marked[1], 0),
            lag,
        )

    def _confirm(self, session: _Session, done: tuple[int, int] | None = None) -> None:
        """Take the positions the destination committed: the slot may move past them now."""
        positions = session.sink.take_committed()
        if done is not None:
            positions.append(done)
        if not positions:
            return
        self.position = max(self.position, *positions)
        self.stats.last_commit_position = self.position[0]
        if isinstance(session.reader, StreamReader):
            # the stream has no end of peek to wait for: a status update moves the slot at once
            session.reader.confirm(self.position[1])

    def advance(self, session: _Session, lsn: int) -> None:
        """Move the slot to ``lsn`` (everything before it is in the destination)."""
        info = src.slot_info(session.meta, session.slot)
        if info is None:
            raise SlotLostError(
                f"replication slot {session.slot!r} vanished while capturing: changes may be lost"
            )
        src.check_slot(info, session.database)
        if isinstance(session.reader, StreamReader):
            session.reader.confirm(lsn)  # the walsender holds the slot: a status update moves it
        elif lsn > info.confirmed_flush:
            src.advance(session.meta, session.slot, lsn)

    # -- export --------------------------------------------------------------------------------------
    def maybe_export(self, force: bool = False) -> None:
        """Export ``changes`` to Parquet every ``export_every`` seconds (a busy directory never stops
        capturing)."""
        if self.export_to is None:
            return
        now = time.monotonic()
        if not force and now - self._exported_at < self.export_every:
            return
        self._exported_at = now
        try:
            from capture.export import export_parquet
        except ImportError:  # pragma: no cover - the export module ships with the package
            log.warning("capture.export is not available: --export-to ignored")
            return
        try:
            export_parquet(self.destination_dsn, self.export_to, progress=False, schema=self.schema)
        except OperationalError as exc:  # a busy directory, a full disk, a dataset that needs attention
            log.warning("export to %s skipped: %s", self.export_to, redact(exc, self.destination_dsn))


def _when(commit_time: int) -> datetime:
    from capture.pgoutput import pg_timestamp_to_datetime

    return pg_timestamp_to_datetime(commit_time)


def _flushed(meta: psycopg.Connection) -> int:
    row = meta.execute("SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint").fetchone()
    assert row is not None
    return int(row[0])


def run(
    dsn: str | None = None,
    *,
    destination: str | None = None,
    once: bool = False,
    snapshot: bool | None = None,
    slot: str | None = None,
    publication: str = "bemi_tt",
    export_to: str | None = None,
    export_every: float = 60.0,
    batch_changes: int = 50_000,
    stop: threading.Event | None = None,
    schema: str = "public",
    context_keys: KeyRing | Iterable[ContextKey | str | bytes] | None = None,
    reader: str = "stream",
) -> CaptureStats:
    """Capture changes from ``dsn`` into ``changes`` at ``destination`` (default: the same database).

    ``context_keys``: the keys signed contexts are checked with (``changes.context_verified``); None
    reads ``BEMI_TT_CONTEXT_KEY``, an empty list means none (``context_verified`` stays NULL).

    ``reader``: ``"stream"`` reads the slot with the streaming replication protocol
    (capture/replication.py; needs a replication connection, which pg_hba.conf may refuse); ``"sql"``
    with ``pg_logical_slot_peek_binary_changes`` over an ordinary connection (the fallback; slower, it
    decodes the backlog again on each call).

    ``once``: drain what was committed before the call, then return. Otherwise run until ``stop`` is set
    or SIGTERM/SIGINT arrives (the current batch is finished). ``snapshot``: None records the existing rows
    on the first start only (the rows ``bemi_tt.install`` copied when it created the slot, if it did);
    True records them again; False never. ``slot`` None: the database's own slot
    (:func:`capture.source.resolve_slot`: ``bemi_tt_<database>``, or ``bemi_tt`` where that one exists).
    """
    source_dsn = resolve_dsn(dsn)
    destination_dsn = source_dsn if destination is None else resolve_dsn(destination)
    for label, value in (("publication", publication), ("schema", schema)):
        if not isinstance(value, str) or not value:
            raise ConfigurationError(f"{label} must be a non-empty name, got {value!r}")
    if slot is not None:
        check_slot_name(slot)
    if not isinstance(batch_changes, int) or isinstance(batch_changes, bool) or batch_changes < 1:
        raise ConfigurationError(f"batch_changes must be a positive integer, got {batch_changes!r}")
    if not isinstance(export_every, (int, float)) or export_every <= 0:
        raise ConfigurationError(f"export_every must be a positive number of seconds, got {export_every!r}")
    if snapshot is not None and not isinstance(snapshot, bool):
        raise ConfigurationError(f"snapshot must be True, False or None, got {snapshot!r}")
    if reader not in READERS:
        raise ConfigurationError(f"reader must be 'stream' or 'sql', got {reader!r}")
    keys = context_keys if isinstance(context_keys, KeyRing) else (
        keys_from_env() if context_keys is None else tuple(context_keys)
    )
    ring = keys if isinstance(keys, KeyRing) else KeyRing(keys) if keys else None
    stop = stop if stop is not None else threading.Event()
    worker = Worker(
        source_dsn,
        destination_dsn,
        slot=slot,
        publication=publication,
        schema=schema,
        batch_changes=batch_changes,
        snapshot=snapshot,
        context_keys=ring,
        reader=reader,
        once=once,
        stop=stop,
        export_to=export_to,
        export_every=export_every,
    )
    with _signals(stop):
        return worker.run()


def _confirmed(session: _Session, slot_confirmed: int) -> int:
    """The slot's confirmed position, or what the stream confirmed (the server applies it a moment later)."""
    if isinstance(session.reader, StreamReader):
        return max(slot_confirmed, session.reader.confirmed)
    return slot_confirmed


def _advance_done(session: _Session, upto: int) -> bool:
    info = src.slot_info(session.meta, session.slot)
    return info is not None and _confirmed(session, info.confirmed_flush) >= upto


def status(
    dsn: str | None = None, *, destination: str | None = None, slot: str | None = None, schema: str = "public"
) -> dict[str, object]:
    """Slot lag and retained WAL (bytes), last captured commit time, changes count, and warnings."""
    source_dsn = resolve_dsn(dsn)
    destination_dsn = source_dsn if destination is None else resolve_dsn(destination)
    if slot is not None:
        check_slot_name(slot)
    try:
        return _status(source_dsn, destination_dsn, slot, schema)
    except psycopg.Error as exc:
        raise database_error(exc, "reading the capture status", source_dsn) from None


def _status(source_dsn: str, destination_dsn: str, slot: str | None, schema: str) -> dict[str, object]:
    warnings: list[str] = []
    with _connect(source_dsn, autocommit=True) as conn:
        slot = src.resolve_slot(conn, slot)
        info = src.slot_info(conn, slot)
        keep = conn.execute("SELECT current_setting('max_slot_wal_keep_size')").fetchone()
    result: dict[str, object] = {"slot": slot}
    if info is None:
        result.update(active=False, lag_bytes=None, retained_wal_bytes=None, wal_status=None)
        warnings.append(f"replication slot {slot!r} does not exist: start bemi-tt capture")
    else:
        result.update(
            active=info.active_pid is not None,
            wal_status=info.wal_status,
            lag_bytes=max(info.current - info.confirmed_flush, 0),
            retained_wal_bytes=max(info.current - info.restart, 0),
            confirmed_position=format_lsn(info.confirmed_flush),
        )
        if info.active_pid is None:
            retained = max(info.current - info.restart, 0)
            limit = keep[0] if keep else "-1"
            warnings.append(
                f"replication slot {slot!r} is inactive: no capture worker is reading it, and it retains "
                f"WAL until one does ({retained} bytes now); start bemi-tt capture"
                + (
                    ", or cap what it may keep with ALTER SYSTEM SET max_slot_wal_keep_size = '10GB';"
                    if limit in ("-1", None)
                    else f" (max_slot_wal_keep_size is {limit}: beyond it the slot is lost)"
                )
            )
        if info.wal_status == "lost":
            warnings.append(
                f"replication slot {slot!r} is lost: changes are missing; restart with --snapshot"
            )
    with _connect(destination_dsn, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL",
            (f"{_qualified(schema, CHANGES_TABLE)}", f"{_qualified(schema, POSITIONS_TABLE)}"),
        ).fetchone()
        assert exists is not None
        changes = None
        position: Position | None = None
        if exists[0]:
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, CHANGES_TABLE))
            ).fetchone()
            changes = int(row[0]) if row else 0
        if exists[1]:
            row = conn.execute(
                sql.SQL(
                    "SELECT commit_position, end_position, committed_at, snapshot_position FROM {}"
                    " WHERE slot = %s"
                ).format(sql.Identifier(schema, POSITIONS_TABLE)),
                (slot,),
            ).fetchone()
            position = Position(*row) if row else None
    result["changes"] = changes
    result["last_captured_commit"] = (
        position.committed_at.isoformat() if position and position.committed_at else None
    )
    result["last_captured_position"] = format_lsn(position.commit_position) if position else None
    if changes is None:
        warnings.append(f"no {CHANGES_TABLE} table in {_describe(destination_dsn)}: start bemi-tt capture")
    result["warnings"] = warnings
    return result


def _qualified(schema: str, table: str) -> str:
    return sql.Identifier(schema, table).as_string(None)
