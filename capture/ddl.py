"""Schema changes into the WAL: event triggers emitting ``bemi_ddl`` (and row) logical messages.

Logical decoding carries no DDL, and some DDL changes values without any row change. The event trigger
runs at the end of ``CREATE TABLE``, ``ALTER TABLE`` (and ``CREATE TABLE AS`` / ``SELECT INTO``) and
after ``DROP TABLE``, and emits, inside the same transaction, ``pg_logical_emit_message(true,
'bemi_ddl', json)`` with::

    {"event": "ALTER TABLE", "schema": "public", "table": "todo", "oid": 16385, "replica_identity": "f",
     "columns": [{"name": "id", "attnum": 1, "type": "integer", "type_oid": 23, "key": true}, ...,
                 {"name": "done", "attnum": 3, "type": "boolean", "type_oid": 16, "key": false,
                  "fill_text": "f"}]}

``oid`` is the relation's OID (a dropped and recreated table is a new relation), ``attnum`` the
column's attribute number (a rename keeps it), ``replica_identity`` ``pg_class.relreplident``.
``columns`` lists the table's columns after the command, those pgoutput sends: no generated columns
before PostgreSQL 18, STORED ones from 18 on (the worker's publication sets ``publish_generated_columns``);
``key`` marks primary key columns; ``fill_text`` is the text value that rows existing before the command
take for the column (``pg_attribute.attmissingval``), absent when there is none. A dropped table has
``"columns": null``. Partitions are skipped (changes are recorded under the partitioned root).
More ``event`` values: ``TRACK`` (install: every table, with ``"empty"``), ``UNTRACK`` (uninstall: a
tracking gap begins), ``REWRITE`` (a DDL rewrote values, with ``"captured"``, ``"reason"`` and the
rewritten ``"partition"``; the rows follow as ``bemi_rewrite`` messages). A TRUNCATE of a partition
writes its rows as ``bemi_truncate`` messages (triggers on the partitions, see ``_TRUNCATE_FUNCTIONS``).
``ATTACH PARTITION`` / ``DETACH PARTITION`` (the root's message with ``"partition"``): the moved rows follow
as ``bemi_rewrite`` messages with ``"op": "CREATE"`` (attached: rows of the root; detached: rows of the
detached table, a relation of its own from here) and ``bemi_truncate`` ones (detached: gone from the root);
an attached table's own relation ends (``"columns": null``). ``ALTER TABLE … DISABLE/ENABLE TRIGGER`` on
tracking's triggers: ``UNTRACK`` with ``"what": "truncate"`` (a partition's TRUNCATE trigger: rows can
vanish unrecorded) or ``"context"`` (the context trigger: rows stay exact), ``TRACK`` (``"what":
"triggers"``) once all are enabled again.
The worker turns these into ``changes_schemas`` rows and ``changes`` rows at the exact position.

The DDL functions fire for every role's DDL and run as the installer (``SECURITY DEFINER``, a fixed
``search_path``): install revokes ``pg_logical_emit_message`` from PUBLIC where it may
(docs/privileges.md), so the caller may not emit. They read the catalog and the rewritten table (when
the installer may not, the REWRITE is recorded with ``"captured": false``, a gap), so no role's DDL can
fail on a privilege; nobody can call an event trigger function directly. The partition trigger
functions run as the installer too.

Cost: a rewrite writes every row of the table into the WAL once more (about the row's text size plus
~60 bytes) and the worker records one UPDATE per row; for a large table, ``SET LOCAL
bemi_tt.capture_rewrites = off`` in that migration skips it and records the gap instead. A TRUNCATE
of a partition (not of the root) costs the same per row of that partition.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from capture.errors import ConfigurationError
from capture.protocol import worker_table_sql

__all__ = ["ddl_tracking_installed", "install_ddl_tracking", "install_statements", "uninstall_ddl_tracking"]

log = logging.getLogger(__name__)

# The message for one table (its columns as pgoutput sends them, attnums, primary key, replica identity),
# shared by the event trigger and install/uninstall's tracking records. Inlined in each function:
# emit_tracking runs as the caller of install/uninstall, so nothing else in schema bemi_tt is called.
_MESSAGE = """(
  SELECT pg_catalog.jsonb_build_object(
    'event', {event}, 'schema', n.nspname, 'table', c.relname, 'oid', c.oid,
    'replica_identity', c.relreplident::text,
    'columns', (
      SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
               'name', a.attname, 'attnum', a.attnum,
               'type', pg_catalog.format_type(a.atttypid, a.atttypmod),
               'type_oid', a.atttypid, 'key', coalesce(a.attnum = ANY (i.indkey), false),
               'fill_text', CASE WHEN a.atthasmissing
                                 THEN pg_catalog.array_to_string(a.attmissingval, '') END))
             ORDER BY a.attnum)
      FROM pg_catalog.pg_attribute a
      LEFT JOIN pg_catalog.pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        -- PostgreSQL 18 publishes STORED generated columns (the worker's publication asks for them)
        AND (a.attgenerated = '' OR a.attgenerated = 's'
             AND pg_catalog.current_setting('server_version_num')::int >= 180000)))
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  WHERE c.oid = {rel} AND c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence = 'p'
    AND n.nspname <> 'information_schema' AND NOT pg_catalog.starts_with(n.nspname, 'pg_'))"""
# A rewrite (ALTER COLUMN TYPE, ADD COLUMN with a volatile default) gives rows new values without row
# changes. The table_rewrite event trigger notes each rewritten relation (and why) in a transaction-local
# setting; at ddl_command_end, after the version messages, emit_ddl writes one ``bemi_rewrite`` message
# per row of it with the new values ({"root": <oid>, "row": {column: text}}, text in the worker's output
# settings), which the worker records as UPDATEs right after the version, in the ALTER's transaction.
# Rewrites that change no value (SET LOGGED/UNLOGGED, SET ACCESS METHOD: reason bits 1 and 8) write
# nothing. ``SET LOCAL bemi_tt.capture_rewrites = off`` skips the rows: the version then says so
# (``"captured": false``), a gap in the record, never a silent one.
_REWRITE_FUNCTION = """
CREATE OR REPLACE FUNCTION bemi_tt.note_rewrite() RETURNS event_trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $bemi$
BEGIN
  PERFORM pg_catalog.set_config('bemi_tt.rewritten',
    coalesce(pg_catalog.current_setting('bemi_tt.rewritten', true), '')
    || pg_catalog.pg_event_trigger_table_rewrite_oid() || ':'
    || pg_catalog.pg_event_trigger_table_rewrite_reason() || ',', true);
