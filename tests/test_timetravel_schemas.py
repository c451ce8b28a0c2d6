"""Tables of the same name in two schemas: every source keeps their histories apart (the PostgreSQL
source's fast path reads an index without the schema and must notice the other table's rows)."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import psycopg
import pytest
import sqlalchemy as sa
from timetravel_history import TODO_COLUMNS, History
from timetravel_sources import KINDS, build_source

from bemi_tt.duckdb_macros import duckdb as bemi_duckdb
from bemi_tt.sources import PostgresSource
from bemi_tt.timetravel import as_of, blame, diff, history
from bemi_tt.triggers import install, uninstall
from capture.errors import ConfigurationError, SourceError
from capture.worker import run


def _row(key: int, task: str) -> dict[str, object]:
    return {"id": key, "task": task, "done": False, "price": None, "due": None}


@pytest.mark.parametrize("kind", KINDS)
def test_as_of_keeps_same_named_tables_of_two_schemas_apart(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    h = History()
    h.columns("todo", TODO_COLUMNS)
    h.columns("todo", TODO_COLUMNS, schema="other")
    h.create("todo", "1", _row(1, "public one"))
    h.create("todo", "1", _row(1, "other one"), schema="other")
    h.create("todo", "2", _row(2, "public two"))
    middle = h.clock
    h.create("todo", "2", _row(2, "other two"), schema="other")
    h.changes.append({**h.changes[0], "operation": "DELETE", "after": {}, "before": _row(1, "public one")})
    h.changes[-1].update(commit_position=h.position + 10, ordinal=0, position=h.position + 10)
    h.changes[-1]["committed_at"] = h.clock
    dsn = request.getfixturevalue("dsn") if kind != "memory" else None
    source = build_source(kind, h.changes, h.schemas, dsn=dsn, tmp_path=tmp_path)
    public_now = as_of("public.todo", h.clock, source=source)
    assert list(public_now.index) == [2] and list(public_now["task"]) == ["public two"]
    other_now = as_of("other.todo", h.clock, source=source)
    assert list(other_now["task"]) == ["other one", "other two"]
    assert list(as_of("other.todo", middle, source=source)["task"]) == ["other one"]
    assert list(as_of("public.todo", middle, source=source)["task"]) == ["public one", "public two"]
    assert len(diff("public.todo", middle, h.clock, source=source)) > 0


# -- the schema record applied (issue 12): gaps, renamed and dropped names, history and blame -------------
def _at(conn: psycopg.Connection) -> pd.Timestamp:
    time.sleep(0.002)  # the next commit is stamped strictly later than this instant
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    time.sleep(0.002)
    return pd.Timestamp(row[0])


def test_as_of_inside_a_tracking_gap_and_after_it_until_a_snapshot_raises_naming_the_gap(
    engine: sa.Engine, dsn: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'a')")
        install(engine)
        run(dsn, once=True)
        before = _at(conn)
        uninstall(engine)  # DDL tracking stops: a gap begins
        conn.execute("ALTER TABLE t RENAME COLUMN v TO w")  # unrecorded
        conn.execute("INSERT INTO t VALUES (2, 'b')")
        inside = _at(conn)
        install(engine)  # tracking restarts, the table is not empty: no exact baseline yet
        after = _at(conn)
    run(dsn, once=True)
    source = PostgresSource(dsn)
    assert list(as_of("t", before, source=source).index) == [1]
    for ts in (inside, after):
        with pytest.raises(SourceError, match=r"public\.t has a tracking gap: ddl tracking stopped at"):
            as_of("t", ts, source=source)
    with pytest.raises(SourceError, match="tracking gap"):
        history("t", 1, source=source)
    run(dsn, once=True, snapshot=True)  # a re-baselining SNAPSHOT ends the gap
    assert list(as_of("t", "now", source=source)["w"]) == ["a", "b"]


def test_as_of_while_a_partition_truncate_trigger_was_disabled_raises(engine: sa.Engine, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE m (id int PRIMARY KEY) PARTITION BY RANGE (id)")
        conn.execute("CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (10)")
        conn.execute("INSERT INTO m VALUES (1), (2)")
        install(engine)
        run(dsn, once=True)
        before = _at(conn)
        conn.execute("ALTER TABLE m1 DISABLE TRIGGER bemi_tt_truncate")
        conn.execute("TRUNCATE m1")  # not recorded
        inside = _at(conn)
        conn.execute("ALTER TABLE m1 ENABLE TRIGGER bemi_tt_truncate")
    run(dsn, once=True)
    source = PostgresSource(dsn)
    assert list(as_of("m", before, source=source).index) == [1, 2]
    with pytest.raises(SourceError, match="truncate tracking stopped"):
        as_of("m", inside, source=source)
    with pytest.raises(SourceError, match=r"restarted at .* without a baseline"):
        as_of("m", "now", source=source)


def test_a_renamed_table_answers_under_both_names_and_a_name_not_held_then_says_which_it_was(
    engine: sa.Engine, dsn: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, title text)")
        install(engine)
        conn.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
        first = _at(conn)
        conn.execute("ALTER TABLE t RENAME COLUMN title TO label")
        conn.execute("ALTER TABLE t RENAME TO u")
        conn.execute("UPDATE u SET label = 'B' WHERE id = 2")
        renamed = _at(conn)
        conn.execute("DROP TABLE u")
        conn.execute("CREATE TABLE u (id int PRIMARY KEY)")
        conn.execute("INSERT INTO u VALUES (9)")
    run(dsn, once=True)
    source = PostgresSource(dsn)
    assert list(as_of("t", first, source=source)["title"]) == ["a", "b"]
    assert list(as_of("u", renamed, source=source)["label"]) == ["a", "B"]  # row 1: never written as label
    with pytest.raises(ConfigurationError, match=r"no table was named public\.t at .* named public\.u then"):
        as_of("t", renamed, source=source)
    assert list(as_of("u", "now", source=source).index) == [9]  # the dropped rows never come back
    with pytest.raises(ConfigurationError, match=r"no table was named public\.t at .*: it was renamed to"):
        as_of("t", "now", source=source)
    # history and blame follow the relation of the name, its columns by attnum
    with pytest.raises(ConfigurationError, match=r"public\.t no longer exists \(renamed to public\.u"):
        history("t", 1, source=source)
    assert list(history("u", 9, source=source)["operation"]) == ["CREATE"]
    con = bemi_duckdb(source)
    rows = con.execute("SELECT primary_key FROM as_of('u', ?)", [renamed.to_pydatetime()]).fetchall()
    assert rows == [("1",), ("2",)]


def test_history_blame_and_diff_follow_a_renamed_table_and_column(engine: sa.Engine, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, title text)")
        install(engine)
        conn.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
        first = _at(conn)
        conn.execute("ALTER TABLE t RENAME COLUMN title TO label")
        conn.execute("ALTER TABLE t RENAME TO u")
        conn.execute("UPDATE u SET label = 'B' WHERE id = 2")
    run(dsn, once=True)
    source = PostgresSource(dsn)
    rows = history("u", 2, source=source)
    assert list(rows["operation"]) == ["CREATE", "UPDATE"] and list(rows["label"]) == ["b", "B"]
    cells = blame("u", source=source)
    assert cells.loc[(1, "label"), "value"] == "a" and cells.loc[(1, "label"), "operation"] == "CREATE"
    assert cells.loc[(2, "label"), "operation"] == "UPDATE"
    changed = diff("u", first, "now", source=source)
    assert list(changed.index) == [(2, "label")] and changed.loc[(2, "label"), "old"] == "b"


def test_history_by_the_new_primary_key_includes_the_row_before_the_key_changed(
    engine: sa.Engine, dsn: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, code text NOT NULL, v int)")
        install(engine)
        conn.execute("INSERT INTO t VALUES (1, 'a', 0), (2, 'b', 0)")
        conn.execute("UPDATE t SET v = 1 WHERE id = 1")
        conn.execute("ALTER TABLE t DROP CONSTRAINT t_pkey, ADD PRIMARY KEY (code)")
        conn.execute("UPDATE t SET v = 2 WHERE code = 'a'")
    run(dsn, once=True)
    source = PostgresSource(dsn)
    rows = history("t", "a", source=source)
    assert list(rows["operation"]) == ["CREATE", "UPDATE", "UPDATE"] and list(rows["v"]) == [0, 1, 2]
    now = as_of("t", "now", source=source)
    assert list(now.index) == ["a", "b"] and list(now["v"]) == [2, 0]  # no duplicate keys
