"""Adoption in place (issue 13): tracking begins when install returns; slots per database."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

import bemi_tt
from capture.errors import ConfigurationError
from capture.source import default_slot_name
from capture.worker import run as capture
from capture.worker import status


def _changes(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            'SELECT "table", operation, primary_key, before, after, context FROM changes'
            " ORDER BY commit_position, ordinal"
        ).fetchall()


def _without_sql(ctx: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ctx.items() if k != "SQL"}


@pytest.fixture
def todo(engine: sa.Engine) -> sa.Table:
    table = sa.Table(
        "todo", sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("done", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("addr", sa.dialects.postgresql.INET),
        sa.Column("code", sa.CHAR(4)),
    )
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [
            {"id": 1, "task": "Sleep", "done": False, "addr": "10.0.0.1", "code": "ab"},
            {"id": 2, "task": "Eat", "done": True, "addr": None, "code": None},
        ])
    return table


def test_changes_between_install_and_the_workers_first_run_are_all_captured_with_their_context(
    engine: sa.Engine, dsn: str, todo: sa.Table
) -> None:
    installation = bemi_tt.install(engine)
    assert installation.slot is not None and installation.warnings == ()
    with bemi_tt.context(user_id=1), engine.begin() as conn:
        conn.execute(todo.insert().values(id=3, task="Code"))
    with bemi_tt.context(user_id=2), engine.begin() as conn:
        conn.execute(todo.update().where(todo.c.id == 1).values(done=True))
    with bemi_tt.context(user_id=3), engine.begin() as conn:
        conn.execute(todo.delete().where(todo.c.id == 2))

    stats = capture(dsn, once=True)  # the worker's first run, after the changes

    rows = _changes(dsn)
    assert stats.snapshot_rows == 2
    snapshot = [r for r in rows if r[1] == "SNAPSHOT"]
    # the rows at install, with the values exactly as pgoutput sends them (boolean, inet, char(n))
    assert sorted((r[2], r[4]) for r in snapshot) == [
        ("1", {"id": 1, "task": "Sleep", "done": False, "addr": "10.0.0.1", "code": "ab  "}),
        ("2", {"id": 2, "task": "Eat", "done": True, "addr": None, "code": None}),
    ]
    changes = [(r[1], r[2], _without_sql(r[5])) for r in rows if r[1] != "SNAPSHOT"]
    assert changes == [("CREATE", "3", {"user_id": 1}), ("UPDATE", "1", {"user_id": 2}),
                       ("DELETE", "2", {"user_id": 3})]
    assert rows[:2] == snapshot  # the snapshot comes first
    with psycopg.connect(dsn) as conn:  # the copy install took is gone once recorded
        assert conn.execute("SELECT count(*) FROM bemi_tt.snapshot_rows").fetchone() == (0,)
    assert bemi_tt.as_of("todo", "2100-01-01", source=dsn)["task"].sort_values().tolist() == [
        "Code", "Sleep"
    ]


def test_install_creates_the_workers_per_database_slot_and_status_shows_its_retained_wal(
    engine: sa.Engine, dsn: str, database: str, todo: sa.Table
) -> None:
    installation = bemi_tt.install(engine)
    assert installation.slot == default_slot_name(database)
    with engine.begin() as conn:
        conn.execute(todo.update().values(task="x"))
    report = status(dsn)
    assert report["slot"] == default_slot_name(database)
    assert isinstance(report["retained_wal_bytes"], int) and report["retained_wal_bytes"] > 0
    assert any("retains WAL" in str(w) and "max_slot_wal_keep_size" in str(w)
               for w in report["warnings"])  # type: ignore[union-attr]
    assert bemi_tt.install(engine).slot == installation.slot  # idempotent: the slot is kept


def test_install_without_logical_wal_level_or_replication_says_so_with_the_fix(
    engine: sa.Engine, dsn: str, make_role: Any, pg_server: Any, database: str, todo: sa.Table
) -> None:
    owner = make_role("owner")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER TABLE todo OWNER TO {}").format(sql.Identifier(owner)))
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
            sql.Identifier(database), sql.Identifier(owner)))
    url = pg_server.sqlalchemy_url(database).set(username=owner)
    installation = bemi_tt.install(url)
    assert installation.slot is None
    assert any(f"ALTER ROLE {owner} REPLICATION" in w for w in installation.warnings)


def test_install_in_a_transaction_that_has_written_warns_instead_of_waiting_for_itself(
    engine: sa.Engine, todo: sa.Table
) -> None:
    with engine.begin() as conn:
        conn.execute(todo.update().values(task="x"))
        installation = bemi_tt.install(conn)
    assert installation.slot is None
    assert any("already written" in w for w in installation.warnings)


def test_two_databases_on_one_server_get_their_own_default_slots(
    pg_server: Any, dsn: str, database: str
) -> None:
    other = f"{database}_b"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other)))
    try:
        capture(dsn, once=True)
        capture(pg_server.dsn(other), once=True)  # used to fail: slot 'bemi_tt' belongs to database ...
        with psycopg.connect(pg_server.admin_dsn) as conn:
            slots = conn.execute(
                "SELECT slot_name, database FROM pg_replication_slots WHERE database IN (%s, %s)"
                " ORDER BY 2", (database, other)).fetchall()
        assert slots == [(default_slot_name(database), database), (default_slot_name(other), other)]
    finally:
        from conftest import drop_database

        drop_database(pg_server, other)


def test_a_slot_of_another_database_is_refused_with_the_name_to_use(
    pg_server: Any, dsn: str, database: str
) -> None:
    other = f"{database}_c"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other)))
    try:
        capture(dsn, once=True, slot="shared_slot")
        with pytest.raises(ConfigurationError) as caught:
            capture(pg_server.dsn(other), once=True, slot="shared_slot")
        message = str(caught.value)
        assert f"belongs to database {database!r}" in message
        assert f"--slot {default_slot_name(other)}" in message
    finally:
        from conftest import drop_database

        drop_database(pg_server, other)


def test_an_installation_with_the_old_shared_slot_name_keeps_using_it(dsn: str, engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (id int PRIMARY KEY)"))
    capture(dsn, once=True, slot="bemi_tt")  # as the first releases did by default
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO t VALUES (1)"))
    assert bemi_tt.install(engine).slot == "bemi_tt"
    capture(dsn, once=True)
    assert [r[1] for r in _changes(dsn)] == ["CREATE"]
    assert status(dsn)["slot"] == "bemi_tt"


@pytest.mark.parametrize("name", ["app", "My-App", "x" * 63, "ÄÖ"])
def test_default_slot_names_are_valid_and_distinct(name: str) -> None:
    from capture.worker import check_slot_name

    slot = default_slot_name(name)
    assert check_slot_name(slot) == slot
    assert slot != default_slot_name(name + "_")
    assert json.dumps(slot)


def test_install_after_the_worker_ran_leaves_every_worker_table_alone(engine: sa.Engine, dsn: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (id int PRIMARY KEY)"))
    capture(dsn, once=True)  # creates changes, changes_schemas, changes_positions
    bemi_tt.install(engine)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT c.relname::text, c.relreplident::text, EXISTS (SELECT FROM pg_trigger g"
            " WHERE g.tgrelid = c.oid AND g.tgname = 'bemi_tt_context') FROM pg_class c"
            " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' ORDER BY 1"
        ).fetchall()
    assert rows == [("changes", "d", False), ("changes_digests", "d", False),
                    ("changes_positions", "d", False), ("changes_schemas", "d", False), ("t", "f", True)]


_OLD_PACKAGE = '''
import sys
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from bemi import Bemi  # the original bemi-sqlalchemy package: its hook is now on every Engine

engine = sa.create_engine(sys.argv[1])
with engine.begin() as conn:
    if sys.argv[2] == "migrate":
        conn.execute(sa.text("CREATE TABLE todo (id int PRIMARY KEY, task text)"))
        with Operations.context(MigrationContext.configure(conn)):
            Bemi.migration_upgrade()
    else:
        Bemi.set_context({"who": sys.argv[3]})
        conn.execute(sa.text(sys.argv[2]))
'''


def _old_process(url: sa.URL, *args: str) -> None:
    """A process still on the original package (its hook appends /*Bemi <json> Bemi*/ to writes)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", _OLD_PACKAGE, url.render_as_string(hide_password=False), *args],
                   check=True, capture_output=True, timeout=120)


