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
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from capture.errors import ConfigurationError
from capture.exclude import Exclusions
from capture.pgoutput import parse_lsn
from capture.protocol import worker_table_sql
from capture.sink import Sink
from capture.stitch import ChangeRow, ColumnSpec, SchemaChange, column_json
from capture.values import TypeInfo, ValueEncoder

__all__ = [
    "SnapshotTable",
    "exported_snapshot",
    "snapshot_tables",
    "stage_snapshot",
    "write_snapshot",
    "write_staged_snapshot",
]

log = logging.getLogger("capture")
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
    conn: psycopg.Connection, publication: str, ignored: Callable[[str, str], bool],
    exclusions: Exclusions | None = None,
) -> list[SnapshotTable]:
    """The tables of ``publication`` (partitioned roots, not partitions), minus ignored and excluded
    ones, with their columns minus the excluded ones (capture/exclude.py: never read)."""
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
    excluded = exclusions or Exclusions()
    for schema, name, oid, estimate, names, types, oids, attnums, identity, key in rows:
        if ignored(schema, name) or excluded.table(schema, name) or not names:
            continue
        keys = set(key or ())
        hidden = excluded.columns_of(schema, name)
        columns = tuple(
            ColumnSpec(n, t, int(o), n in keys, int(a))
            for n, t, o, a in zip(names, types, oids, attnums, strict=True) if n not in hidden
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
    exclusions: Exclusions | None = None,
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
        for table in snapshot_tables(conn, publication, ignored, exclusions):
            key_names = table.key
            names = [c.name for c in table.columns]
            encoder = ValueEncoder([c.type_oid for c in table.columns], type_info, names=names)
            key_index = [names.index(k) for k in key_names]
            sink.write_schema(_snapshot_version(table, position, taken_at, type_info, exclusions))
            query = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(
                sql.SQL(", ").join(sql.Identifier(n) for n in names), sql.Identifier(table.schema, table.name)
            )
            done = 0
            with conn.cursor() as cur, cur.copy(query) as copy:
                for chunk in copy:
                    line = bytes(chunk).decode()
                    values = _fields(line[:-1] if line.endswith("\n") else line)
                    sink.write(
                        _snapshot_row(
                            table, values, key_index, encoder, taken_at, database, position, ordinal
                        )
                    )
                    ordinal += 1
                    done += 1
                    show.show(table, done)
            show.show(table, done, final=True)
        sink.commit(snapshot_position=point)
        conn.rollback()
    return ordinal


def _snapshot_row(
    table: SnapshotTable,
    values: list[bytes | None],
    key_index: list[int],
    encoder: ValueEncoder,
    taken_at: datetime,
    database: str,
    position: int,
    ordinal: int,
) -> ChangeRow:
    """One row's SNAPSHOT change from its columns' text values."""
    if len(key_index) == 1:
        raw = values[key_index[0]]
        pk = raw.decode() if raw is not None else None
    elif key_index:
        pk = "[" + ",".join(encoder.value_json(i, values[i]) for i in key_index) + "]"
    else:
        pk = None
    return ChangeRow(
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


# -- the snapshot taken by bemi_tt.install ------------------------------------------------------------
#
# Tracking begins when install returns, whenever the worker first runs: install creates the worker's slot
# itself (pgoutput, EXPORT_SNAPSHOT) and, inside the exported snapshot, copies every trackable table's
# rows into schema bemi_tt. The slot retains every transaction committed from its consistent point P on;
# the copy holds exactly the rows committed before P. The worker's first run writes the copy as SNAPSHOT
# rows at P - 1 (as its own snapshot would be) and deletes it. Values are stored as their type's output
# text (format('%s', v) calls the output function; a cast to text would not: bool, inet, char(n) differ),
# exactly what COPY and pgoutput send, so the same encoder turns them into JSON.

STAGED_SNAPSHOTS = "snapshots"
STAGED_ROWS = "snapshot_rows"
_STAGE_SETUP = (
    "CREATE SCHEMA IF NOT EXISTS bemi_tt",
    "CREATE TABLE IF NOT EXISTS bemi_tt.snapshots (slot text PRIMARY KEY, point bigint NOT NULL,"
    " taken_at timestamptz NOT NULL, tables jsonb NOT NULL)",
    "CREATE TABLE IF NOT EXISTS bemi_tt.snapshot_rows (slot text NOT NULL, table_index integer NOT NULL,"
    " n bigint NOT NULL, vals text[] NOT NULL, PRIMARY KEY (slot, table_index, n))",
)
#: The tables whose rows the snapshot holds: those of the publication that bemi_tt.install tracks
#: (permanent ordinary and partitioned roots, not extension members, not in system schemas or bemi_tt,
#: not the worker's own tables), with the columns pgoutput sends (STORED generated columns from
#: PostgreSQL 18 on, as the worker publishes them).
_STAGE_TABLES = """
SELECT n.nspname::text, c.relname::text,
  (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a WHERE a.attrelid = c.oid
    AND a.attnum > 0 AND NOT a.attisdropped AND (a.attgenerated = '' OR a.attgenerated = 's' AND %(gen)s)),
  (SELECT array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) FROM pg_attribute a
    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    AND (a.attgenerated = '' OR a.attgenerated = 's' AND %(gen)s)),
  (SELECT array_agg(a.atttypid::int8 ORDER BY a.attnum) FROM pg_attribute a WHERE a.attrelid = c.oid
    AND a.attnum > 0 AND NOT a.attisdropped AND (a.attgenerated = '' OR a.attgenerated = 's' AND %(gen)s)),
  (SELECT array_agg(a.attnum::int ORDER BY a.attnum) FROM pg_attribute a WHERE a.attrelid = c.oid
    AND a.attnum > 0 AND NOT a.attisdropped AND (a.attgenerated = '' OR a.attgenerated = 's' AND %(gen)s)),
  c.oid::int8, c.relreplident::text,
  (SELECT array_agg(a.attname::text ORDER BY k.n) FROM pg_index i,
    unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
    JOIN pg_attribute a ON a.attnum = k.attnum WHERE i.indrelid = c.oid AND i.indisprimary
    AND a.attrelid = c.oid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p' AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'bemi_tt')
  AND NOT starts_with(n.nspname, 'pg_')
  AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                  AND d.deptype = 'e')
  AND NOT """ + worker_table_sql("c") + """
  AND EXISTS (SELECT FROM pg_publication_tables p WHERE p.pubname = %(pub)s AND p.schemaname = n.nspname
              AND p.tablename = c.relname)
ORDER BY 1, 2
"""


#: How long install waits for the transactions running when it creates the slot (a logical slot becomes
#: consistent only once they have ended); longer, and install warns and leaves the start to the worker.
SLOT_WAIT = "60s"


def stage_snapshot(
    conninfo: str, slot: str, publication: str = "bemi_tt", *, wait: str = SLOT_WAIT,
    exclusions: Exclusions | None = None,
) -> int:
    """Create logical slot ``slot`` (pgoutput) and copy the rows as of its consistent point into bemi_tt.

    The worker's publication is created first: pgoutput reads a change only through a publication that
    existed when the change was made. Returns the consistent point. Needs REPLICATION (or superuser)
    and CREATE on the database; on any failure after the slot was created the slot is dropped again, so
    nothing retains WAL for nothing.
    """
    from capture.source import ensure_publication

    with psycopg.connect(conninfo, autocommit=True) as setup:
        ensure_publication(setup, publication)
        for statement in _STAGE_SETUP:
            setup.execute(statement.encode())
        setup.execute("DELETE FROM bemi_tt.snapshot_rows WHERE slot = %s", (slot,))
        setup.execute("DELETE FROM bemi_tt.snapshots WHERE slot = %s", (slot,))
        with psycopg.connect(
            conninfo, autocommit=True, replication="database", cursor_factory=psycopg.ClientCursor,
            options=f"-c lock_timeout={wait}",  # the wait for running transactions is a lock wait
        ) as rep:
            command = sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT").format(
                sql.Identifier(slot)
            )
            row = rep.execute(command).fetchone()
            assert row is not None
            point, name = parse_lsn(row[1]), str(row[2])
            try:
                with psycopg.connect(conninfo) as conn:
                    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(name)))
                    _copy_into_stage(conn, slot, point, publication, exclusions or Exclusions())
            except BaseException:
                setup.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                raise
    return point


