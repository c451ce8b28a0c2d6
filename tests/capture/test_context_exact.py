"""The context reaches ``changes`` exactly as the application's JSON said it, and no context halts capture.

The oracle is PostgreSQL itself: ``'<the JSON text>'::jsonb`` on the same server. A context jsonb cannot
store (lone surrogate escapes, numbers outside numeric's range, too deep, not UTF-8, not an object)
becomes ``{"_bemi_error": ..., "_bemi_raw": ...}`` and the worker carries on; ``\\u0000`` escapes become
the visible text ``\\\\u0000``.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from conftest import Server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bemi_tt import set_context
from bemi_tt.context import encode_context
from bemi_tt.triggers import install
from capture.stitch import MAX_CONTEXT_DEPTH, numeric_literal_fits, parse_context
from capture.worker import run


class Doc:
    """A JSON text as the application wrote it, what jsonb must hold for it, and its nesting depth.

    ``expected`` is ``text`` with every ``\\u0000`` escape written as the visible text ``\\\\u0000``.
    """

    def __init__(self, text: str, expected: str, depth: int) -> None:
        self.text, self.expected, self.depth = text, expected, depth

    def __repr__(self) -> str:  # huge numbers and deep nesting: keep failure reports readable
        shown = self.text if len(self.text) <= 300 else f"{self.text[:150]}...{self.text[-150:]}"
        return f"Doc({shown!r}, {len(self.text)} chars, depth {self.depth})"


def _doc(text: str, expected: str | None = None, depth: int = 0) -> Doc:
    return Doc(text, text if expected is None else expected, depth)


# -- JSON texts, built token by token so that every spelling can occur ---------------------------------
_EXPONENTS = st.one_of(
    st.integers(0, 30),
    st.integers(300, 420),
    st.integers(16375, 16390),
    st.integers(131060, 131080),
    st.integers(1073741818, 1073741826),
)


@st.composite
def numbers(draw: st.DrawFn) -> Doc:
    sign = draw(st.sampled_from(["", "-"]))
    whole = draw(st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,30}", fullmatch=True)))
    if draw(st.integers(0, 40)) == 0:  # rarely a huge number of digits, around numeric's limits
        whole = "1" + "0" * draw(st.sampled_from([131070, 131071, 131072]))
    fraction = draw(st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,40}", fullmatch=True)))
    if draw(st.integers(0, 40)) == 0:
        fraction = "." + "0" * draw(st.sampled_from([16381, 16382, 16383])) + "1"
    exponent = ""
    if draw(st.booleans()):
        letter = draw(st.sampled_from(["e", "E"]))
        exp_sign = draw(st.sampled_from(["", "+", "-"]))
        zeros = draw(st.sampled_from(["", "0", "000"]))
        exponent = f"{letter}{exp_sign}{zeros}{draw(_EXPONENTS)}"
    return _doc(sign + whole + fraction + exponent)


_ESCAPES = [
    ("\\u0000", "\\\\u0000"),  # NUL: jsonb cannot hold it, kept as visible text
    ("\\\\u0000", "\\\\u0000"),  # an escaped backslash before u0000 is not a NUL escape
    ("\\\\\\u0000", "\\\\\\\\u0000"),
    ("\\ud800", None),  # lone high surrogate
    ("\\uDC00", None),  # lone low surrogate
    ("\\ud83d\\ude00", None),  # a pair: one character
    ("\\uD83D\\uDE00", None),
    ('\\"', None),
    ("\\\\", None),
    ("\\/", None),
    ("\\b\\f\\n\\r\\t", None),
    ("\\u00e9\\u20AC", None),
]


_PLAIN = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")


@st.composite
def strings(draw: st.DrawFn) -> Doc:
    text, expected = ['"'], ['"']
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            # never surrogates nor NUL (their escapes come below); any other character, quotes included
            plain = draw(st.text(_PLAIN, max_size=8))
            ascii_only = draw(st.booleans())
            part = json.dumps(plain, ensure_ascii=ascii_only)[1:-1]
            text.append(part)
            expected.append(part)
        else:
            escape, shown = draw(st.sampled_from(_ESCAPES))
            text.append(escape)
            expected.append(escape if shown is None else shown)
    text.append('"')
    expected.append('"')
    return _doc("".join(text), "".join(expected))


_WS = st.sampled_from(["", "", " ", "\n", "\t ", "\r\n"])


def _containers(inner: st.SearchStrategy[Doc]) -> st.SearchStrategy[Doc]:
    @st.composite
    def arrays(draw: st.DrawFn) -> Doc:
        items = draw(st.lists(inner, max_size=4))
        ws = draw(_WS)
        return Doc(
            "[" + ws + ("," + ws).join(d.text for d in items) + "]",
            "[" + ",".join(d.expected for d in items) + "]",
            1 + max((d.depth for d in items), default=0),
        )

    @st.composite
    def objects(draw: st.DrawFn) -> Doc:
        return _object(draw, inner)

    return arrays() | objects()


def _object(draw: st.DrawFn, inner: st.SearchStrategy[Doc], min_size: int = 0) -> Doc:
    pairs = draw(st.lists(st.tuples(strings(), inner), min_size=min_size, max_size=4))
    if pairs and draw(st.integers(0, 5)) == 0:  # a duplicate key: jsonb keeps the last value
        pairs.append((pairs[0][0], draw(inner)))
    ws = draw(_WS)
    kept = {json.loads(k.text): v.depth for k, v in pairs}  # a later duplicate replaces the value
    return Doc(
        "{" + ws + ("," + ws).join(f"{k.text}{ws}:{ws}{v.text}" for k, v in pairs) + ws + "}",
        "{" + ",".join(f"{k.expected}:{v.expected}" for k, v in pairs) + "}",
        1 + max(kept.values(), default=0),
    )


_SCALARS = numbers() | strings() | st.sampled_from([_doc("true"), _doc("false"), _doc("null")])
values = st.recursive(_SCALARS, _containers, max_leaves=12)


@st.composite
def deep(draw: st.DrawFn) -> Doc:
    """A value inside N arrays or objects, N around the depth limit (the context object adds one)."""
    levels = draw(st.sampled_from([*range(MAX_CONTEXT_DEPTH - 2, MAX_CONTEXT_DEPTH + 1), 400, 1200]))
    doc = draw(_SCALARS)
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"k":', "}")]))
    return Doc(opener * levels + doc.text + closer * levels, opener * levels + doc.expected + closer * levels,
               levels)


@st.composite
def contexts(draw: st.DrawFn) -> Doc:
    """A JSON object text, as an application or a raw ``pg_logical_emit_message`` could send it."""
    return _object(draw, values | deep(), min_size=1)


# -- the oracle ---------------------------------------------------------------------------------------
def jsonb_or_none(conn: psycopg.Connection, text: str) -> str | None:
    """``text::jsonb`` as the server stores it (its text form), None when the server refuses it."""
    try:
        row = conn.execute("SELECT %s::jsonb::text", (text,)).fetchone()
    except psycopg.DataError:
        return None
    except psycopg.errors.StatementTooComplex:
        return None
    assert row is not None
    return str(row[0])


#: A zero with exponent 1073741823: PostgreSQL 18 takes it, 15 does not; refusing it is the safe side.
_BORDERLINE = re.compile(r"(?<![\w.\-])-?0+(?:\.0*)?[eE]\+?0*1073741823(?![0-9])")


def check(conn: psycopg.Connection, doc: Doc, stored: str) -> None:
    """``stored`` (jsonb text of the context in ``changes``, or parse_context's output cast by the server)
    equals ``doc.expected::jsonb``, or is the error object — and only for what jsonb cannot store."""
    value = json.loads(stored, parse_int=Decimal)  # numbers of 131072 digits: past Python's int limit
    wanted = jsonb_or_none(conn, doc.expected)
    if set(value) == {"_bemi_error", "_bemi_raw"}:
        refused = wanted is None or doc.depth > MAX_CONTEXT_DEPTH or _BORDERLINE.search(doc.text) is not None
        assert refused, (value["_bemi_error"], doc.text[:300])
        assert value["_bemi_raw"] == doc.text
        return
    assert wanted is not None, doc.text[:300]
    assert doc.depth <= MAX_CONTEXT_DEPTH
    assert stored == wanted, doc.text[:300]


@pytest.fixture(scope="module")
def oracle(pg_server: Server) -> Any:
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        yield conn


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=contexts())
def test_parse_context_gives_the_jsonb_of_the_input_text_or_the_error_object(
    oracle: psycopg.Connection, doc: Doc
) -> None:
    out = parse_context(doc.text.encode("utf-8"))
    stored = jsonb_or_none(oracle, out)
    assert stored is not None, f"jsonb refuses what parse_context gave for {doc.text[:300]!r}"
    check(oracle, doc, stored)


@settings(max_examples=300, deadline=None)
@given(doc=numbers())
def test_numeric_literal_fits_exactly_when_postgresql_numeric_takes_it(
    oracle: psycopg.Connection, doc: Doc
) -> None:
    taken = jsonb_or_none(oracle, doc.text) is not None
    # between the two servers' exponent limits (PostgreSQL 18 takes 0e1073741823, 15 does not) refusing is
    # the safe side
    borderline = _BORDERLINE.fullmatch(doc.text) is not None
    assert numeric_literal_fits(doc.text) == taken or (borderline and not numeric_literal_fits(doc.text))


# -- end to end: hook or raw message -> trigger -> WAL -> worker -> changes ------------------------------
def _setup(dsn: str, engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (id int PRIMARY KEY, note text)"))
    install(engine)
    run(dsn, once=True)


def _stored_contexts(dsn: str) -> dict[int, str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT (after ->> 'id')::int, (context - 'SQL')::text FROM changes WHERE \"table\" = 't'"
        ).fetchall()
    return {int(i): str(c) for i, c in rows}


HOOK_CONTEXTS: list[dict[str, Any]] = [
    {"amount": Decimal("1E+400")},
    {"amount": Decimal("10.10")},
    {"amount": Decimal("0.1000000000000000000001")},
    {"big": 1e16, "negative_zero": -0.0, "tiny": 5e-324},
    {"scale": Decimal("1E-16383"), "nested": {"list": [Decimal("-0.00"), "é\"\\"]}},
]


def test_hook_contexts_reach_changes_exactly_as_their_json_says(dsn: str, engine: sa.Engine) -> None:
    _setup(dsn, engine)
    for i, ctx in enumerate(HOOK_CONTEXTS):
        set_context(ctx)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO t VALUES (:i, 'x')"), {"i": i})
        finally:
            set_context(None)
    run(dsn, once=True)
    stored = _stored_contexts(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i, ctx in enumerate(HOOK_CONTEXTS):
            enc = encode_context(ctx)
            assert enc is not None
            assert stored[i] == jsonb_or_none(conn, enc.json)  # the hook's "SQL" member left out


POISONED: list[tuple[bytes, str]] = [
    (b'{"a": 1e131072}', "numeric"),
    (b'{"a": 0.1e-16383}', "numeric"),
    (b'{"a": "\\ud800"}', "surrogate"),
    (b'{"a": "\\udc00", "a": 1}', "surrogate"),
    (b'{"a": "x\xff"}', "UTF-8"),
    (b'{"a": ' + b"[" * 200 + b"]" * 200 + b"}", "nested"),
    (b'{"a": ' + b"[" * 10000 + b"]" * 10000 + b"}", "nested"),
    (b'{"a": NaN}', "JSON"),
    (b"[1]", "object"),
]


def test_a_poisoned_context_is_an_error_context_and_capture_carries_on(dsn: str, engine: sa.Engine) -> None:
    _setup(dsn, engine)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i, (content, _) in enumerate(POISONED):
            with conn.transaction():
                conn.execute("SELECT pg_logical_emit_message(true, 'bemi', %s::bytea)", (content,))
                conn.execute("INSERT INTO t VALUES (%s, 'poisoned')", (i,))
        with conn.transaction():
            conn.execute("""SELECT pg_logical_emit_message(true, 'bemi', '{"a": "x\\u0000y", "n": 1e999}')""")
            conn.execute("INSERT INTO t VALUES (100, 'nul')")
    run(dsn, once=True)
    set_context({"after": "the poison", "amount": Decimal("10.10")})
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO t VALUES (101, 'later')"))
    finally:
        set_context(None)
    run(dsn, once=True)
    stored = _stored_contexts(dsn)
    for i, (content, reason) in enumerate(POISONED):
        value = json.loads(stored[i])
        assert set(value) == {"_bemi_error", "_bemi_raw"}
        assert reason in value["_bemi_error"]
        assert value["_bemi_raw"] == content.decode("utf-8", "replace")
    assert json.loads(stored[100], parse_float=Decimal) == {"a": "x\\u0000y", "n": Decimal("1E+999")}
    later = json.loads(stored[101], parse_float=Decimal)
    assert later["after"] == "the poison"
    assert str(later["amount"]) == "10.10"


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(contexts(), min_size=30, max_size=30))
def test_random_contexts_reach_changes_as_their_jsonb_or_as_errors_and_capture_never_stops(
    dsn: str, engine: sa.Engine, docs: list[Doc]
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('t')").fetchone() == (None,):
            _setup(dsn, engine)
        first = int(conn.execute("SELECT count(*) FROM t").fetchone()[0])  # type: ignore[index]
        for i, doc in enumerate(docs, first):
            with conn.transaction():
                conn.execute("SELECT pg_logical_emit_message(true, 'bemi', %s::text)", (doc.text,))
                conn.execute("INSERT INTO t VALUES (%s, 'random')", (i,))
    run(dsn, once=True)
    stored = _stored_contexts(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i, doc in enumerate(docs, first):
            check(conn, doc, stored[i])