END
$bemi$
"""
_FUNCTIONS = """
CREATE OR REPLACE FUNCTION bemi_tt.emit_ddl() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET DateStyle = 'ISO' SET TimeZone = 'UTC' SET extra_float_digits = 3
SET IntervalStyle = 'postgres' SET bytea_output = 'hex' AS $bemi$
DECLARE
  obj record;
  msg jsonb;
  rw record;
  root oid;
  capture boolean;
  names text;
  texts text;
BEGIN
  FOR obj IN SELECT DISTINCT e.objid, e.command_tag FROM pg_catalog.pg_event_trigger_ddl_commands() AS e
             WHERE e.classid = 'pg_catalog.pg_class'::regclass AND e.object_type IN ('table', 'table column')
  LOOP
    msg := """ + _MESSAGE.format(rel="obj.objid", event="obj.command_tag") + """;
    IF msg IS NOT NULL THEN
      PERFORM pg_catalog.pg_logical_emit_message(true, 'bemi_ddl', msg::text);
    END IF;
    -- ALTER TABLE ... DISABLE/ENABLE TRIGGER on tracking's own triggers: a gap begins or ends (a disabled
    -- partition TRUNCATE trigger loses rows; a disabled context trigger only the context)
    CONTINUE WHEN obj.command_tag <> 'ALTER TABLE'
      OR pg_catalog.current_query() !~* '(dis|en)able[^;]*trigger';
    root := coalesce(pg_catalog.pg_partition_root(obj.objid), obj.objid);
    SELECT pg_catalog.string_agg(DISTINCT CASE WHEN t.tgname = 'bemi_tt_context' THEN 'context'
                                               ELSE 'truncate' END, ',')
      INTO names
      FROM (SELECT root AS relid UNION SELECT relid FROM pg_catalog.pg_partition_tree(root)) p
      JOIN pg_catalog.pg_trigger t ON t.tgrelid = p.relid
      WHERE t.tgname IN ('bemi_tt_context', 'bemi_tt_truncate', 'bemi_tt_truncate_done')
        AND t.tgenabled IN ('D', 'R');
    CONTINUE WHEN NOT EXISTS (SELECT FROM pg_catalog.pg_trigger t WHERE t.tgrelid = root
                              AND t.tgname IN ('bemi_tt_context', 'bemi_tt_truncate'));
    msg := """ + _MESSAGE.format(rel="root", event="'TRACK'") + """;
    CONTINUE WHEN msg IS NULL;
    PERFORM pg_catalog.pg_logical_emit_message(true, 'bemi_ddl', (msg || CASE WHEN names IS NULL
      THEN pg_catalog.jsonb_build_object('event', 'TRACK', 'what', 'triggers')
      ELSE pg_catalog.jsonb_build_object('event', 'UNTRACK', 'reason', 'DISABLE TRIGGER',
             'what', CASE WHEN pg_catalog.strpos(names, 'truncate') > 0 THEN 'truncate' ELSE 'context' END)
      END)::text);
  END LOOP;
  IF coalesce(pg_catalog.current_setting('bemi_tt.rewritten', true), '') = '' THEN
    RETURN;
  END IF;
  capture := coalesce(pg_catalog.current_setting('bemi_tt.capture_rewrites', true), '')
             NOT IN ('off', 'false', 'no', '0');
  FOR rw IN SELECT pg_catalog.split_part(x, ':', 1)::oid AS rel, pg_catalog.split_part(x, ':', 2)::int AS why
            FROM pg_catalog.unnest(pg_catalog.string_to_array(
              pg_catalog.btrim(pg_catalog.current_setting('bemi_tt.rewritten'), ','), ',')) AS x
  LOOP
    CONTINUE WHEN rw.why & 6 = 0;  -- persistence or access method: no value changed
    root := coalesce(pg_catalog.pg_partition_root(rw.rel), rw.rel);
    -- the capture worker's own tables (never recorded; ``changes`` may be huge)
    CONTINUE WHEN EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.oid = root
                          AND """ + worker_table_sql("c") + """);
    msg := """ + _MESSAGE.format(rel="root", event="'REWRITE'") + """;
    CONTINUE WHEN msg IS NULL;
    -- the owner (a non-superuser's install) may not read another role's table: a recorded gap, no error
    capture := capture AND pg_catalog.has_table_privilege(rw.rel, 'SELECT');
    PERFORM pg_catalog.pg_logical_emit_message(true, 'bemi_ddl', (msg || pg_catalog.jsonb_build_object(
      'captured', capture, 'reason', rw.why, 'partition', CASE WHEN rw.rel <> root THEN rw.rel END))::text);
    CONTINUE WHEN NOT capture;
    SELECT pg_catalog.string_agg(pg_catalog.quote_literal(a.attname), ', ' ORDER BY a.attnum),
           pg_catalog.string_agg(pg_catalog.quote_ident(a.attname) || '::text', ', ' ORDER BY a.attnum)
      INTO names, texts
      FROM pg_catalog.pg_attribute a WHERE a.attrelid = rw.rel AND a.attnum > 0 AND NOT a.attisdropped;
    EXECUTE 'SELECT count(pg_catalog.pg_logical_emit_message(true, ''bemi_rewrite'','
      || ' pg_catalog.jsonb_build_object(''root'', ' || root || ', ''row'', pg_catalog.jsonb_object(ARRAY['
      || names || ']::text[], ARRAY[' || texts || ']::text[]))::text)) FROM ONLY '
      || rw.rel::pg_catalog.regclass::text;
  END LOOP;
  PERFORM pg_catalog.set_config('bemi_tt.rewritten', '', true);
END
$bemi$
"""
# Tracking gaps are data: install records every table as tracked from here on (with whether it is empty,
# so a table created while tracking was off has an exact start), uninstall records the gap's start.
_EMIT_TRACKING = """
CREATE OR REPLACE FUNCTION bemi_tt.emit_tracking(event text) RETURNS bigint LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $bemi$
DECLARE
  r record;
  msg jsonb;
  empty boolean;
  emitted bigint := 0;
BEGIN
  FOR r IN SELECT c.oid, c.relkind FROM pg_catalog.pg_class c
           WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY c.oid LOOP
    msg := """ + _MESSAGE.format(rel="r.oid", event="event") + """;
    CONTINUE WHEN msg IS NULL;
    empty := NULL;
    IF event = 'TRACK' THEN
      BEGIN
        -- (concatenated, not format(): a driver given parameters reads its percent signs as placeholders)
        EXECUTE 'SELECT NOT EXISTS (SELECT FROM ' || CASE WHEN r.relkind = 'p' THEN '' ELSE 'ONLY ' END
                || r.oid::pg_catalog.regclass::text || ')' INTO empty;
      EXCEPTION WHEN insufficient_privilege THEN
        empty := NULL;  -- unknown: the reader must re-baseline (snapshot) or refuse
      END;
    END IF;
    PERFORM pg_catalog.pg_logical_emit_message(true, 'bemi_ddl',
      (msg || pg_catalog.jsonb_build_object('what', 'ddl', 'empty', empty))::text);
    emitted := emitted + 1;
  END LOOP;
  RETURN emitted;
END
$bemi$
"""
_DROP_FUNCTION = """
CREATE OR REPLACE FUNCTION bemi_tt.emit_drop() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $bemi$
DECLARE
  obj record;
BEGIN
  FOR obj IN SELECT * FROM pg_catalog.pg_event_trigger_dropped_objects() AS d
             WHERE d.object_type = 'table' AND d.original AND NOT d.is_temporary
  LOOP
    PERFORM pg_catalog.pg_logical_emit_message(true, 'bemi_ddl', pg_catalog.jsonb_build_object(
      'event', 'DROP TABLE', 'schema', obj.schema_name, 'table', obj.object_name, 'oid', obj.objid,
      'columns', NULL)::text);
  END LOOP;
END
$bemi$
"""


# TRUNCATE of a partition: pgoutput publishes partitions through their root and sends no Truncate for
# a partition (only for a root named by the TRUNCATE), so a statement trigger on each leaf partition
# writes, before the rows go, one ``bemi_truncate`` message per row: {"root": <root oid>, "partition":
# <oid>, "row": {column: text}}, the text in the worker's own output settings (function SET clauses),
# which the worker records as a DELETE of the root. A TRUNCATE of the root itself (which empties every
# partition) is sent by pgoutput as one TRUNCATE: the root's BEFORE trigger, which fires before its
# partitions', marks the root in a transaction-local setting so they write nothing (its AFTER trigger
# clears the mark). SECURITY DEFINER: a role may hold TRUNCATE without SELECT; the rows go to the WAL only.
_TRUNCATE_FUNCTIONS = (
    """
CREATE OR REPLACE FUNCTION bemi_tt.emit_truncate() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET DateStyle = 'ISO' SET TimeZone = 'UTC' SET extra_float_digits = 3
SET IntervalStyle = 'postgres' SET bytea_output = 'hex' AS $bemi$
DECLARE
  root oid := pg_catalog.pg_partition_root(TG_RELID);
  names text;
  texts text;
BEGIN
  IF TG_WHEN = 'BEFORE' AND TG_RELID = root THEN
    PERFORM pg_catalog.set_config('bemi_tt.truncating_roots',
      coalesce(pg_catalog.current_setting('bemi_tt.truncating_roots', true), '') || ',' || root || ',', true);
    RETURN NULL;
  ELSIF TG_RELID = root THEN
    PERFORM pg_catalog.set_config('bemi_tt.truncating_roots', '', true);
    RETURN NULL;
  END IF;
  IF pg_catalog.strpos(coalesce(pg_catalog.current_setting('bemi_tt.truncating_roots', true), ''),
                       ',' || root || ',') > 0 THEN
    RETURN NULL;  -- the root's own TRUNCATE covers this partition
  END IF;
  SELECT pg_catalog.string_agg(pg_catalog.quote_literal(a.attname), ', ' ORDER BY a.attnum),
         pg_catalog.string_agg(pg_catalog.quote_ident(a.attname) || '::text', ', ' ORDER BY a.attnum)
    INTO names, texts
    FROM pg_catalog.pg_attribute a WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped;
  EXECUTE 'SELECT count(pg_catalog.pg_logical_emit_message(true, ''bemi_truncate'','
    || ' pg_catalog.jsonb_build_object(''root'', ' || root || ', ''partition'', ' || TG_RELID
    || ', ''row'', pg_catalog.jsonb_object(ARRAY[' || names || ']::text[], ARRAY[' || texts
    || ']::text[]))::text)) FROM ONLY ' || TG_RELID::pg_catalog.regclass::text;
  RETURN NULL;
END
$bemi$
""",
    """
CREATE OR REPLACE FUNCTION bemi_tt.track_truncates(rel oid) RETURNS integer LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $bemi$
DECLARE
  r record;
  made integer := 0;
BEGIN
  FOR r IN SELECT t.relid, c.relkind, c.relispartition FROM pg_catalog.pg_partition_tree(rel) t
           JOIN pg_catalog.pg_class c ON c.oid = t.relid
           WHERE (t.isleaf AND c.relkind = 'r' AND c.relispartition)
              OR (c.relkind = 'p' AND NOT c.relispartition)
  LOOP
    CONTINUE WHEN EXISTS (SELECT FROM pg_catalog.pg_trigger g WHERE g.tgrelid = r.relid
                          AND g.tgname = 'bemi_tt_truncate');
    BEGIN
      EXECUTE 'CREATE TRIGGER bemi_tt_truncate BEFORE TRUNCATE ON ' || r.relid::pg_catalog.regclass::text
        || ' FOR EACH STATEMENT EXECUTE FUNCTION bemi_tt.emit_truncate()';
      IF r.relkind = 'p' THEN
        EXECUTE 'CREATE TRIGGER bemi_tt_truncate_done AFTER TRUNCATE ON '
          || r.relid::pg_catalog.regclass::text
          || ' FOR EACH STATEMENT EXECUTE FUNCTION bemi_tt.emit_truncate()';
      END IF;
      made := made + 1;
    EXCEPTION WHEN insufficient_privilege THEN
      RAISE WARNING USING MESSAGE = 'bemi_tt: a TRUNCATE of partition '
        || r.relid::pg_catalog.regclass::text || ' will not be recorded: ' || SQLERRM,
        HINT = 'run bemi-tt install as a superuser';
    END;
  END LOOP;
  RETURN made;
END
$bemi$
""",
    """
CREATE OR REPLACE FUNCTION bemi_tt.track_new_partitions() RETURNS event_trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET DateStyle = 'ISO' SET TimeZone = 'UTC'
SET extra_float_digits = 3 SET IntervalStyle = 'postgres' SET bytea_output = 'hex' AS $bemi$
DECLARE
  obj record;
  part_leaf record;
  parent oid;
  top oid;
  msg jsonb;
  part jsonb;
  names text;
  texts text;
  seen oid[] := '{}';
  tops oid[];
BEGIN
  FOR obj IN SELECT DISTINCT e.objid, e.command_tag FROM pg_catalog.pg_event_trigger_ddl_commands() AS e
             JOIN pg_catalog.pg_class c ON c.oid = e.objid
             WHERE e.classid = 'pg_catalog.pg_class'::regclass AND c.relkind IN ('r', 'p')
               AND (c.relispartition OR c.relkind = 'p')
  LOOP
    parent := pg_catalog.pg_partition_root(obj.objid);
    PERFORM bemi_tt.track_truncates(parent);
    CONTINUE WHEN parent = ANY (seen);
    seen := seen || parent;
    tops := '{}';
    -- leaves that joined the tree: ATTACH PARTITION made their rows rows of the parent (recorded as
    -- CREATEs of the parent; the attached table, a relation of its own until now, ends)
    FOR part_leaf IN SELECT t.relid FROM pg_catalog.pg_partition_tree(parent) t
                JOIN pg_catalog.pg_class c ON c.oid = t.relid
                WHERE t.isleaf AND c.relkind = 'r' AND t.relid <> parent
                  AND NOT EXISTS (SELECT FROM bemi_tt.partitions p WHERE p.leaf = t.relid AND p.root = parent)
    LOOP
      DELETE FROM bemi_tt.partitions p WHERE p.leaf = part_leaf.relid;
      INSERT INTO bemi_tt.partitions (leaf, root) VALUES (part_leaf.relid, parent);
      CONTINUE WHEN obj.command_tag <> 'ALTER TABLE';  -- CREATE TABLE ... PARTITION OF: empty
      SELECT a.relid INTO top FROM pg_catalog.pg_partition_ancestors(part_leaf.relid) a
        JOIN pg_catalog.pg_inherits i ON i.inhrelid = a.relid WHERE i.inhparent = parent;
      IF NOT top = ANY (tops) THEN
        tops := tops || top;
        SELECT pg_catalog.jsonb_build_object('oid', c.oid, 'schema', n.nspname, 'table', c.relname)
          INTO part FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = top;
        msg := """ + _MESSAGE.format(rel="parent", event="'ATTACH PARTITION'") + """;
        CONTINUE WHEN msg IS NULL;
        PERFORM pg_catalog.pg_logical_emit_message(true, 'bemi_ddl',
          (msg || pg_catalog.jsonb_build_object('partition', part))::text);
        PERFORM pg_catalog.pg_logical_emit_message(true, 'bemi_ddl', (part || pg_catalog.jsonb_build_object(
          'event', 'ATTACH PARTITION', 'columns', NULL))::text);
      END IF;
      SELECT pg_catalog.string_agg(pg_catalog.quote_literal(a.attname), ', ' ORDER BY a.attnum),
             pg_catalog.string_agg(pg_catalog.quote_ident(a.attname) || '::text', ', ' ORDER BY a.attnum)
        INTO names, texts
        FROM pg_catalog.pg_attribute a
        WHERE a.attrelid = part_leaf.relid AND a.attnum > 0 AND NOT a.attisdropped;
      EXECUTE 'SELECT count(pg_catalog.pg_logical_emit_message(true, ''bemi_rewrite'','
        || ' pg_catalog.jsonb_build_object(''root'', ' || parent || ', ''op'', ''CREATE'', ''row'','
        || ' pg_catalog.jsonb_object(ARRAY[' || names || ']::text[], ARRAY[' || texts || ']::text[]))::text))'
        || ' FROM ONLY ' || part_leaf.relid::pg_catalog.regclass::text;
    END LOOP;
    -- leaves that left it: DETACH PARTITION took their rows out of the parent (recorded as DELETEs of the
    -- parent) into a relation of its own (a new relation starting with those rows as CREATEs)
    tops := '{}';
    FOR part_leaf IN SELECT p.leaf AS relid FROM bemi_tt.partitions p WHERE p.root = parent
                AND NOT EXISTS (SELECT FROM pg_catalog.pg_partition_tree(parent) t WHERE t.relid = p.leaf)
    LOOP
      DELETE FROM bemi_tt.partitions p WHERE p.leaf = part_leaf.relid;
      CONTINUE WHEN NOT EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.oid = part_leaf.relid);  -- dropped
      top := coalesce(pg_catalog.pg_partition_root(part_leaf.relid), part_leaf.relid);
      IF NOT top = ANY (tops) THEN
        tops := tops || top;
        SELECT pg_catalog.jsonb_build_object('oid', c.oid, 'schema', n.nspname, 'table', c.relname)
          INTO part FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = top;
        msg := """ + _MESSAGE.format(rel="parent", event="'DETACH PARTITION'") + """;
        IF msg IS NOT NULL THEN
          PERFORM pg_catalog.pg_logical_emit_message(true, 'bemi_ddl',
            (msg || pg_catalog.jsonb_build_object('partition', part))::text);
        END IF;
        msg := """ + _MESSAGE.format(rel="top", event="'DETACH PARTITION'") + """;
        IF msg IS NOT NULL THEN
          PERFORM pg_catalog.pg_logical_emit_message(true, 'bemi_ddl', msg::text);
        END IF;
      END IF;
      SELECT pg_catalog.string_agg(pg_catalog.quote_literal(a.attname), ', ' ORDER BY a.attnum),
             pg_catalog.string_agg(pg_catalog.quote_ident(a.attname) || '::text', ', ' ORDER BY a.attnum)
        INTO names, texts
        FROM pg_catalog.pg_attribute a
        WHERE a.attrelid = part_leaf.relid AND a.attnum > 0 AND NOT a.attisdropped;
      EXECUTE 'SELECT count(pg_catalog.pg_logical_emit_message(true, ''bemi_truncate'','
        || ' pg_catalog.jsonb_build_object(''root'', ' || parent || ', ''partition'', ' || part_leaf.relid
        || ', ''row'', pg_catalog.jsonb_object(ARRAY[' || names || ']::text[], ARRAY[' || texts
        || ']::text[]))::text)), count(pg_catalog.pg_logical_emit_message(true, ''bemi_rewrite'','
        || ' pg_catalog.jsonb_build_object(''root'', ' || top || ', ''op'', ''CREATE'', ''row'','
        || ' pg_catalog.jsonb_object(ARRAY[' || names || ']::text[], ARRAY[' || texts || ']::text[]))::text))'
        || ' FROM ONLY ' || part_leaf.relid::pg_catalog.regclass::text;
    END LOOP;
  END LOOP;
