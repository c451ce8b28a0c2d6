"""Install and remove context tracking in a database: ``install(engine)``, ``uninstall(engine)``.

``install`` creates schema ``bemi_tt`` with the statement-level trigger function ``emit_context()``: it
turns the hook's ``/*bemi:<base64>*/`` marker into ``pg_logical_emit_message(true, 'bemi', <json>)``, at
most once per statement and only when the context differs from the transaction's last message (so an
executemany of 100k rows emits one message); an unmarked statement after a context emits ``{}``.
The trigger (``BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ... FOR EACH STATEMENT``) goes on every user
table: partitioned parents and each partition, as a statement trigger fires only on the table the
statement names. ``install`` optionally
sets ``REPLICA IDENTITY FULL`` (remembering the old setting), and adds an event trigger doing the same for
tables created later. A role that may not create event triggers gets a NOTICE and a log warning: call
``install`` again after creating tables (e.g. at the end of each migration). Everything is idempotent;
``uninstall`` removes exactly what ``install`` created.

Roles: the event trigger fires for every role's DDL, so its function runs as the installing role
(``SECURITY DEFINER``, ``search_path = pg_catalog, pg_temp``) and only on the tables of the command that
fired it; the functions that alter tables on request (``track_table``, ``track_all``, ``untrack_all``,
``restore_identity``) are not executable by PUBLIC. Where the installing role may not alter a new table,
the DDL succeeds with a WARNING. ``install`` by a role that cannot create in schema ``bemi_tt`` or replace
another role's functions there leaves tracking as it is (a warning says who can update it).
On PostgreSQL 18, a table with a VIRTUAL generated column keeps its replica identity (no publication can
carry such a column, and PostgreSQL refuses UPDATE/DELETE when FULL identity includes it).
``install`` also reports ``wal_level`` (capture needs ``logical``) in :class:`Installation` and the log.

All identifier quoting happens in the database (``quote_ident`` over catalog names), so the SQL sent
from here is constant text, identical on every driver.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from capture.dsn import check_dsn, connect_error, redact
from capture.errors import ConfigurationError

__all__ = [
    "EVENT_TRIGGER",
    "SCHEMA",
    "TRIGGER",
    "Installation",
    "install",
    "install_statements",
    "migration_downgrade",
    "migration_upgrade",
    "uninstall",
]

log = logging.getLogger("bemi_tt")

SCHEMA = "bemi_tt"
TRIGGER = "bemi_tt_context"
EVENT_TRIGGER = "bemi_tt_track_new_tables"
_INSUFFICIENT_PRIVILEGE = "42501"

_SETUP = (
    "CREATE SCHEMA IF NOT EXISTS bemi_tt",
    "GRANT USAGE ON SCHEMA bemi_tt TO PUBLIC",
    # Tables whose replica identity install changed, with the setting to restore.
    "CREATE TABLE IF NOT EXISTS bemi_tt.replica_identity_changes ("
    " relid oid PRIMARY KEY, previous \"char\" NOT NULL, previous_index oid)",
    # The marker is only trusted when it is exactly /*bemi:<valid base64>*/ at the very start. A message
    # is emitted only when it differs from the transaction's last one; an unmarked statement after a
    # context emits {} so it cannot inherit it. executemany runs one statement text once per row: the
    # first check skips those repeats before any parsing (measured: 1.40x -> 1.02x on executemany).
    # Assignments, not PERFORM: plpgsql evaluates them on its fast path. (A WHEN clause on the trigger
    # was measured slower: PostgreSQL prepares it again for every statement.)
    r"""CREATE OR REPLACE FUNCTION bemi_tt.emit_context() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
  query text := current_query();
  encoded text;
  last text;
  ignored text;
BEGIN
  IF query = current_setting('bemi_tt.last_query', true) THEN
    RETURN NULL;
  END IF;
  -- a match without capture groups, then a split: 2-3x cheaper than substring() with a capture
  encoded := CASE WHEN query ~ '^/\*bemi:(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\*/'
    THEN split_part(substr(query, 8), '*/', 1) END;
  last := current_setting('bemi_tt.last_context', true);
  IF encoded <> '' THEN
    IF encoded IS DISTINCT FROM last THEN
      ignored := pg_logical_emit_message(true, 'bemi', decode(encoded, 'base64'));
      ignored := set_config('bemi_tt.last_context', encoded, true);
      ignored := set_config('bemi_tt.last_query', query, true);
    END IF;
  ELSIF last <> '' THEN
    ignored := pg_logical_emit_message(true, 'bemi', '{}'::text);
    ignored := set_config('bemi_tt.last_context', '', true);
    ignored := set_config('bemi_tt.last_query', query, true);
  END IF;
  RETURN NULL;
