"""Writing ``changes``: COPY in chunks, the slot's position in the same transaction, exactly once.

A batch is one destination transaction: change rows are COPYed in chunks of ``chunk_rows`` (so a
million-row source transaction is never held in memory), ``changes_schemas`` rows are upserted, and
``changes_positions`` records the last written commit position for the slot — all committed together.
The worker skips every source transaction whose commit position is at or below the recorded one, and
advances the slot only after the commit, so a crash at any moment neither loses nor duplicates a change;
``UNIQUE (commit_position, ordinal)`` turns any mistake into an error instead of a duplicate.

Unchanged TOAST values the stitcher could not fill (``ChangeRow.missing``) are filled before the row is
written, from the previous version of the same row in ``changes`` (the rows queued before it are COPYed
first), so the row is complete when its digest is computed; when that row was never captured (e.g.
tracking started without a snapshot) the column stays absent.

Every row gets ``context_verified`` (from the stitcher), ``row_digest`` and ``chain_hash``
(:mod:`capture.chain`), chained in write order, which is ``(commit_position, ordinal)`` order. A
``ChangeRow``'s ``before`` and ``after`` must be canonical JSON (:func:`capture.chain.canonical_json`;
capture/values.py writes it): they are hashed as they are, never parsed. The context is canonicalised
once per distinct context. The chain
goes on from the last row in ``changes`` (a first-release table's unhashed rows: from the start); each
commit records the head in ``changes_positions`` and, every ``digest_every`` rows, in ``changes_digests``.

Chunks are COPYed by a background thread (at most two waiting), so PostgreSQL parses one chunk while
Python stitches the next; every other use of the connection waits for it first. (One COPY statement
kept open across chunks was measured too: no faster, the server's per-row cost dominates; so was COPY
in binary: jsonb's binary input is its text again, and the server's cost per row stayed the same.)
``commit(wait=False)`` queues the commit on that thread too, so the worker decodes the next batch while
the server finishes the last chunks and syncs the commit; :meth:`Sink.take_committed` reports the
positions once durable, and only those are ever confirmed to the slot.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from capture.chain import (
    GENESIS,
    Chain,
    canonical_json,
    context_digest,
    digest_with,
    header_prefix,
    text_digest,
)
from capture.fastpath import COPY_BOOL, COPY_ESCAPES, COPY_NULL, copy_escape
from capture.protocol import DIGESTS_TABLE, POSITIONS_TABLE
from capture.schema import CHANGES_TABLE, SCHEMAS_TABLE, changes_ddl, changes_upgrade_ddl, schemas_ddl
from capture.stitch import (
    CHANGE_COLUMNS,
    ChangeRow,
    ColumnSpec,
    KnownSchemas,
    RelationVersion,
    SchemaChange,
)

__all__ = ["DIGESTS_TABLE", "POSITIONS_TABLE", "Position", "Sink", "digests_ddl", "positions_ddl"]

log = logging.getLogger("capture")

#: COPY column order: the columns a transaction's rows share first, so they are formatted once.
_COPY_COLUMNS = (
    "table",
    "schema",
    "database",
    "transaction_id",
    "committed_at",
    "commit_position",
    "context",
    "operation",
    "primary_key",
    "before",
    "after",
    "context_verified",
    "position",
    "ordinal",
    "row_digest",
    "chain_hash",
    "before_primary_key",
)
assert sorted(_COPY_COLUMNS) == sorted(
    (*CHANGE_COLUMNS, "context_verified", "row_digest", "chain_hash", "before_primary_key")
)
def positions_ddl(schema: str = "public", table: str = POSITIONS_TABLE) -> sql.Composed:
    """``CREATE TABLE IF NOT EXISTS`` for the per-slot positions (the exactly-once watermark)."""
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {name} ("
        " slot text PRIMARY KEY, commit_position bigint NOT NULL, end_position bigint NOT NULL,"
        " committed_at timestamptz, snapshot_position bigint, snapshot_at timestamptz,"
        " updated_at timestamptz NOT NULL DEFAULT now(), chain_position bigint, chain_ordinal integer,"
        " chain_hash text);"
        # first-release tables: the chain head columns
        "ALTER TABLE {name} ADD COLUMN IF NOT EXISTS chain_position bigint,"
        " ADD COLUMN IF NOT EXISTS chain_ordinal integer, ADD COLUMN IF NOT EXISTS chain_hash text"
    ).format(name=sql.Identifier(schema, table))


def digests_ddl(schema: str = "public", table: str = DIGESTS_TABLE) -> sql.Composed:
    """``CREATE TABLE IF NOT EXISTS`` for the periodic chain digests (head hash at a point of history)."""
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {name} ("
        " commit_position bigint NOT NULL, ordinal integer NOT NULL, chain_hash text NOT NULL,"
        " recorded_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (commit_position, ordinal))"
    ).format(name=sql.Identifier(schema, table))


@dataclass(frozen=True)
class Position:
    """Where a slot's capture stands in the destination."""

    commit_position: int
    end_position: int
    committed_at: datetime | None
    snapshot_position: int | None


