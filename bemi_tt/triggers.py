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

Roles: ``emit_context()`` runs as the installing role (``SECURITY DEFINER``, ``search_path = pg_catalog,
pg_temp``), so that ``install``, run by a superuser, can revoke ``pg_logical_emit_message`` from PUBLIC:
then only the trigger can emit a ``bemi`` message; it also revokes write rights on the capture worker's
tables from every role but their owner. What it may not do it reports, with the statements, in
:attr:`Installation.warnings` (docs/privileges.md). The event trigger fires for every role's DDL, so its
function runs as the installing role
(``SECURITY DEFINER``, ``search_path = pg_catalog, pg_temp``) and only on the tables of the command that
fired it; the functions that alter tables on request (``track_table``, ``track_all``, ``untrack_all``,
``restore_identity``) are not executable by PUBLIC. Where the installing role may not alter a new table,
the DDL succeeds with a WARNING. ``install`` by a role that cannot create in schema ``bemi_tt`` or replace
another role's functions there leaves tracking as it is (a warning says who can update it).
On PostgreSQL 18, a table with a VIRTUAL generated column keeps its replica identity (no publication can
carry such a column, and PostgreSQL refuses UPDATE/DELETE when FULL identity includes it).
``install`` also reports ``wal_level`` (capture needs ``logical``) in :class:`Installation` and the log.

Tracking begins when ``install`` returns: it creates publication ``bemi_tt`` (``FOR ALL TABLES``, or
``FOR TABLE`` with the tables it owns, kept in step by each install) and the worker's slot
(``bemi_tt_<database>``) with a snapshot copied into schema ``bemi_tt`` at the slot's consistent point,
which the worker's first run records as the SNAPSHOT (capture/snapshot.py). Creating a slot waits for
the transactions running at that moment, so it happens before install writes anything (a transaction
that has already written gets a warning instead; ``migration_upgrade`` uses an autocommit block). It
also replaces the original ``bemi-sqlalchemy`` package's objects (bemi_tt/bemi_compat.py).

All identifier quoting happens in the database (``quote_ident`` over catalog names), so the SQL sent
from here is constant text, identical on every driver.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from capture.dsn import check_dsn, connect_error, one_line, redact
from capture.errors import ConfigurationError
from capture.protocol import WORKER_TABLES as _WORKER_TABLE_NAMES
from capture.protocol import worker_table_sql

if TYPE_CHECKING:
    from capture.exclude import Exclusions

