"""Read what reached the WAL, without the capture worker: a ``test_decoding`` slot, read as bytes.

Shared by the context, hook, trigger, middleware and Alembic tests (``from wal_messages import ...``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import psycopg

_MESSAGE = re.compile(rb"^message: transactional: (\d) prefix: ([^,]*), sz: (\d+) content:", re.S)
_ROW = re.compile(rb"^table ([^:]+): (INSERT|UPDATE|DELETE|TRUNCATE): ?(.*)$", re.S)


@dataclass(frozen=True)
class Event:
    """One decoded WAL record: ``kind`` is BEGIN, COMMIT, MESSAGE or the row operation."""

    kind: str
    xid: int
    table: str = ""
    content: bytes = b""
    prefix: str = ""

    def context(self) -> dict[str, Any]:
        """A ``bemi`` message's JSON object."""
        value = json.loads(self.content.decode("utf-8"))
        assert isinstance(value, dict)
        return value


def create_slot(dsn: str, name: str = "ctx") -> str:
    """A ``test_decoding`` slot: everything committed after this call can be read back."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (name,))
    return name


def read_events(dsn: str, slot: str = "ctx") -> list[Event]:
    """Consume the slot: every BEGIN, COMMIT, logical message and row change, in WAL order."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT xid::text::bigint, data FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL)", (slot,)
        ).fetchall()
    events = []
    for xid, data in rows:
        data = bytes(data)
        if data.startswith(b"BEGIN"):
            events.append(Event("BEGIN", xid))
        elif data.startswith(b"COMMIT"):
            events.append(Event("COMMIT", xid))
        elif m := _MESSAGE.match(data):
            content = data[m.end():]
            assert len(content) == int(m.group(3)), data[:200]
            events.append(Event("MESSAGE", xid, content=content, prefix=m.group(2).decode()))
        elif m := _ROW.match(data):
            events.append(Event(m.group(2).decode(), xid, table=m.group(1).decode(), content=m.group(3)))
        else:
            raise AssertionError(f"unexpected test_decoding output {data[:200]!r}")
    return events


def row_contexts(events: list[Event]) -> list[tuple[Event, dict[str, Any]]]:
    """Each row change with the context of the last ``bemi`` message before it in its transaction."""
    out: list[tuple[Event, dict[str, Any]]] = []
    current: dict[str, Any] = {}
    for event in events:
        if event.kind == "BEGIN":
            current = {}
        elif event.kind == "MESSAGE" and event.prefix == "bemi":
            current = event.context()
        elif event.kind in ("INSERT", "UPDATE", "DELETE", "TRUNCATE"):
            out.append((event, current))
    return out


def without_sql(context: dict[str, Any]) -> dict[str, Any]:
    """The application's part of a message (the hook adds ``"SQL"``)."""
    return {k: v for k, v in context.items() if k != "SQL"}
