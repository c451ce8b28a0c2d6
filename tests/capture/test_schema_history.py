"""The schema record (``changes_schemas``): every relation's versions by OID, with events, in stream order.

Each test changes the schema while the worker is stopped and starts it afterwards, so what the worker
records can only come from the stream, never from the catalog as it is when the worker decodes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic_project import alembic_project

from bemi_tt.sources import PostgresSource
from bemi_tt.timetravel import as_of
from bemi_tt.triggers import install, uninstall
from capture.errors import SourceError
from capture.worker import run


def changes(dsn: str) -> list[tuple[str, str, str | None]]:
    with psycopg.connect(dsn) as conn:
        return [
            (t, op, pk)
            for t, op, pk in conn.execute(
                'SELECT "table", operation, primary_key FROM changes ORDER BY commit_position, ordinal'
            ).fetchall()
        ]


def record(dsn: str) -> list[dict[str, Any]]:
    """Every version, in stream order."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            'SELECT "table", relation_oid, event, context, replica_identity, columns FROM changes_schemas'
            " ORDER BY commit_position, ordinal, step"
        ).fetchall()
    return [
        {"table": t, "oid": oid, "event": event, "context": ctx, "identity": ident, "columns": cols}
        for t, oid, event, ctx, ident, cols in rows
    ]


def kinds(version: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in version["event"]]


def test_a_worker_behind_the_ddl_stores_the_key_valid_at_each_change(engine: sa.Engine, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, code text NOT NULL, v int)")
        conn.execute("INSERT INTO t VALUES (1, 'a', 0)")
    install(engine)  # REPLICA IDENTITY FULL: pgoutput's key flags say nothing about the primary key
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:  # the worker is stopped from here on
        conn.execute("INSERT INTO t VALUES (2, 'b', 0)")
        conn.execute("ALTER TABLE t DROP CONSTRAINT t_pkey, ADD PRIMARY KEY (code)")
        conn.execute("INSERT INTO t VALUES (3, 'c', 0)")
        conn.execute("UPDATE t SET v = 1 WHERE id = 1")
        conn.execute("ALTER TABLE t RENAME COLUMN code TO label")
        conn.execute("INSERT INTO t VALUES (4, 'd', 0)")
        conn.execute("ALTER TABLE t RENAME TO t2")
        conn.execute("INSERT INTO t2 VALUES (5, 'e', 0)")
        conn.execute("DROP TABLE t2")
        conn.execute("CREATE TABLE t2 (k text, n int, PRIMARY KEY (k, n))")
        conn.execute("INSERT INTO t2 VALUES ('x', 1)")
    run(dsn, once=True)
    assert changes(dsn) == [
        ("t", "SNAPSHOT", "1"),
        ("t", "CREATE", "2"),
        ("t", "CREATE", "c"),
        ("t", "UPDATE", "a"),
        ("t", "CREATE", "d"),
        ("t2", "CREATE", "e"),
        ("t2", "CREATE", '["x",1]'),
    ]