__all__ = [
    "EVENT_TRIGGER",
    "SCHEMA",
    "TRIGGER",
    "Installation",
    "grant_statements",
    "include_object",
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
    # Selective tracking (capture/exclude.py): tables (columns NULL) and columns never recorded. Readable
    # by every role: the capture worker starts from it, and it names columns, never values.
    "CREATE TABLE IF NOT EXISTS bemi_tt.exclusions (\"schema\" text NOT NULL, \"table\" text NOT NULL,"
    " columns text[], PRIMARY KEY (\"schema\", \"table\"))",
    "GRANT SELECT ON bemi_tt.exclusions TO PUBLIC",
    # The marker is only trusted when it is exactly /*bemi:<valid base64>*/ at the very start. A message
    # is emitted only when it differs from the transaction's last one; an unmarked statement after a
    # context emits {} so it cannot inherit it. executemany runs one statement text once per row: the
    # first check skips those repeats before any parsing (measured: 1.40x -> 1.02x on executemany).
    # Assignments, not PERFORM: plpgsql evaluates them on its fast path. (A WHEN clause on the trigger
    # was measured slower: PostgreSQL prepares it again for every statement.)
    # SECURITY DEFINER (runs as the installing role, with a fixed search_path and qualified names): the
    # application role then needs no EXECUTE on pg_logical_emit_message, which install revokes from PUBLIC
    # where it may (docs/privileges.md), so the only way to emit a 'bemi' message is this trigger.
    # current_query() and the transaction-local settings are the session's, as before.
    r"""CREATE OR REPLACE FUNCTION bemi_tt.emit_context() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  query text := pg_catalog.current_query();
  encoded text;
  legacy text;
  last text;
  ignored text;
BEGIN
  IF query = pg_catalog.current_setting('bemi_tt.last_query', true) THEN
    RETURN NULL;
  END IF;
  -- a match without capture groups, then a split: 2-3x cheaper than substring() with a capture
  encoded := CASE WHEN query ~ '^/\*bemi:(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\*/'
    THEN pg_catalog.split_part(pg_catalog.substr(query, 8), '*/', 1) END;
  -- a process still on the original bemi-sqlalchemy package appends ' /*Bemi <json> Bemi*/' (its JSON is
  -- the context, "SQL" included); trusted at the very end only. Stored in last_context as is: JSON starts
  -- with '{', which base64 never does.
  IF encoded IS NULL AND pg_catalog.strpos(query, ' Bemi*/') > 0 THEN
    legacy := pg_catalog.substring(query, ' /\*Bemi (\{.*\}) Bemi\*/\s*;?\s*$');
  END IF;
  last := pg_catalog.current_setting('bemi_tt.last_context', true);
  IF legacy IS NOT NULL THEN
    IF legacy IS DISTINCT FROM last THEN
      ignored := pg_catalog.pg_logical_emit_message(true, 'bemi', legacy);
      ignored := pg_catalog.set_config('bemi_tt.last_context', legacy, true);
      ignored := pg_catalog.set_config('bemi_tt.last_query', query, true);
    END IF;
  ELSIF encoded <> '' THEN
    IF encoded IS DISTINCT FROM last THEN
      ignored := pg_catalog.pg_logical_emit_message(true, 'bemi', pg_catalog.decode(encoded, 'base64'));
      ignored := pg_catalog.set_config('bemi_tt.last_context', encoded, true);
      ignored := pg_catalog.set_config('bemi_tt.last_query', query, true);
    END IF;
  ELSIF last <> '' THEN
    ignored := pg_catalog.pg_logical_emit_message(true, 'bemi', '{}'::text);
    ignored := pg_catalog.set_config('bemi_tt.last_context', '', true);
    ignored := pg_catalog.set_config('bemi_tt.last_query', query, true);
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
      AND NOT """ + worker_table_sql("c") + """
      -- excluded by install(exclude_tables=...), itself or through a partitioned ancestor
      AND NOT EXISTS (
        SELECT FROM bemi_tt.exclusions x JOIN pg_catalog.pg_class ac ON ac.relname = x."table"
        JOIN pg_catalog.pg_namespace an ON an.oid = ac.relnamespace AND an.nspname = x."schema"
        WHERE x.columns IS NULL AND (ac.oid = rel OR ac.oid IN (
          SELECT p.relid FROM pg_catalog.pg_partition_ancestors(rel) p))))
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
    # Stores the exclusions (install(exclude_tables=, exclude_columns=)) and, when they changed, emits them
    # as a bemi_exclude message in this transaction, so the capture worker applies them in stream order;
    # excluded tables lose the context trigger (and get their replica identity back) and leave a
    # FOR TABLE publication. tables: [{"schema", "table"}], columns: [{"schema", "table", "columns"}]; a
    # NULL argument keeps that part as stored. A whole table wins over its columns.
    """CREATE OR REPLACE FUNCTION bemi_tt.set_exclusions(tables jsonb, columns jsonb) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  stored jsonb;
  config jsonb;
  r record;
  ignored text;
BEGIN
  SELECT coalesce(jsonb_agg(jsonb_build_object('schema', x."schema", 'table', x."table",
    'columns', to_jsonb(x.columns)) ORDER BY x."schema", x."table"), '[]'::jsonb)
  INTO stored FROM bemi_tt.exclusions x;
  SELECT coalesce(jsonb_agg(jsonb_build_object('schema', n.s, 'table', n.t, 'columns', to_jsonb(n.c))
    ORDER BY n.s, n.t), '[]'::jsonb) INTO config FROM (
    SELECT DISTINCT ON (a.s, a.t) a.s, a.t, a.c FROM (
      SELECT e ->> 'schema' AS s, e ->> 'table' AS t, NULL::text[] AS c
      FROM jsonb_array_elements(coalesce(tables, (SELECT jsonb_agg(x) FROM jsonb_array_elements(stored) x
                                                  WHERE x -> 'columns' = 'null'::jsonb), '[]'::jsonb)) e
      UNION ALL
      SELECT e ->> 'schema', e ->> 'table', ARRAY(SELECT v FROM jsonb_array_elements_text(e -> 'columns') v
                                                  ORDER BY v)
      FROM jsonb_array_elements(coalesce(columns, (SELECT jsonb_agg(x) FROM jsonb_array_elements(stored) x
                                                   WHERE x -> 'columns' <> 'null'::jsonb), '[]'::jsonb)) e
    ) a ORDER BY a.s, a.t, a.c IS NULL DESC) n;
  IF stored = config THEN
    RETURN false;
  END IF;
  DELETE FROM bemi_tt.exclusions;
  INSERT INTO bemi_tt.exclusions ("schema", "table", columns)
  SELECT e ->> 'schema', e ->> 'table', CASE WHEN jsonb_typeof(e -> 'columns') = 'array'
    THEN ARRAY(SELECT jsonb_array_elements_text(e -> 'columns')) END
  FROM jsonb_array_elements(config) e;
  ignored := pg_logical_emit_message(true, 'bemi_exclude', config::text);
  FOR r IN
    SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS target
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE t.tgname = 'bemi_tt_context' AND NOT bemi_tt.trackable(c.oid) ORDER BY c.oid
  LOOP
    EXECUTE 'DROP TRIGGER bemi_tt_context ON ' || r.target;
    PERFORM bemi_tt.restore_identity(r.oid);
  END LOOP;
  IF EXISTS (SELECT FROM pg_publication WHERE pubname = 'bemi_tt' AND NOT puballtables) THEN
    FOR r IN
      SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS target
      FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
      JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE p.pubname = 'bemi_tt' AND NOT bemi_tt.trackable(c.oid) ORDER BY 1
    LOOP
      BEGIN
        EXECUTE 'ALTER PUBLICATION bemi_tt DROP TABLE ' || r.target;
      EXCEPTION WHEN insufficient_privilege THEN
        NULL;  -- the worker drops its changes all the same
      END;
    END LOOP;
  END IF;
  RETURN true;
END
$fn$""",
    # Functions are executable by PUBLIC by default. These alter tables; they run with the caller's
    # rights, but only the installing role (and the event trigger, below) has any business calling them.
    "REVOKE ALL ON FUNCTION bemi_tt.track_table(oid, boolean), bemi_tt.track_all(boolean),"
    " bemi_tt.untrack_all(), bemi_tt.restore_identity(oid), bemi_tt.set_exclusions(jsonb, jsonb)"
    " FROM PUBLIC",
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

# The worker reads changes through publication bemi_tt: FOR ALL TABLES where this role may (superuser),
# else FOR TABLE with the tables this role owns, kept in step here: install (e.g. each migration) adds
# the tables created since. Constant SQL, so Alembic offline mode emits it too.
_PUBLISH = r"""DO $$
DECLARE
  opts text := 'publish_via_partition_root = true' || CASE
    WHEN pg_catalog.current_setting('server_version_num')::int >= 180000
    THEN ', publish_generated_columns = stored' ELSE '' END;
  r record;
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_publication WHERE pubname = 'bemi_tt') THEN
    BEGIN
      EXECUTE 'CREATE PUBLICATION bemi_tt FOR ALL TABLES WITH (' || opts || ')';
    EXCEPTION WHEN insufficient_privilege THEN
      EXECUTE 'CREATE PUBLICATION bemi_tt WITH (' || opts || ')';
    END;
  END IF;
  IF (SELECT p.puballtables OR NOT pg_catalog.pg_has_role(p.pubowner, 'USAGE')
      FROM pg_catalog.pg_publication p WHERE p.pubname = 'bemi_tt') THEN
    RETURN;
  END IF;
  FOR r IN
    SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname) AS target
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE bemi_tt.trackable(c.oid) AND NOT c.relispartition AND pg_catalog.pg_has_role(c.relowner, 'USAGE')
      AND NOT EXISTS (SELECT FROM pg_catalog.pg_publication_rel pr JOIN pg_catalog.pg_publication p
                      ON p.oid = pr.prpubid WHERE p.pubname = 'bemi_tt' AND pr.prrelid = c.oid)
    ORDER BY 1
  LOOP
    EXECUTE 'ALTER PUBLICATION bemi_tt ADD TABLE ' || r.target;
  END LOOP;