END
$fn$""",
    # Which tables carry the trigger: ordinary and partitioned user tables, not temporary or unlogged
    # (not decoded), not extension members, not bemi_tt's own, not the capture worker's tables.
    # Catalog names are qualified (pg_catalog is searched first anyway): these functions also run inside
    # the SECURITY DEFINER event trigger function, where nothing may depend on the caller's search_path.
    """CREATE OR REPLACE FUNCTION bemi_tt.trackable(rel oid) RETURNS boolean
LANGUAGE sql STABLE AS $fn$
  SELECT EXISTS (
    SELECT FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = rel AND c.relkind IN ('r', 'p') AND c.relpersistence = 'p'
      AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'bemi_tt')
      AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
      AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d WHERE d.classid = 'pg_catalog.pg_class'::regclass
                      AND d.objid = c.oid AND d.deptype = 'e')
      AND NOT (c.relname IN ('changes', 'changes_schemas') AND EXISTS (
        SELECT FROM pg_catalog.pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'commit_position'
        AND NOT a.attisdropped)))
$fn$""",
    # Puts back the replica identity install replaced (recorded in replica_identity_changes), if the table
    # still has FULL; forgets the record either way.
    """CREATE OR REPLACE FUNCTION bemi_tt.restore_identity(rel oid) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  r record;
  found_it boolean;
BEGIN
  SELECT pg_catalog.quote_ident(ns.nspname) || '.' || pg_catalog.quote_ident(c.relname) AS target, p.previous,
         (SELECT pg_catalog.quote_ident(i.relname) FROM pg_catalog.pg_class i
          JOIN pg_catalog.pg_index x ON x.indexrelid = i.oid
          WHERE i.oid = p.previous_index AND x.indrelid = c.oid) AS index_name
  INTO r
  FROM bemi_tt.replica_identity_changes p JOIN pg_catalog.pg_class c ON c.oid = p.relid
  JOIN pg_catalog.pg_namespace ns ON ns.oid = c.relnamespace
  WHERE p.relid = rel AND c.relreplident = 'f';
  found_it := FOUND;
  DELETE FROM bemi_tt.replica_identity_changes WHERE relid = rel;
  IF NOT found_it THEN
    RETURN false;
  END IF;
  EXECUTE 'ALTER TABLE ' || r.target || ' REPLICA IDENTITY ' || CASE
    WHEN r.previous = 'n' THEN 'NOTHING'
    WHEN r.previous = 'i' AND r.index_name IS NOT NULL THEN 'USING INDEX ' || r.index_name
    ELSE 'DEFAULT' END;
  RETURN true;
END
$fn$""",
    # REPLICA IDENTITY FULL only where it works: not on a table with a VIRTUAL generated column
    # (PostgreSQL 18), which no publication can carry; PostgreSQL refuses UPDATE/DELETE on a published table
    # whose identity holds an unpublished generated column. Such a table keeps (or, when the column was
    # added after install set FULL, gets back) its own identity, usually the primary key.
    """CREATE OR REPLACE FUNCTION bemi_tt.track_table(rel oid, replica_identity_full boolean)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  target text;
  identity "char";
  has_virtual boolean;
  changed boolean := false;