def test_renames_key_changes_and_drops_are_events_of_one_relation(engine: sa.Engine, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, code text NOT NULL, v int)")
    install(engine)
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE t DROP CONSTRAINT t_pkey, ADD PRIMARY KEY (code)")
        conn.execute("ALTER TABLE t RENAME COLUMN code TO label")
        conn.execute("ALTER TABLE t ALTER COLUMN v TYPE bigint")
        conn.execute("ALTER TABLE t DROP COLUMN v")
        conn.execute("ALTER TABLE t ADD COLUMN w text DEFAULT 'z'")
        conn.execute("ALTER TABLE t RENAME TO t2")
        conn.execute("DROP TABLE t2")
        conn.execute("CREATE TABLE t2 (id int PRIMARY KEY)")
    run(dsn, once=True)
    got = record(dsn)
    first, second = got[0]["oid"], got[-1]["oid"]
    assert first != second and {v["oid"] for v in got} == {first, second}
    events = [(v["table"], v["oid"] == first, e) for v in got for e in v["event"]]
    stripped = [(t, same, {k: x for k, x in e.items() if k != "command"}) for t, same, e in events]
    assert stripped[1:] == [
        # install snapshots the rows at the slot's point, then sets REPLICA IDENTITY FULL: a real event
        ("t", True, {"kind": "replica_identity", "old": "d", "new": "f"}),
        ("t", True, {"kind": "primary_key", "old": ["id"], "new": ["code"]}),
        ("t", True, {"kind": "rename_column", "attnum": 2, "old": "code", "new": "label"}),
        ("t", True, {"kind": "alter_column_type", "attnum": 3, "name": "v", "old": "integer",
                     "new": "bigint"}),
        ("t", True, {"kind": "rewrite", "captured": True, "reason": 4}),  # no rows to carry
        ("t", True, {"kind": "drop_column", "attnum": 3, "name": "v"}),
        ("t", True, {"kind": "add_column", "attnum": 4, "name": "w", "fill": "z"}),
        ("t2", True, {"kind": "rename_table", "old": {"schema": "public", "table": "t"},
                      "new": {"schema": "public", "table": "t2"}}),
        ("t2", True, {"kind": "drop_table"}),
        ("t2", False, {"kind": "create_table"}),
        ("t2", False, {"kind": "replica_identity", "old": "d", "new": "f"}),  # install's event trigger
    ]
    assert kinds(got[0]) == ["new_relation"] and got[0]["event"][0]["command"] == "SNAPSHOT"
    renamed = next(v for v in got if kinds(v) == ["rename_column"])
    assert [(c["attnum"], c["name"], c["key"]) for c in renamed["columns"]] == [
        (1, "id", False), (2, "label", True), (3, "v", False)
    ]
    assert got[-1]["identity"] == "f" and got[-3]["columns"] == []


def test_a_dropped_and_recreated_table_is_a_new_relation_without_ddl_tracking(dsn: str) -> None:
    from capture.ddl import uninstall_ddl_tracking

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        uninstall_ddl_tracking(conn)
        conn.execute("DROP TABLE t")
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
    run(dsn, once=True)
    got = [v for v in record(dsn) if v["table"] == "t"]
    assert len({v["oid"] for v in got}) == 2
    assert kinds(got[-1]) == ["new_relation"]
    assert [c["name"] for c in got[-1]["columns"]] == [c["name"] for c in got[0]["columns"]]