END
$$"""

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
    "DROP FUNCTION IF EXISTS bemi_tt.set_exclusions(jsonb, jsonb)",
    "DROP FUNCTION IF EXISTS bemi_tt.trackable(oid)",
    "DROP FUNCTION IF EXISTS bemi_tt.emit_context()",
    "DROP TABLE IF EXISTS bemi_tt.replica_identity_changes",
    "DROP TABLE IF EXISTS bemi_tt.exclusions",
    # slots install created whose snapshot no worker ever took: nothing reads them, they only retain WAL
    "DO $$ BEGIN IF pg_catalog.to_regclass('bemi_tt.snapshots') IS NOT NULL THEN"
    " PERFORM pg_catalog.pg_drop_replication_slot(s.slot_name) FROM pg_catalog.pg_replication_slots s"
    " WHERE s.database = pg_catalog.current_database() AND s.active_pid IS NULL"
    " AND s.slot_name IN (SELECT slot FROM bemi_tt.snapshots); END IF; END $$",
    "DROP TABLE IF EXISTS bemi_tt.snapshot_rows",
    "DROP TABLE IF EXISTS bemi_tt.snapshots",
)
_SCHEMA_EMPTY = (
    "SELECT NOT EXISTS (SELECT FROM pg_depend d JOIN pg_namespace n ON n.oid = d.refobjid"
    " WHERE d.refclassid = 'pg_namespace'::regclass AND n.nspname = 'bemi_tt' AND d.deptype = 'n')"
)


# -- privileges (docs/privileges.md) ------------------------------------------------------------------
# The capture worker's tables, in any schema (the test of bemi_tt.trackable, which they are not).
_WORKER_TABLES = (
    "SELECT c.oid, c.relowner, c.relacl FROM pg_catalog.pg_class c WHERE c.relkind IN ('r', 'p') AND "
    + worker_table_sql("c")
)
_EMIT_FUNCTIONS = (
    "SELECT p.oid FROM pg_catalog.pg_proc p WHERE p.proname = 'pg_logical_emit_message'"
    " AND p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace"
)
# Non-superuser roles owning bemi_tt's functions: the SECURITY DEFINER ones emit messages as their owner.
_FUNCTION_OWNERS = (
    "SELECT DISTINCT r.oid, r.rolname FROM pg_catalog.pg_proc b JOIN pg_catalog.pg_namespace n"
    " ON n.oid = b.pronamespace JOIN pg_catalog.pg_roles r ON r.oid = b.proowner"
    " WHERE n.nspname = 'bemi_tt' AND NOT r.rolsuper"
)
# What install does where its role may. Only a superuser may revoke EXECUTE on pg_logical_emit_message
# (owned by the bootstrap superuser; a non-owner's REVOKE only warns "no privileges could be revoked"):
# then nobody but superusers and the owners of bemi_tt's functions can emit a 'bemi' message, so a context
# can only come through the trigger. The owners are granted EXECUTE first, so writes never fail. Write
# rights on the worker's tables (its record; nobody else has any business writing it) are revoked from
# PUBLIC and every role but the owner, on the tables this role owns (or as a superuser).
_SECURE = (
    "DO $bemi$\nDECLARE\n"
    "  su boolean := (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user);\n"
    "  f pg_catalog.regprocedure;\n  o record;\n  w record;\n"
    "BEGIN\n"
    "  IF su THEN\n"
    "    FOR f IN " + _EMIT_FUNCTIONS + " LOOP\n"
    "      FOR o IN " + _FUNCTION_OWNERS + " LOOP\n"
    "        EXECUTE 'GRANT EXECUTE ON FUNCTION ' || f::text || ' TO '\n"
    "          || pg_catalog.quote_ident(o.rolname);\n"
    "      END LOOP;\n"
    "      EXECUTE 'REVOKE EXECUTE ON FUNCTION ' || f::text || ' FROM PUBLIC';\n"
    "    END LOOP;\n"
    "  END IF;\n"
    "  FOR w IN SELECT DISTINCT t.oid::pg_catalog.regclass::text AS rel,"
    " CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(g.rolname) END AS who\n"
    "    FROM (" + _WORKER_TABLES + ") t CROSS JOIN LATERAL pg_catalog.aclexplode(t.relacl) a\n"
    "    LEFT JOIN pg_catalog.pg_roles g ON g.oid = a.grantee\n"
    "    WHERE a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE') AND a.grantee <> t.relowner\n"
    "      AND (su OR pg_catalog.pg_has_role(t.relowner, 'USAGE'))\n"
    "  LOOP\n"
    "    EXECUTE 'REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON ' || w.rel || ' FROM ' || w.who || ' CASCADE';\n"
    "  END LOOP;\n"
    "END\n$bemi$"
)
_EMIT_STATE = (
    "SELECT p.oid::pg_catalog.regprocedure::text,"
    " pg_catalog.has_function_privilege('public', p.oid, 'EXECUTE') FROM pg_catalog.pg_proc p"
    " WHERE p.oid IN (" + _EMIT_FUNCTIONS + ") ORDER BY 1"
)
_OWNERS_STATE = (
    "SELECT o.rolname::text, bool_and(pg_catalog.has_function_privilege(o.oid, p.oid, 'EXECUTE'))"
    " FROM (" + _FUNCTION_OWNERS + ") o CROSS JOIN pg_catalog.pg_proc p"
    " WHERE p.oid IN (" + _EMIT_FUNCTIONS + ") GROUP BY 1 ORDER BY 1"
)
# Roles granted EXECUTE by name that are neither superusers nor owners of bemi_tt's functions.
_OTHER_EMITTERS = (
    "SELECT DISTINCT g.rolname::text FROM pg_catalog.pg_proc p"
    " CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a JOIN pg_catalog.pg_roles g ON g.oid = a.grantee"
    " WHERE p.oid IN (" + _EMIT_FUNCTIONS + ") AND a.grantee <> p.proowner AND NOT g.rolsuper"
    " AND g.oid NOT IN (SELECT o.oid FROM (" + _FUNCTION_OWNERS + ") o) ORDER BY 1"
)
_TABLE_WRITERS = (
    "SELECT t.oid::pg_catalog.regclass::text, pg_catalog.pg_get_userbyid(t.relowner)::text,"
    " pg_catalog.string_agg(DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC'"
    " ELSE pg_catalog.quote_ident(g.rolname) END, ', ')"
    " FROM (" + _WORKER_TABLES + ") t CROSS JOIN LATERAL pg_catalog.aclexplode(t.relacl) a"
    " LEFT JOIN pg_catalog.pg_roles g ON g.oid = a.grantee"
    " WHERE a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE') AND a.grantee <> t.relowner"
    " GROUP BY 1, 2 ORDER BY 1"
)


def _secure(conn: Connection, warnings: list[str]) -> None:
    """Close what lets a role forge history (``_SECURE``); a warning with the statements for the rest."""
    _run(conn, _SECURE)
    found: list[str] = []
    emit = conn.exec_driver_sql(_EMIT_STATE, execution_options={"no_parameters": True}).all()
    owners = conn.exec_driver_sql(_OWNERS_STATE, execution_options={"no_parameters": True}).all()
    lacking = [str(name) for name, may in owners if not may]
    if lacking:
        found.append(
            f"bemi_tt: role {', '.join(lacking)} owns bemi_tt's trigger functions but may not call "
            "pg_logical_emit_message, so every write to a tracked table fails with permission denied; run "
            "as a superuser: " + " ".join(
                f"GRANT EXECUTE ON FUNCTION pg_catalog.{fn} TO {_quote(name)};" for fn, _ in emit
                for name in lacking
            )
        )
    if any(public for _, public in emit):
        keep = [str(name) for name, _ in owners]
        found.append(
            "bemi_tt: every role may call pg_logical_emit_message, so any client can emit a 'bemi' "
            "message with a made-up context (the worker stores it with context_verified false when it has "
            "keys); only a superuser may revoke it (docs/privileges.md), so run as a superuser: " + " ".join(
                [f"GRANT EXECUTE ON FUNCTION pg_catalog.{fn} TO {_quote(name)};" for fn, _ in emit
                 for name in keep]
                + [f"REVOKE EXECUTE ON FUNCTION pg_catalog.{fn} FROM PUBLIC;" for fn, _ in emit]
            )
        )
    others = [str(r[0]) for r in conn.exec_driver_sql(_OTHER_EMITTERS,
                                                      execution_options={"no_parameters": True})]
    if others:
        who = ", ".join(_quote(name) for name in others)
        found.append(
            f"bemi_tt: role {', '.join(others)} was granted EXECUTE on pg_logical_emit_message, so it can "
            "emit 'bemi' messages with a made-up context; unless it needs that, run as a superuser: "
            + " ".join(f"REVOKE EXECUTE ON FUNCTION pg_catalog.{fn} FROM {who};" for fn, _ in emit)
        )
    for table, owner, who in conn.exec_driver_sql(_TABLE_WRITERS, execution_options={"no_parameters": True}):
        found.append(
            f"bemi_tt: {who} may write {table}, the capture worker's record of history (bemi-tt verify "
            f"would find the edits, but nothing prevents them); run as {owner} (its owner) or a superuser: "
            f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {table} FROM {who};"
        )
    for message in found:
        log.warning(message)
    warnings.extend(found)


def _quote(name: str) -> str:
    from psycopg import sql

    return sql.Identifier(name).as_string(None)


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
    "track_new_tables", "set_exclusions",
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
    #: The replication slot recording changes from install on (created now or earlier); None when install
    #: could not start tracking (see ``warnings``): then it begins when the capture worker first runs.
    slot: str | None = None

    @property
    def capture_ready(self) -> bool:
        """Whether the capture worker can read this server's changes (``wal_level = logical``)."""
        return self.wal_level == "logical"


