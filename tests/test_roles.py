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
    # emit_context and the DDL functions: they emit messages, which the caller may not (install revoked
    # pg_logical_emit_message from PUBLIC)
    assert sorted(secdef) == [
        ("emit_context", ["search_path=pg_catalog, pg_temp"]),
        ("emit_ddl", ["search_path=pg_catalog, pg_temp", *output]),
        ("emit_drop", ["search_path=pg_catalog, pg_temp"]),
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


_EMIT_CALLS = (
    "SELECT pg_logical_emit_message(true, 'bemi', '{\"user\": \"mallory\"}')",
    "SELECT pg_logical_emit_message(true, 'bemi', '\\x7b7d'::bytea)",
    "SELECT pg_catalog.pg_logical_emit_message(false, 'bemi', '{}')",
)


def _may_not_emit(role_dsn: str) -> None:
    for call in _EMIT_CALLS:
        with psycopg.connect(role_dsn) as conn, pytest.raises(
            psycopg.errors.InsufficientPrivilege,
            match="permission denied for function pg_logical_emit_message",
        ):
            conn.execute(call)  # type: ignore[arg-type]


def test_after_a_superuser_install_the_app_role_may_not_emit_bemi_messages_but_its_writes_carry_context(
    pg_server: Any, database: str, dsn: str, engine: sa.Engine, make_role: MakeRole
) -> None:
    app, worker = make_role("app", ""), make_role("worker", "REPLICATION")
    _grant_create(dsn, database, worker)
    report = install(engine)
    assert not [w for w in report.warnings if "pg_logical_emit_message" in w]
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_publication(conn, "bemi_tt")  # FOR ALL TABLES needs a superuser
    worker_dsn = make_conninfo(dsn, user=worker)
    run(worker_dsn, once=True)
    _exec(dsn, "CREATE TABLE todo (id int PRIMARY KEY, task text)",
          sql.SQL("GRANT ALL ON todo TO {}").format(sql.Identifier(app)))
    _may_not_emit(make_conninfo(dsn, user=app))
    eng = _app_engine(pg_server, database, app)
    try:
        with context(user="alice"), eng.begin() as conn:
            conn.execute(sa.text("INSERT INTO todo VALUES (1, 'a')"))
            conn.execute(sa.text("UPDATE todo SET task = 'b' WHERE id = 1"))
        with context(user="bob"), eng.begin() as conn:
            conn.execute(sa.text("DELETE FROM todo WHERE id = 1"))
    finally:
        eng.dispose()
    assert run(worker_dsn, once=True).changes == 3  # capture works with the REPLICATION-only worker
    assert [(r[0], r[1], r[4]) for r in _changes(dsn)] == [
        ("todo", "CREATE", "alice"), ("todo", "UPDATE", "alice"), ("todo", "DELETE", "bob"),
    ]


def test_install_takes_write_rights_on_the_workers_tables_from_every_other_role(
    dsn: str, database: str, engine: sa.Engine, make_role: MakeRole
) -> None:
    app, worker = make_role("app", ""), make_role("worker", "REPLICATION")
    _grant_create(dsn, database, worker)
    install(engine)
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_publication(conn, "bemi_tt")
    worker_dsn = make_conninfo(dsn, user=worker)
    run(worker_dsn, once=True)  # the worker creates (and owns) changes and its companions
    _exec(dsn, "CREATE TABLE todo (id int PRIMARY KEY)", "INSERT INTO todo VALUES (1)")
    run(worker_dsn, once=True)
    tables = ("changes", "changes_schemas", "changes_positions", "changes_digests")
    # the usual grant for an application, made by a superuser after the worker's tables exist, covers them
    _exec(dsn, sql.SQL("GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC, {}").format(sql.Identifier(app)))
    app_dsn = make_conninfo(dsn, user=app)
    with psycopg.connect(app_dsn) as conn:  # the grant took: the application could rewrite history
        assert conn.execute("UPDATE changes SET primary_key = primary_key").rowcount > 0
    report = install(engine)  # e.g. the next migration
    assert not [w for w in report.warnings if "may write" in w]
    statements = [
        "UPDATE changes SET context = '{\"user\": \"mallory\"}'", "DELETE FROM changes",
        "INSERT INTO changes SELECT * FROM changes", *(f"TRUNCATE {t}" for t in tables),
        "UPDATE changes_positions SET chain_hash = NULL", "DELETE FROM changes_digests",
        "INSERT INTO changes_schemas SELECT * FROM changes_schemas",
    ]
    for statement in statements:
        with psycopg.connect(app_dsn) as conn, pytest.raises(
            psycopg.errors.InsufficientPrivilege, match="permission denied for table"
        ):
            conn.execute(statement)  # type: ignore[arg-type]
    with psycopg.connect(app_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM changes").fetchone() == (1,)  # reading stays granted
    _exec(dsn, "INSERT INTO todo VALUES (2)")
    assert run(worker_dsn, once=True).changes == 1  # the owner still writes


def test_install_by_a_table_owner_reports_write_rights_it_may_not_take(
    dsn: str, database: str, pg_server: Any, engine: sa.Engine, make_role: MakeRole
) -> None:
    owner, worker = make_role("owner", ""), make_role("worker", "REPLICATION")
    for role in (owner, worker):
        _grant_create(dsn, database, role)
    run(make_conninfo(dsn, user=worker), once=True)
    _exec(make_conninfo(dsn, user=worker),
          sql.SQL("GRANT UPDATE ON changes TO {}").format(sql.Identifier(owner)))
    eng = _app_engine(pg_server, database, owner)
    try:
        report = install(eng)
    finally:
        eng.dispose()
    [table_warning] = [w for w in report.warnings if "may write" in w]
    assert table_warning.endswith(
        f'run as {worker} (its owner) or a superuser: REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON changes FROM'
        f" {owner};"
    )
    [emit_warning] = [w for w in report.warnings if "every role may call pg_logical_emit_message" in w]
    assert "REVOKE EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(" in emit_warning