def _copy_into_stage(
    conn: psycopg.Connection, slot: str, point: int, publication: str, exclusions: Exclusions
) -> None:
    gen = conn.info.server_version >= 180000
    tables: list[dict[str, Any]] = []
    for schema, name, names, types, oids, attnums, oid, identity, key in conn.execute(
        _STAGE_TABLES, {"gen": gen, "pub": publication}
    ).fetchall():
        if exclusions.table(schema, name):
            continue  # excluded (capture/exclude.py): never copied
        index = len(tables)  # the worker reads table i's rows at table_index i
        keys = set(key or ())
        hidden = exclusions.columns_of(schema, name)
        columns = [
            {"name": n, "type": t, "type_oid": int(o), "key": n in keys, "attnum": int(a)}
            for n, t, o, a in zip(names or (), types or (), oids or (), attnums or (), strict=True)
            if n not in hidden
        ]
        names = [c["name"] for c in columns]
        tables.append({"schema": schema, "table": name, "columns": columns, "key": list(key or ()),
                       "oid": int(oid), "replica_identity": identity})
        if not names:
            continue
        # NULL stays NULL (num_nulls looks at the value itself: a composite of NULLs IS NULL, yet is a value)
        values = sql.SQL(", ").join(
            sql.SQL("CASE WHEN num_nulls({c}) = 1 THEN NULL ELSE format('%s', {c}) END").format(
                c=sql.Identifier(n)
            )
            for n in names
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO bemi_tt.snapshot_rows (slot, table_index, n, vals)"
                " SELECT {slot}, {index}, row_number() OVER (), ARRAY[{values}]::text[] FROM {table}"
            ).format(
                slot=sql.Literal(slot),
                index=sql.Literal(index),
                values=values,
                table=sql.Identifier(schema, name),
            )
        )
    conn.execute(
        "INSERT INTO bemi_tt.snapshots (slot, point, taken_at, tables) VALUES (%s, %s, now(), %s::jsonb)",
        (slot, point, json.dumps(tables)),
    )
    conn.commit()


