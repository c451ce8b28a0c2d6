"""Signed context end to end: hook with a key → trigger → WAL → worker with keys → ``context_verified``.

Real server, real roles: forgeries come from a non-superuser role without the hook.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

import bemi_tt
from bemi_tt.context import configure_context, context_settings
from capture.signing import ContextKey
from capture.worker import run as capture

KEY = "k1-" + "a" * 40
NEW_KEY = "k2-" + "b" * 40


@pytest.fixture(autouse=True)
def _no_signing_after() -> Iterator[None]:
    before = context_settings()
    yield
    bemi_tt.set_context(None)
    configure_context(signing_key=None, max_bytes=before.max_bytes, max_sql_bytes=before.max_sql_bytes)


@pytest.fixture
def todo(engine: sa.Engine, dsn: str) -> sa.Table:
    table = sa.Table(
        "todo", sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("task", sa.Text, nullable=False),
    )
    table.metadata.create_all(engine)
    bemi_tt.install(engine)
    capture(dsn, once=True, context_keys=())
    return table


def _rows(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT primary_key, operation, context, context_verified FROM changes "
            "WHERE operation <> 'SNAPSHOT' ORDER BY commit_position, ordinal"
        ).fetchall()


def _insert(engine: sa.Engine, todo: sa.Table, key: int, ctx: dict[str, Any] | None) -> None:
    with bemi_tt.context(ctx or {}), engine.begin() as conn:
        conn.execute(todo.insert().values(id=key, task=f"t{key}"))


@pytest.fixture
def app_role(dsn: str) -> Iterator[str]:
    """A non-superuser role that may write ``todo`` (as an application role can), nothing more."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        name = f"app_{conn.info.backend_pid}"
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'x'").format(sql.Identifier(name)))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public, bemi_tt TO {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("GRANT ALL ON todo TO {}").format(sql.Identifier(name)))
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def _as(dsn: str, role: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, user=role, password="x")


def test_signed_context_is_stored_verified_without_its_signature(
    engine: sa.Engine, dsn: str, todo: sa.Table
) -> None:
    configure_context(signing_key=KEY)
    _insert(engine, todo, 1, {"user_id": 7, "role": "admin"})
    capture(dsn, once=True, context_keys=[KEY])
    [(pk, op, ctx, verified)] = _rows(dsn)
    assert (pk, op, verified) == ("1", "CREATE", True)
    assert ctx["user_id"] == 7 and ctx["role"] == "admin" and ctx["SQL"].startswith("INSERT INTO todo")
    assert "_bemi_sig" not in ctx


def test_hand_made_marker_from_a_non_superuser_is_stored_unverified(
    engine: sa.Engine, dsn: str, todo: sa.Table, app_role: str
) -> None:
    configure_context(signing_key=KEY)
    forged = base64.b64encode(json.dumps({"user_id": 1, "role": "admin"}).encode()).decode()
    with psycopg.connect(_as(dsn, app_role), autocommit=True) as conn:
        conn.execute(f"/*bemi:{forged}*/INSERT INTO todo VALUES (1, 'forged')".encode())
    capture(dsn, once=True, context_keys=[KEY])
    [(pk, _, ctx, verified)] = _rows(dsn)
    assert (pk, ctx, verified) == ("1", {"user_id": 1, "role": "admin"}, False)


def test_signature_copied_onto_another_context_does_not_verify(
    engine: sa.Engine, dsn: str, todo: sa.Table, app_role: str
) -> None:
    configure_context(signing_key=KEY)
    enc = bemi_tt.context(user_id=7)
    with enc:
        from bemi_tt.context import current_encoded

        encoded = current_encoded()
        assert encoded is not None
        marked = encoded.marked("INSERT INTO todo VALUES (1, 'x')")
    payload = base64.b64decode(marked[len("/*bemi:"):marked.index("*/")])
    tampered = payload.replace(b'"user_id":7', b'"user_id":1')
    assert tampered != payload
    with psycopg.connect(_as(dsn, app_role), autocommit=True) as conn:
        forged = f"/*bemi:{base64.b64encode(tampered).decode()}*/INSERT INTO todo VALUES (1, 'x')"
        conn.execute(forged.encode())
        # the genuine marker replayed with another statement verifies: replay is out of scope (signing.py)
        replayed = marked[: marked.index("*/") + 2] + "INSERT INTO todo VALUES (2, 'y')"
        conn.execute(replayed.encode())
    capture(dsn, once=True, context_keys=[KEY])
    rows = _rows(dsn)
    assert [(r[2]["user_id"], r[3]) for r in rows] == [(1, False), (7, True)]


