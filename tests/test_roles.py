"""Installing never breaks another role's DDL: application roles running migrations, a non-superuser
installer, a REPLICATION-only capture worker, and what an unprivileged role may call."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from psycopg.conninfo import make_conninfo

import bemi_tt.hook  # noqa: F401  (activates the hook)
from bemi_tt.context import context, set_context
from bemi_tt.triggers import install
from capture.source import ensure_publication
from capture.worker import run

MakeRole = Callable[[str, str], str]


@pytest.fixture(autouse=True)
def _no_context() -> Iterator[None]:
    set_context(None)
    yield
    set_context(None)


def _exec(dsn: str, *statements: str | sql.Composable) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _grant_create(dsn: str, database: str, role: str) -> None:
    ident = sql.Identifier(role)
    _exec(dsn, sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(ident),
          sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(sql.Identifier(database), ident))


def _tracking(dsn: str) -> dict[str, tuple[bool, str]]:
    """Per table in public: (has the context trigger, replica identity)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT c.relname, EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = c.oid"
            " AND t.tgname = 'bemi_tt_context'), c.relreplident::text FROM pg_class c"
            " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'"
            " AND c.relname NOT LIKE 'changes%'"
        ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def _changes(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT \"table\", operation, before, after, context ->> 'user' FROM changes"
            " WHERE operation <> 'SNAPSHOT' ORDER BY commit_position, ordinal"
        ).fetchall()


def _app_engine(pg_server: Any, database: str, role: str) -> sa.Engine:
    return sa.create_engine(pg_server.sqlalchemy_url(database).set(username=role))


MIGRATION = [  # what an Alembic revision run by the application's own role sends, in one transaction
    "CREATE TABLE alembic_version (version_num varchar(32) NOT NULL,"
    " CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))",
    "CREATE TABLE account (id int PRIMARY KEY, name text)",
    "CREATE INDEX account_name ON account (name)",
    "INSERT INTO alembic_version (version_num) VALUES ('a1')",
    "ALTER TABLE account ADD COLUMN email text DEFAULT 'none'",
    "CREATE TABLE account_copy AS SELECT * FROM account",
    "SELECT * INTO account_archive FROM account",
    "ALTER TABLE account_copy ADD COLUMN note text",
    "UPDATE alembic_version SET version_num = 'b2' WHERE alembic_version.version_num = 'a1'",
]


def test_after_a_superuser_install_an_application_roles_migration_succeeds_and_is_tracked(
    pg_server: Any, database: str, dsn: str, engine: sa.Engine, make_role: MakeRole
) -> None:
    app = make_role("app", "")
    _exec(dsn, sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(app)))
    install(engine)
    run(dsn, once=True)  # tracking begins
    with psycopg.connect(make_conninfo(dsn, user=app)) as conn:
        for statement in MIGRATION:
            conn.execute(statement)  # type: ignore[arg-type]
    assert _tracking(dsn) == {
        t: (True, "f") for t in ("alembic_version", "account", "account_copy", "account_archive")
    }
    eng = _app_engine(pg_server, database, app)
    try:
        with context(user="alice"), eng.begin() as conn:
            conn.execute(sa.text("INSERT INTO account (id, name) VALUES (1, 'a')"))
            conn.execute(sa.text("UPDATE account SET name = 'b' WHERE id = 1"))
    finally:
        eng.dispose()
    run(dsn, once=True)
    assert _changes(dsn) == [
        ("alembic_version", "CREATE", {}, {"version_num": "a1"}, None),
        ("alembic_version", "UPDATE", {"version_num": "a1"}, {"version_num": "b2"}, None),
        ("account", "CREATE", {}, {"id": 1, "name": "a", "email": "none"}, "alice"),
        ("account", "UPDATE", {"id": 1, "name": "a", "email": "none"},
         {"id": 1, "name": "b", "email": "none"}, "alice"),
    ]


