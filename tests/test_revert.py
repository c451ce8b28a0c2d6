"""revert and restore against real PostgreSQL with the capture worker.

The oracle: a seeded workload of two users runs on a tracked database; the same workload without the
reverted writes runs on a second, untracked database; after ``revert(...).apply`` the two tables must be
equal value for value (compared as PostgreSQL's own ``to_jsonb`` text, so numeric scale, timestamps,
jsonb, enums and arrays are compared exactly).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pandas as pd
import psycopg
import pytest
import sqlalchemy as sa
from conftest import Server, drop_database
from hypothesis import HealthCheck, given, settings
from psycopg import sql
from psycopg.types.json import Jsonb

import bemi_tt
from bemi_tt import ConflictError
from bemi_tt.dtypes import parse_json
from bemi_tt.sources import json_text
from bemi_tt.undo import _Table, restore, revert
from bemi_tt.undo import _value as literal_of
from capture.export import export_parquet
from capture.worker import run as capture

SCHEMA = [
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
    """CREATE TABLE item (
        shop integer, code text, price numeric(12,3), meta jsonb, seen timestamptz, feel mood,
        tags text[], note text, ratio double precision, PRIMARY KEY (shop, code))""",
    "CREATE TABLE tally (label text, n numeric)",  # no primary key: rows are matched by content
]

INSERT = sa.text(
    "INSERT INTO item (shop, code, price, meta, seen, feel, tags, note, ratio) VALUES "
    "(:shop, :code, :price, CAST(:meta AS jsonb), :seen, CAST(:feel AS mood), :tags, :note, :ratio)"
)


def _value(rng: random.Random, column: str) -> Any:
    if column != "code" and rng.random() < 0.1:
        return None
    if column == "price":
        return Decimal(rng.randrange(-(10**9), 10**9)) / 1000
    if column == "meta":
        return json.dumps(rng.choice([{"a": 1}, {"n": [1, 2.50, None], "s": "x"}, [1, "two"], {}, "text"]))
    if column == "seen":
        return datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=rng.randrange(10**13))
    if column == "feel":
        return rng.choice(["sad", "ok", "happy"])
    if column == "tags":
        return rng.choice([[], ["a"], ["b", None, 'c"d'], ["x,y", "{z}"]])
    if column == "note":
        return rng.choice(["a", "O'Brien", "naïve ✓", 'quote " and \\', "", "line\nbreak", "100%"])
    if column == "ratio":
        return rng.choice([0.5, -1e-300, 1e300, 3.25, float("nan")])
    raise AssertionError(column)


VALUE_COLUMNS = ["price", "meta", "seen", "feel", "tags", "note", "ratio"]
CASTS = {"meta": "CAST(:v AS jsonb)", "feel": "CAST(:v AS mood)"}


@dataclass
class Writer:
    """One user's script: transactions of (statement, parameters), independent of the other user's."""

    user: int
    shop: int
    rng: random.Random
    live: list[str] = field(default_factory=list)
    made: int = 0
    script: list[list[tuple[sa.TextClause, dict[str, Any]]]] = field(default_factory=list)

    def new_code(self) -> str:
        self.made += 1
        return f"u{self.user}-{self.made}"

    def insert(self, code: str) -> tuple[sa.TextClause, dict[str, Any]]:
        self.live.append(code)
        return INSERT, {"shop": self.shop, "code": code, **{c: _value(self.rng, c) for c in VALUE_COLUMNS}}

    def transaction(self, others: list[str] | None = None) -> None:
        """1-3 operations on own rows; with ``others`` (keys of rows nobody else touches any more) also
        updates of their note and deletes of them."""
        ops = []
        for _ in range(self.rng.randrange(1, 4)):
            choice = self.rng.random()
            if others and choice < 0.2:
                code = self.rng.choice(others)
                if self.rng.random() < 0.7:
                    ops.append(
                        (
                            sa.text("UPDATE item SET note = :v WHERE shop = 1 AND code = :code"),
                            {"v": _value(self.rng, "note"), "code": code},
                        )
                    )
                else:
                    ops.append((sa.text("DELETE FROM item WHERE shop = 1 AND code = :code"), {"code": code}))
                    others.remove(code)
            elif choice < 0.45 or not self.live:
                ops.append(self.insert(self.new_code()))
            elif choice < 0.75:
                column = self.rng.choice(VALUE_COLUMNS)
                ops.append(
                    (
                        sa.text(
                            f"UPDATE item SET {column} = {CASTS.get(column, ':v')} "
                            "WHERE shop = :shop AND code = :code"
                        ),
                        {
                            "v": _value(self.rng, column),
                            "shop": self.shop,
                            "code": self.rng.choice(self.live),
                        },
                    )
                )
            elif choice < 0.85:
                old, new = self.rng.choice(self.live), self.new_code()
                ops.append(
                    (
                        sa.text(
                            "UPDATE item SET code = :new, note = :note WHERE shop = :shop AND code = :old"
                        ),
                        {"new": new, "note": _value(self.rng, "note"), "shop": self.shop, "old": old},
                    )
                )
                self.live[self.live.index(old)] = new
            else:
                victim = self.rng.choice(self.live)
                ops.append(
                    (
                        sa.text("DELETE FROM item WHERE shop = :shop AND code = :code"),
                        {"shop": self.shop, "code": victim},
                    )
                )
                self.live.remove(victim)
            if self.rng.random() < 0.2:  # the table without a key, too
                ops.append(
                    (
                        sa.text("INSERT INTO tally VALUES (:label, :n)"),
                        {"label": f"u{self.user}", "n": Decimal(self.rng.randrange(100)) / 10},
                    )
                )
        self.script.append(ops)


def workload(seed: int) -> list[tuple[int, list[tuple[sa.TextClause, dict[str, Any]]]]]:
    """(user, transaction) in commit order. User 1 first inserts rows it never touches again ("settled");
    user 2 updates and deletes some of those, and each works on its own rows otherwise."""
    a = Writer(1, 1, random.Random(seed))
    b = Writer(2, 2, random.Random(seed + 1000))
    settled = [a.new_code() for _ in range(6)]
    a.script.append([a.insert(code) for code in settled])
    a.live = []
    others = list(settled)
    order = random.Random(seed + 2000)
    plan: list[tuple[int, list[tuple[sa.TextClause, dict[str, Any]]]]] = [(1, a.script[0])]
    for _ in range(24):
        writer = a if order.random() < 0.5 else b
        writer.transaction(others if writer is b else None)
        plan.append((writer.user, writer.script[-1]))
    # user 2 also updates and deletes rows of the keyless table it wrote
    plan.append(
        (
            2,
            [
                (
                    sa.text(
                        "UPDATE tally SET n = n + 1 WHERE ctid = (SELECT ctid FROM tally WHERE label = 'u2' "
                        "ORDER BY n LIMIT 1)"
                    ),
                    {},
                ),
                (
                    sa.text(
                        "DELETE FROM tally WHERE ctid = (SELECT ctid FROM tally WHERE label = 'u1' "
                        "ORDER BY n DESC LIMIT 1)"
                    ),
                    {},
                ),
            ],
        )
    )
    return plan


def run(
    engine: sa.Engine,
    plan: list[tuple[int, list[tuple[sa.TextClause, dict[str, Any]]]]],
    skip: Callable[[int, int], bool] = lambda i, user: False,
) -> None:
    for i, (user, ops) in enumerate(plan):
        if skip(i, user):
            continue
        with bemi_tt.context(user_id=user), engine.begin() as conn:
            for statement, params in ops:
                conn.execute(statement, params)


def table_text(engine: sa.Engine) -> dict[str, list[str]]:
    """Both tables as PostgreSQL prints each row (to_jsonb), sorted: exact values, no Python conversion."""
    with engine.connect() as conn:
        return {
            name: sorted(str(r[0]) for r in conn.exec_driver_sql(f"SELECT to_jsonb(t)::text FROM {name} t"))
            for name in ("item", "tally")
        }


def setup(engine: sa.Engine, tracked: bool = True) -> None:
    with engine.begin() as conn:
        for statement in SCHEMA:
            conn.exec_driver_sql(statement)
    if tracked:
        bemi_tt.install(engine)
        capture(_dsn(engine), once=True)


def _dsn(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=False).replace("+psycopg", "")


@pytest.fixture
def oracle(pg_server: Server, database: str) -> Iterator[sa.Engine]:
    """A second, untracked database with the same tables: where the workload runs without the reverted
    writes."""
    name = database + "_oracle"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    eng = sa.create_engine(pg_server.sqlalchemy_url(name))
    setup(eng, tracked=False)
    yield eng
    eng.dispose()
    drop_database(pg_server, name)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_revert_by_context_filter_gives_the_table_without_that_users_writes(
    engine: sa.Engine, dsn: str, oracle: sa.Engine, seed: int
) -> None:
    setup(engine)
    plan = workload(seed)
    run(engine, plan)
    run(oracle, plan, skip=lambda i, user: user == 2)
    capture(dsn, once=True)
    undo = revert(user_id=2, source=dsn)
    assert undo.undone > 0 and "::numeric(12,3)" in undo.sql and '"public"."item"' in undo.sql
    undo.apply(engine)
    assert table_text(engine) == table_text(oracle)


def test_revert_by_transaction_id_undoes_exactly_that_transaction(
    engine: sa.Engine, dsn: str, oracle: sa.Engine
) -> None:
    setup(engine)
    plan = workload(4)
    last_b = max(i for i, (user, _) in enumerate(plan) if user == 2)
    run(engine, plan)
    run(oracle, plan, skip=lambda i, user: i == last_b)
    capture(dsn, once=True)
    feed = bemi_tt.audit(user_id=2, source=dsn)
    xid = int(feed["transaction_id"].iloc[-1])
    undo = revert(transaction_id=xid, source=dsn)
    assert undo.undone == int((feed["transaction_id"] == xid).sum())
    undo.apply(engine)
    assert table_text(engine) == table_text(oracle)


@pytest.fixture
def todo(engine: sa.Engine, dsn: str) -> sa.Engine:
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE todo (id integer PRIMARY KEY, task text NOT NULL, done boolean)")
    bemi_tt.install(engine)
    capture(dsn, once=True)
    return engine


def _write(engine: sa.Engine, user: int, *statements: str) -> None:
    with bemi_tt.context(user_id=user), engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def _rows(engine: sa.Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql("SELECT * FROM todo ORDER BY id")]


def test_a_conflicting_revert_raises_naming_the_rows_and_force_overrides(todo: sa.Engine, dsn: str) -> None:
    _write(todo, 1, "INSERT INTO todo VALUES (1, 'Sleep', false), (2, 'Eat', false)")
    _write(todo, 2, "UPDATE todo SET task = 'Nap' WHERE id IN (1, 2)")
    _write(todo, 1, "UPDATE todo SET task = 'Rest' WHERE id = 1", "UPDATE todo SET done = true WHERE id = 2")
    capture(dsn, once=True)
    undo = revert("todo", user_id=2, source=dsn)
    with pytest.raises(ConflictError, match=r"todo id=1\b") as info:
        undo.apply(todo)
    assert info.value.rows == ["todo id=1"]  # row 2 changed too, but not in the column user 2 set
    assert _rows(todo) == [(1, "Rest", False), (2, "Nap", True)]  # nothing was written
    assert undo.apply(todo, force=True) == 2
    assert _rows(todo) == [(1, "Sleep", False), (2, "Eat", True)]


def test_a_change_not_yet_captured_is_a_conflict_too(todo: sa.Engine, dsn: str) -> None:
    _write(todo, 2, "INSERT INTO todo VALUES (1, 'Sleep', false)")
    capture(dsn, once=True)
    undo = revert("todo", user_id=2, source=dsn)
    _write(todo, 1, "UPDATE todo SET done = true WHERE id = 1")  # the plan's source does not know it
    with pytest.raises(ConflictError, match="todo id=1"):
        undo.apply(todo)
    assert _rows(todo) == [(1, "Sleep", True)]


def test_the_reverts_own_changes_are_captured_with_the_revert_context(todo: sa.Engine, dsn: str) -> None:
    _write(
        todo, 2, "INSERT INTO todo VALUES (1, 'Sleep', false)", "INSERT INTO todo VALUES (2, 'Eat', false)"
    )
    capture(dsn, once=True)
    with bemi_tt.context(user_id=99):  # who runs the revert stays in the context
        assert revert("todo", user_id=2, source=dsn).apply(todo) == 2
    capture(dsn, once=True)
    undone = bemi_tt.audit("todo", bemi_tt_action="revert", source=dsn)
    assert list(undone["operation"]) == ["DELETE", "DELETE"]
    assert list(undone["user_id"]) == [99, 99]
    assert undone["bemi_tt_selection"].iloc[0] == {"table": "todo", "context": {"user_id": 2}}
    assert _rows(todo) == []


def test_revert_of_a_key_update_and_a_delete_puts_the_row_back(todo: sa.Engine, dsn: str) -> None:
    _write(todo, 1, "INSERT INTO todo VALUES (1, 'Sleep', false), (2, 'Eat', null)")
    _write(todo, 2, "UPDATE todo SET id = 10, task = 'Moved' WHERE id = 1", "DELETE FROM todo WHERE id = 2")
    capture(dsn, once=True)
    undo = revert("todo", user_id=2, source=dsn)
    preview = undo.preview.reset_index()
    cells = {
        (r["id"], r["column"]): (r["change"], r["old"], r["new"], r["operation"])
        for _, r in preview.iterrows()
    }
    # a key update undone is a change of the key, indexed by the key the row has after the plan
    assert cells[(1, "id")] == ("changed", 10, 1, "UPDATE")
    assert cells[(1, "task")] == ("changed", "Moved", "Sleep", "UPDATE")
    assert cells[(2, "task")] == ("added", None, "Eat", "DELETE")
    assert cells[(2, "done")] == ("added", None, None, "DELETE")
    undo.apply(todo)
    assert _rows(todo) == [(1, "Sleep", False), (2, "Eat", None)]


def _cell(value: Any) -> str:
    """A preview or diff cell, comparable (NaN equals NaN, lists and dicts by their JSON)."""
    return json_text(value.tolist() if hasattr(value, "tolist") else value)


def test_restore_makes_the_live_table_equal_as_of(engine: sa.Engine, dsn: str) -> None:
    setup(engine)
    plan = workload(5)
    run(engine, plan[:12])
    with engine.connect() as conn:
        middle = conn.exec_driver_sql("SELECT clock_timestamp()").scalar_one()
    run(engine, plan[12:])
    capture(dsn, once=True)
    # the preview is diff(middle, now) turned around: each added row removed, each removed row added
    turned = {"added": "removed", "removed": "added", "changed": "changed"}
    changes = bemi_tt.diff("item", middle, "now", source=dsn).reset_index()
    expected_cells = {
        (r["shop"], r["code"], r["column"], turned[r["change"]], _cell(r["new"]), _cell(r["old"]))
        for _, r in changes.iterrows()
    }
    preview = restore("item", middle, source=dsn).preview.reset_index()
    assert {
        (r["shop"], r["code"], r["column"], r["change"], _cell(r["old"]), _cell(r["new"]))
        for _, r in preview.iterrows()
    } == expected_cells
    for table in ("item", "tally"):
        expected = bemi_tt.as_of(table, middle, source=dsn)
        restore(table, middle, source=dsn).apply(engine)
        capture(dsn, once=True)
        pd.testing.assert_frame_equal(bemi_tt.as_of(table, "now", source=dsn), expected)
        assert len(restore(table, middle, source=dsn)) == 0  # nothing left to do


def test_restore_with_keys_touches_only_those_rows(todo: sa.Engine, dsn: str) -> None:
    _write(todo, 1, "INSERT INTO todo VALUES (1, 'Sleep', false), (2, 'Eat', false)")
    with todo.connect() as conn:
        then = conn.exec_driver_sql("SELECT clock_timestamp()").scalar_one()
    _write(
        todo, 2, "UPDATE todo SET task = 'Nap' WHERE id IN (1, 2)", "INSERT INTO todo VALUES (3, 'New', true)"
    )
    capture(dsn, once=True)
    undo = restore("todo", then, source=dsn, keys=[1, 3])
    assert {s.kind for s in undo.steps} == {"update", "delete"}
    undo.apply(todo)
    assert _rows(todo) == [(1, "Sleep", False), (2, "Nap", False)]


def test_bad_arguments_name_the_bad_value(todo: sa.Engine, dsn: str) -> None:
    _write(todo, 1, "INSERT INTO todo VALUES (1, 'Sleep', false)")
    _write(todo, 1, "TRUNCATE todo")
    capture(dsn, once=True)
    with pytest.raises(bemi_tt.ConfigurationError, match="needs a selection"):
        revert("todo", source=dsn)
    with pytest.raises(bemi_tt.ConfigurationError, match="'12'"):
        revert(transaction_id="12", source=dsn)  # type: ignore[arg-type]
    with pytest.raises(bemi_tt.ConfigurationError, match=r"'usr_id'.*did you mean 'user_id'"):
        revert(usr_id=1, source=dsn)
    with pytest.raises(bemi_tt.ConfigurationError, match="since"):
        revert(since="yesterday-ish", source=dsn)
    with pytest.raises(bemi_tt.ConfigurationError, match="TRUNCATE of todo"):
        revert("todo", user_id=1, source=dsn)
    with pytest.raises(bemi_tt.ConfigurationError, match="unknown table 'nope'"):
        restore("nope", "now", source=dsn)
    with pytest.raises(bemi_tt.ConfigurationError, match="'abc' is not an integer"):
        restore("todo", "now", source=dsn, keys=["abc"])
    with pytest.raises(bemi_tt.ConfigurationError, match="before the history"):
        restore("todo", "2000-01-01", source=dsn)
    with pytest.raises(bemi_tt.ConfigurationError, match="force must be"):
        revert("todo", since="2999-01-01", source=dsn).apply(todo, force="yes")  # type: ignore[arg-type]


# -- literals: every recorded value reads back as itself ------------------------------------------------
_texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)  # text holds no NUL
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.decimals(allow_nan=False,
                                                                             allow_infinity=False) | _texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=6,
)
#: (PostgreSQL type, values psycopg can send for it)
TYPED = [
    ("numeric", st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(
        lambda d: abs(d.as_tuple().exponent) < 100)  # type: ignore[arg-type]
        | st.sampled_from([Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity")])),
    ("numeric(12,3)", st.decimals(min_value=-(10**8), max_value=10**8, places=3)),
    ("double precision", st.floats()),
    ("text", _texts),
    # a row image writes SQL NULL and JSON null alike (``null``): undo writes SQL NULL (see the docs)
    ("jsonb", _json.filter(lambda v: v is not None).map(lambda v: Jsonb(v, dumps=json_text))),
    ("timestamptz", st.datetimes(timezones=st.just(timezone.utc))),
    ("timestamp", st.datetimes()),
    ("date", st.dates()),
    ("interval", st.timedeltas(min_value=timedelta(days=-(10**5)), max_value=timedelta(days=10**5))),
    ("text[]", st.lists(st.none() | _texts, max_size=4)),
    ("integer[]", st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4)),
    ("bytea", st.binary(max_size=8)),
    ("boolean", st.booleans()),
    ("mood", st.sampled_from(["sad", "ok", "happy"])),
    ("timestamptz[]", st.lists(st.datetimes(timezones=st.just(timezone.utc)), max_size=3)),
    ("pair", st.tuples(st.integers(-5, 5), _texts).map(  # a composite, sent as its text
        lambda p: f'({p[0]},"' + p[1].replace("\\", "\\\\").replace('"', '""') + '")')),
    ("pair[]", st.lists(st.tuples(st.integers(-5, 5), st.sampled_from(["", "a b", 'q"'])), max_size=3).map(
        lambda ps: "{" + ",".join('"(' + str(a) + ',\\"' + b.replace('"', '\\"\\"') + '\\")"' for a, b in ps)
        + "}")),
]


@pytest.fixture
def literal_table(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")  # as the capture worker's session records values
        conn.execute("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')")
        conn.execute("CREATE TYPE pair AS (a integer, b text)")
        conn.execute(
            "CREATE TABLE vals (" + ", ".join(f"c{i} {t}" for i, (t, _) in enumerate(TYPED)) + ")"
        )
        yield conn


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_literals_read_back_as_exactly_the_recorded_value(
    literal_table: psycopg.Connection[Any], data: st.DataObject
) -> None:
    i = data.draw(st.integers(0, len(TYPED) - 1))
    type_text, values = TYPED[i]
    value = data.draw(values)
    column = f"c{i}"
    row = literal_table.execute(
        sql.SQL("SELECT to_jsonb(CAST(%s AS {}))::text").format(sql.SQL(type_text)), (value,)
    ).fetchone()
    assert row is not None
    recorded = row[0]
    table = _Table(("public", "vals"), {column: {"name": column, "type": type_text}}, [])
    literal = literal_of(table, column, parse_json(recorded))
    back = literal_table.execute(sql.SQL("SELECT to_jsonb({})::text").format(literal)).fetchone()
    assert back is not None and back[0] == recorded, literal.as_string(None)


def test_revert_across_tables_with_a_foreign_key_undoes_in_reverse_commit_order(
    engine: sa.Engine, dsn: str
) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE parent (id integer PRIMARY KEY, name text)")
        conn.exec_driver_sql("CREATE TABLE child (id integer PRIMARY KEY, parent integer REFERENCES parent)")
    bemi_tt.install(engine)
    capture(dsn, once=True)
    _write(engine, 1, "INSERT INTO parent VALUES (1, 'old')", "INSERT INTO child VALUES (10, 1)")
    _write(engine, 2, "INSERT INTO parent VALUES (2, 'new')", "INSERT INTO child VALUES (20, 2)")
    _write(engine, 2, "DELETE FROM child WHERE id = 10", "DELETE FROM parent WHERE id = 1")
    capture(dsn, once=True)
    undo = revert(user_id=2, source=dsn)
    assert undo.preview.index.names == ["table", "primary_key", "column"]
    assert set(undo.preview["change"]) == {"added", "removed"}
    undo.apply(engine)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT * FROM parent").fetchall() == [(1, "old")]
        assert conn.exec_driver_sql("SELECT * FROM child").fetchall() == [(10, 1)]


def test_revert_after_columns_were_added_and_dropped_writes_the_columns_the_table_has(
    todo: sa.Engine, dsn: str
) -> None:
    _write(todo, 1, "INSERT INTO todo VALUES (1, 'Sleep', false)")
    _write(todo, 2, "UPDATE todo SET task = 'Nap', done = true WHERE id = 1",
           "INSERT INTO todo VALUES (2, 'x', true)")
    _write(todo, 1, "ALTER TABLE todo ADD COLUMN prio integer DEFAULT 5", "ALTER TABLE todo DROP COLUMN done")
    _write(todo, 2, "UPDATE todo SET prio = 9 WHERE id = 2")
    capture(dsn, once=True)
    undo = revert("todo", user_id=2, source=dsn)
    assert "done" not in undo.sql  # dropped since: nothing to write it to
    undo.apply(todo)
    assert _rows(todo) == [(1, "Sleep", 5)]


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1))
def test_revert_of_a_users_writes_over_random_workloads_equals_the_workload_without_them(
    pg_server: Server, seed: int
) -> None:
    names = [f"hyp{seed}_{side}" for side in ("live", "oracle")]
    engines = []
    try:
        for name in names:
            with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            engines.append(sa.create_engine(pg_server.sqlalchemy_url(name)))
        live, oracle_engine = engines
        setup(live)
        setup(oracle_engine, tracked=False)
        plan = workload(seed)
        run(live, plan)
        run(oracle_engine, plan, skip=lambda i, user: user == 2)
        capture(_dsn(live), once=True)
        revert(user_id=2, source=_dsn(live)).apply(live)
        assert table_text(live) == table_text(oracle_engine)
    finally:
        for eng in engines:
            eng.dispose()
        for name in names:
            drop_database(pg_server, name)


def test_a_plan_read_from_a_parquet_export_is_the_plan_read_from_postgresql(
    engine: sa.Engine, dsn: str, tmp_path: Path
) -> None:
    setup(engine)
    plan = workload(6)
    run(engine, plan[:10])
    with engine.connect() as conn:
        middle = conn.exec_driver_sql("SELECT clock_timestamp()").scalar_one()
    run(engine, plan[10:])
    capture(dsn, once=True)
    export_parquet(dsn, str(tmp_path / "export"), progress=False)
    exported = str(tmp_path / "export")
    online_revert, offline_revert = revert(user_id=2, source=dsn), revert(user_id=2, source=exported)
    assert offline_revert.sql == online_revert.sql != ""
    pd.testing.assert_frame_equal(offline_revert.preview, online_revert.preview)
    for table in ("item", "tally"):
        online, offline = restore(table, middle, source=dsn), restore(table, middle, source=exported)
        assert offline.sql == online.sql != ""
        pd.testing.assert_frame_equal(offline.preview, online.preview)


def test_changes_recorded_without_old_values_are_refused_naming_the_change(
    engine: sa.Engine, dsn: str
) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE todo (id integer PRIMARY KEY, task text NOT NULL, done boolean)")
    bemi_tt.install(engine, replica_identity_full=False)  # REPLICA IDENTITY DEFAULT: old values not logged
    capture(dsn, once=True)
    todo = engine
    _write(todo, 1, "INSERT INTO todo VALUES (1, 'Sleep', false), (2, 'Eat', false)")
    _write(todo, 2, "UPDATE todo SET task = 'Nap' WHERE id = 1")
    _write(todo, 3, "DELETE FROM todo WHERE id = 2")
    capture(dsn, once=True)
    with pytest.raises(bemi_tt.ConfigurationError, match=r"the UPDATE of todo key 1 .* recorded no old"):
        revert("todo", user_id=2, source=dsn)
    with pytest.raises(bemi_tt.ConfigurationError, match=r"the DELETE of todo key 2 .* recorded only the"):
        revert("todo", user_id=3, source=dsn)
    restore("todo", "now", source=dsn)  # restore needs no old values: it compares states


def test_restore_across_a_truncate_puts_the_truncated_rows_back(todo: sa.Engine, dsn: str) -> None:
    _write(todo, 1, "INSERT INTO todo VALUES (1, 'Sleep', false), (2, 'Eat', null)")
    with todo.connect() as conn:
        then = conn.exec_driver_sql("SELECT clock_timestamp()").scalar_one()
    _write(todo, 2, "TRUNCATE todo", "INSERT INTO todo VALUES (2, 'Other', true), (3, 'New', true)")
    capture(dsn, once=True)
    restore("todo", then, source=dsn).apply(todo)
    assert _rows(todo) == [(1, "Sleep", False), (2, "Eat", None)]


DAMAGED_TYPES = ["integer); DROP TABLE todo; --", "text /* x */", 'U&"d\\0061t"', "int'"]


@pytest.mark.parametrize("damaged", DAMAGED_TYPES)
def test_a_type_in_changes_schemas_that_is_not_a_type_name_is_refused(damaged: str) -> None:
    table = _Table(("public", "todo"), {"c": {"name": "c", "type": damaged}}, [])
    with pytest.raises(bemi_tt.ConfigurationError, match="not a type name"):
        literal_of(table, "c", 1)
    for fine in ("numeric(10,2)", "timestamp(3) with time zone", 'public."My Type"[]', "bit varying(5)"):
        table = _Table(("public", "t"), {"c": {"name": "c", "type": fine}}, [])
        assert literal_of(table, "c", 1).as_string(None) == f"'1'::{fine}"