def write_staged_snapshot(
    conn: psycopg.Connection,
    *,
    slot: str,
    sink: Sink,
    database: str,
    type_info: Mapping[int, TypeInfo],
    ignored: Callable[[str, str], bool],
    exclusions: Exclusions | None = None,
) -> tuple[int, int] | None:
    """Write the snapshot ``install`` took for ``slot`` as SNAPSHOT rows; (rows, point), None if none.

    ``conn`` is an autocommit connection to the source. The rows are committed with the slot's position
    (``snapshot_position`` = the point), then the copy is deleted.
    """
    exists = conn.execute(
        "SELECT to_regclass('bemi_tt.snapshots') IS NOT NULL"
        " AND has_table_privilege('bemi_tt.snapshots', 'SELECT, DELETE')"
        " AND has_table_privilege('bemi_tt.snapshot_rows', 'SELECT, DELETE')"
    ).fetchone()
    if not exists or not exists[0]:
        if conn.execute("SELECT to_regclass('bemi_tt.snapshots') IS NOT NULL").fetchone() == (True,):
            log.warning(
                "role %s may not read the snapshot bemi_tt.install took, so the worker takes its own now "
                "(changes since install are recorded before it): run GRANT SELECT, DELETE ON "
                "bemi_tt.snapshots, bemi_tt.snapshot_rows TO %s; as the installing role",
                conn.info.user, conn.info.user,
            )
        return None
    found = conn.execute(
        "SELECT point, taken_at, tables FROM bemi_tt.snapshots WHERE slot = %s", (slot,)
    ).fetchone()
    if found is None:
        return None
    point, taken_at, tables = int(found[0]), found[1], found[2]
    position = point - 1
    ordinal = 0
    excluded = exclusions or Exclusions()
    for index, spec in enumerate(tables):
        schema, name = str(spec["schema"]), str(spec["table"])
        if ignored(schema, name) or excluded.table(schema, name) or not spec["columns"]:
            continue
        # excluded since install staged the copy: left out here (capture/exclude.py)
        hidden = excluded.columns_of(schema, name)
        shown = [i for i, c in enumerate(spec["columns"]) if str(c["name"]) not in hidden]
        columns = tuple(
            ColumnSpec(str(c["name"]), str(c["type"]), int(c["type_oid"]), bool(c["key"]),
                       None if c.get("attnum") is None else int(c["attnum"]))
            for c in (spec["columns"][i] for i in shown)
        )
        oid = None if spec.get("oid") is None else int(spec["oid"])
        table = SnapshotTable(schema, name, columns, tuple(spec["key"]), 0, oid, spec.get("replica_identity"))
        names = [c.name for c in columns]
        encoder = ValueEncoder([c.type_oid for c in columns], type_info, names=names)
        key_index = [names.index(k) for k in table.key]
        sink.write_schema(_snapshot_version(table, position, taken_at, type_info, excluded))
        with conn.cursor() as cur:
            for (vals,) in cur.stream(
                "SELECT vals FROM bemi_tt.snapshot_rows WHERE slot = %s AND table_index = %s ORDER BY n",
                (slot, index),
            ):
                values = [None if vals[i] is None else str(vals[i]).encode() for i in shown]
                row = _snapshot_row(table, values, key_index, encoder, taken_at, database, position, ordinal)
                sink.write(row)
                ordinal += 1
    sink.commit(snapshot_position=point)
    discard_staged_snapshot(conn, slot)
    return ordinal, point


