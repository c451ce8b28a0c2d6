"""Bemi.migration_upgrade() / migration_downgrade() inside a real Alembic migration run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic_project import alembic_project
from wal_messages import create_slot, read_events, row_contexts, without_sql

import bemi_tt.hook  # noqa: F401  (activates the hook)
from bemi_tt.context import context

FIRST = '''
import sqlalchemy as sa
from alembic import op
from bemi_tt.context import Bemi

revision = "0001"
down_revision = None


def upgrade():
    op.create_table("todo", sa.Column("id", sa.Integer, primary_key=True), sa.Column("task", sa.Text))
    Bemi.migration_upgrade()


def downgrade():
    Bemi.migration_downgrade()
    op.drop_table("todo")
'''

SECOND = '''
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade():
    op.create_table("later", sa.Column("id", sa.Integer, primary_key=True))


def downgrade():
    op.drop_table("later")
'''


#: alembic_version is a user table too: its writes carry the migration's context (if any)
TRACKED = ["alembic_version", "later", "todo"]


@pytest.fixture
def alembic_config(tmp_path: Path, pg_server: Any, database: str) -> Config:
    migrations = {"0001_todo": FIRST, "0002_later": SECOND}
    return alembic_project(tmp_path / "migrations", pg_server.sqlalchemy_url(database), migrations)


def _state(dsn: str) -> tuple[list[str], list[str], bool]:
    with psycopg.connect(dsn) as conn:
        triggers = conn.execute(
            "SELECT tgrelid::regclass::text FROM pg_trigger WHERE tgname = 'bemi_tt_context' ORDER BY 1"
        ).fetchall()
        events = conn.execute("SELECT evtname FROM pg_event_trigger ORDER BY 1").fetchall()
        schema = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'bemi_tt'").fetchone()
    return [r[0] for r in triggers], [r[0] for r in events], bool(schema and schema[0])


def test_migration_helpers_upgrade_downgrade_and_upgrade_again(
    alembic_config: Config, engine: sa.Engine, dsn: str
) -> None:
    command.upgrade(alembic_config, "head")
    triggers, events, schema = _state(dsn)
    assert triggers == TRACKED and "bemi_tt_track_new_tables" in events and schema

    create_slot(dsn)
    with context(user_id=187234), engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO todo (id, task) VALUES (1, 'Sleep')"))
        conn.execute(sa.text("INSERT INTO later (id) VALUES (1)"))
    assert [without_sql(c) for _, c in row_contexts(read_events(dsn))] == [{"user_id": 187234}] * 2
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot('ctx')")

    command.downgrade(alembic_config, "base")
    assert _state(dsn) == ([], [], False)

    command.upgrade(alembic_config, "head")
    triggers, events, schema = _state(dsn)
    assert triggers == TRACKED and "bemi_tt_track_new_tables" in events and schema


def test_offline_migration_emits_the_install_sql(
    alembic_config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    command.upgrade(alembic_config, "0001", sql=True)
    out = capsys.readouterr().out
    assert "CREATE OR REPLACE FUNCTION bemi_tt.emit_context()" in out
    assert "CREATE EVENT TRIGGER bemi_tt_track_new_tables" in out
    assert "SELECT bemi_tt.track_all(true)" in out


def test_offline_migration_emits_ddl_tracking_and_replaces_the_original_package(
    alembic_config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    command.upgrade(alembic_config, "0001", sql=True)
    out = capsys.readouterr().out
    assert "CREATE EVENT TRIGGER bemi_tt_ddl" in out and "CREATE EVENT TRIGGER bemi_tt_drop" in out
    assert "DROP FUNCTION IF EXISTS public._bemi_row_trigger_func() CASCADE" in out
    assert "bemi-tt install URL" in out  # the slot cannot be created offline: says how to begin now


def test_in_the_example_apps_order_migrate_use_the_app_then_start_the_worker_loses_nothing(
    alembic_config: Config, engine: sa.Engine, dsn: str
) -> None:
    """BemiHQ/bemi-sqlalchemy-example's README order: alembic upgrade head, use the app, start the worker."""
    import asyncio

    import httpx
    from fastapi import FastAPI

    from bemi_tt.middleware import BemiFastAPIMiddleware
    from capture.worker import run as capture

    command.upgrade(alembic_config, "0001")
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO todo (id, task) VALUES (1, 'before the app')"))
    command.upgrade(alembic_config, "head")

    app = FastAPI()
    app.add_middleware(BemiFastAPIMiddleware, set_context=lambda request: {
        "user": request.headers.get("x-user"), "endpoint": request.url.path, "method": request.method})

    @app.post("/todo/{todo_id}")
    def create(todo_id: int) -> dict[str, int]:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO todo (id, task) VALUES (:i, 'new')"), {"i": todo_id})
        return {"id": todo_id}

    @app.put("/todo/{todo_id}")
    def complete(todo_id: int) -> dict[str, int]:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE todo SET task = 'done' WHERE id = :i"), {"i": todo_id})
        return {"id": todo_id}

    @app.delete("/todo/{todo_id}")
    def remove(todo_id: int) -> dict[str, int]:
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM todo WHERE id = :i"), {"i": todo_id})
        return {"id": todo_id}

    async def use_the_app() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for method, path in (("POST", "/todo/2"), ("PUT", "/todo/2"), ("DELETE", "/todo/1")):
                (await client.request(method, path, headers={"x-user": "ann"})).raise_for_status()

    asyncio.run(use_the_app())
    capture(dsn, once=True)  # the worker starts only now

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT operation, primary_key, after ->> 'task', context FROM changes WHERE \"table\" = 'todo'"
            " ORDER BY commit_position, ordinal"
        ).fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [
        # tracking began inside 0001 (migration_upgrade), so even this write between migrations is there
        ("CREATE", "1", "before the app"), ("CREATE", "2", "new"), ("UPDATE", "2", "done"),
        ("DELETE", "1", None),
    ]
    assert [without_sql(r[3]) for r in rows] == [
        {},
        {"user": "ann", "endpoint": "/todo/2", "method": "POST"},
        {"user": "ann", "endpoint": "/todo/2", "method": "PUT"},
        {"user": "ann", "endpoint": "/todo/1", "method": "DELETE"},
    ]


def test_autogenerate_never_proposes_touching_the_workers_or_bemi_tts_objects(
    alembic_config: Config, engine: sa.Engine, dsn: str
) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from bemi_tt.triggers import include_object
    from capture.worker import run as capture

    command.upgrade(alembic_config, "head")
    capture(dsn, once=True)  # creates changes, changes_schemas, changes_positions and the index
    metadata = sa.MetaData()
    sa.Table("todo", metadata, sa.Column("id", sa.Integer, primary_key=True), sa.Column("task", sa.Text))
    sa.Table("later", metadata, sa.Column("id", sa.Integer, primary_key=True))
    with engine.connect() as conn:
        plain = compare_metadata(MigrationContext.configure(conn), metadata)
        proposed = compare_metadata(
            MigrationContext.configure(conn, opts={"include_object": include_object,
                                                   "include_schemas": True}), metadata)
    assert {d[1].name for d in plain if d[0] == "remove_table"} >= {
        "changes", "changes_schemas", "changes_positions"}  # what the hook is for
    assert proposed == []
