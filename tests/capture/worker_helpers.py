"""Helpers shared by the capture worker tests: an audit-trigger reference and readers of ``changes``.

The reference: row-level AFTER triggers (and statement-level TRUNCATE triggers) write ``to_jsonb(OLD)``,
``to_jsonb(NEW)``, the transaction id and the test's current context into ``audit.log`` inside the same
transaction, in firing order. From it and each table's key and replica identity, :func:`expected_changes`
derives exactly what ``changes`` must hold — independently of logical decoding.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

AUDIT_SETUP = """
CREATE SCHEMA audit;
CREATE SEQUENCE audit.seq;
CREATE TABLE audit.log (seq bigint PRIMARY KEY, xid bigint, tbl text, op text, old jsonb, new jsonb,
                        ctx text);
CREATE FUNCTION audit.row_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO audit.log VALUES (nextval('audit.seq'), txid_current() % 4294967296, TG_ARGV[0], TG_OP,
    CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END, CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
    current_setting('bemi_test.ctx', true));
  RETURN NULL;
END $$;
"""


@dataclass(frozen=True)
class Table:
    """A table of the workload: its key columns and whether its replica identity is FULL."""

    name: str
    key: tuple[str, ...]
    full: bool = False


def audit(conn: psycopg.Connection, table: Table) -> None:
    """Attach the reference triggers to ``table``."""
    name = sql.Identifier(table.name)
    conn.execute(
        sql.SQL(
            "CREATE TRIGGER audit_rows AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW"
            " EXECUTE FUNCTION audit.row_change({})"
        ).format(name, sql.Literal(table.name))
    )
    conn.execute(
        sql.SQL(
            "CREATE TRIGGER audit_truncate AFTER TRUNCATE ON {} FOR EACH STATEMENT"
            " EXECUTE FUNCTION audit.row_change({})"
        ).format(name, sql.Literal(table.name))
    )


def set_context(conn: psycopg.Connection, context: dict[str, Any] | None) -> None:
    """What the hook and trigger do, by hand: one ``bemi`` message; the reference remembers it too."""
    text = json.dumps(context if context is not None else {})
    conn.execute(
        "SELECT pg_logical_emit_message(true, 'bemi', %s), set_config('bemi_test.ctx', %s, true)",
        (text, text),
    )


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text, parse_float=Decimal)


def _key_text(row: dict[str, Any], key: tuple[str, ...]) -> Any:
    if len(key) == 1:
        value = row[key[0]]
        return value if isinstance(value, str) else json.dumps(value)
    return [row[k] for k in key]


Change = tuple[Any, ...]


def expected_changes(conn: psycopg.Connection, tables: dict[str, Table]) -> dict[int, list[Change]]:
    """Per transaction id, the changes the reference triggers saw, in order."""
    out: dict[int, list[Change]] = {}
    for _seq, xid, tbl, op, old_text, new_text, ctx in conn.execute(
        "SELECT seq, xid, tbl, op, old::text, new::text, ctx FROM audit.log ORDER BY seq"
    ):
        table = tables[tbl]
        old, new = _loads(old_text), _loads(new_text)
        context = _loads(ctx) if ctx else {}
        if op == "TRUNCATE":
            change: Change = (tbl, "TRUNCATE", None, {}, {}, context)
        elif op == "INSERT":
            change = (tbl, "CREATE", _key_text(new, table.key), {}, new, context)
        elif op == "UPDATE":
            if table.full:
                before = old
            elif any(old[k] != new[k] for k in table.key):
                before = {k: old[k] for k in table.key}
            else:
                before = {}
            change = (tbl, "UPDATE", _key_text(new, table.key), before, new, context)
        else:
            before = old if table.full else {k: old[k] for k in table.key}
            change = (tbl, "DELETE", _key_text(old, table.key), before, {}, context)
        out.setdefault(int(xid), []).append(change)
    return out


def captured_changes(conn: psycopg.Connection, schema: str = "public") -> dict[int, list[Change]]:
    """Per transaction id, the rows of ``changes`` (other than the reference's own), in commit order."""
    out: dict[int, list[Change]] = {}
    for xid, tbl, op, pk, before, after, context in conn.execute(
        sql.SQL(
            'SELECT transaction_id, "table", operation, primary_key, before::text, after::text, context::text'
            " FROM {} WHERE \"schema\" <> 'audit' AND operation <> 'SNAPSHOT'"
            " ORDER BY commit_position, ordinal"
        ).format(sql.Identifier(schema, "changes"))
    ):
        key = _loads(pk) if pk is not None and pk.startswith("[") else pk
        out.setdefault(int(xid), []).append((tbl, op, key, _loads(before), _loads(after), _loads(context)))
    return out


def changes_rows(dsn: str, schema: str = "public") -> list[tuple[Any, ...]]:
    """Every row of ``changes`` except ``id``, ordered: what two equivalent runs must both hold."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            sql.SQL(
                'SELECT primary_key, "table", operation, before::text, after::text, context::text,'
                ' committed_at, "schema", transaction_id, position, commit_position, ordinal FROM {}'
                " WHERE operation <> 'SNAPSHOT' ORDER BY commit_position, ordinal"
            ).format(sql.Identifier(schema, "changes"))
        ).fetchall()


def run_module(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m capture ARGS`` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "capture", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
