"""Schema evolution, exact: after every step of a migration history, ``as_of`` at that instant equals a copy
of the live tables taken then — from PostgreSQL ``changes``, the Parquet export, the Delta export and memory.

The steps are the ordinary ones an application makes (issue 12): RENAME COLUMN, ADD COLUMN (constant and
volatile default), DROP COLUMN, ALTER COLUMN TYPE … USING, a primary key change, RENAME TABLE, DROP TABLE
then CREATE TABLE of the same name, a table without a primary key, a partitioned table with a partition
TRUNCATE, with writes between them. The history runs twice: with the worker caught up after each step,
and with the worker stopped during the whole migration, catching up afterwards (so what it records can
only come from the stream, never from the catalog as it is when it decodes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pytest
import sqlalchemy as sa
from timetravel_sources import export_source

from bemi_tt.duckdb_macros import duckdb
from bemi_tt.sources import InMemorySource, PostgresSource, Scope, Source
from bemi_tt.state import _duck
from bemi_tt.timetravel import as_of
from bemi_tt.triggers import install
from capture.errors import ConfigurationError
from capture.worker import run

#: (label, statements): each step's DDL and the writes after it, in one autocommit session.
STEPS: list[tuple[str, list[str]]] = [
    (
        "create",
        [
            "CREATE TABLE todo (id int PRIMARY KEY, title text NOT NULL, n int)",
            "CREATE TABLE tags (name text, n int)",  # no primary key
            "CREATE TABLE events (id int PRIMARY KEY, kind text) PARTITION BY RANGE (id)",
            "CREATE TABLE events_low PARTITION OF events FOR VALUES FROM (0) TO (100)",
            "CREATE TABLE events_high PARTITION OF events FOR VALUES FROM (100) TO (200)",
            "INSERT INTO todo SELECT i, 'task ' || i, i * 10 FROM generate_series(1, 6) AS i",
            "INSERT INTO tags VALUES ('a', 1), ('a', 1), ('b', 2)",
            "INSERT INTO events VALUES (1, 'x'), (2, 'y'), (101, 'z'), (102, 'w')",
        ],
    ),
    (
        "rename column",
        [
            "ALTER TABLE todo RENAME COLUMN title TO label",
            "UPDATE todo SET n = 11 WHERE id = 1",  # rows 2..6 are never written again under the new name
            "INSERT INTO todo VALUES (7, 'task 7', 70)",
        ],
    ),
    (
        "add column with a default",
        [
            "ALTER TABLE todo ADD COLUMN done boolean NOT NULL DEFAULT false",
            "UPDATE todo SET done = true WHERE id = 2",
            "INSERT INTO todo VALUES (8, 'task 8', 80, true)",
        ],
    ),
    (
        "drop column",
        [
            "ALTER TABLE todo DROP COLUMN n",
            "DELETE FROM todo WHERE id = 3",
            "INSERT INTO todo VALUES (9, 'task 9', false)",
        ],
    ),
    (
        "alter column type using",  # a rewrite: every row gets a new value without a row change
        [
            "ALTER TABLE todo ALTER COLUMN done DROP DEFAULT, ALTER COLUMN done TYPE int"
            " USING (CASE WHEN done THEN 1 ELSE 0 END)",
            "UPDATE todo SET done = 5 WHERE id = 4",
        ],
    ),
    (
        "primary key change",
        [
            "ALTER TABLE todo DROP CONSTRAINT todo_pkey, ADD PRIMARY KEY (label)",
            "UPDATE todo SET done = 2 WHERE id = 5",
            "UPDATE todo SET id = 50 WHERE id = 6",  # no key change any more: the key is label
            "INSERT INTO todo VALUES (10, 'task 10', 0)",
        ],
    ),
    (
        "rename table",
        [
            "ALTER TABLE todo RENAME TO tasks",
            "UPDATE tasks SET done = 3 WHERE label = 'task 7'",
            "INSERT INTO tasks VALUES (11, 'task 11', 1)",
        ],
    ),
    (
        "table without a primary key",
        [
            "ALTER TABLE tags RENAME COLUMN n TO weight",
            "ALTER TABLE tags ADD COLUMN note text DEFAULT 'none'",
            "DELETE FROM tags WHERE ctid = (SELECT min(ctid) FROM tags WHERE name = 'a')",
            "INSERT INTO tags VALUES ('c', 3, 'new')",
            "UPDATE tags SET weight = 20 WHERE name = 'b'",
        ],
    ),
    (
        "truncate a partition",
        [
            "TRUNCATE events_low",
            "INSERT INTO events VALUES (3, 'after')",
            "UPDATE events SET kind = 'zz' WHERE id = 101",
        ],
    ),
    (
        "add column with a volatile default",  # a rewrite of every partition
        [
            "ALTER TABLE events ADD COLUMN seq int DEFAULT (floor(random() * 1000))::int",
            "INSERT INTO events VALUES (103, 'late', 7)",
        ],
    ),
    (
        "attach partition",  # a table of its own until now: its rows become rows of events
        [
            "CREATE TABLE events_side (id int PRIMARY KEY, kind text, seq int)",
            "INSERT INTO events_side VALUES (201, 'side', 5), (202, 'side', 6)",
            "ALTER TABLE events ATTACH PARTITION events_side FOR VALUES FROM (200) TO (300)",
            "UPDATE events SET kind = 'joined' WHERE id = 201",
        ],
    ),
    (
        "detach partition",  # its rows leave events and start a table of their own
        [
            "ALTER TABLE events DETACH PARTITION events_high",
            "INSERT INTO events_high VALUES (104, 'own', 1)",
            "UPDATE events_high SET kind = 'moved' WHERE id = 101",
        ],
    ),
    (
        "drop table then create table",
        [
            "DROP TABLE tasks",
            "CREATE TABLE tasks (id bigint PRIMARY KEY, body text)",
            "INSERT INTO tasks VALUES (1, 'fresh')",
        ],
    ),
    (
        "rename the key column",
        [
            "ALTER TABLE tasks RENAME COLUMN id TO task_id",
            "INSERT INTO tasks VALUES (2, 'second')",
            "UPDATE tasks SET task_id = 3 WHERE task_id = 1",  # a key UPDATE under the new name
        ],
    ),
    (
        "primary key on a table without one",
        [
            "DELETE FROM tags WHERE name = 'a'",
            "ALTER TABLE tags ADD PRIMARY KEY (name)",
            "UPDATE tags SET note = 'keyed' WHERE name = 'c'",
        ],
    ),
    (
        "truncate the partitioned table",
        [
            "TRUNCATE events",
            "INSERT INTO events VALUES (250, 'only', 1)",
        ],
    ),
]

TABLES = ("todo", "tasks", "tags", "events", "events_side", "events_high")


def _plain(value: Any) -> Any:
    """A cell as a comparable Python value (NULL/NA/NaN alike: None; numbers by value)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and value != value:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, Decimal):
        return value.normalize()
    return value