class _Copier:
    """Runs the destination's writes on a background thread, in order: COPY chunks and commits.

    The server parses one chunk (or commits a batch) while Python stitches the next. At most two jobs
    wait; :meth:`wait` blocks until all are done and re-raises the first error (jobs after it are
    dropped, so nothing after a failed COPY is ever committed).
    """

    def __init__(self, copy: Callable[[bytes], None]) -> None:
        self._copy = copy
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def put(self, data: bytes) -> None:
        """Queue one COPY chunk."""
        self.put_job(functools.partial(self._copy, data))

    def put_job(self, job: Callable[[], None]) -> None:
        """Queue ``job`` (it runs on the writer thread, after everything queued before it)."""
        if self._error is not None:
            self.wait()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="bemi-tt-copy", daemon=True)
            self._thread.start()
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    job()
            except BaseException as exc:  # handed to the main thread by wait()
                self._error = exc
            finally:
                self._queue.task_done()

    def wait(self) -> None:
        """Block until every queued job is done; raise the first error."""
        if self._thread is not None:
            self._queue.join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None


class Sink:
    """The destination connection: schema set-up, chunked COPY, position bookkeeping, commit."""

    def __init__(
        self,
        conn: psycopg.Connection,
        slot: str,
        *,
        schema: str = "public",
        chunk_rows: int = 5000,
        digest_every: int = 100_000,
    ) -> None:
        if conn.autocommit:
            raise ValueError("the sink needs a connection with autocommit off")
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
        if not isinstance(digest_every, int) or digest_every < 1:
            raise ValueError(f"digest_every must be a positive int, got {digest_every!r}")
        self.digest_every = digest_every
        self.conn = conn
        self.slot = slot
        self.schema = schema
        self.chunk_rows = chunk_rows
        self.changes = sql.Identifier(schema, CHANGES_TABLE)
        self.schemas = sql.Identifier(schema, SCHEMAS_TABLE)
        self.positions = sql.Identifier(schema, POSITIONS_TABLE)
        self.digests = sql.Identifier(schema, DIGESTS_TABLE)
        self._copy = (
            sql.SQL("COPY {} ({}) FROM STDIN")
            .format(self.changes, sql.SQL(", ").join(sql.Identifier(c) for c in _COPY_COLUMNS))
            .as_bytes(conn)
        )
        self._buffer: list[str] = []
        self._shared_commit: int | None = None
        self._shared_table = ""
        self._shared_schema = ""
        self._shared = ""
        self._context_in = ""
        self._copier = _Copier(self._copy_chunk)
        #: positions of queued commits that succeeded (appended by the writer thread)
        self._committed: collections.deque[tuple[int, int]] = collections.deque()
        self.pending = 0  # change rows written in the open transaction
        self._mark: tuple[int, int, datetime | None] | None = None
        self._chain: Chain | None = None  # None: read the head from ``changes`` before the next row
        self._chain_key: tuple[int, int] | None = None  # (commit_position, ordinal) of the head
        self._prefix = b""
        self._shared_verified: bool | None = None
        self._context_digest = b""
        self._context_digests: dict[str, bytes] = {}
        self._since_digest = 0  # rows chained since the last stored digest (committed)
        self._pending_digest = 0

    # -- set-up and reading state -------------------------------------------------------------------
    def setup(self) -> None:
        """Create ``changes``, ``changes_schemas`` and ``changes_positions`` if missing."""
        with self.conn.transaction():
            self.conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            for ddl in (
                changes_ddl(self.schema),
                changes_upgrade_ddl(self.schema),
                schemas_ddl(self.schema),
                positions_ddl(self.schema),
                digests_ddl(self.schema),
            ):
                self.conn.execute(ddl)
        self.conn.commit()

    def position(self) -> Position | None:
        """The last written position for this slot, or None before anything was written."""
        self._copier.wait()
        row = self.conn.execute(
            sql.SQL(
                "SELECT commit_position, end_position, committed_at, snapshot_position FROM {} "
                "WHERE slot = %s"
            ).format(self.positions),
            (self.slot,),
        ).fetchone()
        self.conn.rollback()
        return None if row is None else Position(*row)

    def known_columns(self) -> KnownSchemas:
        """The last recorded version of every live relation in ``changes_schemas`` (by OID; versions of
        the first release, without OID, by name): the record the stitcher continues."""
        self._copier.wait()
        rows = self.conn.execute(
            sql.SQL(
                "SELECT * FROM (SELECT DISTINCT ON (relation_oid, CASE WHEN relation_oid IS NULL"
                ' THEN ("schema", "table") END) "schema", "table", relation_oid, replica_identity, columns,'
                " event, commit_position FROM {} ORDER BY relation_oid, CASE WHEN relation_oid IS NULL"
                ' THEN ("schema", "table") END, commit_position DESC, ordinal DESC, step DESC) AS v'
                " WHERE NOT v.event @> '[{{\"kind\": \"drop_table\"}}]'"
                " ORDER BY relation_oid NULLS FIRST"
            ).format(self.schemas)
        ).fetchall()
        # relations inside a tracking gap: their last tracked/untracked event is an untracked one
        gaps = {
            oid for oid, last in self.conn.execute(
                sql.SQL(
                    "SELECT relation_oid, (array_agg(e ->> 'kind' ORDER BY commit_position DESC,"
                    " ordinal DESC, step DESC))[1] FROM {}, jsonb_array_elements(event) AS e"
                    " WHERE e ->> 'kind' IN ('tracked', 'untracked') AND relation_oid IS NOT NULL"
                    " GROUP BY relation_oid"
                ).format(self.schemas)
            ).fetchall() if last == "untracked"
        }
        self.conn.rollback()
        known = KnownSchemas()
        for schema, table, oid, identity, columns, _, position in rows:
            spec = tuple(
                ColumnSpec(c["name"], c["type"], int(c["type_oid"]), bool(c["key"]), c.get("attnum"))
                for c in columns
            )
            # OID versions come last, so a name now held by a relation with an OID maps to it
            known.record(
                RelationVersion(oid, schema, table, spec, identity, oid not in gaps, int(position)), None
            )
        return known

    # -- writing -----------------------------------------------------------------------------------
    def write(self, row: ChangeRow) -> None:
        """Queue one change row (digested and chained); COPY the queue when it reaches ``chunk_rows``."""
        (pk, table, operation, before, after, context, _, schema, _, _, position, commit, ordinal, missing,
         _, verified, moved_from) = row
        if self._chain is None:
            self._chain = Chain(self._read_head())
        if missing and pk is not None:
            after = self._filled(row)
        # the columns shared by a transaction's rows of one table are formatted once (see _COPY_COLUMNS)
        if (
            commit != self._shared_commit
            or context is not self._context_in
            or table != self._shared_table
            or schema != self._shared_schema
        ):
            self._shared_commit, self._shared_table, self._shared_schema = commit, table, schema
            if context is not self._context_in:
                self._context_in = context
                cached = self._context_digests.get(context)
                if cached is None:
                    if len(self._context_digests) >= 4096:
                        self._context_digests.clear()
                    cached = self._context_digests[context] = context_digest(context)
                self._context_digest = cached
            xid = row.transaction_id
            self._shared = (
                f"{copy_escape(table)}\t{copy_escape(schema)}\t{copy_escape(row.database)}\t"
                f"{COPY_NULL if xid is None else xid}\t{row.committed_at.isoformat()}\t{commit}\t"
                f"{copy_escape(context)}\t"
            )
            self._prefix = header_prefix(schema, table, row.database, verified, row.committed_at, xid, commit)
            self._shared_verified = verified
        elif verified is not self._shared_verified:  # same context text, another verdict: not shared
            self._shared_verified = verified
            self._prefix = header_prefix(
                schema, table, row.database, verified, row.committed_at, row.transaction_id, commit
            )
        # the images are canonical JSON as the stitcher wrote them (capture/values.py): hashed as they are,
        # never parsed (verify canonicalises what jsonb gives back to the same text)
        digest = digest_with(
            self._prefix, operation, pk, position, ordinal, before, after, self._context_digest,
            text_digest(before), text_digest(after),
        )
        chain_hash = self._chain.add(digest)
        self._chain_key = (commit, ordinal)
        self._pending_digest += 1
        # copy_escape inlined for the per-row JSON values: 4 C scans each
        if "\\" in after or "\n" in after or "\t" in after or "\r" in after:
            after = after.translate(COPY_ESCAPES)
        if before != "{}" and ("\\" in before or "\n" in before or "\t" in before or "\r" in before):
            before = before.translate(COPY_ESCAPES)
        self._buffer.append(
            f"{self._shared}{operation}\t{COPY_NULL if pk is None else copy_escape(pk)}\t{before}\t"
            f"{after}\t{COPY_BOOL[verified]}\t{position}\t{ordinal}\t{digest.hex()}\t{chain_hash}\t"
            f"{COPY_NULL if moved_from is None else copy_escape(moved_from)}\n"
        )
        self.pending += 1
        if len(self._buffer) >= self.chunk_rows:
            self.flush()

    def _read_head(self) -> str:
        """The chain hash of the last row in ``changes`` (GENESIS when empty or unhashed: a new chain)."""
        self._copier.wait()
        row = self.conn.execute(
            sql.SQL(
                "SELECT commit_position, ordinal, chain_hash FROM {} "
                "ORDER BY commit_position DESC, ordinal DESC LIMIT 1"
            ).format(self.changes)
        ).fetchone()
        if row is None or row[2] is None:
            self._chain_key = None
            return GENESIS
        self._chain_key = (int(row[0]), int(row[1]))
        return str(row[2])

    def _filled(self, row: ChangeRow) -> str:
        """``after`` with its unchanged TOAST values from the previous version of the row in ``changes``."""
        self.flush()
        self._copier.wait()
        found = self.conn.execute(
            sql.SQL(
                "SELECT jsonb_object_agg(k.name, p.after -> k.name)::text FROM ("
                '  SELECT after FROM {changes} AS p WHERE p."table" = %s AND p."schema" = %s'
                "  AND p.primary_key = %s AND p.operation <> 'DELETE' AND p.operation <> 'TRUNCATE'"
                "  AND (p.commit_position, p.ordinal) < (%s, %s)"
                "  ORDER BY p.commit_position DESC, p.ordinal DESC LIMIT 1) AS p,"
                "  unnest(%s::text[]) AS k(name) WHERE p.after ? k.name"
            ).format(changes=self.changes),
            (row.table, row.schema, row.previous_key or row.primary_key, row.commit_position, row.ordinal,
             list(row.missing)),
        ).fetchone()
        fill = None if found is None else found[0]
        if not fill or fill == "{}":
            return row.after
        # jsonb's text, merged: canonical again (keys sorted, compact) as the digest expects
        return canonical_json(fill if row.after == "{}" else f"{row.after[:-1]},{fill[1:]}")

    def write_many(self, rows: Iterable[ChangeRow]) -> None:
        for row in rows:
            self.write(row)

    def flush(self) -> None:
        """Hand the queued rows to the COPY thread."""
        if self._buffer:
            data = "".join(self._buffer).encode()
            self._buffer.clear()
            self._copier.put(data)

    def _copy_chunk(self, data: bytes) -> None:
        with self.conn.cursor() as cur, cur.copy(self._copy) as copy:
            copy.write(data)

    def write_schema(self, change: SchemaChange) -> None:
        """Record a relation's version (the later of two at the same position and step wins)."""
        self._copier.wait()
        self.conn.execute(
            sql.SQL(
                'INSERT INTO {} ("schema", "table", commit_position, ordinal, step, committed_at, columns,'
                " relation_oid, event, context, replica_identity)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s::jsonb, %s::jsonb, %s)"
                ' ON CONFLICT ("schema", "table", commit_position, ordinal, step) DO UPDATE SET'
                " columns = EXCLUDED.columns, relation_oid = EXCLUDED.relation_oid, event = EXCLUDED.event,"
                " context = EXCLUDED.context, replica_identity = EXCLUDED.replica_identity"
            ).format(self.schemas),
            (
                change.schema,
                change.table,
                change.commit_position,
                change.ordinal,
                change.step,
                change.committed_at,
                change.columns,
                change.relation_oid,
                change.event,
                change.context,
                change.replica_identity,
            ),
        )

    def mark(self, commit_position: int, end_position: int, committed_at: datetime | None) -> None:
        """Note that the source transaction ending at ``end_position`` is fully written (not committed)."""
        self._mark = (commit_position, end_position, committed_at)

    def commit(
        self, *, snapshot_position: int | None = None, initialize: bool = False, wait: bool = True
    ) -> tuple[int, int] | None:
        """Flush, record the marked position, COMMIT; return the committed (commit, end) position.

        ``wait=False``: queue the commit behind the COPY chunks on the writer thread and return None at
        once; the position is reported by :meth:`take_committed` after the COMMIT succeeded (a failure
        is raised by the next use of the sink, and nothing queued after it is committed).
        """
        self.flush()
        mark, self._mark = self._mark, None
        position: tuple[object, ...] | None = None
        if mark is not None or snapshot_position is not None or initialize:
            commit_position, end_position, committed_at = mark if mark is not None else (0, 0, None)
            head: tuple[int | None, int | None, str | None] = (None, None, None)
            if self.pending and self._chain is not None and self._chain_key is not None:
                head = (*self._chain_key, self._chain.head)
            position = (
                self.slot,
                commit_position,
                end_position,
                committed_at,
                snapshot_position,
                snapshot_position,
                *head,
            )
        digest: tuple[int, int, str] | None = None
        if (
            self._since_digest + self._pending_digest >= self.digest_every
            and self._chain is not None
            and self._chain_key is not None
        ):
            digest = (*self._chain_key, self._chain.head)
            self._since_digest = self._pending_digest = 0
        # counted as committed now: a failed commit only shifts when the next digest is stored
        self._since_digest += self._pending_digest
        self._pending_digest = 0
        self.pending = 0
        done = None if mark is None else (mark[0], mark[1])
        report = None if wait else done
        self._copier.put_job(functools.partial(self._commit_job, position, digest, report))
        if not wait:
            return None
        self._copier.wait()
        return done

    def _commit_job(
        self, position: tuple[object, ...] | None, digest: tuple[int, int, str] | None,
        report: tuple[int, int] | None,
    ) -> None:
        """On the writer thread: the position (and digest) rows, then COMMIT."""
        if position is not None:
            self.conn.execute(
                sql.SQL(
                    "INSERT INTO {p} AS p (slot, commit_position, end_position, committed_at,"
                    " snapshot_position, snapshot_at, updated_at, chain_position, chain_ordinal, chain_hash)"
                    " VALUES (%s, %s, %s, %s, %s, CASE WHEN %s::bigint IS NULL THEN NULL ELSE now() END,"
                    " now(), %s, %s, %s)"
                    " ON CONFLICT (slot) DO UPDATE SET"
                    " commit_position = greatest(p.commit_position, EXCLUDED.commit_position),"
                    " end_position = greatest(p.end_position, EXCLUDED.end_position),"
                    " committed_at = coalesce(EXCLUDED.committed_at, p.committed_at),"
                    " snapshot_position = coalesce(EXCLUDED.snapshot_position, p.snapshot_position),"
                    " snapshot_at = coalesce(EXCLUDED.snapshot_at, p.snapshot_at), updated_at = now(),"
                    " chain_position = coalesce(EXCLUDED.chain_position, p.chain_position),"
                    " chain_ordinal = coalesce(EXCLUDED.chain_ordinal, p.chain_ordinal),"
                    " chain_hash = coalesce(EXCLUDED.chain_hash, p.chain_hash)"
                ).format(p=self.positions),
                position,
            )
        if digest is not None:
            self.conn.execute(
                sql.SQL(
                    "INSERT INTO {} (commit_position, ordinal, chain_hash) VALUES (%s, %s, %s)"
                    " ON CONFLICT DO NOTHING"
                ).format(self.digests),
                digest,
            )
            # the line an operator can ship elsewhere and pass back to verify as an anchor
            log.info("chain digest %s/%s:%s", *digest)
        self.conn.commit()
        if report is not None:
            self._committed.append(report)

    def take_committed(self) -> list[tuple[int, int]]:
        """The (commit, end) positions of the queued commits that succeeded since the last call."""
        done = []
        while self._committed:
            done.append(self._committed.popleft())
        return done

    def wait(self) -> None:
        """Block until every queued COPY and commit is done; raise the first error."""
        self._copier.wait()

    def rollback(self) -> None:
        """Drop everything written since the last commit."""
        with contextlib.suppress(Exception):  # the transaction is being abandoned anyway
            self._copier.wait()
        self._buffer.clear()
        self._mark = None
        self.pending = 0
        self._chain = None  # read the committed head again
        self._chain_key = None
        self._pending_digest = 0
        if not self.conn.closed:
            self.conn.rollback()

    def close(self) -> None:
        """Stop the COPY thread (the connection is the caller's)."""
        self._copier.close()