def test_a_ddl_event_carries_the_context_of_its_transaction(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    run(dsn, once=True)
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT pg_logical_emit_message(true, 'bemi', %s)", (json.dumps({"who": "migration"}),))
        conn.execute("ALTER TABLE t ADD COLUMN v int")
        conn.commit()
        conn.execute("ALTER TABLE t ADD COLUMN w int")  # no context in this transaction
        conn.commit()
    run(dsn, once=True)
    got = record(dsn)
    assert [(kinds(v), v["context"]) for v in got[1:]] == [
        (["add_column"], {"who": "migration"}),
        (["add_column"], {}),
    ]


def test_uninstall_and_install_record_the_tracking_gap(engine: sa.Engine, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
    install(engine)
    run(dsn, once=True)
    uninstall(engine)
    with psycopg.connect(dsn, autocommit=True) as conn:  # untracked: no DDL event reaches the WAL
        conn.execute("DROP TABLE t")
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    install(engine)
    run(dsn, once=True)
    got = [v for v in record(dsn) if v["table"] == "t"]
    old, new = got[0]["oid"], got[-1]["oid"]
    assert old != new
    assert [(v["oid"] == old, kinds(v)) for v in got] == [
        (True, ["new_relation"]),
        (True, ["replica_identity"]),  # install set FULL after the snapshot it took at the slot's point
        (True, ["untracked"]),
        (False, ["new_relation", "tracked"]),
    ]
    assert got[2]["event"][0]["what"] == "ddl" and got[3]["event"][1]["empty"] is True
    install(engine)  # installing again is no gap and no event
    run(dsn, once=True)
    assert len([v for v in record(dsn) if v["table"] == "t"]) == 4


MIGRATION = '''
import sqlalchemy as sa
from alembic import op
from bemi_tt.context import Bemi

revision = "0001"
down_revision = None


def upgrade():
    op.create_table("todo", sa.Column("id", sa.Integer, primary_key=True), sa.Column("task", sa.Text))
    Bemi.migration_upgrade()


def downgrade():
{downgrade}
'''


@pytest.mark.parametrize("tracking_removed", ["last", "first"])
def test_alembic_downgrade_base_and_upgrade_head_record_the_dropped_rows_as_gone(
    tmp_path: Path, pg_server: Any, database: str, engine: sa.Engine, dsn: str, tracking_removed: str
) -> None:
    steps = ['op.drop_table("todo")', "Bemi.migration_downgrade()"]  # documented: migration_downgrade last
    if tracking_removed == "first":  # the order of the report: the drop runs untracked
        steps.reverse()
    migration = MIGRATION.replace("{downgrade}", "\n".join("    " + s for s in steps))
    url = pg_server.sqlalchemy_url(database)
    config = alembic_project(tmp_path / "migrations", url, {"0001_todo": migration})
    command.upgrade(config, "head")
    run(dsn, once=True)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO todo (id, task) SELECT i, 'x' FROM generate_series(1, 5) AS i"))
    run(dsn, once=True)
    command.downgrade(config, "base")
    command.upgrade(config, "head")
    run(dsn, once=True)
    got = [v for v in record(dsn) if v["table"] == "todo"]
    old, new = got[0]["oid"], got[-1]["oid"]
    assert old != new
    # the old relation ends: dropped (tracked) or a gap begins (untracked); the new one starts empty
    assert kinds([v for v in got if v["oid"] == old][-1]) == (
        ["drop_table"] if tracking_removed == "last" else ["untracked"]
    )
    assert [kinds(v) for v in got if v["oid"] == new] == [["new_relation", "tracked"]]
    assert got[-1]["event"][1]["empty"] is True
    # the engine: the recreated table is empty; the dropped rows never come back
    assert len(as_of("todo", "now", source=PostgresSource(dsn))) == 0


def test_truncate_records_exactly_the_rows_of_the_tables_it_emptied(engine: sa.Engine, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE m (id int PRIMARY KEY, v text) PARTITION BY RANGE (id)")
        conn.execute("CREATE TABLE p1 PARTITION OF m FOR VALUES FROM (0) TO (10)")
        conn.execute("CREATE TABLE p2 PARTITION OF m FOR VALUES FROM (10) TO (20)")
        conn.execute("CREATE TABLE p3 PARTITION OF m FOR VALUES FROM (20) TO (30) PARTITION BY RANGE (id)")
        conn.execute("CREATE TABLE p3a PARTITION OF p3 FOR VALUES FROM (20) TO (25)")
        conn.execute("CREATE TABLE p3b PARTITION OF p3 FOR VALUES FROM (25) TO (30)")
        conn.execute("CREATE TABLE parent (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent)")
        conn.execute("INSERT INTO m VALUES (1, 'a'), (2, NULL), (11, 'b'), (21, 'c'), (26, 'd')")
        conn.execute("INSERT INTO parent VALUES (1)")
        conn.execute("INSERT INTO child VALUES (1, 1)")
    install(engine)
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE p4 PARTITION OF m FOR VALUES FROM (30) TO (40)")  # after install
        conn.execute("INSERT INTO m VALUES (31, 'e'), (3, 'f')")
        conn.execute("TRUNCATE p1")
        conn.execute("TRUNCATE ONLY p2")
        conn.execute("TRUNCATE p3")  # a partitioned partition: both of its leaves
        conn.execute("TRUNCATE p4")
        conn.execute("INSERT INTO m VALUES (5, 'g')")
        conn.execute("TRUNCATE m")  # the root: one TRUNCATE, no row-by-row record
        conn.execute("TRUNCATE parent CASCADE")
    run(dsn, once=True)
    with psycopg.connect(dsn) as conn:
        got = conn.execute(
            "SELECT \"table\", operation, primary_key, before FROM changes WHERE operation <> 'SNAPSHOT'"
            " ORDER BY commit_position, ordinal"
        ).fetchall()
    assert got == [
        ("m", "CREATE", "31", {}),
        ("m", "CREATE", "3", {}),
        ("m", "DELETE", "1", {"id": 1, "v": "a"}),
        ("m", "DELETE", "2", {"id": 2, "v": None}),
        ("m", "DELETE", "3", {"id": 3, "v": "f"}),
        ("m", "DELETE", "11", {"id": 11, "v": "b"}),
        ("m", "DELETE", "21", {"id": 21, "v": "c"}),
        ("m", "DELETE", "26", {"id": 26, "v": "d"}),
        ("m", "DELETE", "31", {"id": 31, "v": "e"}),
        ("m", "CREATE", "5", {}),
        ("m", "TRUNCATE", None, {}),
        ("parent", "TRUNCATE", None, {}),
        ("child", "TRUNCATE", None, {}),
    ]


def _live(dsn: str, table: str) -> dict[int, Any]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute(f"SELECT id, to_jsonb(x) FROM {table} AS x ORDER BY id").fetchall())


def test_a_rewriting_alter_reaches_the_history_as_updates_in_its_transaction(
    engine: sa.Engine, dsn: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, price text)")
        conn.execute("INSERT INTO t VALUES (1, '1.50'), (2, '2')")
        conn.execute("CREATE TABLE m (id int PRIMARY KEY, v int) PARTITION BY RANGE (id)")
        conn.execute("CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (10)")
        conn.execute("CREATE TABLE m2 PARTITION OF m FOR VALUES FROM (10) TO (20)")
        conn.execute("INSERT INTO m VALUES (1, 1), (11, 2)")
    install(engine)
    run(dsn, once=True)
    states = []
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT pg_logical_emit_message(true, 'bemi', %s)", (json.dumps({"who": "migration"}),))
        conn.execute("ALTER TABLE t ALTER COLUMN price TYPE numeric(10,2) USING price::numeric * 2")
        conn.commit()
        states.append(_live(dsn, "t"))
        conn.execute("ALTER TABLE t ADD COLUMN r double precision DEFAULT random()")  # volatile
        conn.commit()
        states.append(_live(dsn, "t"))
        conn.execute("ALTER TABLE m ALTER COLUMN v TYPE bigint USING v + 10")  # each partition
        conn.commit()
        states.append(_live(dsn, "m"))
        conn.execute("SET LOCAL bemi_tt.capture_rewrites = off")  # a migration opting out
        conn.execute("ALTER TABLE t ALTER COLUMN price TYPE numeric(12,2) USING price + 1")
        conn.commit()
        conn.execute("ALTER TABLE t SET UNLOGGED")  # a rewrite that changes no value
        conn.execute("ALTER TABLE t SET LOGGED")
        conn.commit()
    run(dsn, once=True)
    with psycopg.connect(dsn) as conn:
        got = conn.execute(
            "SELECT \"table\", operation, primary_key, before, after, context FROM changes"
            " WHERE operation <> 'SNAPSHOT' ORDER BY commit_position, ordinal"
        ).fetchall()
    migration = {"who": "migration"}
    assert got == [
        ("t", "UPDATE", "1", {}, states[0][1], migration),
        ("t", "UPDATE", "2", {}, states[0][2], migration),
        ("t", "UPDATE", "1", {}, states[1][1], {}),
        ("t", "UPDATE", "2", {}, states[1][2], {}),
        ("m", "UPDATE", "1", {}, states[2][1], {}),
        ("m", "UPDATE", "11", {}, states[2][11], {}),
    ]
    assert states[0][1]["price"] == 3.0 and states[2][11]["v"] == 12
    rewrites = [(v["table"], e) for v in record(dsn) for e in v["event"] if e["kind"] == "rewrite"]
    assert [(t, e["captured"], "partition" in e) for t, e in rewrites] == [
        ("t", True, False), ("t", True, False), ("m", True, True), ("m", True, True), ("t", False, False)
    ]


def test_a_first_release_changes_schemas_table_is_upgraded_in_place(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:  # the first release's table, with one version
        conn.execute(
            'CREATE TABLE changes_schemas ("schema" text NOT NULL, "table" text NOT NULL,'
            " commit_position bigint NOT NULL, ordinal integer NOT NULL DEFAULT 0,"
            " committed_at timestamptz NOT NULL, columns jsonb NOT NULL,"
            ' PRIMARY KEY ("schema", "table", commit_position, ordinal))'
        )
        conn.execute(
            "INSERT INTO changes_schemas VALUES ('public', 'old', 1, 0, now(),"
            " '[{\"name\": \"id\", \"type\": \"integer\", \"type_oid\": 23, \"key\": true}]')"
        )
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    run(dsn, once=True)
    run(dsn, once=True)  # the upgrade is idempotent
    with psycopg.connect(dsn) as conn:
        key = conn.execute(
            "SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_constraint c"
            " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)"
            " WHERE c.conrelid = 'changes_schemas'::regclass AND c.contype = 'p'"
        ).fetchone()
        old = conn.execute(
            "SELECT relation_oid, step, event, context FROM changes_schemas WHERE \"table\" = 'old'"
        ).fetchall()
    assert key == (["commit_position", "ordinal", "schema", "step", "table"],)
    assert old == [(None, 0, [], {})]
    assert [kinds(v) for v in record(dsn) if v["table"] == "t"] == [["new_relation"]]


def test_a_replayed_transaction_leaves_the_recorded_version_as_it_is() -> None:
    from capture.pgoutput import Begin, Column, Commit, Relation
    from capture.stitch import ColumnSpec, KnownSchemas, RelationVersion, Stitcher

    known = KnownSchemas()
    columns = (ColumnSpec("id", "integer", 23, True, 1), ColumnSpec("v", "text", 25, False, 2))
    known.record(RelationVersion(7, "public", "t", columns, "f", position=100), None)
    stitcher = Stitcher("db", {}, known)
    old = Relation(7, "public", "t", "f", (Column(True, "id", 23, -1),))
    new = Relation(7, "public", "t", "f", (Column(True, "id", 23, -1), Column(True, "v", 25, -1)))
    # the worker decodes again a transaction the destination already holds (before the ADD COLUMN) ...
    assert stitcher.feed_all([(1, Begin(50, 0, 1)), (2, old), (3, Commit(0, 50, 60, 0))]) == []
    # ... then the new ones: the record still describes them, the key is the recorded one
    assert stitcher.feed_all([(4, Begin(200, 0, 2)), (5, new)]) == []
    assert stitcher.known_columns.by_oid[7].columns == columns


def test_a_table_created_without_the_context_trigger_is_a_recorded_gap(
    pg_server: Any, database: str, dsn: str, engine: sa.Engine, make_role: Any
) -> None:
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    owner, other = make_role("owner", ""), make_role("other", "")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for role in (owner, other):
            conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
            sql.Identifier(database), sql.Identifier(owner)))
    app = sa.create_engine(pg_server.sqlalchemy_url(database).set(username=owner))
    try:
        install(app)  # the functions belong to (and run as) a non-superuser ...
    finally:
        app.dispose()
    install(engine)  # ... and a superuser adds the event triggers
    run(dsn, once=True)
    with psycopg.connect(make_conninfo(dsn, user=other), autocommit=True) as conn:
        conn.execute("CREATE TABLE other_later (id int PRIMARY KEY)")  # the owner may not alter it
    run(dsn, once=True)
    got = [v for v in record(dsn) if v["table"] == "other_later"]
    assert [kinds(v) for v in got] == [["create_table"], ["untracked"]]
    assert got[1]["event"][0]["what"] == "context" and got[1]["columns"] == got[0]["columns"]


def test_the_parquet_export_carries_every_column_of_the_record(
    engine: sa.Engine, dsn: str, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    from capture.export import export_parquet

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, a int)")
    install(engine)
    run(dsn, once=True)
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT pg_logical_emit_message(true, 'bemi', %s)", (json.dumps({"who": "m"}),))
        conn.execute("ALTER TABLE t RENAME COLUMN a TO b")
        conn.execute("ALTER TABLE t RENAME COLUMN b TO c")  # a second version at the same position
        conn.commit()
    run(dsn, once=True)
    export_parquet(dsn, str(tmp_path / "out"))
    exported = pq.read_table(tmp_path / "out" / "_bemi_tt" / "schemas.pq").to_pylist()
    with psycopg.connect(dsn) as conn:
        stored = conn.execute(
            'SELECT "schema", "table", commit_position, ordinal, committed_at, columns, relation_oid, step,'
            " event, context, replica_identity FROM changes_schemas"
            ' ORDER BY "schema", "table", commit_position, ordinal, step'
        ).fetchall()
    names = ["schema", "table", "commit_position", "ordinal", "committed_at", "columns", "relation_oid",
             "step", "event", "context", "replica_identity"]
    json_fields = ("columns", "event", "context")
    assert [{k: json.loads(v) if k in json_fields else v for k, v in row.items()} for row in exported] == [
        dict(zip(names, row, strict=True)) for row in stored
    ]
    assert [r["step"] for r in exported][-2:] == [0, 1]
    assert json.loads(exported[-1]["context"]) == {"who": "m"}


def test_a_worker_behind_a_type_change_records_the_rewritten_values_in_the_new_type(
    engine: sa.Engine, dsn: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, done boolean NOT NULL)")
        conn.execute("INSERT INTO t VALUES (1, true), (2, false)")
    install(engine)
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:  # the worker last saw done as boolean
        conn.execute("INSERT INTO t VALUES (3, true)")
        conn.execute("ALTER TABLE t ALTER COLUMN done TYPE int USING (CASE WHEN done THEN 1 ELSE 0 END)")
    run(dsn, once=True)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT operation, primary_key, after FROM changes WHERE operation = 'UPDATE'"
            " ORDER BY commit_position, ordinal"
        ).fetchall()
    assert sorted((op, pk, after["done"]) for op, pk, after in rows) == [
        ("UPDATE", "1", 1), ("UPDATE", "2", 0), ("UPDATE", "3", 1)
    ]


