"""The walking skeleton, end to end: context → trigger → WAL → capture → changes → as_of."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime

import psycopg
import pytest
import sqlalchemy as sa

import bemi_tt
from capture.worker import run as capture


def _now(engine: sa.Engine) -> datetime:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()  # type: ignore[no-any-return]


@pytest.fixture
def todo(engine: sa.Engine) -> sa.Table:
    table = sa.Table(
        "todo", sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("is_completed", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    table.metadata.create_all(engine)
    bemi_tt.install(engine)
    # Tracking starts when the worker first runs: it creates the slot and snapshots existing rows.
    capture(engine.url.render_as_string(hide_password=False).replace("+psycopg", ""), once=True)
    return table


def test_change_made_through_sqlalchemy_lands_in_changes_with_its_context(
    engine: sa.Engine, dsn: str, todo: sa.Table
) -> None:
    bemi_tt.set_context({"user_id": 187234, "endpoint": "/todo", "method": "POST"})
    try:
        with engine.begin() as conn:
            conn.execute(todo.insert().values(id=1, task="Sleep"))
    finally:
        bemi_tt.set_context(None)
    with bemi_tt.context(user_id=187234, endpoint="/todo/complete", method="PUT"), engine.begin() as conn:
        conn.execute(todo.update().where(todo.c.id == 1).values(is_completed=True))
    with engine.begin() as conn:  # no context at all
        conn.execute(todo.delete().where(todo.c.id == 1))
    capture(dsn, once=True)

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            'SELECT primary_key, "table", operation, before, after, context FROM changes '
            "ORDER BY commit_position, ordinal"
        ).fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [("1", "todo", "CREATE"), ("1", "todo", "UPDATE"),
                                                  ("1", "todo", "DELETE")]
    created, updated, deleted = rows
    assert created[3] == {} and created[4] == {"id": 1, "task": "Sleep", "is_completed": False}
    assert updated[3] == {"id": 1, "task": "Sleep", "is_completed": False}
    assert updated[4] == {"id": 1, "task": "Sleep", "is_completed": True}
    assert deleted[3] == {"id": 1, "task": "Sleep", "is_completed": True} and deleted[4] == {}
    assert {k: v for k, v in created[5].items() if k != "SQL"} == {
        "user_id": 187234, "endpoint": "/todo", "method": "POST"}
    assert created[5]["SQL"].startswith("INSERT INTO todo")
    assert updated[5]["endpoint"] == "/todo/complete" and updated[5]["SQL"].startswith("UPDATE todo")
    assert deleted[5] == {}


def test_as_of_before_and_after_a_change_returns_the_two_states(
    engine: sa.Engine, dsn: str, todo: sa.Table
) -> None:
    with bemi_tt.context(user_id=1), engine.begin() as conn:
        conn.execute(todo.insert().values(id=1, task="Sleep"))
    before = _now(engine)
    with bemi_tt.context(user_id=2), engine.begin() as conn:
        conn.execute(todo.update().where(todo.c.id == 1).values(task="Eat"))
    after = _now(engine)
    capture(dsn, once=True)

    old = bemi_tt.as_of("todo", before, source=dsn)
    new = bemi_tt.as_of("todo", after, source=dsn)
    assert old.loc[1, "task"] == "Sleep"
    assert new.loc[1, "task"] == "Eat"
    assert list(new.columns) == ["task", "is_completed"]
    assert not bool(new.loc[1, "is_completed"])


def test_capture_once_from_the_command_line_exits_zero_and_writes_changes(
    engine: sa.Engine, dsn: str, todo: sa.Table
) -> None:
    with bemi_tt.context(source="cli-test"), engine.begin() as conn:
        conn.execute(todo.insert().values(id=5, task="Repeat"))
    result = subprocess.run([sys.executable, "-m", "bemi_tt.cli", "capture", "--dsn", dsn, "--once"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT after, context FROM changes").fetchone()
    assert row is not None
    assert row[0] == {"id": 5, "task": "Repeat", "is_completed": False}
    assert json.loads(json.dumps(row[1]))["source"] == "cli-test"


def test_demo_story_diff_names_each_changed_cell_with_the_context_that_changed_it(
    engine: sa.Engine, dsn: str, todo: sa.Table
) -> None:
    with bemi_tt.context(user_id=187234, endpoint="/todo", method="POST"), engine.begin() as conn:
        for key, task in ((26, "Sleep"), (27, "Eat"), (28, "Repeat")):
            conn.execute(todo.insert().values(id=key, task=task))
    t1 = _now(engine)
    with bemi_tt.context(user_id=187234, endpoint="/todo/complete", method="PUT"), engine.begin() as conn:
        conn.execute(todo.update().where(todo.c.id == 26).values(is_completed=True))
    with bemi_tt.context(user_id=187234, endpoint="/todo/27", method="DELETE"), engine.begin() as conn:
        conn.execute(todo.delete().where(todo.c.id == 27))
    t2 = _now(engine)
    capture(dsn, once=True)

    frame = bemi_tt.diff("todo", t1, t2, source=dsn).reset_index()
    cells = {(int(r["id"]), r["column"], r["change"], str(r["old"]), str(r["new"]), r["endpoint"])
             for _, r in frame.iterrows()}
    assert cells == {
        (26, "is_completed", "changed", "False", "True", "/todo/complete"),
        (27, "task", "removed", "Eat", "None", "/todo/27"),
        (27, "is_completed", "removed", "False", "None", "/todo/27"),
    }
    assert bemi_tt.diff("todo", t2, t2, source=dsn).empty