def test_a_bemi_database_migrates_in_place_while_a_process_still_writes_through_the_old_hook(
    engine: sa.Engine, dsn: str
) -> None:
    from bemi_tt.bemi_compat import bemi_objects

    url = engine.url
    _old_process(url, "migrate")  # the database as the original package set it up
    capture(dsn, once=True)  # a worker already running: its tables get Bemi's triggers too
    _old_process(url, "INSERT INTO todo VALUES (1, 'a')", "old, on Bemi's trigger")
    with engine.connect() as conn:
        assert "event trigger _bemi_create_table_trigger" in bemi_objects(conn)

    installation = bemi_tt.install(engine)  # the new release's migration

    with engine.connect() as conn:
        assert bemi_objects(conn) == []  # nothing of Bemi's left: no trigger on any table, no function
    assert installation.warnings == ()
    _old_process(url, "UPDATE todo SET task = 'b' WHERE id = 1", "old, on bemi_tt's trigger")
    with bemi_tt.context(who="new"), engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM todo WHERE id = 1"))
    capture(dsn, once=True)

    rows = [(r[1], _without_sql(r[5])) for r in _changes(dsn) if r[0] == "todo"]
    assert rows == [("CREATE", {"who": "old, on Bemi's trigger"}),
                    ("UPDATE", {"who": "old, on bemi_tt's trigger"}), ("DELETE", {"who": "new"})]


