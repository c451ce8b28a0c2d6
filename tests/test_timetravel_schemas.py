"""Tables of the same name in two schemas: every source keeps their histories apart (the PostgreSQL
source's fast path reads an index without the schema and must notice the other table's rows)."""

from __future__ import annotations

from pathlib import Path

import pytest
from timetravel_history import TODO_COLUMNS, History
from timetravel_sources import KINDS, build_source

from bemi_tt.timetravel import as_of, diff


def _row(key: int, task: str) -> dict[str, object]:
    return {"id": key, "task": task, "done": False, "price": None, "due": None}


@pytest.mark.parametrize("kind", KINDS)
def test_as_of_keeps_same_named_tables_of_two_schemas_apart(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    h = History()
    h.columns("todo", TODO_COLUMNS)
    h.columns("todo", TODO_COLUMNS, schema="other")
    h.create("todo", "1", _row(1, "public one"))
    h.create("todo", "1", _row(1, "other one"), schema="other")
    h.create("todo", "2", _row(2, "public two"))
    middle = h.clock
    h.create("todo", "2", _row(2, "other two"), schema="other")
    h.changes.append({**h.changes[0], "operation": "DELETE", "after": {}, "before": _row(1, "public one")})
    h.changes[-1].update(commit_position=h.position + 10, ordinal=0, position=h.position + 10)
    h.changes[-1]["committed_at"] = h.clock
    dsn = request.getfixturevalue("dsn") if kind != "memory" else None
    source = build_source(kind, h.changes, h.schemas, dsn=dsn, tmp_path=tmp_path)
    public_now = as_of("public.todo", h.clock, source=source)
    assert list(public_now.index) == [2] and list(public_now["task"]) == ["public two"]
    other_now = as_of("other.todo", h.clock, source=source)
    assert list(other_now["task"]) == ["other one", "other two"]
    assert list(as_of("other.todo", middle, source=source)["task"]) == ["other one"]
    assert list(as_of("public.todo", middle, source=source)["task"]) == ["public one", "public two"]
    assert len(diff("public.todo", middle, h.clock, source=source)) > 0