BEGIN
  IF NOT bemi_tt.trackable(rel) THEN
    RETURN false;
  END IF;
  SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname), c.relreplident
  INTO target, identity
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel;
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgrelid = rel AND tgname = 'bemi_tt_context') THEN
    EXECUTE 'CREATE TRIGGER bemi_tt_context BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON '
      || target || ' FOR EACH STATEMENT EXECUTE FUNCTION bemi_tt.emit_context()';
    changed := true;
  END IF;
  has_virtual := EXISTS (SELECT FROM pg_catalog.pg_attribute WHERE attrelid = rel AND attgenerated = 'v'
                         AND NOT attisdropped);
  IF has_virtual AND identity = 'f' AND bemi_tt.restore_identity(rel) THEN
    RAISE NOTICE 'bemi_tt: table % is back to its previous replica identity: it has a virtual generated '
      'column, which no publication can carry (UPDATE and DELETE would fail under REPLICA IDENTITY FULL)',
      target;
    changed := true;
  ELSIF has_virtual AND replica_identity_full AND identity <> 'f' THEN
    RAISE NOTICE 'bemi_tt: table % keeps its replica identity: it has a virtual generated column, '
      'which no publication can carry (UPDATE and DELETE would fail under REPLICA IDENTITY FULL)',
      target;
  ELSIF replica_identity_full AND identity <> 'f' THEN
    INSERT INTO bemi_tt.replica_identity_changes (relid, previous, previous_index)
    SELECT rel, identity,
      (SELECT indexrelid FROM pg_catalog.pg_index WHERE indrelid = rel AND indisreplident)
    ON CONFLICT (relid) DO NOTHING;
    EXECUTE 'ALTER TABLE ' || target || ' REPLICA IDENTITY FULL';
    changed := true;
  END IF;
  RETURN changed;
END
$fn$""",
    """CREATE OR REPLACE FUNCTION bemi_tt.track_all(replica_identity_full boolean)
RETURNS integer LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $fn$
  SELECT (count(*) FILTER (WHERE t.changed))::integer FROM (
    SELECT bemi_tt.track_table(c.oid, replica_identity_full) AS changed FROM pg_catalog.pg_class c
    WHERE bemi_tt.trackable(c.oid) ORDER BY c.oid) t
$fn$""",
    """CREATE OR REPLACE FUNCTION bemi_tt.untrack_all() RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  r record;
  n integer := 0;
BEGIN
  FOR r IN
    SELECT pg_catalog.quote_ident(ns.nspname) || '.' || pg_catalog.quote_ident(c.relname) AS target
    FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
    JOIN pg_catalog.pg_namespace ns ON ns.oid = c.relnamespace
    WHERE t.tgname = 'bemi_tt_context' AND t.tgfoid = 'bemi_tt.emit_context()'::pg_catalog.regprocedure
  LOOP
    EXECUTE 'DROP TRIGGER bemi_tt_context ON ' || r.target;
    n := n + 1;
  END LOOP;
  PERFORM bemi_tt.restore_identity(p.relid) FROM bemi_tt.replica_identity_changes p ORDER BY p.relid;
  DELETE FROM bemi_tt.replica_identity_changes;
  RETURN n;
END
$fn$""",
    # Functions are executable by PUBLIC by default. These alter tables; they run with the caller's
    # rights, but only the installing role (and the event trigger, below) has any business calling them.
    "REVOKE ALL ON FUNCTION bemi_tt.track_table(oid, boolean), bemi_tt.track_all(boolean),"
    " bemi_tt.untrack_all(), bemi_tt.restore_identity(oid) FROM PUBLIC",
)

# The event trigger fires for every role's DDL, and a function runs with its caller's rights: as the
# caller, the bookkeeping INSERT (and tables of other roles) fail and would abort the caller's CREATE TABLE.
# So it runs as its owner, the installing role (SECURITY DEFINER, with a fixed search_path). That is safe
# because nobody can call an event-trigger function directly, and it only touches the tables of the
# command that fired it, which the caller just created or altered (so was allowed to). When the owner
# may not alter such a table (install was run by a non-superuser), the DDL still succeeds, with a WARNING.
_EVENT_FUNCTION = """CREATE OR REPLACE FUNCTION bemi_tt.track_new_tables() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  r record;
BEGIN
  FOR r IN SELECT DISTINCT e.objid FROM pg_catalog.pg_event_trigger_ddl_commands() e
           WHERE e.object_type = 'table' LOOP
    BEGIN
      PERFORM bemi_tt.track_table(r.objid, {replica_identity_full});
    EXCEPTION WHEN insufficient_privilege THEN
      RAISE WARNING 'bemi_tt: table % gets no context trigger: role % (which installed bemi_tt) may not '
        'alter it: %', r.objid::pg_catalog.regclass, current_user, SQLERRM
        USING HINT = 'run bemi_tt.install(engine) as a superuser or as the owner of the table';
      -- a tracking gap is data: the capture worker records it for the table (capture/ddl.py, UNTRACK)
      PERFORM pg_catalog.pg_logical_emit_message(true, 'bemi_ddl', pg_catalog.jsonb_build_object(
        'event', 'UNTRACK', 'what', 'context', 'oid', c.oid, 'schema', n.nspname, 'table', c.relname,
        'reason', SQLERRM)::text)
        FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = r.objid;
    END;
  END LOOP;
