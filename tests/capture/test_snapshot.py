"""capture/snapshot.py: existing rows become SNAPSHOT changes, exact with respect to the slot."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import psycopg

from capture.worker import run


def snapshot_rows(dsn: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            'SELECT "table", primary_key, after::text, commit_position, ordinal, transaction_id FROM changes'
            " WHERE operation = 'SNAPSHOT' ORDER BY commit_position, ordinal"
        ).fetchall()


def test_first_start_records_existing_rows_of_every_table(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE a (id int PRIMARY KEY, note text, n numeric)")
        conn.execute("INSERT INTO a VALUES (1, E'tab\\there', 1.50), (2, NULL, 2)")
        conn.execute("CREATE TABLE b (x int, y text, PRIMARY KEY (x, y))")
        conn.execute("INSERT INTO b VALUES (1, 'q')")
        conn.execute("CREATE TABLE nokey (v int)")
        conn.execute("INSERT INTO nokey VALUES (5)")
    stats = run(dsn, once=True)
    assert stats.snapshot_rows == 4
    got = snapshot_rows(dsn)
    assert [(t, pk) for t, pk, *_ in got] == [("a", "1"), ("a", "2"), ("b", '[1,"q"]'), ("nokey", None)]
    assert json.loads(str(got[0][2])) == {"id": 1, "note": "tab\there", "n": 1.5}
    assert [o for *_, o, _ in got] == [0, 1, 2, 3]
    assert {x for *_, x in got} == {None}
    with psycopg.connect(dsn) as conn:
        expected = conn.execute("SELECT to_jsonb(a)::text FROM a ORDER BY id").fetchall()
        assert [(r[2],) for r in got[:2]] == expected
        columns = conn.execute("SELECT columns FROM changes_schemas WHERE \"table\" = 'a'").fetchone()
    assert columns is not None and [c["name"] for c in columns[0]] == ["id", "note", "n"]
    assert run(dsn, once=True).snapshot_rows == 0  # only on the first start


def test_snapshot_position_orders_between_the_transactions_it_includes_and_misses(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        conn.execute("INSERT INTO t SELECT g, 0 FROM generate_series(1, 2000) g")
    stop = threading.Event()

    def writer() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            i = 0
            while not stop.is_set():
                i += 1
                conn.execute("UPDATE t SET v = %s WHERE id = %s", (i, i % 2000 + 1))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        run(dsn, once=True)
    finally:
        stop.set()
        thread.join()
    run(dsn, once=True)
    with psycopg.connect(dsn) as conn:
        # the table now equals the snapshot replayed with every later change, in commit order
        rebuilt = conn.execute(
            "SELECT DISTINCT ON (primary_key) primary_key::int, (after->>'v')::int FROM changes"
            " WHERE operation IN ('SNAPSHOT', 'UPDATE') AND commit_position >= ("
            "  SELECT min(commit_position) FROM changes WHERE operation = 'SNAPSHOT')"
            " ORDER BY primary_key, commit_position DESC, ordinal DESC"
        ).fetchall()
        actual = conn.execute("SELECT id, v FROM t").fetchall()
        assert sorted(rebuilt) == sorted(actual)
        position = conn.execute(
            "SELECT DISTINCT commit_position FROM changes WHERE operation = 'SNAPSHOT'"
        ).fetchall()
    assert len(position) == 1 and position[0][0] % 8 != 0  # never a real commit position


def test_snapshot_again_adds_a_newer_complete_snapshot(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (2)")
    stats = run(dsn, once=True, snapshot=True)
    assert stats.snapshot_rows == 2
    got = snapshot_rows(dsn)
    assert [pk for _, pk, *_ in got] == ["1", "1", "2"]
    assert got[0][3] < got[1][3] == got[2][3]
    with psycopg.connect(dsn) as conn:
        create = conn.execute("SELECT commit_position FROM changes WHERE operation = 'CREATE'").fetchone()
    assert create is not None and create[0] < got[1][3]


def test_snapshot_false_never_records_existing_rows(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
    assert run(dsn, once=True, snapshot=False).snapshot_rows == 0
    assert run(dsn, once=True).snapshot_rows == 0
    assert snapshot_rows(dsn) == []


def test_snapshot_again_writes_the_backlog_first_so_changes_stay_in_key_order(
    dsn: str, tmp_path: Path
) -> None:
    from capture.export import export_parquet
    from capture.export.dataset import read_dataset

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        conn.execute("INSERT INTO t SELECT g, 0 FROM generate_series(1, 20) g")
    run(dsn, once=True)
    directory = str(tmp_path / "export")
    export_parquet(dsn, directory, progress=False)
    with psycopg.connect(dsn, autocommit=True) as conn:  # a backlog the slot holds, not yet captured
        for i in range(1, 6):
            conn.execute("UPDATE t SET v = %s WHERE id = %s", (i, i))
        conn.execute("DELETE FROM t WHERE id = 20")
    stats = run(dsn, once=True, snapshot=True)
    assert (stats.snapshot_rows, stats.changes) == (19, 6)
    with psycopg.connect(dsn) as conn:
        by_id = conn.execute("SELECT commit_position, ordinal, operation FROM changes ORDER BY id").fetchall()
    assert by_id == sorted(by_id)
    assert [op for *_, op in by_id] == ["SNAPSHOT"] * 20 + ["UPDATE"] * 5 + ["DELETE"] + ["SNAPSHOT"] * 19
    export_parquet(dsn, directory, progress=False)  # would stop: rows inserted below its watermark
    table = read_dataset(directory)
    assert table.num_rows == len(by_id)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE t SET v = -1 WHERE id = 1")
    assert run(dsn, once=True).changes == 1
    export_parquet(dsn, directory, progress=False)
    assert read_dataset(directory).num_rows == len(by_id) + 1
