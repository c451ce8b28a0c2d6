"""Bemi.migration_upgrade() / migration_downgrade() inside a real Alembic migration run."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from wal_messages import create_slot, read_events, row_contexts, without_sql

import bemi_tt.hook  # noqa: F401  (activates the hook)
from bemi_tt.context import context

ENV = '''
from alembic import context
from sqlalchemy import create_engine

config = context.config
url = config.attributes["url"]
if context.is_offline_mode():
    context.configure(url=url, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
'''

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
    root = tmp_path / "migrations"
    (root / "versions").mkdir(parents=True)
    (root / "env.py").write_text(textwrap.dedent(ENV))
    (root / "versions" / "0001_todo.py").write_text(textwrap.dedent(FIRST))
    (root / "versions" / "0002_later.py").write_text(textwrap.dedent(SECOND))
    config = Config()
    config.set_main_option("script_location", str(root))
    config.attributes["url"] = pg_server.sqlalchemy_url(database)
    return config


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