END
$fn$"""

_REVOKE_EVENT_FUNCTION = "REVOKE ALL ON FUNCTION bemi_tt.track_new_tables() FROM PUBLIC"
_EVENT_TRIGGER = (
    "CREATE EVENT TRIGGER bemi_tt_track_new_tables ON ddl_command_end"
    " WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')"
    " EXECUTE FUNCTION bemi_tt.track_new_tables()"
)
_HAS_EVENT_TRIGGER = "SELECT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'bemi_tt_track_new_tables')"
_NO_EVENT_TRIGGER_MESSAGE = (
    "bemi_tt: this role may not create event triggers, so tables created later get no context "
    "trigger; call bemi_tt.install(engine) again after creating tables (e.g. in each migration)"
)
_NO_EVENT_TRIGGER_NOTICE = (
    "DO $$ BEGIN RAISE NOTICE 'bemi_tt: this role may not create event triggers, so tables created "
    "later get no context trigger; call bemi_tt.install(engine) again after creating tables'; END $$"
)

_TEARDOWN = (
    "DROP EVENT TRIGGER IF EXISTS bemi_tt_track_new_tables",
    "SELECT bemi_tt.untrack_all()",
    "DROP FUNCTION IF EXISTS bemi_tt.track_new_tables()",
    "DROP FUNCTION IF EXISTS bemi_tt.untrack_all()",
    "DROP FUNCTION IF EXISTS bemi_tt.track_all(boolean)",
    "DROP FUNCTION IF EXISTS bemi_tt.track_table(oid, boolean)",
    "DROP FUNCTION IF EXISTS bemi_tt.restore_identity(oid)",
    "DROP FUNCTION IF EXISTS bemi_tt.trackable(oid)",
    "DROP FUNCTION IF EXISTS bemi_tt.emit_context()",
    "DROP TABLE IF EXISTS bemi_tt.replica_identity_changes",
)
_SCHEMA_EMPTY = (
    "SELECT NOT EXISTS (SELECT FROM pg_depend d JOIN pg_namespace n ON n.oid = d.refobjid"
    " WHERE d.refclassid = 'pg_namespace'::regclass AND n.nspname = 'bemi_tt' AND d.deptype = 'n')"
)


_WAL_LEVEL_MESSAGE = (
    "bemi_tt: wal_level is {level!r}, so the capture worker cannot read changes (it needs 'logical'): "
    "run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"
)
# Constant SQL, so that offline (Alembic --sql) installs warn too.
_WAL_LEVEL_WARNING = (
    "DO $$ BEGIN IF pg_catalog.current_setting('wal_level') <> 'logical' THEN RAISE WARNING '%', "
    "pg_catalog.format('" + _WAL_LEVEL_MESSAGE.replace("{level!r}", "%L").replace("'", "''")
    + "', pg_catalog.current_setting('wal_level')); END IF; END $$"
)
_TRACKING_FUNCTIONS = (
    "emit_context", "trackable", "track_table", "track_all", "untrack_all", "restore_identity",
    "track_new_tables",
)
# Roles owning schema bemi_tt or install's functions that the current role cannot act as: CREATE in the
# schema or CREATE OR REPLACE of those functions would fail. (Catalog joins, not to_regprocedure: that
# fails without USAGE on the schema.)
_OTHER_OWNERS = (
    "SELECT pg_catalog.string_agg(DISTINCT r.rolname::text, ', ') FROM pg_catalog.pg_namespace n"
    " CROSS JOIN LATERAL (SELECT n.nspowner WHERE NOT pg_catalog.has_schema_privilege(n.oid, 'CREATE')"
    "  UNION ALL SELECT p.proowner FROM pg_catalog.pg_proc p WHERE p.pronamespace = n.oid"
    "  AND p.proname IN (" + ", ".join(f"'{f}'" for f in _TRACKING_FUNCTIONS) + ")"
    "  AND NOT pg_catalog.pg_has_role(p.proowner, 'USAGE')) AS o(owner)"
    " JOIN pg_catalog.pg_roles r ON r.oid = o.owner WHERE n.nspname = 'bemi_tt'"
)


@dataclass(frozen=True)
class Installation:
    """What ``install`` did: tables it changed (trigger or replica identity), whether new tables are
    tracked automatically (``False``: the role may not create event triggers), the server's ``wal_level``
    (capture needs ``'logical'``) and ``warnings``: one line per problem, each naming its fix (already
    logged on the ``bemi_tt`` logger; a command line tool should print them)."""

    tables_changed: int
    event_trigger: bool
    wal_level: str = "logical"
    warnings: tuple[str, ...] = ()

    @property
    def capture_ready(self) -> bool:
        """Whether the capture worker can read this server's changes (``wal_level = logical``)."""
        return self.wal_level == "logical"


