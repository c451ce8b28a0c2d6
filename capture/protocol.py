"""The protocol's names, defined once: context marker, logical message prefixes, schema and worker tables.

The application side (bemi_tt/hook.py, bemi_tt/context.py, bemi_tt/bemi_compat.py) writes them, the
trigger installed by bemi_tt/triggers.py turns the marker into a message, and the worker
(capture/stitch.py, capture/worker.py) reads them back; all import them from here. A leaf module: it
imports nothing, so anything may import it.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BEMI_PREFIX",
    "CHANGES_TABLE",
    "CONTEXT_PREFIX",
    "DDL_PREFIX",
    "DIGESTS_TABLE",
    "MARKER_PREFIX",
    "POSITIONS_TABLE",
    "REWRITE_PREFIX",
    "SCHEMA",
    "SCHEMAS_TABLE",
    "TRUNCATE_PREFIX",
    "WORKER_TABLES",
    "worker_table_sql",
]

#: What the hook prepends to a write statement: ``/*bemi:<base64 of the context JSON>*/``.
MARKER_PREFIX: Final = "/*bemi:"
#: The prefix of the context messages the trigger emits (``pg_logical_emit_message(true, 'bemi', json)``).
CONTEXT_PREFIX: Final = "bemi"
#: The original bemi-sqlalchemy package's trigger: the same JSON context, once per row (rolling deploys).
BEMI_PREFIX: Final = "_bemi"
#: Schema changes (capture/ddl.py's event triggers).
DDL_PREFIX: Final = "bemi_ddl"
#: One row a TRUNCATE of a partition removed (capture/ddl.py): recorded as a DELETE of the root.
TRUNCATE_PREFIX: Final = "bemi_truncate"
#: One row a DDL rewrite gave new values (capture/ddl.py): recorded as an UPDATE with the new row.
REWRITE_PREFIX: Final = "bemi_rewrite"

#: The schema of tracking's own objects in the source database (triggers, functions, bookkeeping).
SCHEMA: Final = "bemi_tt"

#: The worker's tables in the destination schema: the captured rows, the schema record, the per-slot
#: positions (the exactly-once watermark) and the periodic chain digests.
CHANGES_TABLE: Final = "changes"
SCHEMAS_TABLE: Final = "changes_schemas"
POSITIONS_TABLE: Final = "changes_positions"
DIGESTS_TABLE: Final = "changes_digests"
WORKER_TABLES: Final = (CHANGES_TABLE, SCHEMAS_TABLE, POSITIONS_TABLE, DIGESTS_TABLE)


def worker_table_sql(rel: str = "c") -> str:
    """SQL true for a ``pg_class`` row ``rel`` that is one of the worker's tables, in any schema.

    Recognised by name and by a column only they have (``commit_position``; ``snapshot_position`` for the
    positions table), so an application table that happens to be called ``changes`` is still tracked.
    Used by tracking, the snapshot, the publication check and the DDL event triggers alike.
    """
    named = ", ".join(f"'{name}'" for name in WORKER_TABLES if name != POSITIONS_TABLE)
    return (
        f"(({rel}.relname IN ({named}) AND EXISTS (SELECT FROM pg_catalog.pg_attribute wa"
        f" WHERE wa.attrelid = {rel}.oid AND wa.attname = 'commit_position' AND NOT wa.attisdropped))"
        f" OR ({rel}.relname = '{POSITIONS_TABLE}' AND EXISTS (SELECT FROM pg_catalog.pg_attribute wa"
        f" WHERE wa.attrelid = {rel}.oid AND wa.attname = 'snapshot_position' AND NOT wa.attisdropped)))"
    )