def install_statements(
    *,
    replica_identity_full: bool = True,
    exclude_tables: Iterable[str] | None = None,
    exclude_columns: Mapping[str, Iterable[str]] | None = None,
) -> list[str]:
    """The constant SQL ``install`` runs, in order (for Alembic offline mode and review)."""
    _check_flag(replica_identity_full)
    flag = "true" if replica_identity_full else "false"
    exclusions = _exclusions_statement(exclude_tables, exclude_columns)
    return [
        _WAL_LEVEL_WARNING,
        *_SETUP,
        _EVENT_FUNCTION.format(replica_identity_full=flag),
        _REVOKE_EVENT_FUNCTION,
        *([exclusions] if exclusions is not None else []),
        f"SELECT bemi_tt.track_all({flag})",
        _PUBLISH,
        "DROP EVENT TRIGGER IF EXISTS bemi_tt_track_new_tables",
        _EVENT_TRIGGER,
    ]


def _exclusions_statement(
    exclude_tables: Iterable[str] | None, exclude_columns: Mapping[str, Iterable[str]] | None
) -> str | None:
    """``SELECT bemi_tt.set_exclusions(...)`` for install's arguments; None when both are None (keep)."""
    if exclude_tables is None and exclude_columns is None:
        return None
    import json

    from psycopg import sql

    from capture.exclude import parse_exclusions

    parsed = parse_exclusions(exclude_tables, exclude_columns)
    tables = [{"schema": s, "table": t} for s, t in sorted(parsed.tables)]
    columns = [{"schema": s, "table": t, "columns": sorted(c)}
               for (s, t), c in sorted(parsed.columns.items())]
    given = [sql.SQL("NULL") if value is None else sql.SQL("{}::jsonb").format(sql.Literal(json.dumps(value)))
             for value in (tables if exclude_tables is not None else None,
                           columns if exclude_columns is not None else None)]
    return sql.SQL("SELECT bemi_tt.set_exclusions({}, {})").format(*given).as_string(None)


