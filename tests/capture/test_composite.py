"""Composite (row-type) columns end to end: ``changes`` holds what ``to_jsonb`` gives, also across ALTER TYPE.

Values go through the real path: INSERT on a server, logical decoding, ``capture.worker.run``, the
``changes`` table; the reference is ``to_jsonb`` of the live row (or of the row when it was written,
for the ALTER TYPE cases), compared as jsonb on the server.
"""

from __future__ import annotations

import itertools
import threading
import time
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capture.errors import BemiError
from capture.pgoutput import UNCHANGED, Begin, Column, Insert, Relation, Update, decode, encode
from capture.stitch import NOT_HANDLED, Stitcher
from capture.values import TypeInfo
from capture.worker import run

SETUP = [
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'with \"quote\", (paren)')",
    "CREATE TYPE item AS (n numeric, s text, tags text[], at timestamptz, m mood, f float8)",
    "CREATE DOMAIN item_d AS item",
    "CREATE TYPE wrap AS (i item, items item[], d item_d, label text)",
    "CREATE TABLE t (id int PRIMARY KEY, a item, b wrap, c item[], d item_d)",
]
ITEM_SQL = "ROW(%s::numeric, %s::text, %s::text[], %s::timestamptz, %s::mood, %s::float8)::item"

texts = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)), max_size=12)
awkward = st.sampled_from(["", " ", "NULL", "()", "(", ")", ",", '"', '""', "\\", "\\\\", "{}", "{", "a,b",
                           '(1,"x")', "ünï 😀", "\n\t", "null"])
strings = st.one_of(st.none(), awkward, texts)
numbers = st.one_of(
    st.none(),
    st.decimals(allow_nan=False, allow_infinity=False).filter(lambda d: abs(d.adjusted()) < 200),
    st.sampled_from([Decimal("NaN"), Decimal("1.50"), Decimal("-0.000")]),
)
moments = st.one_of(
    st.none(),
    st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(timezone.utc)
    ),
)
items = st.one_of(
    st.none(),
    st.tuples(
        numbers,
        strings,
        st.one_of(st.none(), st.lists(strings, max_size=3)),
        moments,
        st.one_of(st.none(), st.sampled_from(["sad", "ok", 'with "quote", (paren)'])),
        st.one_of(st.none(), st.floats()),
    ),
)
wraps = st.one_of(
    st.none(), st.tuples(items, st.one_of(st.none(), st.lists(items, max_size=3)), items, strings)
)
rows = st.lists(st.tuples(items, wraps, st.one_of(st.none(), st.lists(items, max_size=3)), items), max_size=4)


def _item(value: Any, params: list[Any]) -> str:
    if value is None:
        return "NULL::item"
    params.extend(value)
    return ITEM_SQL


def _items(value: list[Any] | None, params: list[Any]) -> str:
    if value is None:
        return "NULL::item[]"
    return "ARRAY[" + ", ".join(_item(v, params) for v in value) + "]::item[]"


def _wrap(value: Any, params: list[Any]) -> str:
    if value is None:
        return "NULL::wrap"
    i, many, d, label = value
    parts = [_item(i, params), _items(many, params), _item(d, params) + "::item_d"]
    params.append(label)
    return "ROW(" + ", ".join(parts) + ", %s::text)::wrap"


def insert(conn: psycopg.Connection, key: int, row: tuple[Any, ...]) -> None:
    a, b, c, d = row
    params: list[Any] = [key]
    query = "INSERT INTO t VALUES (%s, {}, {}, {}, {})".format(  # only placeholders, never data
        _item(a, params), _wrap(b, params), _items(c, params), _item(d, params) + "::item_d"
    )
    conn.execute(query.encode(), params)


def connect(dsn: str) -> psycopg.Connection:
    # to_jsonb prints timestamptz in the session's zone; the worker's sessions use UTC
    return psycopg.connect(dsn, autocommit=True, options="-c TimeZone=UTC -c DateStyle=ISO")