def test_a_table_without_a_context_trigger_never_inherits_the_previous_statements_context(
    engine: sa.Engine, dsn: str
) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE tracked (id int PRIMARY KEY)"))
        conn.execute(sa.text("CREATE TABLE bare (id int PRIMARY KEY)"))
    bemi_tt.install(engine)
    with engine.begin() as conn:  # e.g. created where install had no event-trigger rights
        conn.execute(sa.text("DROP TRIGGER bemi_tt_context ON bare"))
    with engine.begin() as conn:
        with bemi_tt.context(user="ann"):
            conn.execute(sa.text("INSERT INTO tracked VALUES (1)"))
            conn.execute(sa.text("INSERT INTO bare VALUES (1)"))  # marked, but nothing reads the marker
        conn.execute(sa.text("INSERT INTO bare VALUES (2)"))  # unmarked
        with bemi_tt.context(user="bob"):
            conn.execute(sa.text("INSERT INTO tracked VALUES (2)"))
    capture(dsn, once=True)
    rows = [(r[0], r[2], _without_sql(r[5])) for r in _changes(dsn) if r[1] != "SNAPSHOT"]
    assert rows == [("tracked", "1", {"user": "ann"}), ("bare", "1", {}), ("bare", "2", {}),
                    ("tracked", "2", {"user": "bob"})]


@pytest.mark.parametrize("statement", [
    "CALL add_row(10)",
    "DO $$ BEGIN INSERT INTO tracked VALUES (10); END $$",
    "EXECUTE add_prepared(10)",
    "EXPLAIN (ANALYZE, COSTS OFF) INSERT INTO tracked VALUES (10)",
    "EXPLAIN ANALYZE INSERT INTO tracked VALUES (10)",
])
def test_writes_through_call_do_execute_and_explain_analyze_carry_the_context(
    engine: sa.Engine, dsn: str, statement: str
) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE tracked (id int PRIMARY KEY)"))
        conn.execute(sa.text(
            "CREATE PROCEDURE add_row(i int) LANGUAGE sql AS $$ INSERT INTO tracked VALUES (i) $$"))
    bemi_tt.install(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("PREPARE add_prepared(int) AS INSERT INTO tracked VALUES ($1)"))
        with bemi_tt.context(user="ann"):
            conn.exec_driver_sql(statement)
    capture(dsn, once=True)
    assert [(r[1], r[2], _without_sql(r[5])) for r in _changes(dsn)] == [("CREATE", "10", {"user": "ann"})]


def test_install_does_not_wait_forever_for_a_transaction_that_keeps_running(
    engine: sa.Engine, dsn: str, todo: sa.Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    import capture.snapshot

    monkeypatch.setattr(capture.snapshot.stage_snapshot, "__kwdefaults__", {"wait": "1s"})
    with psycopg.connect(dsn) as other:  # another client's open transaction that has written
        other.execute("CREATE TEMP TABLE held (i int)")  # (on a table install does not alter)
        other.execute("INSERT INTO held VALUES (1)")
        installation = bemi_tt.install(engine)
        other.rollback()
    assert installation.slot is None
    assert any("run bemi-tt install again" in w for w in installation.warnings)
    with psycopg.connect(dsn) as conn:  # nothing left behind that retains WAL
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
                            ).fetchone() == (0,)