def _check_excluded_keys(conn: Connection, exclusions: Exclusions) -> None:
    """Refuse to exclude a primary key column: the key is what every change is recorded under."""
    for (schema, table), columns in sorted(exclusions.columns.items()):
        keys = conn.execute(sa.text(
            "SELECT a.attname::text FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a"
            " ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)"
            " WHERE i.indisprimary AND i.indrelid = pg_catalog.to_regclass("
            " pg_catalog.quote_ident(:schema) || '.' || pg_catalog.quote_ident(:table))"
        ), {"schema": schema, "table": table}).scalars().all()
        bad = sorted(columns & set(keys))
        if bad:
            raise ConfigurationError(
                f"exclude_columns: {', '.join(bad)} of {schema}.{table} is part of its primary key, which "
                "every change is recorded under; exclude the other columns, or the whole table with "
                f"exclude_tables=[{f'{schema}.{table}'!r}]"
            )


def _merged_exclusions(
    conn: Connection,
    exclude_tables: Iterable[str] | None,
    exclude_columns: Mapping[str, Iterable[str]] | None,
) -> Exclusions:
    """The configuration install leaves: each given argument replaces its part of the stored one."""
    from capture.exclude import Exclusions, parse_exclusions

    given = parse_exclusions(exclude_tables, exclude_columns)
    stored = _stored_exclusions(conn)
    tables = given.tables if exclude_tables is not None else stored.tables
    columns = given.columns if exclude_columns is not None else stored.columns
    return Exclusions(set(tables), {k: v for k, v in columns.items() if k not in tables})