END
$bemi$
""",
)

# DROP TABLE of a partition: its rows leave the root without a row change, and at sql_drop they are gone:
# the root's record gets a gap (``untracked``, what "partition") that a SNAPSHOT ends. Runs as the
# installer (the partitions it knows are in bemi_tt.partitions).
_PARTITION_DROP_FUNCTION = """
CREATE OR REPLACE FUNCTION bemi_tt.partition_dropped() RETURNS event_trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $bemi$
DECLARE
  obj record;
  msg jsonb;
BEGIN
  FOR obj IN SELECT d.objid, d.object_identity, p.root FROM pg_catalog.pg_event_trigger_dropped_objects() d
             JOIN bemi_tt.partitions p ON p.leaf = d.objid WHERE d.object_type = 'table'
  LOOP
    DELETE FROM bemi_tt.partitions p WHERE p.leaf = obj.objid;
    msg := """ + _MESSAGE.format(rel="obj.root", event="'UNTRACK'") + """;
    CONTINUE WHEN msg IS NULL;  -- the root went too
    PERFORM pg_catalog.pg_logical_emit_message(true, 'bemi_ddl', (msg || pg_catalog.jsonb_build_object(
      'what', 'partition', 'reason', 'DROP TABLE ' || obj.object_identity))::text);
  END LOOP;