def test_direct_pg_logical_emit_message_is_denied_to_a_non_superuser_after_install(
    engine: sa.Engine, dsn: str, todo: sa.Table, app_role: str
) -> None:
    with psycopg.connect(_as(dsn, app_role)) as conn, pytest.raises(
        psycopg.errors.InsufficientPrivilege, match="permission denied for function pg_logical_emit_message"
    ):
        conn.execute("SELECT pg_logical_emit_message(true, 'bemi', '{\"user_id\": 1}')")


def test_direct_pg_logical_emit_message_where_the_server_allows_it_is_stored_unverified(
    engine: sa.Engine, dsn: str, todo: sa.Table, app_role: str
) -> None:
    # a server where the revoke was not possible (or was undone): signing is then the defence
    with psycopg.connect(dsn, autocommit=True) as conn:
        for (signature,) in conn.execute(
            "SELECT oid::regprocedure::text FROM pg_proc WHERE proname = 'pg_logical_emit_message'"
        ).fetchall():
            conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(
                sql.SQL(signature), sql.Identifier(app_role)))
    with psycopg.connect(_as(dsn, app_role)) as conn:
        conn.execute("SELECT pg_logical_emit_message(true, 'bemi', '{\"user_id\": 1}')")
        conn.execute("INSERT INTO todo VALUES (1, 'direct')")
    capture(dsn, once=True, context_keys=[KEY])
    [(_, _, ctx, verified)] = _rows(dsn)
    assert (ctx, verified) == ({"user_id": 1}, False)


def test_worker_without_key_stores_null_and_strips_the_signature(
    engine: sa.Engine, dsn: str, todo: sa.Table
) -> None:
    configure_context(signing_key=KEY)
    _insert(engine, todo, 1, {"user_id": 7})
    capture(dsn, once=True, context_keys=())
    [(_, _, ctx, verified)] = _rows(dsn)
    assert verified is None
    assert ctx["user_id"] == 7 and "_bemi_sig" not in ctx


def test_statement_without_context_is_unverified_when_the_worker_has_keys(
    engine: sa.Engine, dsn: str, todo: sa.Table
) -> None:
    configure_context(signing_key=KEY)
    _insert(engine, todo, 1, None)
    capture(dsn, once=True, context_keys=[KEY])
    assert [(r[2], r[3]) for r in _rows(dsn)] == [({}, False)]


def test_key_rotation_worker_accepts_old_and_new_keys(engine: sa.Engine, dsn: str, todo: sa.Table) -> None:
    configure_context(signing_key=KEY)
    _insert(engine, todo, 1, {"user_id": 1})
    configure_context(signing_key=NEW_KEY)
    _insert(engine, todo, 2, {"user_id": 2})
    configure_context(signing_key="k3-" + "c" * 40)  # a key the worker does not know
    _insert(engine, todo, 3, {"user_id": 3})
    capture(dsn, once=True, context_keys=[NEW_KEY, KEY])
    assert [(r[0], r[3]) for r in _rows(dsn)] == [("1", True), ("2", True), ("3", False)]


def test_worker_reads_keys_from_the_environment(
    engine: sa.Engine, dsn: str, todo: sa.Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_context(signing_key=KEY)
    _insert(engine, todo, 1, {"user_id": 1})
    monkeypatch.setenv("BEMI_TT_CONTEXT_KEY", f"{NEW_KEY} {KEY}")
    capture(dsn, once=True)
    assert [r[3] for r in _rows(dsn)] == [True]


def test_audit_carries_context_verified(engine: sa.Engine, dsn: str, todo: sa.Table) -> None:
    configure_context(signing_key=KEY)
    _insert(engine, todo, 1, {"user_id": 1})
    configure_context(signing_key=None)
    _insert(engine, todo, 2, {"user_id": 2})
    capture(dsn, once=True, context_keys=[ContextKey.of(KEY)])
    frame = bemi_tt.audit("todo", source=dsn)
    frame = frame[frame["operation"] != "SNAPSHOT"]
    assert list(zip(frame["user_id"], frame["context_verified"], strict=True)) == [(1, True), (2, False)]
