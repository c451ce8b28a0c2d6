"""The SQLAlchemy hook against real PostgreSQL: what runs is the app's statement, what reaches the WAL
is the context, byte for byte, on psycopg 3, psycopg2, psycopg 3 async and asyncpg."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import orm
from sqlalchemy.ext.asyncio import create_async_engine
from wal_messages import create_slot, read_events, row_contexts, without_sql

import bemi_tt.hook  # noqa: F401  (activates the hook)
from bemi_tt.context import configure_context, context, context_settings, set_context
from bemi_tt.hook import is_write
from bemi_tt.triggers import install
from capture.errors import ConfigurationError

DRIVERS = ["psycopg", "psycopg2", "psycopg_async", "asyncpg"]
ASYNC_DRIVERS = {"psycopg_async", "asyncpg"}
HOSTILE = [
    "*/", "/*", " Bemi*/", "%", "%(x)s", "%s", "$1", "'", '"', "''; --", "\\", "\\x00", "a\nb\r\nc\t",
    "*/ OR true /*", "*/; DELETE FROM other; /*", "😀 é ünïcødé 中文", "\u2028\ufeff", "x" * 900_000,
]

metadata = sa.MetaData()
items = sa.Table("items", metadata, sa.Column("id", sa.Integer, primary_key=True), sa.Column("v", sa.Text))
other = sa.Table("other", metadata, sa.Column("id", sa.Integer, primary_key=True))
# text(), not items.insert(): SQLAlchemy reports rowcount -1 for Core inserts on psycopg 3
INSERT = sa.text("INSERT INTO items (id, v) VALUES (:id, :v)")


@pytest.fixture(autouse=True)
def _no_context() -> Iterator[None]:
    settings = context_settings()
    set_context(None)
    yield
    set_context(None)
    configure_context(max_sql_bytes=settings.max_sql_bytes)


@pytest.fixture
def tracked(engine: sa.Engine, dsn: str) -> sa.Engine:
    """``items`` and ``other`` (3 rows) with tracking installed and a test_decoding slot."""
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(other.insert(), [{"id": i} for i in range(3)])
    install(engine)
    create_slot(dsn)
    return engine


def _write_one(conn: sa.Connection, i: int, value: str) -> tuple[int, int]:
    inserted = conn.execute(INSERT, {"id": i, "v": f"tag{i}:{value}"}).rowcount
    updated = conn.execute(
        items.update().where(items.c.id == sa.bindparam("key")).values(v=sa.bindparam("nv")),
        {"key": i, "nv": f"tag{i}:{value}!"},
    ).rowcount
    return inserted, updated


def _run_matrix(url: sa.URL, driver: str) -> list[tuple[int, int]]:
    """For each hostile value: set it as context, insert and update a row holding it."""
    if driver not in ASYNC_DRIVERS:
        eng = sa.create_engine(url)
        try:
            counts = []
            for i, value in enumerate(HOSTILE):
                set_context({"value": value, "i": i})
                with eng.begin() as conn:
                    counts.append(_write_one(conn, i, value))
            return counts
        finally:
            eng.dispose()

    async def main() -> list[tuple[int, int]]:
        eng = create_async_engine(url)
        try:
            counts = []
            for i, value in enumerate(HOSTILE):
                set_context({"value": value, "i": i})
                async with eng.begin() as conn:
                    row = {"id": i, "v": f"tag{i}:{value}"}
                    inserted = (await conn.execute(INSERT, row)).rowcount
                    counts.append((inserted, (await conn.run_sync(_update_one, i, value))))
            return counts
        finally:
            await eng.dispose()

    return asyncio.run(main())


def _update_one(conn: sa.Connection, i: int, value: str) -> int:
    return conn.execute(items.update().where(items.c.id == i).values(v=f"tag{i}:{value}!")).rowcount


@pytest.mark.parametrize("driver", DRIVERS)
def test_hostile_values_run_exactly_the_apps_statement_and_reach_the_wal_byte_for_byte(
    pg_server: Any, database: str, dsn: str, tracked: sa.Engine, driver: str
) -> None:
    counts = _run_matrix(pg_server.sqlalchemy_url(database, driver), driver)
    set_context(None)

    assert counts == [(1, 1)] * len(HOSTILE)
    with tracked.connect() as conn:
        stored = dict(conn.execute(sa.select(items.c.id, items.c.v)).all())
        assert conn.execute(sa.select(sa.func.count()).select_from(other)).scalar_one() == 3
    assert stored == {i: f"tag{i}:{value}!" for i, value in enumerate(HOSTILE)}

    changes = row_contexts(read_events(dsn))
    assert [e.kind for e, _ in changes] == ["INSERT", "UPDATE"] * len(HOSTILE)
    for n, (event, ctx) in enumerate(changes):
        i = n // 2
        assert without_sql(ctx) == {"value": HOSTILE[i], "i": i}, (driver, i)
        sql = ctx["SQL"]
        assert sql.lstrip().upper().startswith(event.kind), sql
        assert "tag" not in sql  # placeholders only: bound values never reach the WAL through the hook


def test_context_with_nul_is_refused_before_anything_reaches_the_database(
    tracked: sa.Engine, dsn: str
) -> None:
    with pytest.raises(ConfigurationError, match="NUL"):
        set_context({"v": "a\x00"})
    with tracked.begin() as conn:
        conn.execute(items.insert().values(id=1, v="x"))
    assert [(e.kind, ctx) for e, ctx in row_contexts(read_events(dsn))] == [("INSERT", {})]


def test_statements_in_one_transaction_each_get_their_own_context(tracked: sa.Engine, dsn: str) -> None:
    with tracked.begin() as conn:
        set_context({"step": "A"})
        conn.execute(items.insert().values(id=1, v="a"))
        set_context(None)
        conn.execute(items.insert().values(id=2, v="b"))
        set_context({"step": "C"})
        conn.execute(items.update().where(items.c.id.in_([1, 2])).values(v="c"))
    set_context(None)
    with tracked.begin() as conn:  # a transaction with no context at all sends no message
        conn.execute(items.delete().where(items.c.id == 1))

    events = [e for e in read_events(dsn) if e.kind != "COMMIT"]
    shape = [(e.kind, without_sql(e.context()) if e.kind == "MESSAGE" else None) for e in events]
    assert shape == [
        ("BEGIN", None),
        ("MESSAGE", {"step": "A"}), ("INSERT", None),
        ("MESSAGE", {}), ("INSERT", None),
        ("MESSAGE", {"step": "C"}), ("UPDATE", None), ("UPDATE", None),
        ("BEGIN", None), ("DELETE", None),
    ]
    assert [without_sql(ctx) for _, ctx in row_contexts(events)] == [
        {"step": "A"}, {}, {"step": "C"}, {"step": "C"}, {}
    ]


def test_statement_repeated_after_a_rolled_back_savepoint_sends_its_context_again(
    tracked: sa.Engine, dsn: str
) -> None:
    with context(step="x"), tracked.begin() as conn:
        savepoint = conn.begin_nested()
        conn.execute(INSERT, {"id": 1, "v": "a"})
        savepoint.rollback()
        conn.execute(INSERT, {"id": 1, "v": "a"})
    events = read_events(dsn)
    assert [(e.kind, without_sql(c)) for e, c in row_contexts(events)] == [("INSERT", {"step": "x"})]
    assert [e.kind for e in events] == ["BEGIN", "MESSAGE", "INSERT", "COMMIT"]


def test_one_message_per_statement_not_per_row(tracked: sa.Engine, dsn: str) -> None:
    with tracked.begin() as conn:
        conn.execute(items.insert(), [{"id": i, "v": "x"} for i in range(50)])
    with context(job="bulk"), tracked.begin() as conn:
        conn.execute(items.update().values(v="y"))
    events = read_events(dsn)
    assert [e.kind for e in events].count("MESSAGE") == 1
    assert [without_sql(c) for e, c in row_contexts(events) if e.kind == "UPDATE"] == [{"job": "bulk"}] * 50


def test_executemany_sends_one_message_while_the_context_stays_the_same(tracked: sa.Engine, dsn: str) -> None:
    with tracked.begin() as conn:
        conn.execute(items.insert(), [{"id": i, "v": "x"} for i in range(40)])
    with context(job="many"), tracked.begin() as conn:  # cursor.executemany: one UPDATE per row
        conn.execute(
            items.update().where(items.c.id == sa.bindparam("key")).values(v=sa.bindparam("nv")),
            [{"key": i, "nv": "y"} for i in range(40)],
        )
        conn.execute(items.delete().where(items.c.id < 5))
    events = read_events(dsn)
    messages = [without_sql(e.context()) for e in events if e.kind == "MESSAGE"]
    assert messages == [{"job": "many"}, {"job": "many"}]  # the UPDATEs, then the DELETE (other SQL)
    assert [without_sql(c) for _, c in row_contexts(events)][40:] == [{"job": "many"}] * 45


def test_insertmanyvalues_batches_carry_the_context_with_capped_sql(tracked: sa.Engine, dsn: str) -> None:
    configure_context(max_sql_bytes=200)
    with context(job="import"), tracked.begin() as conn:
        conn.execute(items.insert().returning(items.c.id), [{"id": i, "v": "x"} for i in range(2500)])
    changes = row_contexts(read_events(dsn))
    assert len(changes) == 2500
    assert {without_sql(ctx)["job"] for _, ctx in changes} == {"import"}
    assert all(len(ctx["SQL"].encode()) < 300 and "truncated" in ctx["SQL"] for _, ctx in changes)


def test_orm_session_flushes_carry_the_context(tracked: sa.Engine, dsn: str) -> None:
    class Base(orm.DeclarativeBase):
        pass

    class Item(Base):
        __table__ = items

    with context(user_id=7), orm.Session(tracked) as session:
        session.add_all([Item(id=1, v="a"), Item(id=2, v="b")])
        session.commit()
        session.get(Item, 1).v = "changed"  # type: ignore[union-attr]
        session.commit()
    changes = row_contexts(read_events(dsn))
    assert [(e.kind, without_sql(c)) for e, c in changes] == [
        ("INSERT", {"user_id": 7}), ("INSERT", {"user_id": 7}), ("UPDATE", {"user_id": 7})
    ]


@pytest.mark.parametrize(
    "statement",
    [
        "  \n\t-- a comment; INSERT\n /* block */ INSERT INTO items (id, v) VALUES (1, 'x')",
        "WITH n AS (SELECT 1 AS id) INSERT INTO items (id, v) SELECT id, 'x' FROM n",
        "with moved as (delete from other where id = 0 returning id) "
        "insert into items (id, v) select id + 10, 'x' from moved",
        "TRUNCATE other",
    ],
    ids=["leading-comments", "with-insert", "writable-cte", "truncate"],
)
def test_write_statements_in_any_form_carry_the_context(tracked: sa.Engine, dsn: str, statement: str) -> None:
    with context(form="x"), tracked.begin() as conn:
        conn.execute(sa.text(statement))
    messages = [e.context() for e in read_events(dsn) if e.kind == "MESSAGE"]
    assert messages and {without_sql(m)["form"] for m in messages} == {"x"}
    assert {m["SQL"] for m in messages} == {statement}


def test_merge_carries_the_context(pg_server: Any, tracked: sa.Engine, dsn: str) -> None:
    if pg_server.version < 150000:
        pytest.skip("MERGE needs PostgreSQL 15")
    statement = (
        "MERGE INTO items i USING (SELECT 1 AS id) s ON i.id = s.id "
        "WHEN NOT MATCHED THEN INSERT (id, v) VALUES (s.id, 'm')"
    )
    with context(via="merge"), tracked.begin() as conn:
        conn.execute(sa.text(statement))
    changes = row_contexts(read_events(dsn))
    assert [(e.kind, without_sql(c)) for e, c in changes] == [("INSERT", {"via": "merge"})]


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT current_query()",
        "  /* x */ select current_query() -- INSERT",
        "WITH q AS (SELECT current_query() AS t) SELECT t FROM q",
        "SELECT current_query() FROM other FOR UPDATE",
        "WITH q AS (SELECT current_query() AS t FROM other FOR NO KEY UPDATE) SELECT t FROM q",
    ],
    ids=["select", "comments", "with-select", "for-update", "with-for-update"],
)
def test_other_statements_reach_the_server_byte_identical(tracked: sa.Engine, statement: str) -> None:
    with context(user="u"), tracked.connect() as conn:
        seen = conn.execute(sa.text(statement)).scalars().first()
    assert seen == statement


def test_write_reaches_the_server_as_marker_then_the_apps_statement(tracked: sa.Engine) -> None:
    statement = "INSERT INTO items (id, v) SELECT 1, current_query()"
    with tracked.begin() as conn:
        conn.execute(sa.text(statement))
        with context(user="u"):
            conn.execute(sa.text(statement.replace("1,", "2,")))
        stored = dict(conn.execute(sa.select(items.c.id, items.c.v)).all())
    assert stored[1] == statement  # no context: untouched
    assert stored[2].startswith("/*bemi:") and stored[2].endswith(statement.replace("1,", "2,"))


def test_async_engine_sees_the_context_of_its_task(pg_server: Any, database: str, tracked: sa.Engine,
                                                   dsn: str) -> None:
    async def request(eng: Any, i: int) -> None:
        set_context({"user": i})
        await asyncio.sleep(0)
        async with eng.begin() as conn:
            await conn.execute(items.insert().values(id=i, v=str(i)))

    async def main() -> None:
        eng = create_async_engine(pg_server.sqlalchemy_url(database, "psycopg_async"), pool_size=10)
        try:
            await asyncio.gather(*(request(eng, i) for i in range(20)))
        finally:
            await eng.dispose()

    asyncio.run(main())
    changes = row_contexts(read_events(dsn))
    assert len(changes) == 20
    for event, ctx in changes:
        assert f"id[integer]:{without_sql(ctx)['user']} ".encode() in event.content + b" "


def test_other_dialects_are_left_untouched() -> None:
    eng = sa.create_engine("sqlite://")
    sent: list[str] = []

    @sa.event.listens_for(eng, "after_cursor_execute")
    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    with context(user="u"), eng.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (id integer)"))
        conn.execute(sa.text("INSERT INTO t VALUES (1)"))
    eng.dispose()
    assert sent == ["CREATE TABLE t (id integer)", "INSERT INTO t VALUES (1)"]


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("INSERT INTO t VALUES (1)", True),
        ("  update t set a = 1", True),
        ("-- c\nDELETE FROM t", True),
        ("/* c */ merge into t using s on true when matched then delete", True),
        ("TRUNCATE t", True),
        ("WITH x AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM x", True),
        ("SELECT 1", False),
        ("SELECT 'insert into t'", False),
        ('SELECT "update" FROM t', False),
        ("SELECT * FROM t FOR UPDATE", False),
        ("WITH x AS (SELECT 1) SELECT * FROM x", False),
        ("WITH x AS (SELECT $$delete$$) SELECT * FROM x", False),
        ("CREATE TABLE t (id int REFERENCES u ON DELETE CASCADE)", False),
        ("", False),
    ],
)
def test_is_write_recognises_writes_only(statement: str, expected: bool) -> None:
    assert is_write(statement) is expected


@given(
    prefix=st.lists(
        st.sampled_from([" ", "\n", "\t", "-- INSERT INTO x\n", "/* DELETE FROM x */", "/* a\n b */"]),
        max_size=5,
    ).map("".join),
    statement=st.sampled_from(["INSERT INTO t VALUES (1)", "SELECT 1", "WITH x AS (DELETE FROM t) SELECT 1",
                               "SELECT 1 FOR UPDATE", "truncate t", "VALUES (1)"]),
)
def test_leading_whitespace_and_comments_never_change_the_classification(prefix: str, statement: str) -> None:
    assert is_write(prefix + statement) is is_write(statement)


def test_is_write_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="bytes"):
        is_write(b"INSERT")  # type: ignore[arg-type]


_: Callable[..., Any] = _write_one  # used by the sync matrix