END
$bemi$
"""


# Which leaf partitions each root had when last looked at (by the event trigger above, as the installer):
# ATTACH and DETACH PARTITION report only the root, so the difference says which partition moved.
_PARTITIONS = (
    "CREATE TABLE IF NOT EXISTS bemi_tt.partitions (leaf oid PRIMARY KEY, root oid NOT NULL)",
    "REVOKE ALL ON bemi_tt.partitions FROM PUBLIC",
    "DELETE FROM bemi_tt.partitions",
    "INSERT INTO bemi_tt.partitions (leaf, root) SELECT c.oid, pg_catalog.pg_partition_root(c.oid)"
    " FROM pg_catalog.pg_class c WHERE c.relispartition AND c.relkind = 'r'",
)


_INSTALL = (
    "CREATE SCHEMA IF NOT EXISTS bemi_tt",
    _REWRITE_FUNCTION,
    _FUNCTIONS,
    _EMIT_TRACKING,
    _DROP_FUNCTION,
    "DROP EVENT TRIGGER IF EXISTS bemi_tt_ddl",
    "CREATE EVENT TRIGGER bemi_tt_ddl ON ddl_command_end WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE',"
    " 'CREATE TABLE AS', 'SELECT INTO') EXECUTE FUNCTION bemi_tt.emit_ddl()",
    "DROP EVENT TRIGGER IF EXISTS bemi_tt_rewrite",
    "CREATE EVENT TRIGGER bemi_tt_rewrite ON table_rewrite EXECUTE FUNCTION bemi_tt.note_rewrite()",
    "DROP EVENT TRIGGER IF EXISTS bemi_tt_drop",
    "CREATE EVENT TRIGGER bemi_tt_drop ON sql_drop WHEN TAG IN ('DROP TABLE')"
    " EXECUTE FUNCTION bemi_tt.emit_drop()",
    *_PARTITIONS,
    _PARTITION_DROP_FUNCTION,
    "DROP EVENT TRIGGER IF EXISTS bemi_tt_partition_drop",
    "CREATE EVENT TRIGGER bemi_tt_partition_drop ON sql_drop WHEN TAG IN ('DROP TABLE')"
    " EXECUTE FUNCTION bemi_tt.partition_dropped()",
    *_TRUNCATE_FUNCTIONS,
    "REVOKE ALL ON FUNCTION bemi_tt.track_truncates(oid) FROM PUBLIC",
    "DROP EVENT TRIGGER IF EXISTS bemi_tt_partitions",
    "CREATE EVENT TRIGGER bemi_tt_partitions ON ddl_command_end WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')"
    " EXECUTE FUNCTION bemi_tt.track_new_partitions()",
    "SELECT count(bemi_tt.track_truncates(c.oid)) FROM pg_catalog.pg_class c"
    " WHERE c.relkind = 'p' AND NOT c.relispartition",
    "SELECT bemi_tt.emit_tracking('TRACK')",
)
_UNINSTALL = (
    "DO $bemi$ BEGIN IF pg_catalog.to_regprocedure('bemi_tt.emit_tracking(text)') IS NOT NULL"
    " AND EXISTS (SELECT FROM pg_catalog.pg_event_trigger WHERE evtname = 'bemi_tt_ddl') THEN"
    " PERFORM bemi_tt.emit_tracking('UNTRACK'); END IF; END $bemi$",
    "DROP EVENT TRIGGER IF EXISTS bemi_tt_ddl",
    "DROP EVENT TRIGGER IF EXISTS bemi_tt_drop",
    "DROP EVENT TRIGGER IF EXISTS bemi_tt_partitions",
    "DROP EVENT TRIGGER IF EXISTS bemi_tt_rewrite",
    "DROP FUNCTION IF EXISTS bemi_tt.note_rewrite()",
    # the partition triggers go with their function
    "DROP FUNCTION IF EXISTS bemi_tt.emit_truncate() CASCADE",
    "DROP FUNCTION IF EXISTS bemi_tt.track_new_partitions()",
    "DROP FUNCTION IF EXISTS bemi_tt.track_truncates(oid)",
    "DROP FUNCTION IF EXISTS bemi_tt.emit_ddl()",
    "DROP FUNCTION IF EXISTS bemi_tt.emit_drop()",
    "DROP FUNCTION IF EXISTS bemi_tt.emit_tracking(text)",
    "DROP EVENT TRIGGER IF EXISTS bemi_tt_partition_drop",
    "DROP FUNCTION IF EXISTS bemi_tt.partition_dropped()",
    "DROP TABLE IF EXISTS bemi_tt.partitions",
)
_INSUFFICIENT_PRIVILEGE = "42501"


def _run(conn: Any, statements: tuple[str, ...]) -> bool:
    """Run ``statements`` atomically on a psycopg or SQLAlchemy connection; False without the privilege."""
    if isinstance(conn, psycopg.Connection):
        try:
            with conn.transaction():
                for statement in statements:
                    conn.execute(statement.encode())
        except psycopg.errors.InsufficientPrivilege:
            log.warning(_NO_PRIVILEGE)
            return False
        return True
    if not hasattr(conn, "exec_driver_sql") or not hasattr(conn, "begin_nested"):
        raise ConfigurationError(f"expected a psycopg or SQLAlchemy Connection, got {type(conn).__name__}")
    try:
        with conn.begin_nested():
            for statement in statements:
                conn.exec_driver_sql(statement)
    except Exception as exc:  # SQLAlchemy's DBAPIError; its driver may be psycopg 3 or psycopg2
        orig = getattr(exc, "orig", None)
        code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if code != _INSUFFICIENT_PRIVILEGE:
            raise
        log.warning(_NO_PRIVILEGE)
        return False
    return True


_NO_PRIVILEGE = (
    "bemi_tt: only a superuser can create event triggers, so schema changes are not tracked exactly; "
    "run bemi-tt install (or capture.ddl.install_ddl_tracking) as a superuser"
)


def install_ddl_tracking(conn: Any) -> bool:
    """Create (or replace) the DDL event triggers on a psycopg or SQLAlchemy connection; idempotent.

    Returns False (with a warning) when the role may not create event triggers (superuser only).
    """
    return _run(conn, _INSTALL)


def install_statements() -> list[str]:
    """The SQL ``install_ddl_tracking`` runs, in order (Alembic offline mode emits it)."""
    return list(_INSTALL)


def uninstall_ddl_tracking(conn: Any) -> bool:
    """Drop the DDL event triggers and their functions; idempotent. The ``bemi_tt`` schema stays."""
    return _run(conn, _UNINSTALL)


def ddl_tracking_installed(conn: psycopg.Connection) -> bool:
    """Whether the DDL event triggers exist and are enabled."""
    row = conn.execute(
        "SELECT count(*) FROM pg_event_trigger WHERE evtname IN ('bemi_tt_ddl', 'bemi_tt_drop',"
        " 'bemi_tt_partitions', 'bemi_tt_rewrite') AND evtenabled <> 'D'"
    ).fetchone()
    return bool(row and row[0] == 4)