def install_statements(*, replica_identity_full: bool = True) -> list[str]:
    """The constant SQL ``install`` runs, in order (for Alembic offline mode and review)."""
    _check_flag(replica_identity_full)
    flag = "true" if replica_identity_full else "false"
    return [
        _WAL_LEVEL_WARNING,
        *_SETUP,
        _EVENT_FUNCTION.format(replica_identity_full=flag),
        _REVOKE_EVENT_FUNCTION,
        f"SELECT bemi_tt.track_all({flag})",
        "DROP EVENT TRIGGER IF EXISTS bemi_tt_track_new_tables",
        _EVENT_TRIGGER,
    ]


def _check_flag(value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(f"replica_identity_full must be True or False, got {value!r}")


def _engine(target: str | sa.URL) -> Engine:
    """An engine on psycopg 3 (the core driver) for a URL or a libpq ``key=value`` connection string."""
    if isinstance(target, str) and ("://" not in target or target.startswith("postgres")):
        check_dsn(target)  # malformed: ConfigurationError, password redacted (other dialects: below)
    if isinstance(target, str) and "://" not in target:
        import psycopg

        return sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(target))
    try:
        url = sa.make_url(target)
    except sa.exc.ArgumentError:
        raise ConfigurationError(f"not a database URL: {redact(target)!r}") from None
    if url.drivername in ("postgresql", "postgres"):  # SQLAlchemy would pick psycopg2, an optional extra
        url = url.set(drivername="postgresql+psycopg")
    return sa.create_engine(url)


@contextmanager
def _connection(target: Engine | Connection | str | sa.URL) -> Iterator[Connection]:
    """A connection in a transaction: a passed Connection as is (the caller commits), else our own."""
    if isinstance(target, Connection):
        yield target
        return
    if isinstance(target, Engine):
        with target.begin() as conn:
            yield conn
        return
    if isinstance(target, (str, sa.URL)):
        engine = _engine(target)
        try:
            try:
                connection = engine.connect()
            except sa.exc.DBAPIError as exc:  # one line, no password, in the error tree (capture.dsn)
                url = target if isinstance(target, str) else target.render_as_string(hide_password=False)
                raise connect_error(exc, url) from None
            with connection, connection.begin():
                yield connection
        finally:
            engine.dispose()
        return
    raise ConfigurationError(
        f"expected a SQLAlchemy Engine, Connection or database URL, got {type(target).__name__}; "
        "for an AsyncEngine use: async with engine.begin() as conn: await conn.run_sync(bemi_tt.install)"
    )


def _run(conn: Connection, statement: str) -> Any:
    result = conn.exec_driver_sql(statement, execution_options={"no_parameters": True})
    return result.scalar() if result.returns_rows else None


def _check_postgresql(conn: Connection) -> None:
    if conn.dialect.name != "postgresql":
        raise ConfigurationError(
            f"bemi_tt tracks PostgreSQL databases only, got a {conn.dialect.name!r} connection"
        )


