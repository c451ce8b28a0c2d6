"""capture/ddl.py: schema changes reach changes_schemas at their exact commit position, with fills."""

from __future__ import annotations

import psycopg
import sqlalchemy as sa

from capture.ddl import ddl_tracking_installed, install_ddl_tracking, uninstall_ddl_tracking
from capture.worker import run


def versions(dsn: str, table: str) -> list[tuple[int, list[dict[str, object]]]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            'SELECT commit_position, columns FROM changes_schemas WHERE "table" = %s'
            " ORDER BY commit_position, ordinal",
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
    assert [[c["name"] for c in columns] for _, columns in got] == [["id"], ["id", "v"]]
    assert got[-1][1][1]["type"] == "bigint"


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
    assert [[c["type"] for c in columns] for _, columns in got] == [["integer", "integer"], ["text"]]
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