def mismatches(conn: psycopg.Connection, operation: str, keys: list[int]) -> list[tuple[Any, ...]]:
    """Rows of ``t`` whose ``changes`` row of ``operation`` is missing or differs from ``to_jsonb``."""
    return conn.execute(
        "SELECT t.id, c.after::text, to_jsonb(t)::text FROM t LEFT JOIN changes c"
        " ON c.primary_key = t.id::text AND c.operation = %s AND c.\"table\" = 't'"
        " WHERE t.id = ANY(%s) AND c.after IS DISTINCT FROM to_jsonb(t)",
        (operation, keys),
    ).fetchall()


@pytest.fixture
def source(dsn: str) -> str:
    with connect(dsn) as conn:
        for statement in SETUP:
            conn.execute(statement.encode())
    run(dsn, once=True)  # tracking begins: later inserts are decoded from the WAL
    return dsn


_keys = itertools.count(1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=rows)
def test_composite_columns_in_changes_and_snapshot_equal_to_jsonb(source: str, batch: list[Any]) -> None:
    """Random nested composites, arrays of them, domains over them: CREATE and SNAPSHOT rows alike."""
    keys = []
    with connect(source) as conn:
        conn.execute("TRUNCATE t")
        for row in batch:
            key = next(_keys)
            insert(conn, key, row)
            keys.append(key)
    run(source, once=True, snapshot=True)  # the inserts from the WAL, then every current row as SNAPSHOT
    with connect(source) as conn:
        assert mismatches(conn, "CREATE", keys) == []
        assert mismatches(conn, "SNAPSHOT", keys) == []


def test_awkward_field_texts_round_trip_through_record_out(source: str) -> None:
    with connect(source) as conn:
        insert(conn, 1, ((Decimal("1.50"), '"(a,b)"\\ \n', ["", None, "NULL"], None, "ok", 0.1),
                         None, [None, (None,) * 6], (None, "", [], None, None, None)))
        run(source, once=True)
        assert mismatches(conn, "CREATE", [1]) == []
        row = conn.execute("SELECT after -> 'a' FROM changes WHERE operation = 'CREATE'").fetchone()
    assert row is not None
    expected = {"n": 1.5, "s": '"(a,b)"\\ \n', "tags": ["", None, "NULL"], "at": None, "m": "ok", "f": 0.1}
    assert row[0] == expected


# --------------------------------------------------------------------------- ALTER TYPE


def _history(conn: psycopg.Connection) -> list[Any]:
    return [
        row[0]
        for row in conn.execute(
            "SELECT after -> 'v' FROM changes WHERE \"table\" = 'p' AND operation = 'CREATE'"
            " ORDER BY commit_position, ordinal"
        ).fetchall()
    ]


ALTERATIONS = [
    "ALTER TYPE pair ADD ATTRIBUTE c numeric",
    "ALTER TYPE pair RENAME ATTRIBUTE b TO bee",
    "ALTER TYPE pair DROP ATTRIBUTE a",
    "ALTER TYPE pair ADD ATTRIBUTE a timestamptz",
]