def test_attach_and_detach_partition_move_the_rows_and_are_events_of_the_root(
    engine: sa.Engine, dsn: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE m (id int PRIMARY KEY, v text) PARTITION BY RANGE (id)")
        conn.execute("CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (10)")
        conn.execute("CREATE TABLE side (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO m VALUES (1, 'a'), (2, 'b')")
        conn.execute("INSERT INTO side VALUES (11, 's')")
    install(engine)
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:  # the worker is stopped during the DDL
        conn.execute("ALTER TABLE m ATTACH PARTITION side FOR VALUES FROM (10) TO (20)")
        conn.execute("ALTER TABLE m DETACH PARTITION m1")
        conn.execute("INSERT INTO m1 VALUES (3, 'c')")
    run(dsn, once=True)
    got = [(v["table"], kinds(v)) for v in record(dsn)]
    assert ("m", ["attach_partition"]) in got and ("side", ["drop_table"]) in got
    assert ("m", ["detach_partition"]) in got and ("m1", ["new_relation"]) in got
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            'SELECT "table", operation, primary_key FROM changes WHERE "table" IN (\'m\', \'m1\', \'side\')'
            " AND operation <> 'SNAPSHOT' ORDER BY commit_position, ordinal"
        ).fetchall()
    assert rows == [
        ("m", "CREATE", "11"),
        ("m", "DELETE", "1"),
        ("m1", "CREATE", "1"),
        ("m", "DELETE", "2"),
        ("m1", "CREATE", "2"),
        ("m1", "CREATE", "3"),
    ]


