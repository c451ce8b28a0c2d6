"""Initial snapshot: the existing rows of tracked tables as ``SNAPSHOT`` changes, exact w.r.t. the slot.

A temporary logical slot is created on a ``replication=database`` connection with ``EXPORT_SNAPSHOT``;
while that connection stays open, a ``REPEATABLE READ`` transaction adopts the exported snapshot
(``SET TRANSACTION SNAPSHOT``) and sees exactly the transactions committed before the slot's consistent
point ``P``. Every transaction committed at or after ``P`` has a commit position ``>= P`` and is decoded
from the capture slot (created before, so it retains them); every earlier one is inside the snapshot.
The snapshot rows are therefore stamped with ``commit_position = P - 1``: WAL records are 8-byte
aligned, so no real commit can sit there, and the rows sort after every transaction they include and
before every one they miss. ``ordinal`` counts rows across tables; ``transaction_id`` is NULL.

Tables are streamed with ``COPY (SELECT ...) TO STDOUT`` (text format, exactly the values pgoutput
would send) and written in chunks inside one destination transaction, with a progress line on a
terminal. Running it again (``--snapshot``) adds a newer complete snapshot at a newer position.
The capture slot's transactions committed before ``P`` are written first, in the same destination
transaction (``before_rows``), so rows enter ``changes`` in ``(commit_position, ordinal)`` order, as
the incremental Parquet export requires.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from capture.pgoutput import parse_lsn
from capture.sink import Sink
from capture.stitch import ChangeRow, ColumnSpec, SchemaChange, column_json
from capture.values import TypeInfo, ValueEncoder

__all__ = ["SnapshotTable", "exported_snapshot", "snapshot_tables", "write_snapshot"]

_UNESCAPE = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


@dataclass(frozen=True)
class SnapshotTable:
    """A published table to copy: its published columns and primary key."""

    schema: str
    name: str
    columns: tuple[ColumnSpec, ...]
    key: tuple[str, ...]
    estimate: int
    oid: int | None = None
    replica_identity: str | None = None


@contextlib.contextmanager
def exported_snapshot(dsn: str, slot: str) -> Iterator[tuple[int, str]]:
    """Create temporary slot ``slot`` exporting a snapshot; yield (consistent point, snapshot name)."""
    with psycopg.connect(
        dsn, autocommit=True, replication="database", cursor_factory=psycopg.ClientCursor
    ) as conn:
        command = sql.SQL("CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT").format(
            sql.Identifier(slot)
        )
        row = conn.execute(command).fetchone()
        assert row is not None
        yield parse_lsn(row[1]), str(row[2])


def snapshot_tables(
    conn: psycopg.Connection, publication: str, ignored: Callable[[str, str], bool]
) -> list[SnapshotTable]:
    """The tables of ``publication`` (partitioned roots, not partitions), minus ignored ones."""
    # the columns pgoutput sends: STORED generated ones too when the publication publishes them (PG 18)
    pub = conn.execute(
        "SELECT to_jsonb(p) ->> 'pubgencols' FROM pg_publication p WHERE pubname = %s", (publication,)
    ).fetchone()
    published = "a.attgenerated IN ('', 's')" if pub is not None and pub[0] == "s" else "a.attgenerated = ''"
    rows = conn.execute(
        "SELECT n.nspname, c.relname, c.oid, c.reltuples::bigint,"
        " (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a"
        "   WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND " + published + "),"
        " (SELECT array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) FROM pg_attribute a"
        "   WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND " + published + "),"
        " (SELECT array_agg(a.atttypid::int8 ORDER BY a.attnum) FROM pg_attribute a"
        "   WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND " + published + "),"
        " (SELECT array_agg(a.attnum::int ORDER BY a.attnum) FROM pg_attribute a"
        "   WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND " + published + "),"
        " c.relreplident::text,"
        " (SELECT array_agg(a.attname::text ORDER BY k.n) FROM pg_index i,"
        "   unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)"
        "   JOIN pg_attribute a ON a.attnum = k.attnum WHERE i.indrelid = c.oid AND i.indisprimary"
        "   AND a.attrelid = c.oid)"
        " FROM pg_publication_tables p JOIN pg_namespace n ON n.nspname = p.schemaname"
        " JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename"
        " WHERE p.pubname = %s ORDER BY 1, 2",
        (publication,),
    ).fetchall()
    tables = []
    for schema, name, oid, estimate, names, types, oids, attnums, identity, key in rows:
        if ignored(schema, name) or not names:
            continue
        keys = set(key or ())
        columns = tuple(
            ColumnSpec(n, t, int(o), n in keys, int(a))
            for n, t, o, a in zip(names, types, oids, attnums, strict=True)
        )
        tables.append(SnapshotTable(
            schema, name, columns, tuple(key or ()), max(int(estimate), 0), int(oid), identity
        ))
    return tables


def _fields(line: str) -> list[bytes | None]:
    """One line of COPY text output as raw text values (None for NULL)."""
    out: list[bytes | None] = []
    for field in line.split("\t"):
        if field == "\\N":
            out.append(None)
        elif "\\" not in field:
            out.append(field.encode())
        else:
            out.append(_unescape(field).encode())
    return out


def _unescape(field: str) -> str:
    parts = []
    i = 0
    size = len(field)
    while i < size:
        ch = field[i]
        if ch != "\\" or i + 1 >= size:
            parts.append(ch)
            i += 1
            continue
        nxt = field[i + 1]
        if nxt in _UNESCAPE:
            parts.append(_UNESCAPE[nxt])
            i += 2
        elif nxt in "01234567":
            j = i + 1
            while j < size and j < i + 4 and field[j] in "01234567":
                j += 1
            parts.append(chr(int(field[i + 1 : j], 8)))
            i = j
        elif nxt == "x":
            j = i + 2
            while j < size and j < i + 4 and field[j] in "0123456789abcdefABCDEF":
                j += 1
            parts.append(chr(int(field[i + 2 : j], 16)))
            i = j
        else:
            parts.append(nxt)
            i += 2
    return "".join(parts)


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.last = 0.0

    def show(self, table: SnapshotTable, done: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self.last < 0.2:
            return
        self.last = now
        total = max(table.estimate, done)
        width = 30
        filled = width * done // total if total else width
        sys.stderr.write(
            f"\rsnapshot {table.schema}.{table.name} [{'#' * filled}{'.' * (width - filled)}] "
            f"{done}/{total} rows"
        )
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


def write_snapshot(
    source_dsn: str,
    *,
    slot: str,
    publication: str,
    sink: Sink,
    database: str,
    type_info: Mapping[int, TypeInfo],
    ignored: Callable[[str, str], bool],
    session_options: str,
    progress: bool | None = None,
    before_rows: Callable[[int], None] | None = None,
) -> int:
    """Copy every tracked table as SNAPSHOT rows, consistent with a fresh slot point; return rows written.

    The capture slot must already exist (so it retains every transaction after the snapshot point).
    ``before_rows(point)`` runs once the snapshot is taken and before any row is written (the worker
    writes the slot's transactions committed before ``point`` there, in the same destination
    transaction, so ``changes`` stays inserted in key order); the rows are committed with them.
    """
    show = _Progress(sys.stderr.isatty() if progress is None else progress)
    with (
        exported_snapshot(source_dsn, f"{slot}_snapshot") as (point, name),
        psycopg.connect(source_dsn, options=session_options) as conn,
    ):
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(name)))
        row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        taken_at: datetime = row[0]
        if before_rows is not None:
            before_rows(point)
        position = point - 1
        ordinal = 0
        for table in snapshot_tables(conn, publication, ignored):
            key_names = table.key
            names = [c.name for c in table.columns]
            encoder = ValueEncoder([c.type_oid for c in table.columns], type_info, names=names)
            key_index = [names.index(k) for k in key_names]
            sink.write_schema(
                SchemaChange(table.schema, table.name, position, 0, taken_at,
                             _columns_json(table.columns, type_info), table.oid,
                             '[{"kind":"new_relation","command":"SNAPSHOT"}]', "{}", table.replica_identity)
            )
            query = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(
                sql.SQL(", ").join(sql.Identifier(n) for n in names), sql.Identifier(table.schema, table.name)
            )
            done = 0
            with conn.cursor() as cur, cur.copy(query) as copy:
                for chunk in copy:
                    line = bytes(chunk).decode()
                    values = _fields(line[:-1] if line.endswith("\n") else line)
                    if len(key_index) == 1:
                        raw = values[key_index[0]]
                        pk = raw.decode() if raw is not None else None
                    elif key_index:
                        pk = "[" + ",".join(encoder.value_json(i, values[i]) for i in key_index) + "]"
                    else:
                        pk = None
                    sink.write(
                        ChangeRow(
                            pk,
                            table.name,
                            "SNAPSHOT",
                            "{}",
                            encoder.row_json(values),
                            "{}",
                            taken_at,
                            table.schema,
                            database,
                            None,
                            position,
                            position,
                            ordinal,
                        )
                    )
                    ordinal += 1
                    done += 1
                    show.show(table, done)
            show.show(table, done, final=True)
        sink.commit(snapshot_position=point)
        conn.rollback()
    return ordinal


def _columns_json(columns: tuple[ColumnSpec, ...], type_info: Mapping[int, TypeInfo]) -> str:
    return "[" + ",".join(column_json(c, type_info) for c in columns) + "]"
