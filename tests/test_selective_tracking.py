"""Selective tracking: install(exclude_tables=, exclude_columns=) keeps tables and columns out of history.

Real PostgreSQL with the capture worker; REPLICA IDENTITY FULL (install's default), so the WAL carries the
whole old row of every UPDATE and DELETE and the worker must drop the excluded values itself.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import hypothesis.strategies as st
import psycopg
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from alembic.config import Config
from alembic_project import alembic_project
from hypothesis import given
from test_least_privilege import roles as documented_roles  # noqa: F401  (a fixture of that name)

import bemi_tt
from capture.errors import ConfigurationError
from capture.exclude import drop_members
from capture.export import export_parquet
from capture.worker import run as capture

SECRET = "hash-" + os.urandom(2000).hex()  # long and incompressible: stored out of line (TOAST)


def _now(engine: sa.Engine) -> datetime:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()  # type: ignore[no-any-return]


def _setup(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(
            "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL, password_hash text, name text)"))
        conn.execute(sa.text("CREATE TABLE secrets (id int PRIMARY KEY, token text)"))
        conn.execute(sa.text("INSERT INTO users VALUES (1, 'a@x', :h || '-1', 'Ann')"), {"h": SECRET})
        conn.execute(sa.text("INSERT INTO secrets VALUES (1, 'tok-before')"))


def _changes_text(dsn: str) -> list[tuple[str, str, str, str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            'SELECT "table", operation, before::text, after::text FROM changes'
            " ORDER BY commit_position, ordinal"
        ).fetchall()
    return [(str(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]


def _workload(engine: sa.Engine) -> None:
    with bemi_tt.context(user_id=7), engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users VALUES (2, 'b@x', :h || '-2', 'Bob')"), {"h": SECRET})
        conn.execute(sa.text("UPDATE users SET password_hash = :h || '-3' WHERE id = 1"), {"h": SECRET})
        conn.execute(sa.text("UPDATE users SET name = 'Anne' WHERE id = 1"))  # the hash unchanged (TOAST)
        conn.execute(sa.text("INSERT INTO secrets VALUES (2, 'tok-after')"))
        conn.execute(sa.text("UPDATE secrets SET token = 'tok-changed'"))
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM users WHERE id = 2"))
        conn.execute(sa.text("DELETE FROM secrets WHERE id = 1"))


def test_excluded_columns_and_tables_never_reach_changes_exports_or_as_of(
    engine: sa.Engine, dsn: str, tmp_path: Path
) -> None:
    _setup(engine)
    installation = bemi_tt.install(
        engine, exclude_tables=["secrets"], exclude_columns={"users": ["password_hash"]}
    )
    assert installation.slot is not None  # install's snapshot: the existing rows, staged in bemi_tt
    capture(dsn, once=True)
    _workload(engine)
    at = _now(engine)
    capture(dsn, once=True)

    rows = _changes_text(dsn)
    assert [(t, op) for t, op, _, _ in rows] == [
        ("users", "SNAPSHOT"), ("users", "CREATE"), ("users", "UPDATE"), ("users", "UPDATE"),
        ("users", "DELETE")]
    for _, _, before, after in rows:
        assert "password_hash" not in before + after and "hash-" not in before + after
    with psycopg.connect(dsn) as conn:
        full = conn.execute("SELECT before, after FROM changes WHERE operation = 'UPDATE'").fetchall()
        # everything else is still recorded exactly, old rows included (REPLICA IDENTITY FULL)
        assert full[1] == ({"id": 1, "email": "a@x", "name": "Ann"},
                           {"id": 1, "email": "a@x", "name": "Anne"})
        identity = conn.execute("SELECT relreplident FROM pg_class WHERE relname = 'users'").fetchone()
        assert identity == ("f",)
        # the excluded table has no context trigger
        triggers = conn.execute("SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                                " WHERE c.relname = 'secrets' AND t.tgname = 'bemi_tt_context'").fetchone()
        assert triggers == (0,)
        versions = conn.execute(
            'SELECT "table", columns, event FROM changes_schemas ORDER BY commit_position, ordinal, step'
        ).fetchall()
    # the snapshot's version, then install's replica identity change: each says what is left out
    assert [v[0] for v in versions] == ["users", "users"]
    for _, columns, event in versions:
        assert [c["name"] for c in columns] == ["id", "email", "name"]
        assert {"kind": "exclude", "columns": ["password_hash"]} in [
            {k: v for k, v in e.items() if k != "command"} for e in event]

    frame = bemi_tt.as_of("users", at, source=dsn)
    assert list(frame.columns) == ["email", "name"] and frame.loc[1, "name"] == "Anne"
    history = bemi_tt.history("users", 1, source=dsn)
    assert "password_hash" not in history.columns

    export_parquet(dsn, str(tmp_path / "export"), progress=False)
    files = sorted((tmp_path / "export").rglob("*.parquet"))
    assert files
    for file in files:
        table = pq.read_table(file)
        for column in ("before", "after"):
            for value in table.column(column).to_pylist():
                assert value is None or ("password_hash" not in value and "hash-" not in value)
        # the context holds the statement text, with placeholders: the column's name, never its value
        assert all("hash-" not in value for value in table.column("context").to_pylist())
        assert set(table.column("table").to_pylist()) == {"users"}
    exported = bemi_tt.as_of("users", at, source=str(tmp_path / "export"))
    assert list(exported.columns) == ["email", "name"]


def test_worker_snapshot_leaves_out_excluded_columns_and_tables(engine: sa.Engine, dsn: str) -> None:
    _setup(engine)
    bemi_tt.install(engine, exclude_tables=["public.secrets"], exclude_columns={"users": ["password_hash"]},
                    start_tracking=False)
    capture(dsn, once=True)  # no slot yet: the worker creates it and takes its own snapshot
    rows = _changes_text(dsn)
    assert rows == [("users", "SNAPSHOT", "{}", '{"id": 1, "name": "Ann", "email": "a@x"}')]


def test_exclusion_added_later_applies_from_its_commit_in_stream_order(engine: sa.Engine, dsn: str) -> None:
    _setup(engine)
    bemi_tt.install(engine)
    capture(dsn, once=True)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE users SET name = 'Before' WHERE id = 1"))
    # the worker has not read the first UPDATE yet when the exclusion is stored: it still applies from
    # the exclusion's commit on, and the record shows where
    bemi_tt.install(engine, exclude_columns={"users": ["password_hash"]}, exclude_tables=["secrets"])
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE users SET name = 'After' WHERE id = 1"))
        conn.execute(sa.text("UPDATE secrets SET token = 'tok-after'"))
    capture(dsn, once=True)
    rows = [r for r in _changes_text(dsn) if r[1] == "UPDATE"]
    assert [(t, json.loads(a).get("name")) for t, _, _, a in rows] == [
        ("users", "Before"), ("users", "After")]
    # the worker started with the stored (newer) configuration: stricter, never looser
    assert all("password_hash" not in b + a for _, _, b, a in rows)
    with psycopg.connect(dsn) as conn:
        events = [e for (e,) in conn.execute(
            "SELECT event FROM changes_schemas WHERE event @> '[{\"command\": \"EXCLUDE\"}]'"
            " ORDER BY commit_position, ordinal, step").fetchall()]
    assert {"kind": "exclude", "columns": ["password_hash"], "command": "EXCLUDE"} in events[0] + events[1]
    assert any(e.get("kind") == "untracked" and e.get("what") == "table" for es in events for e in es)


def test_exclusion_stored_while_worker_runs_applies_to_the_rest_of_the_stream(
    engine: sa.Engine, dsn: str
) -> None:
    _setup(engine)
    bemi_tt.install(engine)
    capture(dsn, once=True)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE users SET name = 'Before' WHERE id = 1"))
    capture(dsn, once=True)
    bemi_tt.install(engine, exclude_columns={"users": ["password_hash"]})
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE users SET name = 'After' WHERE id = 1"))
    capture(dsn, once=True)
    rows = [r for r in _changes_text(dsn) if r[1] == "UPDATE"]
    assert "password_hash" in rows[0][3]  # recorded before the exclusion
    assert "password_hash" not in rows[1][2] + rows[1][3]


def test_excluding_a_primary_key_column_is_refused(engine: sa.Engine) -> None:
    _setup(engine)
    with pytest.raises(ConfigurationError, match="primary key"):
        bemi_tt.install(engine, exclude_columns={"users": ["id"]})


def test_install_without_exclusions_keeps_the_stored_ones(engine: sa.Engine) -> None:
    _setup(engine)
    bemi_tt.install(engine, exclude_columns={"users": ["password_hash"]}, start_tracking=False)
    bemi_tt.install(engine, start_tracking=False)
    with engine.connect() as conn:
        stored = conn.execute(sa.text('SELECT "table", columns FROM bemi_tt.exclusions')).all()
    assert [tuple(r) for r in stored] == [("users", ["password_hash"])]


@given(st.dictionaries(st.text(max_size=5), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=5), max_size=6), st.sets(st.text(max_size=5), max_size=3), st.booleans())
def test_drop_members_removes_exactly_the_named_members(obj: dict[str, object], names: set[str],
                                                        spaced: bool) -> None:
    text = json.dumps(obj, separators=(", ", ": ") if spaced else (",", ":"), ensure_ascii=spaced)
    out = drop_members(text, frozenset(names))
    assert json.loads(out) == {k: v for k, v in obj.items() if k not in names}
    if not names & set(obj):
        assert out == text  # untouched, byte for byte


MIGRATION = '''
import sqlalchemy as sa
from alembic import op
from bemi_tt.context import Bemi

revision = "0001"
down_revision = None


def upgrade():
    op.create_table("users", sa.Column("id", sa.Integer, primary_key=True), sa.Column("email", sa.Text),
                    sa.Column("password_hash", sa.Text))
    op.create_table("secrets", sa.Column("id", sa.Integer, primary_key=True), sa.Column("token", sa.Text))
    Bemi.migration_upgrade(exclude_tables=["secrets"], exclude_columns={"users": ["password_hash"]})


def downgrade():
    Bemi.migration_downgrade()
'''


def _alembic(tmp_path: Path, url: object) -> Config:
    return alembic_project(tmp_path / "migrations", url, {"0001_users": MIGRATION})


def test_migration_upgrade_excludes_tables_and_columns(
    tmp_path: Path, pg_server: object, database: str, engine: sa.Engine, dsn: str
) -> None:
    from alembic import command

    config = _alembic(tmp_path, pg_server.sqlalchemy_url(database))
    command.upgrade(config, "head")  # type: ignore[arg-type]
    capture(dsn, once=True)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users VALUES (1, 'a@x', 'hash-1')"))
        conn.execute(sa.text("UPDATE users SET password_hash = 'hash-2', email = 'b@x'"))
        conn.execute(sa.text("INSERT INTO secrets VALUES (1, 'tok')"))
    capture(dsn, once=True)
    rows = _changes_text(dsn)
    assert [(t, op) for t, op, _, _ in rows if t != "alembic_version"] == [
        ("users", "CREATE"), ("users", "UPDATE")]
    assert all("hash-" not in b + a and "tok" not in b + a for _, _, b, a in rows)


def test_offline_migration_emits_the_exclusions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from alembic import command

    config = _alembic(tmp_path, "postgresql://localhost/offline")
    command.upgrade(config, "0001", sql=True)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "SELECT bemi_tt.set_exclusions(" in out and '"password_hash"' in out and '"secrets"' in out


def test_stitcher_applies_a_bemi_exclude_message_from_its_position_on() -> None:
    """A worker that started with an older configuration: the message takes effect where it was written."""
    from capture.pgoutput import Begin, Column, Commit, Insert, Message, Relation, Update
    from capture.stitch import ChangeRow, SchemaChange, Stitcher

    users = Relation(2001, "public", "users", "f", (Column(True, "id", 23, -1), Column(False, "pw", 25, -1),
                                                     Column(False, "name", 25, -1)))
    other = Relation(2002, "public", "other", "f", (Column(True, "id", 23, -1),))
    s = Stitcher("db", {})
    s.add_relation(users, primary_key=["id"])
    s.add_relation(other, primary_key=["id"])
    config = [{"schema": "public", "table": "other", "columns": None},
              {"schema": "public", "table": "users", "columns": ["pw"]}]
    out = s.feed(1000, Begin(1500, 10**15, 7))
    for i, message in enumerate([
        Insert(2001, (b"1", b"secret-1", b"Ann")),
        Insert(2002, (b"1",)),
        Message(True, 0, "bemi_exclude", json.dumps(config).encode()),
        Update(2001, "O", (b"1", b"secret-1", b"Anne"), (b"1", b"secret-2", b"Ann")),
        Insert(2002, (b"2",)),
    ]):
        out += s.feed(1008 + 8 * i, message)
    out += s.feed(1500, Commit(0, 1500, 1560, 10**15))
    rows = [r for r in out if isinstance(r, ChangeRow)]
    versions = [v for v in out if isinstance(v, SchemaChange)]
    assert [(r.table, r.operation) for r in rows] == [("users", "CREATE"), ("other", "CREATE"),
                                                      ("users", "UPDATE")]
    assert json.loads(rows[0].after) == {"id": 1, "pw": "secret-1", "name": "Ann"}  # before the message
    assert json.loads(rows[2].before) == {"id": 1, "name": "Anne"} and "secret" not in rows[2].after
    assert [(v.table, json.loads(v.event)[0]["kind"]) for v in versions] == [
        ("other", "untracked"), ("users", "exclude")]
    assert [c["name"] for c in json.loads(versions[1].columns)] == ["id", "name"]


def test_each_argument_replaces_only_its_part_of_the_stored_exclusions(engine: sa.Engine) -> None:
    _setup(engine)
    bemi_tt.install(engine, exclude_columns={"users": ["password_hash"]}, start_tracking=False)
    bemi_tt.install(engine, exclude_tables=["secrets"], start_tracking=False)
    with engine.connect() as conn:
        stored = conn.execute(sa.text('SELECT "table", columns FROM bemi_tt.exclusions ORDER BY 1')).all()
    assert [tuple(r) for r in stored] == [("secrets", None), ("users", ["password_hash"])]
    bemi_tt.install(engine, exclude_columns={}, start_tracking=False)
    with engine.connect() as conn:
        stored = conn.execute(sa.text('SELECT "table", columns FROM bemi_tt.exclusions ORDER BY 1')).all()
    assert [tuple(r) for r in stored] == [("secrets", None)]


def test_cli_install_excludes_columns(engine: sa.Engine, dsn: str) -> None:
    import subprocess
    import sys

    _setup(engine)
    url = engine.url.render_as_string(hide_password=False).replace("+psycopg", "")
    result = subprocess.run([sys.executable, "-m", "bemi_tt.cli", "install", url, "--exclude-column",
                             "users.password_hash", "--exclude-table", "secrets"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    with engine.connect() as conn:
        stored = conn.execute(sa.text('SELECT "table", columns FROM bemi_tt.exclusions ORDER BY 1')).all()
    assert [tuple(r) for r in stored] == [("secrets", None), ("users", ["password_hash"])]


PUBLISHED = "SELECT tablename::text FROM pg_publication_tables WHERE pubname = 'bemi_tt' ORDER BY 1"


def test_without_superuser_an_excluded_table_leaves_the_publication_and_stays_out(
    pg_server: object, database: str, dsn: str, request: pytest.FixtureRequest
) -> None:
    from psycopg.conninfo import make_conninfo

    names, steps = request.getfixturevalue("documented_roles")
    url = pg_server.sqlalchemy_url(database)  # type: ignore[attr-defined]
    installer = sa.create_engine(url.set(username=names["installer"]))
    try:
        _setup(installer)
        bemi_tt.install(installer)  # FOR TABLE publication with both tables
        bemi_tt.install(installer, exclude_tables=["secrets"], exclude_columns={"users": ["password_hash"]})
        with installer.begin() as conn:
            for statement in steps["installer"]:
                conn.execute(sa.text(statement))
            published = conn.execute(sa.text(PUBLISHED)).all()
            assert [r[0] for r in published] == ["users"]
            conn.execute(sa.text("UPDATE users SET password_hash = 'hash-x', name = 'Ann2'"))
            conn.execute(sa.text("INSERT INTO secrets VALUES (2, 'tok')"))
        # a worker run by the publication's owner adds the tables it owns that are missing: not this one
        capture(make_conninfo(dsn, user=names["installer"]), once=True)
        with installer.connect() as conn:
            published = conn.execute(sa.text(PUBLISHED)).all()
        assert [r[0] for r in published] == ["users"]
    finally:
        installer.dispose()
    rows = _changes_text(dsn)
    assert {t for t, _, _, _ in rows} == {"users"}
    assert all("hash-" not in b + a for _, _, b, a in rows)