def _stored_exclusions(conn: Connection) -> Exclusions:
    """The exclusions an earlier install stored (none before the first install)."""
    from capture.exclude import READABLE, Exclusions

    # catalog lookups: to_regclass fails without USAGE on schema bemi_tt (made by a superuser's worker)
    if not conn.exec_driver_sql(READABLE, ("exclusions",)).scalar():
        return Exclusions()
    rows = conn.exec_driver_sql(
        'SELECT "schema", "table", columns FROM bemi_tt.exclusions', execution_options={"no_parameters": True}
    ).all()
    return Exclusions.from_config({"schema": r[0], "table": r[1], "columns": r[2]} for r in rows)


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
    target: Engine | Connection | str | sa.URL,
    *,
    replica_identity_full: bool = True,
    slot: str | None = None,
    start_tracking: bool = True,
    exclude_tables: Iterable[str] | None = None,
    exclude_columns: Mapping[str, Iterable[str]] | None = None,
) -> Installation:
    """Install the trigger function, triggers on existing tables and the event trigger; idempotent.

    Tracking begins when install returns: unless the worker's replication slot exists already, install
    creates it (``slot``, default ``bemi_tt_<database>``, the worker's default) and copies the rows as of
    its consistent point, which the worker's first run records as the SNAPSHOT (capture/snapshot.py).
    The slot retains WAL until a worker reads it. Where that cannot happen (``wal_level``, no
    REPLICATION, a transaction that has already written), ``warnings`` says so with the fix.

    Selective tracking (capture/exclude.py, docs/retention-and-erasure.md): ``exclude_tables`` (names,
    ``"users"`` or ``"schema.users"``; unqualified means ``public``) are not tracked at all;
    ``exclude_columns`` (``{"users": ["password_hash"]}``) never reach ``changes``, its exports or
    ``as_of``, and every schema version of the table names them. Each argument given replaces its part of
    the stored configuration (pass ``[]``/``{}`` to clear it); None keeps that part as an earlier install
    stored it. A primary key column cannot be excluded.

    A Connection runs it inside its transaction (commit it yourself, as Alembic does).
    """
    _check_flag(replica_identity_full)
    if slot is not None:
        from capture.worker import check_slot_name

        check_slot_name(slot)
    statements = install_statements(
        replica_identity_full=replica_identity_full, exclude_tables=exclude_tables,
        exclude_columns=exclude_columns,
    )
    excluding = exclude_tables is not None or exclude_columns is not None
    warnings: list[str] = []
    with _connection(target) as conn:
        _check_postgresql(conn)
        exclusions = _merged_exclusions(conn, exclude_tables, exclude_columns)
        _check_excluded_keys(conn, exclusions)
        wal_level = str(_run(conn, "SELECT pg_catalog.current_setting('wal_level')"))
        if wal_level != "logical":
            warnings.append(_WAL_LEVEL_MESSAGE.format(level=wal_level))
            log.warning(warnings[-1])
        tracking = start_tracking and wal_level == "logical"
        tracking_slot = _start_tracking(conn, slot, warnings, exclusions) if tracking else None
        from bemi_tt.bemi_compat import replace_bemi

        replace_bemi(conn, warnings)
        owners = _run(conn, _OTHER_OWNERS)
        if owners and excluding and _stored_exclusions(conn).config() != exclusions.config():
            raise ConfigurationError(
                f"cannot change the tracked tables and columns: schema bemi_tt and its functions belong to "
                f"role {owners}; run bemi_tt.install(engine, exclude_tables=..., exclude_columns=...) as "
                "that role or a superuser"
            )
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
            return Installation(0, event_trigger, wal_level, tuple(warnings), tracking_slot)
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
        _secure(conn, warnings)
    return Installation(changed, event_trigger, wal_level, tuple(warnings), tracking_slot)


_SLOT_STATE = (
    "SELECT pg_catalog.current_database()::text, pg_catalog.pg_current_xact_id_if_assigned() IS NOT NULL,"
    " (SELECT pg_catalog.array_agg(s.slot_name::text) FROM pg_catalog.pg_replication_slots s"
    "  WHERE s.database = pg_catalog.current_database() AND s.plugin = 'pgoutput' AND NOT s.temporary)"
)


def _start_tracking(
    conn: Connection, slot: str | None, warnings: list[str], exclusions: Exclusions | None = None
) -> str | None:
    """Create the worker's slot with its snapshot unless it exists; the slot name, None if impossible.

    Runs before install writes anything in ``conn``'s transaction: creating a logical slot waits for
    every transaction holding an xid to end, so from a transaction that has written it would wait for
    itself.
    """
    from capture.source import LEGACY_SLOT, default_slot_name

    row = conn.exec_driver_sql(_SLOT_STATE, execution_options={"no_parameters": True}).one()
    database, has_written, existing = str(row[0]), bool(row[1]), set(row[2] or ())
    if slot is None:
        slot = LEGACY_SLOT if LEGACY_SLOT in existing else default_slot_name(database)
    if slot in existing:
        return slot  # tracking began when it was created (by an earlier install or the worker)
    if has_written:
        warnings.append(
            f"bemi_tt: replication slot {slot} not created, because this transaction has already written "
            "(creating a slot waits for it to end), so tracking begins only when the capture worker first "
            "runs: run bemi-tt install URL after this transaction commits, or use Bemi.migration_upgrade() "
            "(it installs in an autocommit block)"
        )
        log.warning(warnings[-1])
        return None
    conninfo = _conninfo(conn)
    if conninfo is None:
        warnings.append(
            f"bemi_tt: replication slot {slot} not created: cannot open a second connection like this "
            f"{conn.dialect.driver} connection; run bemi-tt install URL to start tracking now"
        )
        log.warning(warnings[-1])
        return None
    import psycopg

    from capture.snapshot import stage_snapshot

    row = conn.exec_driver_sql(_MAY_REPLICATE, execution_options={"no_parameters": True}).one()
    user, may_replicate = str(row[0]), bool(row[1])
    try:
        if not may_replicate:
            raise psycopg.errors.InsufficientPrivilege("the role has no REPLICATION attribute")
        stage_snapshot(conninfo, slot, exclusions=exclusions)  # excluded tables/columns never copied
    except ConfigurationError as exc:  # the publication is missing and this role may not create it
        warnings.append(f"bemi_tt: tracking begins only when the capture worker first runs: {exc}")
        log.warning(warnings[-1])
        return None
    except psycopg.errors.InsufficientPrivilege as exc:
        warnings.append(
            f"bemi_tt: role {user} may not create replication slots ({one_line(str(exc))}), so tracking "
            f"begins only when the capture worker first runs: run ALTER ROLE {user} REPLICATION; (on "
            f"Amazon RDS: GRANT rds_replication TO {user};) and bemi-tt install again, or start the worker"
            " now"
        )
        log.warning(warnings[-1])
        return None
    except psycopg.errors.DuplicateObject:
        return slot  # created meanwhile by a worker starting at the same time
    except psycopg.errors.LockNotAvailable:
        warnings.append(
            f"bemi_tt: replication slot {slot} not created: transactions that were running kept it from "
            "becoming consistent (a new slot waits for them to end), so tracking begins only when the "
            "capture worker first runs; run bemi-tt install again once they have finished"
        )
        log.warning(warnings[-1])
        return None
    except psycopg.Error as exc:
        warnings.append(
            f"bemi_tt: replication slot {slot} not created ({one_line(str(exc))}): tracking begins only "
            "when the capture worker first runs"
        )
        log.warning(warnings[-1])
        return None
    log.info(
        "bemi_tt: tracking began in replication slot %s; it retains WAL until bemi-tt capture reads it "
        "(cap it with max_slot_wal_keep_size)",
        slot,
    )
    return slot


