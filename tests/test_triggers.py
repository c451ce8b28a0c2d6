"""install / uninstall against real PostgreSQL: which tables get the statement trigger, partitions,
tables created later, replica identity and its restoration, roles without event-trigger rights."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from wal_messages import create_slot, read_events, row_contexts, without_sql

import bemi_tt.hook  # noqa: F401  (activates the hook)
from bemi_tt.context import context, set_context
from bemi_tt.embedded import EmbeddedPostgres
from bemi_tt.triggers import EVENT_TRIGGER, TRIGGER, install, install_statements, uninstall
from capture.errors import ConfigurationError
from capture.schema import changes_ddl, schemas_ddl

WEIRD_SCHEMA = 'Odd Schema-"x"'
WEIRD_TABLES = [("public", "Mixed Case"), ("public", "with-dash"), ("public", "with space"),
                ("public", 'quo"te'), (WEIRD_SCHEMA, "t"), (WEIRD_SCHEMA, "Tab;le")]


@pytest.fixture(autouse=True)
def _no_context() -> Iterator[None]:
    set_context(None)
    yield
    set_context(None)


def _exec(dsn: str, *statements: str | sql.Composable) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _query(dsn: str, statement: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(statement).fetchall()  # type: ignore[arg-type]


def _triggered(dsn: str) -> set[tuple[str, str]]:
    rows = _query(
        dsn,
        "SELECT n.nspname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        f"JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname = '{TRIGGER}'",
    )
    return {(r[0], r[1]) for r in rows}


def _identities(dsn: str) -> dict[str, str]:
    rows = _query(dsn, "SELECT relname, relreplident::text FROM pg_class"
                  " WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p')")
    return dict(rows)  # type: ignore[arg-type]


def _create(dsn: str, schema: str, table: str, columns: str = "id int PRIMARY KEY, v text") -> None:
    _exec(dsn, sql.SQL("CREATE TABLE {} (" + columns + ")").format(sql.Identifier(schema, table)))


def test_install_puts_the_trigger_on_every_user_table_whatever_its_name(engine: sa.Engine, dsn: str) -> None:
    _exec(dsn, sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(WEIRD_SCHEMA)))
    for schema, table in WEIRD_TABLES:
        _create(dsn, schema, table)
    _exec(dsn, changes_ddl(), schemas_ddl(), "CREATE UNLOGGED TABLE scratch (id int)",
          "CREATE VIEW v AS SELECT 1 AS one")

    report = install(engine)

    assert _triggered(dsn) == set(WEIRD_TABLES)  # not changes/changes_schemas, unlogged tables or views
    assert report.tables_changed == len(WEIRD_TABLES) and report.event_trigger
    assert _query(dsn, f"SELECT evtname FROM pg_event_trigger WHERE evtname = '{EVENT_TRIGGER}'")

    with context(who="weird"), engine.begin() as conn:
        create_slot(str(dsn))
        for schema, table in WEIRD_TABLES:
            target = sa.table(table, sa.column("id"), sa.column("v"), schema=schema)
            conn.execute(sa.insert(target).values(id=1, v="x"))
    changes = row_contexts(read_events(dsn))
    assert [without_sql(c) for _, c in changes] == [{"who": "weird"}] * len(WEIRD_TABLES)


def test_install_twice_changes_nothing_the_second_time(engine: sa.Engine, dsn: str) -> None:
    _create(dsn, "public", "a")
    first = install(engine)
    triggers = _triggered(dsn)
    second = install(engine)
    assert (first.tables_changed, second.tables_changed) == (1, 0)
    assert _triggered(dsn) == triggers
    assert _query(dsn, f"SELECT count(*) FROM pg_trigger WHERE tgname = '{TRIGGER}'") == [(1,)]


def test_tables_created_later_get_the_trigger_and_replica_identity(engine: sa.Engine, dsn: str) -> None:
    install(engine)
    _create(dsn, "public", "Later-Table")
    _exec(dsn, "CREATE TABLE made_as AS SELECT 1 AS id", "SELECT 1 AS id INTO selected_into",
          "CREATE TABLE parted (id int, v text) PARTITION BY RANGE (id)",
          "CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (10)",
          "CREATE UNLOGGED TABLE turned_logged (id int)", "ALTER TABLE turned_logged SET LOGGED")
    expected = {"Later-Table", "made_as", "selected_into", "parted", "parted_1", "turned_logged"}
    assert _triggered(dsn) == {("public", t) for t in expected}
    assert _identities(dsn) == dict.fromkeys(expected, "f")


def test_partitioned_table_emits_one_message_per_statement(engine: sa.Engine, dsn: str) -> None:
    _exec(dsn, "CREATE TABLE p (id int, v text) PARTITION BY RANGE (id)",
          "CREATE TABLE p_low PARTITION OF p FOR VALUES FROM (0) TO (100)",
          "CREATE TABLE p_high PARTITION OF p FOR VALUES FROM (100) TO (200)")
    install(engine)
    create_slot(dsn)
    with engine.begin() as conn:
        with context(via="parent"):
            conn.execute(sa.text("INSERT INTO p VALUES (1, 'a'), (150, 'b')"))
            conn.execute(sa.text("UPDATE p SET v = 'c'"))
        with context(via="partition"):
            conn.execute(sa.text("INSERT INTO p_low VALUES (2, 'd')"))
        with context(via="truncate"):
            conn.execute(sa.text("TRUNCATE p"))  # fires the parent's and each partition's trigger
    events = read_events(dsn)
    messages = [without_sql(e.context()) for e in events if e.kind == "MESSAGE"]
    assert messages == [{"via": "parent"}, {"via": "parent"}, {"via": "partition"}, {"via": "truncate"}]
    assert [(e.kind, without_sql(c)["via"]) for e, c in row_contexts(events)] == [
        ("INSERT", "parent"), ("INSERT", "parent"), ("UPDATE", "parent"), ("UPDATE", "parent"),
        ("INSERT", "partition"), ("TRUNCATE", "truncate"),
    ]


def test_uninstall_restores_each_tables_previous_replica_identity(engine: sa.Engine, dsn: str) -> None:
    _exec(dsn, "CREATE TABLE d (id int PRIMARY KEY)", "CREATE TABLE n (id int)",
          "ALTER TABLE n REPLICA IDENTITY NOTHING", "CREATE TABLE i (a int NOT NULL, b int NOT NULL)",
          "CREATE UNIQUE INDEX i_ab ON i (a, b)", "ALTER TABLE i REPLICA IDENTITY USING INDEX i_ab",
          "CREATE TABLE f (id int)", "ALTER TABLE f REPLICA IDENTITY FULL")
    before = _identities(dsn)
    install(engine)
    assert _identities(dsn) == dict.fromkeys(before, "f")
    uninstall(engine)
    assert _identities(dsn) == before == {"d": "d", "n": "n", "i": "i", "f": "f"}
    assert _query(dsn, "SELECT indexrelid::regclass::text FROM pg_index WHERE indisreplident") == [("i_ab",)]


def test_install_without_replica_identity_full_leaves_it_alone(engine: sa.Engine, dsn: str) -> None:
    _create(dsn, "public", "a")
    install(engine, replica_identity_full=False)
    assert _identities(dsn) == {"a": "d"}
    assert _triggered(dsn) == {("public", "a")}


def test_uninstall_removes_exactly_what_install_created(engine: sa.Engine, dsn: str) -> None:
    _create(dsn, "public", "a")
    _exec(dsn, "CREATE FUNCTION mine() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$",
          "CREATE TRIGGER mine AFTER INSERT ON a FOR EACH STATEMENT EXECUTE FUNCTION mine()")
    catalog = (
        "SELECT (SELECT array_agg(tgname::text ORDER BY tgname) FROM pg_trigger WHERE NOT tgisinternal),"
        " (SELECT count(*) FROM pg_event_trigger),"
        " (SELECT count(*) FROM pg_namespace WHERE nspname = 'bemi_tt'),"
        " (SELECT count(*) FROM pg_proc WHERE pronamespace::regnamespace::text = 'bemi_tt')"
    )
    before = _query(dsn, catalog)
    install(engine)
    assert _query(dsn, catalog) != before
    assert uninstall(engine) == 1
    assert _query(dsn, catalog) == before == [(["mine"], 0, 0, 0)]
    assert uninstall(engine) == 0  # idempotent


def test_uninstall_keeps_the_schema_when_something_else_lives_in_it(engine: sa.Engine, dsn: str) -> None:
    install(engine)
    _exec(dsn, "CREATE TABLE bemi_tt.someone_elses (id int)")
    uninstall(engine)
    assert _query(dsn, "SELECT count(*) FROM pg_class WHERE relnamespace = 'bemi_tt'::regnamespace") == [(1,)]
    assert _query(dsn, "SELECT count(*) FROM pg_proc WHERE pronamespace = 'bemi_tt'::regnamespace") == [(0,)]


def test_crafted_or_broken_markers_never_break_a_write(engine: sa.Engine, dsn: str) -> None:
    _create(dsn, "public", "a")
    install(engine)
    create_slot(dsn)
    statements = ["/*bemi:not base64!*/INSERT INTO a VALUES (1)", "/*bemi:QQ*/INSERT INTO a VALUES (2)",
                  "/*bemi:Q===*/INSERT INTO a VALUES (3)", "/*bemi:*/INSERT INTO a VALUES (4)",
                  "/*bemi: e30= */INSERT INTO a VALUES (5)"]
    _exec(dsn, *statements)
    assert _query(dsn, "SELECT count(*) FROM a") == [(len(statements),)]
    assert [e.kind for e in read_events(dsn) if e.kind == "MESSAGE"] == []


def test_role_without_event_trigger_rights_gets_a_notice_and_tracking_still_works(
    pg_server: Any, database: str, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    role = f"app_{database}"
    _exec(pg_server.admin_dsn, sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)),
          sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(sql.Identifier(database), sql.Identifier(role)))
    _exec(dsn, sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(role)))
    app_dsn = psycopg.conninfo.make_conninfo(dsn, user=role)
    eng = sa.create_engine(pg_server.sqlalchemy_url(database).set(username=role))
    try:
        _create(app_dsn, "public", "a")
        with caplog.at_level(logging.WARNING, logger="bemi_tt"):
            report = install(eng)
        assert not report.event_trigger
        assert "install(engine) again" in caplog.text
        assert _triggered(dsn) == {("public", "a")}
        create_slot(dsn)
        with context(user="app"), eng.begin() as conn:
            conn.execute(sa.text("INSERT INTO a VALUES (1, 'x')"))
        assert [without_sql(c) for _, c in row_contexts(read_events(dsn))] == [{"user": "app"}]
        _create(app_dsn, "public", "later")  # no event trigger: the documented fix is to install again
        assert install(eng).tables_changed == 1
        assert _triggered(dsn) == {("public", "a"), ("public", "later")}
        uninstall(eng)
        assert _triggered(dsn) == set()
    finally:
        eng.dispose()
        _exec(dsn, sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        ident = sql.Identifier(role)
        _exec(pg_server.admin_dsn,
              sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(sql.Identifier(database), ident),
              sql.SQL("DROP ROLE {}").format(ident))


def test_install_accepts_a_url_and_a_connection(engine: sa.Engine, dsn: str) -> None:
    _create(dsn, "public", "a")
    install(engine.url.render_as_string(hide_password=False), replica_identity_full=False)
    assert _triggered(dsn) == {("public", "a")}
    _create(dsn, "public", "b")
    with engine.connect() as conn:
        install(conn)
        conn.rollback()  # a passed connection is the caller's transaction
    assert _identities(dsn) == {"a": "d", "b": "d"}
    with engine.connect() as conn:
        install(conn)
        conn.commit()
    assert _identities(dsn) == {"a": "f", "b": "f"}


@pytest.mark.parametrize("target", [42, None, object()], ids=["int", "none", "object"])
def test_install_rejects_what_is_not_an_engine(target: Any) -> None:
    with pytest.raises(ConfigurationError, match="expected a SQLAlchemy Engine"):
        install(target)


def test_install_rejects_other_databases() -> None:
    with pytest.raises(ConfigurationError, match="'sqlite'"):
        install("sqlite://")


def test_install_rejects_a_non_boolean_flag(engine: sa.Engine) -> None:
    with pytest.raises(ConfigurationError, match="replica_identity_full"):
        install(engine, replica_identity_full="yes")  # type: ignore[arg-type]


def test_install_statements_are_constant_sql_for_offline_migrations() -> None:
    on, off = install_statements(), install_statements(replica_identity_full=False)
    assert on != off and len(on) == len(off)
    assert any("CREATE EVENT TRIGGER" in s for s in on)


class _ReplicaServer(EmbeddedPostgres):
    """An embedded server with ``wal_level=replica``: EmbeddedPostgres refuses to start without ``logical``
    (its readiness check asserts it), which is exactly what this server must not have."""

    def __init__(self) -> None:
        super().__init__(settings={"wal_level": "replica"})

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def test_install_on_wal_level_replica_says_capture_cannot_work_and_writes_still_work(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with _ReplicaServer() as pg:
        eng = sa.create_engine(pg.url("postgresql+psycopg"))
        try:
            with eng.begin() as conn:
                conn.execute(sa.text("CREATE TABLE t (id int PRIMARY KEY)"))
            with caplog.at_level(logging.WARNING, logger="bemi_tt"):
                report = install(eng)
            assert report.wal_level == "replica" and not report.capture_ready
            assert len(report.warnings) == 1 and "ALTER SYSTEM SET wal_level = logical" in report.warnings[0]
            assert report.warnings[0] in caplog.text
            assert (report.tables_changed, report.event_trigger) == (1, True)  # the migration still works
            with context(user="x"), eng.begin() as conn:
                conn.execute(sa.text("INSERT INTO t VALUES (1)"))
                conn.execute(sa.text("CREATE TABLE later (id int PRIMARY KEY)"))
                conn.execute(sa.text("UPDATE t SET id = 2"))
        finally:
            eng.dispose()
    assert install_statements()[0].startswith("DO $$") and "wal_level" in install_statements()[0]


def test_a_table_with_a_virtual_generated_column_keeps_its_identity_so_updates_work(
    engine: sa.Engine, dsn: str, pg_server: Any
) -> None:
    if pg_server.version < 180000:
        pytest.skip("virtual generated columns arrived in PostgreSQL 18")
    table = "CREATE TABLE {} (id int PRIMARY KEY, a int, b int GENERATED ALWAYS AS (a * 2) VIRTUAL)"
    _exec(dsn, table.format("v"), "INSERT INTO v (id, a) VALUES (1, 1)",
          "CREATE PUBLICATION p FOR ALL TABLES WITH (publish_generated_columns = stored)")
    _create(dsn, "public", "plain")
    _exec(dsn, "INSERT INTO plain VALUES (1, 'x')")
    install(engine)
    assert _identities(dsn) == {"v": "d", "plain": "f"}
    _exec(dsn, table.format("later"), "INSERT INTO later (id, a) VALUES (1, 1)",
          "ALTER TABLE plain ADD COLUMN w int GENERATED ALWAYS AS (id * 2) VIRTUAL")
    assert _identities(dsn) == {"v": "d", "later": "d", "plain": "d"}  # plain is back to its own
    assert _triggered(dsn) == {("public", "v"), ("public", "later"), ("public", "plain")}
    _exec(dsn, "UPDATE v SET a = 2", "DELETE FROM v", "UPDATE later SET a = 2",  # FULL would refuse these
          "UPDATE plain SET v = 'y'")
    uninstall(engine)
    assert _identities(dsn) == {"v": "d", "later": "d", "plain": "d"} and _triggered(dsn) == set()