def install(
    target: Engine | Connection | str | sa.URL, *, replica_identity_full: bool = True
) -> Installation:
    """Install the trigger function, triggers on existing tables and the event trigger; idempotent.

    A Connection runs it inside its transaction (commit it yourself, as Alembic does).
    """
    _check_flag(replica_identity_full)
    statements = install_statements(replica_identity_full=replica_identity_full)
    warnings: list[str] = []
    with _connection(target) as conn:
        _check_postgresql(conn)
        wal_level = str(_run(conn, "SELECT pg_catalog.current_setting('wal_level')"))
        if wal_level != "logical":
            warnings.append(_WAL_LEVEL_MESSAGE.format(level=wal_level))
            log.warning(warnings[-1])
        owners = _run(conn, _OTHER_OWNERS)
        if owners:
            # Installed by another role (e.g. a superuser, before this role's migrations), or schema bemi_tt
            # made by a superuser's capture worker: nothing can be created or replaced from here (and doing
            # so must not break the migration); an event trigger, if any, tracks the tables created later.
            event_trigger = bool(_run(conn, _HAS_EVENT_TRIGGER))
            warnings.append(
                f"bemi_tt: schema bemi_tt and its functions belong to role {owners}, so this role leaves "
                "tracking as it is; to install or update it, run bemi_tt.install(engine) as that role or "
                "a superuser" + ("" if event_trigger else " (until then, new tables are not tracked)")
            )
            log.log(logging.INFO if event_trigger else logging.WARNING, warnings[-1])
            return Installation(0, event_trigger, wal_level, tuple(warnings))
        changed = 0
        for statement in statements[1:-2]:  # the wal_level warning was handled above
            result = _run(conn, statement)
            if statement.startswith("SELECT bemi_tt.track_all"):
                changed = int(result or 0)
        event_trigger = bool(_run(conn, _HAS_EVENT_TRIGGER))
        if not event_trigger:
            event_trigger = _create_event_trigger(conn)
            if not event_trigger:
                warnings.append(_NO_EVENT_TRIGGER_MESSAGE)
        _ddl_tracking(conn, "install_ddl_tracking")
    return Installation(changed, event_trigger, wal_level, tuple(warnings))


def _create_event_trigger(conn: Connection) -> bool:
    """Create the event trigger in a savepoint; without the privilege, say so and carry on."""
    try:
        with conn.begin_nested():
            _run(conn, _EVENT_TRIGGER)
    except sa.exc.DBAPIError as exc:
        code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if code != _INSUFFICIENT_PRIVILEGE:
            raise
        _run(conn, _NO_EVENT_TRIGGER_NOTICE)
        log.warning(_NO_EVENT_TRIGGER_MESSAGE)
        return False
    return True


def _ddl_tracking(conn: Connection, name: str) -> None:
    """Call the capture worker's schema-change tracking (``capture.ddl``) when it provides ``name``."""
    try:
        module = importlib.import_module("capture.ddl")
    except ModuleNotFoundError:
        return
    func = getattr(module, name, None)
    if func is not None:
        func(conn)


def uninstall(target: Engine | Connection | str | sa.URL) -> int:
    """Remove what ``install`` created (triggers, event trigger, functions, replica identities); idempotent.

    Returns the number of table triggers dropped. The schema ``bemi_tt`` goes too when nothing else is in it.
    """
    with _connection(target) as conn:
        _check_postgresql(conn)
        if not _run(conn, "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = 'bemi_tt')"):
            return 0
        _ddl_tracking(conn, "uninstall_ddl_tracking")
        dropped = 0
        has_functions = _run(conn, "SELECT to_regprocedure('bemi_tt.untrack_all()') IS NOT NULL")
        for statement in _TEARDOWN:
            if statement.startswith("SELECT bemi_tt.untrack_all"):
                dropped = int(_run(conn, statement) or 0) if has_functions else 0
            else:
                _run(conn, statement)
        if _run(conn, _SCHEMA_EMPTY):
            _run(conn, "DROP SCHEMA IF EXISTS bemi_tt")
    return dropped


def migration_upgrade(*, replica_identity_full: bool = True) -> None:
    """Install tracking from inside an Alembic migration (online: on its connection; offline: as SQL)."""
    from alembic import op

    if op.get_context().as_sql:
        for statement in install_statements(replica_identity_full=replica_identity_full):
            op.execute(sa.text(statement))
        return
    install(op.get_bind(), replica_identity_full=replica_identity_full)


def migration_downgrade() -> None:
    """Remove tracking from inside an Alembic migration (online: on its connection; offline: as SQL).

    Call it **last** in ``downgrade()``, after the migration's own ``op.drop_table`` calls: DDL run
    after it is not tracked, so a drop would not be recorded (the record then shows a tracking gap,
    ``untracked``, from here on, and the next install re-baselines each table, never a silent change).
    """
    from alembic import op

    if op.get_context().as_sql:
        for statement in _TEARDOWN:
            op.execute(sa.text(statement))
        op.execute(sa.text("DROP SCHEMA IF EXISTS bemi_tt"))
        return
    uninstall(op.get_bind())