def _pair_table(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TYPE pair AS (a int, b text)")
    conn.execute("CREATE TABLE p (id serial PRIMARY KEY, v pair)")


def _insert_pair(conn: psycopg.Connection) -> Any:
    """Insert a row whose every field is set; returns ``to_jsonb`` of its value at that moment."""
    row = conn.execute(
        "INSERT INTO p (v) SELECT jsonb_populate_record(NULL::pair, jsonb_object_agg(a.attname,"
        " CASE a.atttypid WHEN 'text'::regtype THEN to_jsonb('x,y'::text) WHEN 'int4'::regtype THEN"
        " to_jsonb(1) WHEN 'numeric'::regtype THEN to_jsonb(1.50)"
        " ELSE to_jsonb('2026-01-01 00:00:00+00'::timestamptz) END))"
        " FROM pg_attribute a WHERE a.attrelid = 'pair'::regclass AND a.attnum > 0 AND NOT a.attisdropped"
        " RETURNING to_jsonb(v)"
    ).fetchone()
    assert row is not None
    return row[0]


def test_alter_type_each_change_read_after_it_is_committed_gets_the_attributes_of_its_time(dsn: str) -> None:
    """The worker reads each change before the next ALTER TYPE (it runs continuously): exact."""
    with connect(dsn) as conn:
        _pair_table(conn)
        run(dsn, once=True)
        expected = [_insert_pair(conn)]
        run(dsn, once=True)
        for statement in ALTERATIONS:
            conn.execute(statement.encode())
            expected.append(_insert_pair(conn))
            run(dsn, once=True)
        assert _history(conn) == expected
    assert [sorted(v) for v in expected] == [
        ["a", "b"], ["a", "b", "c"], ["a", "bee", "c"], ["bee", "c"], ["a", "bee", "c"],
    ]


def test_added_attributes_are_exact_for_changes_read_after_the_alter_type(dsn: str) -> None:
    """Read in one peek after ADD ATTRIBUTE: the older rows have fewer fields, the first attributes."""
    with connect(dsn) as conn:
        _pair_table(conn)
        run(dsn, once=True)
        expected = [_insert_pair(conn)]
        conn.execute("ALTER TYPE pair ADD ATTRIBUTE c numeric")
        expected.append(_insert_pair(conn))
        conn.execute("ALTER TYPE pair ADD ATTRIBUTE d text")
        expected.append(_insert_pair(conn))
        run(dsn, once=True)
        assert _history(conn) == expected


def test_a_change_read_after_a_later_drop_attribute_keeps_its_text(dsn: str) -> None:
    """The documented limit: the catalog no longer says which fields the older row had."""
    with connect(dsn) as conn:
        _pair_table(conn)
        run(dsn, once=True)
        conn.execute("INSERT INTO p (v) VALUES (ROW(1, 'x'))")
        conn.execute("ALTER TYPE pair DROP ATTRIBUTE a")
        conn.execute("INSERT INTO p (v) VALUES (ROW('y'))")
        run(dsn, once=True)
        assert _history(conn) == ["(1,x)", {"b": "y"}]


def test_a_change_read_after_drop_and_add_attribute_keeps_its_text_and_never_stops_the_worker(
    dsn: str,
) -> None:
    """Same field count, other types: pairing "x" with the new int attribute would be invalid JSON."""
    with connect(dsn) as conn:
        _pair_table(conn)
        run(dsn, once=True)
        conn.execute("INSERT INTO p (v) VALUES (ROW(1, 'x'))")
        conn.execute("ALTER TYPE pair DROP ATTRIBUTE a")
        conn.execute("ALTER TYPE pair ADD ATTRIBUTE c int")
        conn.execute("INSERT INTO p (v) VALUES (ROW('y', 2))")
        run(dsn, once=True)
        assert _history(conn) == ["(1,x)", {"b": "y", "c": 2}]


def test_a_change_read_after_a_later_rename_attribute_takes_the_new_name(dsn: str) -> None:
    """The documented limit: the old name is gone from the catalog; the field count still matches."""
    with connect(dsn) as conn:
        _pair_table(conn)
        run(dsn, once=True)
        conn.execute("INSERT INTO p (v) VALUES (ROW(1, 'x'))")
        conn.execute("ALTER TYPE pair RENAME ATTRIBUTE b TO bee")
        run(dsn, once=True)
        assert _history(conn) == [{"a": 1, "bee": "x"}]


def _wait_until(conn: psycopg.Connection, query: str) -> None:
    deadline = time.monotonic() + 60  # a hang guard, not a timing threshold
    while conn.execute(query.encode()).fetchone() != (True,):
        assert time.monotonic() < deadline, f"timed out waiting for {query}"
        time.sleep(0.05)


class Worker:
    """``run(dsn, stop=...)`` in a thread: one worker session across the statements of a test."""

    def __init__(self, dsn: str) -> None:
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(dsn,))

    def _run(self, dsn: str) -> None:
        try:
            run(dsn, stop=self.stop)
        except BaseException as exc:  # pragma: no cover - reported by __exit__
            self.errors.append(exc)

    def __enter__(self) -> Worker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.errors


