"""The whole pipeline with roles holding exactly the documented grants (docs/privileges.md), no superuser."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from psycopg.conninfo import make_conninfo

import bemi_tt
from bemi_tt.triggers import grant_statements
from capture.worker import run as capture


@pytest.fixture
def roles(pg_server: Any, database: str, dsn: str) -> Any:
    """The three documented roles, created by the documented admin SQL; dropped with what they own."""
    names = {k: f"{database}_{k}" for k in ("app", "installer", "worker")}
    steps = grant_statements(database=database, application=names["app"], installer=names["installer"],
                             worker=names["worker"])
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in steps["admin"]:
            conn.execute(statement.encode())
    yield names, steps
    for role in names.values():
        for target in (dsn, pg_server.admin_dsn):
            with psycopg.connect(target, autocommit=True) as conn:
                conn.execute(f'DROP OWNED BY "{role}" CASCADE'.encode())
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        # slots belong to no role: drop the ones this test made (drop_database would too)
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                     " WHERE database = %s AND active_pid IS NULL", (database,))
        for role in names.values():
            conn.execute(f'DROP ROLE "{role}"'.encode())


def test_pipeline_with_exactly_the_documented_grants_and_no_superuser(
    pg_server: Any, database: str, dsn: str, roles: Any
) -> None:
    names, steps = roles
    url = pg_server.sqlalchemy_url(database)
    installer = sa.create_engine(url.set(username=names["installer"]))
    app = sa.create_engine(url.set(username=names["app"]))
    try:
        with installer.begin() as conn:  # the first migration, as the tables' owner
            conn.execute(sa.text("CREATE TABLE todo (id int PRIMARY KEY, task text NOT NULL)"))
            conn.execute(sa.text("INSERT INTO todo VALUES (1, 'existing')"))
        installation = bemi_tt.install(installer)
        assert installation.slot is not None  # tracking began: slot, publication FOR TABLE, snapshot
        assert not installation.event_trigger  # no event-trigger rights: install runs in each migration
        with installer.begin() as conn:
            for statement in steps["installer"]:
                conn.execute(sa.text(statement))

        with bemi_tt.context(user="ann"), app.begin() as conn:
            conn.execute(sa.text("INSERT INTO todo VALUES (2, 'new')"))
            conn.execute(sa.text("UPDATE todo SET task = 'done' WHERE id = 1"))

        with installer.begin() as conn:  # a later migration adds a table, then calls install again
            conn.execute(sa.text("CREATE TABLE later (id int PRIMARY KEY)"))
            conn.execute(sa.text(f'GRANT INSERT ON later TO "{names["app"]}"'))
        bemi_tt.install(installer)
        with bemi_tt.context(user="bob"), app.begin() as conn:
            conn.execute(sa.text("INSERT INTO later VALUES (7)"))
            conn.execute(sa.text("DELETE FROM todo WHERE id = 2"))

        stats = capture(make_conninfo(dsn, user=names["worker"]), once=True)  # REPLICATION, no superuser
        assert stats.snapshot_rows == 1
        assert not [w for w in installation.warnings if "pg_logical_emit_message" in w]
        with psycopg.connect(make_conninfo(dsn, user=names["worker"]), autocommit=True) as conn:
            for statement in steps["worker"]:
                conn.execute(statement.encode())
        app_dsn = make_conninfo(dsn, user=names["app"])
        for forgery in ("SELECT pg_logical_emit_message(true, 'bemi', '{\"user\": \"mallory\"}')",
                        "UPDATE changes SET context = '{}'"):
            with psycopg.connect(app_dsn) as conn, pytest.raises(
                psycopg.errors.InsufficientPrivilege, match="permission denied for"
            ):
                conn.execute(forgery)  # type: ignore[arg-type]
    finally:
        installer.dispose()
        app.dispose()

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT \"table\", operation, primary_key, context - 'SQL' FROM changes"
            " ORDER BY commit_position, ordinal"
        ).fetchall()
        superusers = conn.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s) AND rolsuper", (list(names.values()),)
        ).fetchone()
    assert superusers == (0,)
    assert rows == [
        ("todo", "SNAPSHOT", "1", {}),
        ("todo", "CREATE", "2", {"user": "ann"}),
        ("todo", "UPDATE", "1", {"user": "ann"}),
        ("later", "CREATE", "7", {"user": "bob"}),
        ("todo", "DELETE", "2", {"user": "bob"}),
    ]


def test_bemi_tt_grants_prints_the_documented_sql(capsys: pytest.CaptureFixture[str]) -> None:
    from bemi_tt.cli import main

    assert main(["grants", "--database", "shop", "--worker", "w"]) == 0
    out = capsys.readouterr().out
    assert 'CREATE ROLE "w" LOGIN REPLICATION;' in out
    assert 'GRANT SELECT, DELETE ON bemi_tt.snapshots, bemi_tt.snapshot_rows TO "w";' in out
    assert "' TO ' || '\"bemi_installer\"'; EXECUTE 'REVOKE EXECUTE ON FUNCTION '" in out
    assert ('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON "public".changes, "public".changes_schemas,'
            ' "public".changes_positions, "public".changes_digests FROM PUBLIC, "app";') in out


def _emit_signatures(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(
            "SELECT oid::regprocedure::text FROM pg_proc WHERE proname = 'pg_logical_emit_message' ORDER BY 1"
        )]


def _statements(warning: str) -> list[str]:
    """The SQL a warning tells the DBA to run (after its last colon)."""
    tail = warning.rsplit("superuser: ", 1)[1]
    return [part.strip() for part in tail.split(";") if part.strip()]


@pytest.mark.parametrize("before", ["public", "nobody"])
def test_install_by_a_non_superuser_reports_the_statements_that_close_pg_logical_emit_message(
    pg_server: Any, database: str, dsn: str, roles: Any, before: str
) -> None:
    """``public``: the DBA skipped the revoke; ``nobody``: revoked it without granting the installer."""
    names, steps = roles
    action = "GRANT EXECUTE ON FUNCTION {} TO PUBLIC" if before == "public" else \
        "REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC, {}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        for signature in _emit_signatures(dsn):
            conn.execute(sql.SQL(action).format(sql.SQL(signature), sql.Identifier(names["installer"])))
    url = pg_server.sqlalchemy_url(database)
    installer = sa.create_engine(url.set(username=names["installer"]))
    app = sa.create_engine(url.set(username=names["app"]))
    try:
        with installer.begin() as conn:
            conn.execute(sa.text("CREATE TABLE todo (id int PRIMARY KEY)"))
            conn.execute(sa.text(f'GRANT INSERT ON todo TO "{names["app"]}"'))
        warnings = [w for w in bemi_tt.install(installer).warnings if "pg_logical_emit_message" in w]
        if before == "public":
            [warning] = warnings
            assert "every role may call pg_logical_emit_message" in warning
        else:
            [warning] = warnings
            assert "every write to a tracked table fails" in warning
            with pytest.raises(sa.exc.ProgrammingError, match="permission denied for function"), \
                    bemi_tt.context(user="ann"), app.begin() as conn:  # a write with context
                conn.execute(sa.text("INSERT INTO todo VALUES (0)"))
        with psycopg.connect(dsn, autocommit=True) as conn:  # the DBA runs what the warning says
            for statement in _statements(warning):
                conn.execute(statement.encode())
        assert not [w for w in bemi_tt.install(installer).warnings if "pg_logical_emit_message" in w]
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied for function"), \
                app.begin() as conn:
            conn.execute(sa.text("SELECT pg_logical_emit_message(true, 'bemi', '{}')"))
        with bemi_tt.context(user="ann"), app.begin() as conn:
            conn.execute(sa.text("INSERT INTO todo VALUES (1)"))
        with installer.begin() as conn:
            for statement in steps["installer"]:
                conn.execute(sa.text(statement))
        capture(make_conninfo(dsn, user=names["worker"]), once=True)
    finally:
        installer.dispose()
        app.dispose()
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT operation, context ->> 'user' FROM changes WHERE operation <> 'SNAPSHOT'")
        assert rows.fetchall() == [("CREATE", "ann")]