def _rows(frame: pd.DataFrame) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Columns (by name: as_of puts the key in the index) and rows sorted."""
    if not isinstance(frame.index, pd.RangeIndex):
        frame = frame.reset_index()
    frame = frame[sorted(frame.columns)]
    columns = [str(c) for c in frame.columns]
    rows = [tuple(_plain(v) for v in row) for row in frame.itertuples(index=False, name=None)]
    return columns, sorted(rows, key=repr)


def _copy(conn: psycopg.Connection) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    """The live tables that exist now, as rows."""
    out = {}
    for table in TABLES:
        exists = conn.execute(  # partitions are recorded under their root
            "SELECT EXISTS (SELECT FROM pg_class WHERE oid = to_regclass(%s) AND NOT relispartition)",
            (f"public.{table}",),
        ).fetchone()
        if not exists or not exists[0]:
            continue
        cur = conn.execute(f'SELECT * FROM "{table}"')
        names = [d.name for d in cur.description or []]
        out[table] = _rows(pd.DataFrame(cur.fetchall(), columns=names))
    return out


Instants = list[tuple[str, pd.Timestamp, dict[str, tuple[list[str], list[tuple[Any, ...]]]]]]


def _migrate(engine: sa.Engine, dsn: str, *, caught_up: bool) -> Instants:
    """Run the steps; after each, take the time and copy the live tables. ``caught_up``: the worker runs
    after every step, else only once at the end."""
    instants: Instants = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i, (label, statements) in enumerate(STEPS):
            for statement in statements:
                conn.execute(statement.encode())
            if i == 0:
                install(engine)
                run(dsn, once=True)  # tracking begins: the snapshot
            elif caught_up:
                run(dsn, once=True)
            time.sleep(0.002)  # the next commit is stamped strictly later than this instant
            at = conn.execute("SELECT clock_timestamp()").fetchone()
            assert at is not None
            instants.append((label, pd.Timestamp(at[0]), _copy(conn)))
            time.sleep(0.002)
    run(dsn, once=True)
    return instants


def _memory(dsn: str) -> Source:
    """The same changes held in memory (read through the PostgreSQL source)."""
    pg = PostgresSource(dsn)
    con = _duck()
    pg.load(con, "everything", Scope())
    return InMemorySource(con.sql("SELECT * FROM everything").to_arrow_table(), pg.schemas())


def _json_row(text: str, columns: list[str]) -> tuple[Any, ...]:
    """A macro's JSON row as the copy's row (JSON numbers as Python numbers, as the copy holds them)."""
    row = json.loads(text)
    return tuple(_plain(row.get(c)) for c in columns)


def _sources(dsn: str, tmp_path: Path) -> dict[str, Callable[[], Source]]:
    makers: dict[str, Callable[[], Source]] = {
        "postgres": lambda: PostgresSource(dsn),
        "parquet": lambda: export_source(dsn, tmp_path / "parquet"),
        "memory": lambda: _memory(dsn),
    }
    try:
        import deltalake  # noqa: F401
    except ImportError:  # pragma: no cover - the [delta] extra
        return makers
    makers["delta"] = lambda: export_source(dsn, tmp_path / "delta", format="delta")
    return makers


def _check(instants: Instants, source: Source) -> list[str]:
    """Every (step, table) where as_of, or the DuckDB macro as_of, differs from the copy (the macros
    answer for tables with a primary key: rows without one have no ``primary_key`` to pick by)."""
    wrong = []
    con = duckdb(source)
    for label, at, tables in instants:
        for table, expected in tables.items():
            try:
                frame = as_of(table, at, source=source)
            except Exception as exc:  # a refusal is a failure too, with its message
                wrong.append(f"{label}: {table}: {type(exc).__name__}: {exc}")
                continue
            got = _rows(frame)
            if got != expected:
                wrong.append(f"{label}: {table}: as_of {got} != live {expected}")
            if isinstance(frame.index, pd.RangeIndex):
                continue
            rows = con.execute('SELECT "row" FROM as_of(?, ?)', [table, at.to_pydatetime()]).fetchall()
            macro = sorted(repr(_json_row(r[0], expected[0])) for r in rows)
            if macro != sorted(repr(row) for row in expected[1]):
                wrong.append(f"{label}: {table}: macro as_of {macro} != live {expected}")
    return wrong


@pytest.mark.parametrize("worker", ["caught_up", "stopped_during_ddl"])
def test_as_of_at_every_step_of_a_migration_history_equals_the_live_tables_on_every_source(
    engine: sa.Engine, dsn: str, tmp_path: Path, worker: str
) -> None:
    instants = _migrate(engine, dsn, caught_up=worker == "caught_up")
    assert len(instants) - 1 >= 12  # schema-change steps after the first
    for kind, make in _sources(dsn, tmp_path).items():
        source = make()
        wrong = _check(instants, source)
        assert wrong == [], kind + ":\n" + "\n".join(wrong)
        # a name is followed to the relation it had at the time, with the error for a name not held then
        renamed = next(at for label, at, _ in instants if label == "rename table")
        before = next(at for label, at, _ in instants if label == "primary key change")
        with pytest.raises(ConfigurationError, match=r"named public\.tasks then"):
            as_of("todo", renamed, source=source)
        assert len(as_of("todo", before, source=source)) == 9
        recreated = next(at for label, at, _ in instants if label == "drop table then create table")
        # the dropped rows never come back
        assert list(as_of("tasks", recreated, source=source)["body"]) == ["fresh"]