def test_a_running_worker_reloads_the_attributes_after_alter_type(dsn: str) -> None:
    """One worker session across ALTER TYPE: the re-sent Relation of the next peek reloads the catalog."""
    with connect(dsn) as conn:
        _pair_table(conn)
    run(dsn, once=True)
    expected = []
    with Worker(dsn), connect(dsn) as conn:
        for n, statement in enumerate([None, *ALTERATIONS], start=1):
            if statement is not None:
                conn.execute(statement.encode())
            expected.append(_insert_pair(conn))
            _wait_until(conn, f"SELECT count(*) = {n} FROM changes WHERE \"table\" = 'p'")
        assert _history(conn) == expected


def test_a_running_worker_converts_values_of_types_created_after_it_started(dsn: str) -> None:
    """The catalog reloaded for an unknown type reaches the encoders of the same batch."""
    with connect(dsn) as conn:
        conn.execute("CREATE TABLE warm (id int PRIMARY KEY)")
    run(dsn, once=True)
    with Worker(dsn), connect(dsn) as conn:
        conn.execute("INSERT INTO warm VALUES (1)")
        _wait_until(conn, "SELECT count(*) = 1 FROM changes")  # the worker's session has loaded its types
        conn.execute("CREATE DOMAIN amount AS numeric")
        conn.execute("CREATE TYPE point2 AS (x amount, y amount)")
        conn.execute("CREATE TABLE q (id int PRIMARY KEY, a amount, p point2)")
        conn.execute("INSERT INTO q VALUES (1, 1.50, ROW(2.5, NULL))")
        _wait_until(conn, "SELECT count(*) = 1 FROM changes WHERE \"table\" = 'q'")
        row = conn.execute(
            "SELECT after = (SELECT to_jsonb(q) FROM q), after::text FROM changes WHERE \"table\" = 'q'"
        ).fetchone()
    assert row is not None
    assert row[0], row[1]


# --------------------------------------------------------------------------- the stitcher's fast path

_PAIR = TypeInfo(60000, "pair", "C", attributes=(("a", 23), ("b", 25)))
_PAIRS = TypeInfo(60001, "_pair", "A", element_oid=60000)
_RECORD_VALUES = st.one_of(
    st.none(),
    st.just(UNCHANGED),
    st.sampled_from(
        [b"(1,x)", b"()", b"(,)", b'(2,"a ""b"" \\\\c")', b'{"(1,x)",NULL,"(,)"}', b"(1,x,y)", b"(", b"(x,y)"]
    ),
    st.text(max_size=8).map(str.encode),
)


@settings(max_examples=200)
@given(
    types=st.lists(st.sampled_from([23, 25, 60000, 60001]), min_size=1, max_size=4),
    data=st.data(),
)
def test_the_fast_path_equals_decoding_then_stitching_for_composite_columns(
    types: list[int], data: st.DataObject
) -> None:
    names = [f"c{i}" for i in range(len(types))]
    columns = tuple(Column(False, n, t, -1) for n, t in zip(names, types, strict=True))
    rel = Relation(5000, "public", "t", "f", columns)
    values = tuple(data.draw(_RECORD_VALUES) for _ in types)
    message = data.draw(st.sampled_from([Insert(rel.oid, values), Update(rel.oid, None, None, values)]))
    raw = encode(message)
    outcomes = []
    for fast in (True, False):
        stitcher = Stitcher("db", {_PAIR.oid: _PAIR, _PAIRS.oid: _PAIRS})
        stitcher.add_relation(rel)
        stitcher.feed(1, Begin(100, 0, 7))
        try:
            row = stitcher.change_data(10, raw) if fast else NOT_HANDLED
            if row is NOT_HANDLED:
                row = stitcher.change(10, decode(raw))  # type: ignore[arg-type]
            outcomes.append(("row", row))
        except (BemiError, ValueError) as exc:
            outcomes.append(("error", type(exc).__name__, str(exc)))
    assert outcomes[0] == outcomes[1]
