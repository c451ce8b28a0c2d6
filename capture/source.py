"""Reading the replication slot with psycopg 3: server checks, publication, slot, peek and advance.

psycopg 3 cannot stream the replication protocol, so changes are read with
``pg_logical_slot_peek_binary_changes(slot, upto_lsn, NULL, 'proto_version', '1', 'publication_names',
pub, 'messages', 'true')`` through a server-side cursor, and the slot is moved with
``pg_replication_slot_advance`` only after the destination committed what was read. Every peek decodes
again from the slot's restart point, so calls are bounded by LSN (everything up to the WAL position at
the start of the call), never by ``upto_nchanges``. A slot held by an open peek cursor cannot be advanced
from another session: :meth:`SlotReader.peek` must be finished (or closed) before :meth:`advance`.

Publication: ``FOR ALL TABLES WITH (publish_via_partition_root = true)`` (plus
``publish_generated_columns = stored`` on PostgreSQL 18), so every user table — including
tables created later — is published and partitions are recorded under their root. PostgreSQL cannot
exclude tables from such a publication, so the worker's own tables (``changes``, ``changes_schemas``,
``changes_positions``) are decoded too when the destination is the source database, and dropped by the
stitcher (``ignored`` relations); that costs roughly one extra decoded row per captured change, measured
by ``bench/capture_throughput.py``. Creating it needs a superuser; without one, the publication is
``FOR TABLE`` with the tables the creating role owns, and :func:`publish_new_tables` (run by every
``bemi_tt.install`` and worker start) adds the ones created since (docs/privileges.md).

Slots: one per database, ``bemi_tt_<database>`` by default (:func:`default_slot_name`); a slot named
``bemi_tt`` (the first releases' shared default) keeps being used by the database it belongs to.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
from psycopg import sql

from capture.errors import ConfigurationError, SlotLostError, SourceError
from capture.pgoutput import format_lsn
from capture.protocol import worker_table_sql

__all__ = [
    "SlotInfo",
    "SlotReader",
    "advance",
    "check_server",
    "check_slot",
    "default_slot_name",
    "ensure_publication",
    "ensure_slot",
    "owned_unpublished_tables",
    "publish_new_tables",
    "quote_ident",
    "resolve_slot",
    "slot_info",
    "tables_without_identity",
]

MIN_VERSION = 140000
#: First version whose publications can carry (STORED) generated columns.
GENERATED_COLUMNS_VERSION = 180000
log = logging.getLogger("capture")
_SIMPLE_IDENT = re.compile(r"^[a-z_][a-z0-9_$]*$")


def quote_ident(name: str) -> str:
    """``name`` as a PostgreSQL identifier (pgoutput's ``publication_names`` option parses identifiers)."""
    if _SIMPLE_IDENT.match(name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _validate_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{what} must be a non-empty string, got {name!r}")


def check_server(conn: psycopg.Connection) -> tuple[int, str]:
    """Stop with a one-line fix unless the server can be captured; return (version_num, database)."""
    row = conn.execute(
        "SELECT current_setting('server_version_num')::int, current_setting('wal_level'),"
        " current_database(), r.rolsuper, r.rolreplication, current_user"
        " FROM pg_roles r WHERE r.rolname = current_user"
    ).fetchone()
    if row is None:
        raise SourceError("cannot read the current role from pg_roles")
    version, wal_level, database, superuser, replication, user = row
    if version < MIN_VERSION:
        raise ConfigurationError(
            f"PostgreSQL {version // 10000} is too old: the capture worker needs PostgreSQL 14 or newer"
        )
    if wal_level != "logical":
        raise ConfigurationError(
            f"wal_level is {wal_level!r}: run ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
        )
    if not (superuser or replication):
        raise ConfigurationError(
            f"role {user!r} cannot read replication slots: run ALTER ROLE {quote_ident(user)} REPLICATION;"
        )
    return int(version), str(database)


def ensure_publication(conn: psycopg.Connection, name: str) -> bool:
    """Create the publication on all tables if missing; return True when it was created.

    On PostgreSQL 18 it publishes STORED generated columns (``publish_generated_columns = stored``),
    also when it was created earlier without: PostgreSQL refuses UPDATE and DELETE on a published table
    whose replica identity (FULL, set by ``bemi_tt.install``) holds an unpublished generated column.
    """
    _validate_name("publication", name)
    gencols = conn.info.server_version >= GENERATED_COLUMNS_VERSION
    found = conn.execute(
        "SELECT to_jsonb(p) ->> 'pubgencols' FROM pg_publication p WHERE pubname = %s", (name,)
    ).fetchone()
    if found is not None:
        if gencols and found[0] == "n":
            _publish_generated_columns(conn, name)
        return False
    options = "publish_via_partition_root = true"
    if gencols:
        options += ", publish_generated_columns = stored"
    statement = sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES WITH (" + options + ")").format(
        sql.Identifier(name)
    )
    try:
        with conn.transaction():
            conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege:
        # FOR ALL TABLES (and FOR TABLES IN SCHEMA) need a superuser; a table's owner may publish it
        owned = owned_unpublished_tables(conn, None)
        tables = sql.SQL(", ").join(sql.Identifier(s, t) for s, t in owned)
        fallback = sql.SQL("CREATE PUBLICATION {} {} WITH (" + options + ")").format(
            sql.Identifier(name), sql.SQL("FOR TABLE {}").format(tables) if owned else sql.SQL("")
        )
        try:
            with conn.transaction():
                conn.execute(fallback)
        except psycopg.errors.InsufficientPrivilege:
            raise ConfigurationError(
                f"publication {name!r} is missing and this role may not create it: ask a superuser to run "
                f"{statement.as_string(conn)}; (or GRANT CREATE ON DATABASE to the tables' owner and run "
                "bemi-tt install as that role)"
            ) from None
        log.info("created publication %s for the tables this role owns (FOR TABLE)", name)
    except psycopg.errors.DuplicateObject:
        return False
    return True


#: Trackable tables (as bemi_tt.install tracks them: permanent ordinary and partitioned roots outside the
#: system schemas and bemi_tt, not extension members, not the worker's tables) missing from publication
#: %(pub)s (NULL: all of them), owned by the current role (%(owned)s) or not.
_UNPUBLISHED = """
SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p' AND NOT c.relispartition
  AND n.nspname NOT IN ('information_schema', 'bemi_tt') AND NOT starts_with(n.nspname, 'pg_')
  AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                  AND d.deptype = 'e')
  AND NOT """ + worker_table_sql("c") + """
  AND pg_has_role(c.relowner, 'USAGE') = %(owned)s
  AND NOT EXISTS (SELECT FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                  WHERE p.pubname = %(pub)s AND r.prrelid = c.oid)
ORDER BY 1, 2
"""


def owned_unpublished_tables(
    conn: psycopg.Connection, publication: str | None, *, owned: bool = True
) -> list[tuple[str, str]]:
    """Trackable tables missing from ``publication`` that this role owns (``owned=False``: does not)."""
    rows = conn.execute(_UNPUBLISHED, {"pub": publication, "owned": owned}).fetchall()
    return [(str(r[0]), str(r[1])) for r in rows]


def publish_new_tables(conn: psycopg.Connection, name: str) -> tuple[list[str], list[str]]:
    """Keep a ``FOR TABLE`` publication in step: add the trackable tables this role owns.

    Returns (added, left out: tables other roles own, which only they can add). A ``FOR ALL TABLES``
    publication needs nothing.
    """
    row = conn.execute("SELECT puballtables FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
    if row is None or row[0]:
        return [], []
    owner = conn.execute(
        "SELECT pg_has_role(pubowner, 'USAGE') FROM pg_publication WHERE pubname = %s", (name,)
    ).fetchone()
    from capture.exclude import load_exclusions

    excluded = load_exclusions(conn).tables  # install(exclude_tables=...): never published again
    added: list[str] = []
    if owner and owner[0]:
        for schema, table in owned_unpublished_tables(conn, name):
            if (schema, table) in excluded:
                continue
            try:
                with conn.transaction():
                    conn.execute(
                        sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                            sql.Identifier(name), sql.Identifier(schema, table)
                        )
                    )
            except psycopg.errors.DuplicateObject:
                continue
            added.append(f"{schema}.{table}")
    from capture.exclude import load_exclusions

    excluded = load_exclusions(conn).tables
    others = owned_unpublished_tables(conn, name, owned=False)
    if not (owner and owner[0]):
        others = owned_unpublished_tables(conn, name) + others
    left = [f"{s}.{t}" for s, t in others if (s, t) not in excluded]
    return added, left


def _publish_generated_columns(conn: psycopg.Connection, name: str) -> None:
    """Make an existing publication (from an earlier version) publish STORED generated columns."""
    statement = sql.SQL("ALTER PUBLICATION {} SET (publish_generated_columns = stored)").format(
        sql.Identifier(name)
    )
    try:
        conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege:
        # not fatal for capture itself, but the application's writes to such tables fail: say so loudly
        log.warning(
            "publication %s does not publish generated columns, so UPDATE and DELETE fail on tables with a"
            " STORED generated column and REPLICA IDENTITY FULL; ask its owner or a superuser to run %s;",
            name,
            statement.as_string(conn),
        )
        if not conn.autocommit:
            conn.rollback()
    else:
        log.info("publication %s now publishes generated columns", name)


def tables_without_identity(conn: psycopg.Connection) -> list[str]:
    """User tables whose UPDATE and DELETE PostgreSQL refuses while they are published (no key, no FULL)."""
    rows = conn.execute(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('r', 'p') AND n.nspname <> 'information_schema'"
        " AND NOT starts_with(n.nspname, 'pg_') AND (c.relreplident = 'n' OR (c.relreplident = 'd'"
        " AND NOT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))"
        " ORDER BY 1"
    ).fetchall()
    return [str(r[0]) for r in rows]


@dataclass(frozen=True)
class SlotInfo:
    """A replication slot's state (LSNs as ints)."""

    name: str
    plugin: str | None
    database: str | None
    confirmed_flush: int
    restart: int
    wal_status: str | None
    active_pid: int | None
    current: int


def slot_info(conn: psycopg.Connection, slot: str) -> SlotInfo | None:
    """The slot's state, or None when it does not exist."""
    row = conn.execute(
        "SELECT slot_name, plugin, database, (coalesce(confirmed_flush_lsn, '0/0') - '0/0'::pg_lsn)::bigint,"
        " (coalesce(restart_lsn, '0/0') - '0/0'::pg_lsn)::bigint, wal_status, active_pid,"
        " (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return None
    return SlotInfo(*row)


def ensure_slot(conn: psycopg.Connection, slot: str, database: str) -> tuple[SlotInfo, bool]:
    """The slot (created without a snapshot if missing) and whether it was created now."""
    _validate_name("slot", slot)
    info = slot_info(conn, slot)
    created = False
    if info is None:
        try:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
            created = True
        except psycopg.errors.DuplicateObject:
            pass
        info = slot_info(conn, slot)
        assert info is not None
    check_slot(info, database)
    return info, created


def check_slot(info: SlotInfo, database: str) -> None:
    """Raise unless ``info`` is a usable pgoutput slot of ``database``."""
    if info.wal_status == "lost":
        raise SlotLostError(
            f"replication slot {info.name!r} is lost (its WAL was removed): changes are missing; "
            f"drop it with SELECT pg_drop_replication_slot('{info.name}'); and start again with --snapshot"
        )
    if info.database != database:
        raise ConfigurationError(
            f"replication slot {info.name!r} belongs to database {info.database!r}, and a slot serves one "
            f"database: capture {database!r} with its own slot, e.g. --slot {default_slot_name(database)} "
            "(the default when --slot is not given)"
        )
    if info.plugin != "pgoutput":
        raise ConfigurationError(
            f"replication slot {info.name!r} uses plugin {info.plugin!r}, not pgoutput: it belongs to "
            f"another tool; capture with another slot, e.g. --slot {default_slot_name(database)}"
        )


#: The slot name of the first releases, shared by every database (kept where it already exists).
LEGACY_SLOT = "bemi_tt"


def default_slot_name(database: str) -> str:
    """``bemi_tt_<database>``: one slot per database, a valid slot name for any database name.

    Slot names are server-wide and allow only ``[a-z0-9_]``, at most 63 characters: other characters
    become ``_``, and a name that had to change (or be shortened) gets 8 hex digits of its hash, so
    two databases never share a default slot.
    """
    clean = re.sub(r"[^a-z0-9_]", "_", database.lower())
    name = f"bemi_tt_{clean}"
    if clean != database or len(name) > 63:
        digest = hashlib.sha256(database.encode()).hexdigest()[:8]
        name = f"{name[:54]}_{digest}"
    return name


def resolve_slot(conn: psycopg.Connection, slot: str | None) -> str:
    """``slot``, or the default for the connected database: the old shared name ``bemi_tt`` where a
    slot of that name already serves this database (installations of the first releases), else
    :func:`default_slot_name`."""
    if slot is not None:
        return slot
    row = conn.execute(
        "SELECT current_database(), EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = %s"
        " AND database = current_database())",
        (LEGACY_SLOT,),
    ).fetchone()
    assert row is not None
    return LEGACY_SLOT if row[1] else default_slot_name(str(row[0]))


class SlotReader:
    """Peeks a slot's changes through a server-side cursor on its own connection; advances it."""

    def __init__(self, conn: psycopg.Connection, slot: str, publication: str, *, fetch: int = 5000) -> None:
        _validate_name("slot", slot)
        _validate_name("publication", publication)
        if conn.autocommit:
            raise ConfigurationError("the slot reader needs a connection with autocommit off")
        self.conn = conn
        self.slot = slot
        self.publication = quote_ident(publication)
        self.fetch = fetch
        self._cursor: psycopg.ServerCursor | None = None

    def peek(self, upto: int) -> Iterator[tuple[int, bytes]]:
        """Yield ``(lsn, pgoutput bytes)`` of the transactions committed before ``upto``."""
        for rows in self.peek_batches(upto):
            yield from rows

    def peek_batches(self, upto: int) -> Iterator[list[tuple[int, bytes]]]:
        """Like :meth:`peek`, a list of up to ``fetch`` messages at a time (less overhead per message)."""
        cur = self.conn.cursor(name="bemi_tt_peek", binary=True)
        self._cursor = cur
        cur.itersize = self.fetch
        try:
            cur.execute(
                "SELECT (lsn - '0/0'::pg_lsn)::bigint, data FROM pg_logical_slot_peek_binary_changes("
                "%s, %s::pg_lsn, NULL, 'proto_version', '1', 'publication_names', %s, 'messages', 'true')",
                (self.slot, format_lsn(upto), self.publication),
            )
            while True:
                rows = cur.fetchmany(self.fetch)
                if not rows:
                    break
                yield rows
        except psycopg.errors.UndefinedObject as exc:
            raise SlotLostError(f"replication slot {self.slot!r} vanished while reading it: {exc}") from exc
        except psycopg.errors.ObjectNotInPrerequisiteState as exc:
            if "can no longer" in str(exc) or "invalidated" in str(exc):
                raise SlotLostError(f"replication slot {self.slot!r} can no longer be read: {exc}") from exc
            raise
        finally:
            self.close()

    def close(self) -> None:
        """End the peek: close the cursor and its transaction (needed before advancing)."""
        cur, self._cursor = self._cursor, None
        if cur is None:
            return
        if self.conn.closed:  # broken and closed elsewhere: close the cursor locally, or its finalizer warns
            cur.close()
            return
        try:
            cur.close()
            self.conn.rollback()
        except psycopg.Error:
            # the connection broke mid-peek (the worker learns it from its next statement and
            # reconnects): closing it closes the cursor without a round trip, so neither this call
            # nor the cursor's finalizer raises while the generator is being torn down
            self.conn.close()
            cur.close()


def advance(conn: psycopg.Connection, slot: str, lsn: int) -> None:
    """Move the slot's confirmed position to ``lsn`` (never backwards; only after the write committed)."""
    conn.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (slot, format_lsn(lsn)))