def test_disabling_a_tracking_trigger_records_a_gap_and_enabling_it_records_tracking_again(
    engine: sa.Engine, dsn: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE m (id int PRIMARY KEY) PARTITION BY RANGE (id)")
        conn.execute("CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (10)")
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    install(engine)
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE m1 DISABLE TRIGGER bemi_tt_truncate")
        conn.execute("ALTER TABLE m1 ENABLE TRIGGER bemi_tt_truncate")
        conn.execute("ALTER TABLE t DISABLE TRIGGER bemi_tt_context")
        conn.execute("ALTER TABLE t ENABLE TRIGGER bemi_tt_context")
        conn.execute("ALTER TABLE t ADD COLUMN v int")  # no trigger named: no tracking event
    run(dsn, once=True)
    got = [(v["table"], e["kind"], e.get("what")) for v in record(dsn) for e in v["event"]]
    assert [g for g in got if g[1] in ("tracked", "untracked")] == [
        ("m", "untracked", "truncate"),
        ("m", "tracked", "triggers"),
        ("t", "untracked", "context"),
        ("t", "tracked", "triggers"),
    ]


def test_dropping_one_partition_records_a_gap_of_the_root(engine: sa.Engine, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE m (id int PRIMARY KEY) PARTITION BY RANGE (id)")
        conn.execute("CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (10)")
        conn.execute("CREATE TABLE m2 PARTITION OF m FOR VALUES FROM (10) TO (20)")
        conn.execute("INSERT INTO m VALUES (1), (11)")
    install(engine)
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE m1")  # its row leaves m without a row change
    run(dsn, once=True)
    last = [e for v in record(dsn) if v["table"] == "m" for e in v["event"]][-1]
    assert (last["kind"], last["what"], last["reason"]) == ("untracked", "partition", "DROP TABLE public.m1")
    with pytest.raises(SourceError, match=r"partition tracking stopped .*DROP TABLE public\.m1"):
        as_of("m", "now", source=PostgresSource(dsn))  # never a silently wrong table
