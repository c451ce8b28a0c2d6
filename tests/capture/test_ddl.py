"""capture/ddl.py: schema changes reach changes_schemas at their exact commit position, with fills."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from psycopg.conninfo import make_conninfo

from bemi_tt.triggers import install
from capture.ddl import ddl_tracking_installed, install_ddl_tracking, uninstall_ddl_tracking
from capture.worker import run


def versions(dsn: str, table: str) -> list[tuple[int, list[dict[str, object]]]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            'SELECT commit_position, columns FROM changes_schemas WHERE "table" = %s'
            " ORDER BY commit_position, ordinal, step",
            (table,),
        ).fetchall()


def test_install_and_uninstall_are_idempotent(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert install_ddl_tracking(conn) and install_ddl_tracking(conn)
        assert ddl_tracking_installed(conn)
        assert uninstall_ddl_tracking(conn) and uninstall_ddl_tracking(conn)
        assert not ddl_tracking_installed(conn)


def test_install_accepts_a_sqlalchemy_connection(engine: sa.Engine, dsn: str) -> None:
    with engine.begin() as conn:
        assert install_ddl_tracking(conn)
    with psycopg.connect(dsn) as conn:
        assert ddl_tracking_installed(conn)


def test_added_column_with_default_records_the_value_existing_rows_take(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'a')")
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE t ADD COLUMN price numeric(10,2) NOT NULL DEFAULT 9.50")
        conn.execute("ALTER TABLE t ADD COLUMN tags text[] DEFAULT '{x,\"y z\"}'")
        conn.execute("ALTER TABLE t ADD COLUMN plain int")
        ddl_lsn = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    run(dsn, once=True)
    got = versions(dsn, "t")
    assert len(got) == 4  # snapshot, then one per ALTER (no row changed meanwhile)
    last = {c["name"]: c for c in got[-1][1]}
    assert last["price"]["fill"] == 9.5 and last["price"]["type"] == "numeric(10,2)"
    assert last["tags"]["fill"] == ["x", "y z"]
    assert "fill" not in last["plain"] and last["id"]["key"] is True
    assert ddl_lsn is not None and got[-1][0] < ddl_lsn[0]
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM changes WHERE operation <> 'SNAPSHOT'").fetchone() == (0,)


def test_column_set_change_without_ddl_tracking_is_seen_from_the_relation(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        uninstall_ddl_tracking(conn)
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("ALTER TABLE t ADD COLUMN v bigint")
        conn.execute("INSERT INTO t VALUES (2, 3)")
    run(dsn, once=True)
    got = versions(dsn, "t")
    # snapshot; uninstall's gap record; the Relation message's new column; the worker reinstalling
    # tracking ends the gap
    assert [[c["name"] for c in columns] for _, columns in got] == [["id"], ["id"], ["id", "v"], ["id", "v"]]
    assert got[2][1][1]["type"] == "bigint"


def test_drop_and_recreate_records_the_new_columns(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, a int)")
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE t")
        conn.execute("CREATE TABLE t (id text PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES ('k')")
    run(dsn, once=True)
    got = versions(dsn, "t")
    # the drop is a version of its own: no columns from there on, then the new relation's
    assert [[c["type"] for c in columns] for _, columns in got] == [["integer", "integer"], [], ["text"]]
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT primary_key FROM changes WHERE operation = 'CREATE'").fetchall() == [
            ("k",)
        ]


def test_the_workers_own_tables_are_never_recorded(dsn: str) -> None:
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE changes ADD COLUMN IF NOT EXISTS extra int")
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    run(dsn, once=True)
    with psycopg.connect(dsn) as conn:
        tables = conn.execute('SELECT DISTINCT "table" FROM changes_schemas').fetchall()
    assert tables == [("t",)]


def _rows_as_jsonb(dsn: str) -> dict[int, dict[str, object]]:
    with psycopg.connect(dsn) as conn:
        return {r[0]: r[1] for r in conn.execute("SELECT id, to_jsonb(g) FROM g").fetchall()}


def test_update_and_delete_on_a_table_with_a_stored_generated_column_work_and_are_captured(
    engine: sa.Engine, dsn: str, pg_server: Any
) -> None:
    create = ("CREATE TABLE {} (id int PRIMARY KEY, price numeric(10,2), qty int,"
              " total numeric GENERATED ALWAYS AS (price * qty) STORED)")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(create.format("g"))  # type: ignore[arg-type]
        conn.execute("INSERT INTO g (id, price, qty) VALUES (1, 2.50, 2)")
    install(engine)
    run(dsn, once=True)
    states = [_rows_as_jsonb(dsn)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(create.format("later"))  # type: ignore[arg-type]
        conn.execute("INSERT INTO later (id, price, qty) VALUES (1, 1, 1)")
        conn.execute("UPDATE later SET qty = 3")
        conn.execute("INSERT INTO g (id, price, qty) VALUES (2, 1.25, 4)")
        states.append(_rows_as_jsonb(dsn))
        conn.execute("UPDATE g SET qty = qty + 1")  # refused by PostgreSQL 18 before the fix
        states.append(_rows_as_jsonb(dsn))
        conn.execute("DELETE FROM g WHERE id = 1")
    run(dsn, once=True)
    published = pg_server.version >= 180000  # older servers never publish generated columns

    def row(state: int, key: int) -> dict[str, object]:
        return {k: v for k, v in states[state][key].items() if published or k != "total"}

    with psycopg.connect(dsn) as conn:
        got = conn.execute(
            "SELECT operation, primary_key, before, after FROM changes WHERE \"table\" = 'g'"
            " ORDER BY commit_position, ordinal"
        ).fetchall()
    assert got == [
        ("SNAPSHOT", "1", {}, row(0, 1)),
        ("CREATE", "2", {}, row(1, 2)),
        ("UPDATE", "1", row(1, 1), row(2, 1)),
        ("UPDATE", "2", row(1, 2), row(2, 2)),
        ("DELETE", "1", row(2, 1), {}),
    ]
    for table in ("g", "later"):  # one column set each: DDL messages, snapshot and rows agree on it
        # (``later`` has a second version: install's event trigger set REPLICA IDENTITY FULL)
        column_sets = {tuple(c["name"] for c in columns) for _, columns in versions(dsn, table)}
        assert column_sets == {("id", "price", "qty") + (("total",) if published else ())}


def test_a_publication_from_an_earlier_version_is_made_to_publish_generated_columns(
    engine: sa.Engine, dsn: str, pg_server: Any
) -> None:
    if pg_server.version < 180000:
        pytest.skip("publications carry generated columns from PostgreSQL 18 on")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE PUBLICATION bemi_tt FOR ALL TABLES WITH (publish_via_partition_root = true)")
        conn.execute("CREATE TABLE g (id int PRIMARY KEY, a int, b int GENERATED ALWAYS AS (a * 2) STORED)")
        conn.execute("INSERT INTO g (id, a) VALUES (1, 1)")
    install(engine)
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT pubgencols, pubviaroot FROM pg_publication").fetchall() == [("s", True)]
        conn.execute("UPDATE g SET a = 2")
    run(dsn, once=True)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT before, after FROM changes WHERE operation = 'UPDATE'").fetchall() == [
            ({"id": 1, "a": 1, "b": 2}, {"id": 1, "a": 2, "b": 4})
        ]


def test_every_roles_ddl_is_recorded(dsn: str, database: str, make_role: Callable[[str, str], str]) -> None:
    app = make_role("app", "")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(app)))
    run(dsn, once=True)  # a superuser worker installs the DDL event triggers
    with psycopg.connect(make_conninfo(dsn, user=app), autocommit=True) as conn:
        conn.execute("SET search_path = ''")  # the functions must not depend on the caller's setting
        conn.execute("CREATE TABLE public.t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO public.t VALUES (1)")
        conn.execute("ALTER TABLE public.t ADD COLUMN v text DEFAULT 'x'")
        conn.execute("CREATE TABLE public.gone AS SELECT 1 AS id")
        conn.execute("DROP TABLE public.gone")
    run(dsn, once=True)
    got = versions(dsn, "t")
    assert [[c["name"] for c in columns] for _, columns in got] == [["id"], ["id", "v"]]
    assert got[-1][1][1]["fill"] == "x"
    assert [[c["name"] for c in columns] for _, columns in versions(dsn, "gone")] == [["id"], []]
