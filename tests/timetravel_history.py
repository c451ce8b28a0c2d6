"""A small builder of ``changes`` histories for the analysis tests (one commit per call unless grouped)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

START = datetime(2026, 1, 1, tzinfo=timezone.utc)

TODO_COLUMNS = [
    {"name": "id", "type": "integer", "type_oid": 23, "key": True},
    {"name": "task", "type": "text", "type_oid": 25, "key": False},
    {"name": "done", "type": "boolean", "type_oid": 16, "key": False},
    {"name": "price", "type": "numeric(10,2)", "type_oid": 1700, "key": False},
    {"name": "due", "type": "timestamp with time zone", "type_oid": 1184, "key": False},
]


class History:
    """Changes of tables in commit order: ``commit_position`` grows by 10 and ``committed_at`` by a second."""

    def __init__(self) -> None:
        self.changes: list[dict[str, Any]] = []
        self.schemas: list[dict[str, Any]] = []
        self.position = 0
        self.ordinal = 0
        self.clock = START
        self.open = False

    # a transaction groups several changes under one commit
    def begin(self) -> History:
        self._next_commit()
        self.open = True
        return self

    def commit(self) -> datetime:
        self.open = False
        return self.clock

    def _next_commit(self) -> None:
        self.position += 10
        self.ordinal = 0
        self.clock += timedelta(seconds=1)

    def _add(self, **row: Any) -> datetime:
        if not self.open:
            self._next_commit()
        row.setdefault("schema", "public")
        self.changes.append(
            {
                **row,
                "commit_position": self.position,
                "ordinal": self.ordinal,
                "committed_at": self.clock,
                "position": self.position + self.ordinal,
                "transaction_id": self.position,
            }
        )
        self.ordinal += 1
        return self.clock

    def columns(self, table: str, columns: Sequence[Mapping[str, Any]], schema: str = "public") -> datetime:
        if not self.open:
            self._next_commit()
        self.schemas.append(
            {
                "schema": schema,
                "table": table,
                "commit_position": self.position,
                "ordinal": self.ordinal,
                "committed_at": self.clock,
                "columns": list(columns),
            }
        )
        return self.clock

    def create(
        self,
        table: str,
        pk: str | None,
        after: Mapping[str, Any],
        context: Mapping[str, Any] | None = None,
        operation: str = "CREATE",
        schema: str = "public",
    ) -> datetime:
        return self._add(
            schema=schema,
            table=table,
            operation=operation,
            primary_key=pk,
            before={},
            after=dict(after),
            context=dict(context or {}),
        )

    def update(
        self,
        table: str,
        pk: str | None,
        before: Mapping[str, Any],
        after: Mapping[str, Any],
        context: Mapping[str, Any] | None = None,
    ) -> datetime:
        return self._add(
            table=table,
            operation="UPDATE",
            primary_key=pk,
            before=dict(before),
            after=dict(after),
            context=dict(context or {}),
        )

    def delete(
        self, table: str, pk: str | None, before: Mapping[str, Any], context: Mapping[str, Any] | None = None
    ) -> datetime:
        return self._add(
            table=table,
            operation="DELETE",
            primary_key=pk,
            before=dict(before),
            after={},
            context=dict(context or {}),
        )

    def truncate(self, table: str, context: Mapping[str, Any] | None = None) -> datetime:
        return self._add(
            table=table,
            operation="TRUNCATE",
            primary_key=None,
            before={},
            after={},
            context=dict(context or {}),
        )

    def between(self, t: datetime) -> datetime:
        """A time after ``t`` and before the next commit."""
        return t + timedelta(milliseconds=500)