def test_install_again_as_the_application_role_after_a_superuser_install_changes_nothing(
    pg_server: Any, database: str, dsn: str, engine: sa.Engine, make_role: MakeRole,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_role("app", "")
    _grant_create(dsn, database, app)
    install(engine)
    eng = _app_engine(pg_server, database, app)
    try:
        with caplog.at_level(logging.INFO, logger="bemi_tt"):
            report = install(eng)  # e.g. Bemi.migration_upgrade() in the application's migrations
    finally:
        eng.dispose()
    assert (report.tables_changed, report.event_trigger) == (0, True)
    assert report.warnings and "belong to role postgres" in report.warnings[0]
    assert "belong to role postgres" in caplog.text
    _exec(make_conninfo(dsn, user=app), "CREATE TABLE later (id int PRIMARY KEY)")
    assert _tracking(dsn) == {"later": (True, "f")}


def test_install_as_the_application_role_after_a_superuser_worker_made_the_schema_does_not_fail(
    pg_server: Any, database: str, dsn: str, make_role: MakeRole, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_role("app", "")
    _grant_create(dsn, database, app)
    run(dsn, once=True)  # a superuser worker installs schema-change tracking: schema bemi_tt is its own
    _exec(make_conninfo(dsn, user=app), "CREATE TABLE a (id int PRIMARY KEY)")
    eng = _app_engine(pg_server, database, app)
    try:
        with caplog.at_level(logging.WARNING, logger="bemi_tt"):
            report = install(eng)
    finally:
        eng.dispose()
    assert (report.tables_changed, report.event_trigger) == (0, False)
    assert "run bemi_tt.install(engine) as that role or a superuser" in report.warnings[0]
    assert report.warnings[0] in caplog.text


def test_install_by_a_non_superuser_owner_leaves_every_roles_ddl_working(
    pg_server: Any, database: str, dsn: str, engine: sa.Engine, make_role: MakeRole
) -> None:
    owner, other = make_role("owner", ""), make_role("other", "")
    for role in (owner, other):
        _grant_create(dsn, database, role)
    owner_dsn, other_dsn = make_conninfo(dsn, user=owner), make_conninfo(dsn, user=other)
    _exec(owner_dsn, "CREATE TABLE owned (id int PRIMARY KEY)")
    eng = _app_engine(pg_server, database, owner)
    try:
        assert not install(eng).event_trigger  # a non-superuser may not create event triggers
    finally:
        eng.dispose()
    _exec(other_dsn, "CREATE TABLE other_first (id int PRIMARY KEY)")
    # A superuser adds the event trigger later; the functions stay owned by (and run as) the owner.
    assert install(engine).event_trigger
    notices: list[str] = []
    with psycopg.connect(other_dsn, autocommit=True) as conn:
        conn.add_notice_handler(
            lambda d: notices.append(f"{d.severity}: {d.message_primary} {d.message_hint}")
        )
        conn.execute("CREATE TABLE other_later (id int PRIMARY KEY)")  # the owner may not alter it
        conn.execute("CREATE TABLE other_copy AS SELECT * FROM other_later")
        conn.execute("ALTER TABLE other_later ADD COLUMN v text")
        conn.execute("INSERT INTO other_later VALUES (1, 'x')")
    warnings = [n for n in notices if n.startswith("WARNING")]
    assert len(warnings) == 3 and "public.other_later" in warnings[0] and "public.other_copy" in warnings[1]
    assert all("as a superuser or as the owner of the table" in w for w in warnings)
    _exec(owner_dsn, "CREATE TABLE owned_later (id int PRIMARY KEY)")
    assert _tracking(dsn) == {
        "owned": (True, "f"), "other_first": (True, "f"), "owned_later": (True, "f"),
        "other_later": (False, "d"), "other_copy": (False, "d"),
    }


def test_a_replication_only_worker_creates_its_tables_and_captures_after_a_superuser_install(
    dsn: str, database: str, engine: sa.Engine, make_role: MakeRole
) -> None:
    worker = make_role("worker", "REPLICATION")
    _grant_create(dsn, database, worker)
    install(engine)
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_publication(conn, "bemi_tt")  # FOR ALL TABLES needs a superuser
    worker_dsn = make_conninfo(dsn, user=worker)
    run(worker_dsn, once=True)  # creates changes, changes_schemas, changes_positions as the worker
    _exec(dsn, "CREATE TABLE item (id int PRIMARY KEY, v text)", "INSERT INTO item VALUES (1, 'a')",
          "UPDATE item SET v = 'b'")
    assert run(worker_dsn, once=True).changes == 2
    assert _changes(dsn) == [
        ("item", "CREATE", {}, {"id": 1, "v": "a"}, None),
        ("item", "UPDATE", {"id": 1, "v": "a"}, {"id": 1, "v": "b"}, None),
    ]


def test_an_unprivileged_role_cannot_call_the_functions_that_alter_tables(
    dsn: str, engine: sa.Engine, make_role: MakeRole
) -> None:
    app = make_role("app", "")
    _exec(dsn, "CREATE TABLE victim (id int PRIMARY KEY) WITH (fillfactor = 90)")
    _exec(dsn, "ALTER TABLE victim REPLICA IDENTITY NOTHING")
    install(engine, replica_identity_full=False)
    app_dsn = make_conninfo(dsn, user=app)
    for call in ("SELECT bemi_tt.track_table('victim'::regclass, true)", "SELECT bemi_tt.track_all(true)",
                 "SELECT bemi_tt.untrack_all()", "SELECT bemi_tt.track_truncates('victim'::regclass)"):
        with psycopg.connect(app_dsn) as conn, pytest.raises(
            psycopg.errors.InsufficientPrivilege, match="permission denied for function"
        ):
            conn.execute(call)  # type: ignore[arg-type]
    with psycopg.connect(app_dsn) as conn, pytest.raises(psycopg.Error):
        conn.execute("SELECT bemi_tt.track_new_tables()")  # event trigger functions cannot be called
    for call in ("SELECT bemi_tt.track_new_partitions()", "SELECT bemi_tt.emit_truncate()",
                 "SELECT bemi_tt.partition_dropped()"):
        with psycopg.connect(app_dsn) as conn, pytest.raises(psycopg.Error):
            conn.execute(call)  # type: ignore[arg-type]  # (event) trigger functions cannot be called
    assert _tracking(dsn) == {"victim": (True, "n")}
    with psycopg.connect(dsn) as conn:
        secdef = conn.execute(
            "SELECT proname, proconfig FROM pg_proc WHERE pronamespace = 'bemi_tt'::regnamespace"
            " AND prosecdef"
        ).fetchall()
    # capture/ddl.py's: the partition TRUNCATE trigger (which reads the rows it emits), the event trigger
    # giving new partitions that trigger and emitting the rows ATTACH/DETACH PARTITION move, the one
    # recording a dropped partition's gap; none can be called
    output = ["DateStyle=ISO", "TimeZone=UTC", "extra_float_digits=3", "IntervalStyle=postgres",
              "bytea_output=hex"]
    assert sorted(secdef) == [
        ("emit_truncate", ["search_path=pg_catalog, pg_temp", *output]),
        ("partition_dropped", ["search_path=pg_catalog, pg_temp"]),
        ("track_new_partitions", ["search_path=pg_catalog, pg_temp", *output]),
        ("track_new_tables", ["search_path=pg_catalog, pg_temp"]),
    ]


def test_a_worker_that_may_not_update_an_old_publication_names_the_fix(
    dsn: str, database: str, pg_server: Any, make_role: MakeRole, caplog: pytest.LogCaptureFixture
) -> None:
    if pg_server.version < 180000:
        pytest.skip("publications carry generated columns from PostgreSQL 18 on")
    worker = make_role("worker", "REPLICATION")
    _grant_create(dsn, database, worker)
    _exec(dsn, "CREATE PUBLICATION bemi_tt FOR ALL TABLES WITH (publish_via_partition_root = true)")
    with caplog.at_level(logging.WARNING, logger="capture"):
        run(make_conninfo(dsn, user=worker), once=True)  # capture itself still works
    assert 'ALTER PUBLICATION "bemi_tt" SET (publish_generated_columns = stored);' in caplog.text
