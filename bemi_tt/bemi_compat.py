"""The original ``bemi-sqlalchemy`` package's database objects, replaced in place by ``install``.

Bemi's ``Bemi.migration_upgrade()`` creates, in schema ``public``: the row trigger function
``_bemi_row_trigger_func()`` (it emits the ``/*Bemi <json> Bemi*/`` comment its hook appends to each
write as a ``_bemi`` logical message, once per row), a ``_bemi_row_trigger_<table>_<table>`` trigger
on every table, the procedure ``_bemi_create_triggers()`` and the event trigger
``_bemi_create_table_trigger`` (function ``_bemi_create_table_trigger_func()``), which adds its row
trigger to every table created later — bemi_tt's own included. ``install`` drops them all (the row
triggers go with their function), so nothing of Bemi's is left and nothing of ours is tracked by it.

Contexts keep flowing during a rolling deploy: ``bemi_tt.emit_context()`` also reads the old hook's
comment at the end of a statement, and the worker reads ``_bemi`` messages (written by Bemi's trigger
before install replaced it) as contexts (``capture.stitch``). ``changes`` rows written by Bemi's own
worker stay where they are (see docs/migrating-from-bemi.md).
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from capture.protocol import BEMI_PREFIX

__all__ = ["BEMI_MESSAGE_PREFIX", "REPLACE_BEMI", "bemi_objects", "replace_bemi"]

log = logging.getLogger("bemi_tt")

#: The logical message prefix of the original package's trigger (capture/protocol.py).
BEMI_MESSAGE_PREFIX = BEMI_PREFIX

#: Drops everything ``Bemi.migration_upgrade()`` created (constant SQL: Alembic offline mode emits it).
REPLACE_BEMI = (
    "DROP EVENT TRIGGER IF EXISTS _bemi_create_table_trigger",
    "DROP FUNCTION IF EXISTS public._bemi_create_table_trigger_func()",
    "DROP PROCEDURE IF EXISTS public._bemi_create_triggers()",
    # CASCADE drops exactly the triggers that call it (the _bemi_row_trigger_* of every table)
    "DROP FUNCTION IF EXISTS public._bemi_row_trigger_func() CASCADE",
)

_FIND = (
    "SELECT 'event trigger ' || evtname FROM pg_catalog.pg_event_trigger"
    " WHERE evtname = '_bemi_create_table_trigger'"
    " UNION ALL SELECT 'function ' || p.oid::pg_catalog.regprocedure::text FROM pg_catalog.pg_proc p"
    " JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'"
    " AND p.proname IN ('_bemi_row_trigger_func', '_bemi_create_triggers', '_bemi_create_table_trigger_func')"
    " UNION ALL SELECT 'trigger ' || t.tgname || ' on ' || t.tgrelid::pg_catalog.regclass::text"
    " FROM pg_catalog.pg_trigger t WHERE t.tgname LIKE '\\_bemi\\_row\\_trigger\\_%' AND NOT t.tgisinternal"
    " ORDER BY 1"
)
_INSUFFICIENT_PRIVILEGE = "42501"


def bemi_objects(conn: Connection) -> list[str]:
    """The original package's objects in this database, e.g. ``['event trigger _bemi_create_table_trigger',
    ...]``."""
    rows = conn.exec_driver_sql(_FIND, execution_options={"no_parameters": True}).fetchall()
    return [str(r[0]) for r in rows]


def replace_bemi(conn: Connection, warnings: list[str]) -> bool:
    """Drop the original package's objects (in a savepoint); True when there were any.

    A role that may not drop them (the event trigger belongs to a superuser, say) gets a warning naming
    what is left and who can drop it; install carries on.
    """
    found = bemi_objects(conn)
    if not found:
        return False
    try:
        with conn.begin_nested():
            for statement in REPLACE_BEMI:
                conn.exec_driver_sql(statement, execution_options={"no_parameters": True})
    except sa.exc.DBAPIError as exc:
        code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if code != _INSUFFICIENT_PRIVILEGE:
            raise
        warnings.append(
            "bemi_tt: the original bemi-sqlalchemy package's objects are still installed and this role may "
            f"not drop them ({', '.join(found[:5])}{' ...' if len(found) > 5 else ''}): run bemi-tt install "
            "as a superuser or their owner, so that Bemi's event trigger stops adding its triggers"
        )
        log.warning(warnings[-1])
        return True
    log.info("bemi_tt: replaced the original bemi-sqlalchemy package's objects: %s", ", ".join(found))
    return True