# rds_replication (Amazon RDS/Aurora) grants replication through membership, not the attribute
_MAY_REPLICATE = (
    "SELECT r.rolname::text, r.rolsuper OR r.rolreplication OR EXISTS (SELECT FROM pg_catalog.pg_roles g"
    " WHERE g.rolname = 'rds_replication' AND pg_catalog.pg_has_role(r.oid, g.oid, 'MEMBER'))"
    " FROM pg_catalog.pg_roles r WHERE r.rolname = current_user"
)


def _conninfo(conn: Connection) -> str | None:
    """A libpq connection string to the database ``conn`` is connected to, as the same role."""
    from psycopg.conninfo import make_conninfo

    dbapi = conn.connection.dbapi_connection
    info = getattr(dbapi, "info", None)
    params: dict[str, Any] | None = None
    password: str | None = None
    if info is not None and hasattr(info, "get_parameters"):  # psycopg 3
        params = dict(info.get_parameters())
        password = info.password
    elif info is not None and hasattr(info, "dsn_parameters"):  # psycopg2
        params = {k: v for k, v in info.dsn_parameters.items() if k in _LIBPQ_KEYS}
        password = info.password
    else:
        url = conn.engine.url
        if url.database is None:
            return None
        params = {k: v for k, v in url.query.items() if k in _LIBPQ_KEYS and isinstance(v, str)}
        for key, value in (("host", url.host), ("port", url.port), ("dbname", url.database),
                           ("user", url.username)):
            if value is not None:
                params[key] = str(value)
        password = url.password if isinstance(url.password, str) else None
    if password:
        params["password"] = password
    params.pop("replication", None)
    return make_conninfo("", **params)


_LIBPQ_KEYS = frozenset(
    (
        "host", "hostaddr", "port", "dbname", "user", "sslmode", "sslrootcert", "sslcert", "sslkey",
        "sslcrl", "options", "application_name", "target_session_attrs", "gssencmode", "krbsrvname",
        "service", "passfile", "channel_binding",
    )
)


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


def grant_statements(
    *, database: str, application: str, installer: str, worker: str, schema: str = "public"
) -> dict[str, list[str]]:
    """The least-privilege set-up (docs/privileges.md), as SQL: who runs what, in order.

    ``"admin"`` (a superuser, or on managed PostgreSQL the administrator role, once): the three roles and
    their rights, and ``pg_logical_emit_message`` for the installer only (a true superuser only; see
    docs/privileges.md). ``"installer"`` (the tables' owner, after ``bemi-tt install``): what the worker
    reads. ``"worker"`` (after its first run): nobody else may write its tables.
    Nobody is a superuser: the installer has REPLICATION (to create the slot at install) and owns the
    tables; the worker has REPLICATION and creates its tables in ``schema``; the application only writes.
    On Amazon RDS/Aurora use ``GRANT rds_replication TO <role>`` instead of ``ALTER ROLE ... REPLICATION``.
    """
    from psycopg import sql

    def q(text: str, **names: str) -> str:
        return sql.SQL(text).format(**{k: sql.Identifier(v) for k, v in names.items()}).as_string(None)

    return {
        "admin": [
            q("CREATE ROLE {r} LOGIN", r=application),
            q("CREATE ROLE {r} LOGIN REPLICATION", r=installer),
            q("CREATE ROLE {r} LOGIN REPLICATION", r=worker),
            # schema bemi_tt and publication bemi_tt (CREATE PUBLICATION needs CREATE on the database)
            q("GRANT CREATE ON DATABASE {d} TO {r}", d=database, r=installer),
            q("GRANT USAGE, CREATE ON SCHEMA {s} TO {r}", s=schema, r=installer),
            # the worker's changes, changes_schemas and changes_positions (it runs CREATE SCHEMA IF NOT
            # EXISTS first, which PostgreSQL checks against the database)
            q("GRANT CREATE ON DATABASE {d} TO {r}", d=database, r=worker),
            q("GRANT USAGE, CREATE ON SCHEMA {s} TO {r}", s=schema, r=worker),
            q("GRANT USAGE ON SCHEMA {s} TO {r}", s=schema, r=application),
            # only the trigger may emit 'bemi' messages: it runs as the installer (SECURITY DEFINER), so
            # the installer keeps EXECUTE and PUBLIC (the application) loses it. A DO block because the
            # signatures differ (PostgreSQL 17 added a flush argument); only a superuser may run it.
            _emit_grants(installer),
        ],
        "installer": [
            # the rows install copied when tracking began: the worker records them, then deletes them
            q("GRANT SELECT, DELETE ON bemi_tt.snapshots, bemi_tt.snapshot_rows TO {r}", r=worker),
            # the application's own rights on its tables, as usual
            q("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {r}",
              s=schema, r=application),
            q("ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {r}",
              s=schema, r=application),
        ],
        "worker": [
            # after the worker's first run (it creates them): its record is written by the worker only
            # (PostgreSQL grants nobody else anything by default; this undoes any grant made since)
            q("REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {s}.changes, {s}.changes_schemas,"
              " {s}.changes_positions, {s}.changes_digests FROM PUBLIC, {r}", s=schema, r=application),
        ],
    }