def discard_staged_snapshot(conn: psycopg.Connection, slot: str) -> None:
    """Delete the copy ``install`` took for ``slot`` (written, or outdated by a recorded position)."""
    exists = conn.execute(
        "SELECT to_regclass('bemi_tt.snapshots') IS NOT NULL"
        " AND has_table_privilege('bemi_tt.snapshots', 'DELETE')"
        " AND has_table_privilege('bemi_tt.snapshot_rows', 'DELETE')"
    ).fetchone()
    if not exists or not exists[0]:
        return
    try:
        with conn.transaction():
            conn.execute("DELETE FROM bemi_tt.snapshot_rows WHERE slot = %s", (slot,))
            conn.execute("DELETE FROM bemi_tt.snapshots WHERE slot = %s", (slot,))
    except psycopg.errors.InsufficientPrivilege:
        raise ConfigurationError(
            f"role {conn.info.user!r} may not delete the snapshot install took for slot {slot!r}: run "
            "GRANT SELECT, DELETE ON bemi_tt.snapshots, bemi_tt.snapshot_rows TO "
            f"{conn.info.user}; (bemi-tt grants prints every grant)"
        ) from None


def _snapshot_version(
    table: SnapshotTable, position: int, taken_at: datetime, type_info: Mapping[int, TypeInfo],
    exclusions: Exclusions | None = None,
) -> SchemaChange:
    """The schema version a SNAPSHOT starts a relation with (the worker's snapshot or install's alike)."""
    event = '[{"kind":"new_relation","command":"SNAPSHOT"}]'
    hidden = exclusions.columns_of(table.schema, table.name) if exclusions is not None else frozenset()
    if hidden:  # the columns are left out (capture/exclude.py): the record says so
        event = json.dumps([{"kind": "new_relation", "command": "SNAPSHOT"},
                            {"kind": "exclude", "columns": sorted(hidden)}], separators=(",", ":"))
    return SchemaChange(
        table.schema, table.name, position, 0, taken_at, _columns_json(table.columns, type_info), table.oid,
        event, "{}", table.replica_identity,
    )


def _columns_json(columns: tuple[ColumnSpec, ...], type_info: Mapping[int, TypeInfo]) -> str:
    return "[" + ",".join(column_json(c, type_info) for c in columns) + "]"