def _emit_grants(installer: str) -> str:
    """A DO block: EXECUTE on every ``pg_logical_emit_message`` signature for ``installer`` only."""
    from psycopg import sql

    role = sql.Literal(sql.Identifier(installer).as_string(None)).as_string(None)
    if "$bemi$" in role:
        raise ConfigurationError(f"role name {installer!r} contains $bemi$; choose another name")
    return (
        "DO $bemi$ DECLARE f pg_catalog.regprocedure; BEGIN FOR f IN " + _EMIT_FUNCTIONS + " LOOP"
        " EXECUTE 'GRANT EXECUTE ON FUNCTION ' || f::text || ' TO ' || " + role + ";"
        " EXECUTE 'REVOKE EXECUTE ON FUNCTION ' || f::text || ' FROM PUBLIC'; END LOOP; END $bemi$"
    )


#: The capture worker's tables (capture/schema.py, capture/sink.py); its index is "changes_table_key_idx".
WORKER_TABLES = frozenset(_WORKER_TABLE_NAMES)


def include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object | None
) -> bool:
    """Alembic ``include_object`` hook: autogenerate leaves bemi_tt's and the worker's objects alone.

    The worker creates ``changes``, ``changes_schemas``, ``changes_positions`` (and their indexes) in the
    application's schema, and install creates schema ``bemi_tt``; none is in the application's metadata,
    so autogenerate would propose dropping them. Wire it in env.py:
    ``context.configure(..., include_object=bemi_tt.triggers.include_object)`` (chain your own if any).
    A table of the application's own metadata with one of those names is still compared.
    """
    if not reflected or compare_to is not None:
        return True  # in the application's metadata: the application owns it
    table = getattr(obj, "table", None) if type_ in ("index", "column", "unique_constraint",
                                                       "foreign_key_constraint") else obj
    table_name = getattr(table, "name", name)
    schema = getattr(table, "schema", None)
    if schema == SCHEMA:
        return False
    return table_name not in WORKER_TABLES


def migration_upgrade(
    *,
    replica_identity_full: bool = True,
    exclude_tables: Iterable[str] | None = None,
    exclude_columns: Mapping[str, Iterable[str]] | None = None,
) -> None:
    """Install tracking from inside an Alembic migration (online: on its connection; offline: as SQL).

    ``exclude_tables``/``exclude_columns``: as for :func:`install` (None keeps the stored ones).
    """
    from alembic import op

    migration = op.get_context()
    if migration.as_sql:
        for statement in install_statements(
            replica_identity_full=replica_identity_full, exclude_tables=exclude_tables,
            exclude_columns=exclude_columns,
        ):
            op.execute(sa.text(statement))
        for statement in _offline_extras():
            op.execute(sa.text(statement))
        return
    # The worker's slot can only be created outside a transaction that has written (it would wait for
    # it): so the migration's work so far is committed, and the slot with its snapshot is created in
    # autocommit mode; then install runs in the migration's transaction. Tracking thus begins when this
    # call returns (changes made later in the migration are recorded too).
    with migration.autocommit_block():
        bind = op.get_bind()
        exclusions = _merged_exclusions(bind, exclude_tables, exclude_columns)
        _start_tracking(bind, None, [], exclusions)  # its warnings come again from install, below
    install(op.get_bind(), replica_identity_full=replica_identity_full, exclude_tables=exclude_tables,
            exclude_columns=exclude_columns)


def _offline_extras() -> list[str]:
    """What online install adds to ``install_statements`` (for Alembic ``--sql``): replacing the original
    package's objects, schema-change tracking, and a notice that the slot is not created offline."""
    from bemi_tt.bemi_compat import REPLACE_BEMI
    from capture.ddl import install_statements as ddl_statements

    return [
        *REPLACE_BEMI,
        *ddl_statements(),
        _SECURE,
        "DO $$ BEGIN RAISE NOTICE 'bemi_tt: tracking begins when the capture worker first runs: SQL cannot "
        "create its replication slot with a snapshot; run bemi-tt install URL right after this script "
        "to begin now'; END $$",
    ]


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
