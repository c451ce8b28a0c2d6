"""capture/stitch.py: decoded messages of a transaction → change rows (pure, no server)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capture.pgoutput import (
    UNCHANGED,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    Relation,
    Truncate,
    Update,
)
from capture.stitch import MAX_CONTEXT_BYTES, ChangeRow, SchemaChange, Stitcher, parse_context

INT4, TEXT, NUMERIC, BOOL = 23, 25, 1700, 16

TODO = Relation(
    1001,
    "public",
    "todo",
    "d",
    (
        Column(True, "id", INT4, -1),
        Column(False, "title", TEXT, -1),
        Column(False, "price", NUMERIC, -1),
    ),
)
PAIR = Relation(
    1002,
    "public",
    "pair",
    "d",
    (
        Column(True, "a", INT4, -1),
        Column(True, "b", TEXT, -1),
        Column(False, "v", BOOL, -1),
    ),
)
FULL = Relation(1003, "public", "log", "f", (Column(True, "msg", TEXT, -1), Column(True, "n", INT4, -1)))


def stitcher(*relations: Relation, **keys: list[str]) -> Stitcher:
    s = Stitcher("db", {})
    for rel in relations:
        s.add_relation(rel, primary_key=keys.get(rel.name))
    return s


def txn(s: Stitcher, *messages: object, lsn: int = 1000, xid: int = 7) -> list[ChangeRow | SchemaChange]:
    out = s.feed(lsn, Begin(lsn + 500, 10**15, xid))
    for i, message in enumerate(messages):
        out += s.feed(lsn + 8 * (i + 1), message)  # type: ignore[arg-type]
    out += s.feed(lsn + 500, Commit(0, lsn + 500, lsn + 560, 10**15))
    return out


def ctx(obj: object) -> Message:
    return Message(True, 0, "bemi", json.dumps(obj).encode())


def test_each_change_gets_the_context_of_the_last_message_before_it() -> None:
    s = stitcher(TODO)
    rows = txn(
        s,
        Insert(1001, (b"1", b"a", b"1.5")),
        ctx({"user": 1}),
        Insert(1001, (b"2", b"b", None)),
        ctx({"user": 2}),
        Insert(1001, (b"3", b"c", None)),
    )
    assert [json.loads(r.context) for r in rows] == [{}, {"user": 1}, {"user": 2}]


def test_context_does_not_leak_into_the_next_transaction() -> None:
    s = stitcher(TODO)
    txn(s, ctx({"user": 1}), Insert(1001, (b"1", b"a", None)))
    [row] = txn(s, Insert(1001, (b"2", b"b", None)), lsn=5000)
    assert row.context == "{}"


def test_ordinal_and_positions_follow_the_transaction() -> None:
    s = stitcher(TODO)
    rows = txn(s, Insert(1001, (b"1", b"a", None)), Insert(1001, (b"2", b"b", None)), lsn=4000, xid=99)
    assert [(r.ordinal, r.commit_position, r.transaction_id) for r in rows] == [(0, 4500, 99), (1, 4500, 99)]
    assert [r.position for r in rows] == [4008, 4016]
    assert rows[0].committed_at.year == 2031


def test_numeric_stays_exact_and_rows_are_typed_json() -> None:
    s = stitcher(TODO)
    [row] = txn(s, Insert(1001, (b"1", b"a", b"12345678901234567890.123456789")))
    after = json.loads(row.after, parse_float=Decimal)
    assert after == {"id": 1, "title": "a", "price": Decimal("12345678901234567890.123456789")}
    assert (row.primary_key, row.operation, row.before) == ("1", "CREATE", "{}")


def test_composite_key_is_a_json_array_of_typed_values() -> None:
    s = stitcher(PAIR)
    [row] = txn(s, Insert(1002, (b"4", b"x y", b"t")))
    assert row.primary_key == '[4,"x y"]'


def test_delete_with_default_identity_records_the_key_in_before() -> None:
    s = stitcher(PAIR)
    [row] = txn(s, Delete(1002, "K", (b"4", b"x", None)))
    assert (row.operation, json.loads(row.before), row.after) == ("DELETE", {"a": 4, "b": "x"}, "{}")


def test_key_change_keeps_the_old_key_in_before_and_the_new_one_as_primary_key() -> None:
    s = stitcher(TODO)
    [row] = txn(s, Update(1001, "K", (b"1", None, None), (b"10", b"a", None)))
    assert (row.primary_key, json.loads(row.before)) == ("10", {"id": 1})


def test_full_identity_without_key_has_null_primary_key_and_the_whole_old_row() -> None:
    s = stitcher(FULL)
    [row] = txn(s, Update(1003, "O", (b"hi", b"1"), (b"hi", b"2")))
    assert row.primary_key is None
    assert json.loads(row.before) == {"msg": "hi", "n": 1}


def test_full_identity_uses_the_catalog_primary_key() -> None:
    s = stitcher(FULL, log=["n"])
    [row] = txn(s, Delete(1003, "O", (b"hi", b"3")))
    assert row.primary_key == "3"


def test_unchanged_toast_is_taken_from_the_full_old_row() -> None:
    rel = Relation(1004, "public", "doc", "f", (Column(True, "id", INT4, -1), Column(True, "body", TEXT, -1)))
    s = stitcher(rel, doc=["id"])
    [row] = txn(s, Update(1004, "O", (b"1", b"long"), (b"1", UNCHANGED)))
    assert json.loads(row.after) == {"id": 1, "body": "long"}
    assert row.missing == ()


def test_unchanged_toast_without_old_row_is_left_for_the_sink() -> None:
    s = stitcher(TODO)
    [row] = txn(s, Update(1001, None, None, (b"1", UNCHANGED, b"2")))
    assert json.loads(row.after) == {"id": 1, "price": 2}
    assert row.missing == ("title",)


def test_truncate_gives_one_row_per_table_and_skips_ignored_ones() -> None:
    s = stitcher(TODO, PAIR)
    s.add_relation(FULL, ignored=True)
    rows = txn(s, ctx({"job": "reset"}), Truncate((1001, 1003, 1002), False, False))
    assert [(r.table, r.operation, r.primary_key, r.ordinal) for r in rows] == [
        ("todo", "TRUNCATE", None, 0),
        ("pair", "TRUNCATE", None, 1),
    ]
    assert json.loads(rows[0].context) == {"job": "reset"}


def test_changes_to_ignored_tables_produce_nothing() -> None:
    s = Stitcher("db", {})
    s.add_relation(TODO, ignored=True)
    assert txn(s, Insert(1001, (b"1", b"a", None))) == []


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"[1, 2]", id="array"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b'{"a": NaN}', id="nan"),
        pytest.param(b"", id="empty"),
    ],
)
def test_a_bad_context_is_marked_as_an_error_and_never_raises(content: bytes) -> None:
    value = json.loads(parse_context(content))
    assert set(value) == {"_bemi_error", "_bemi_raw"}


def test_a_context_with_nul_is_kept_visible_without_a_nul() -> None:
    value = parse_context(b'{"a": "x\\u0000y"}')
    assert "\\u0000" not in value.replace("\\\\u0000", "")
    assert json.loads(value) == {"a": "x\\u0000y"}


@pytest.mark.parametrize(
    "text",
    [
        '{"amount": 10.10, "long": 0.1000000000000000000001, "big": 1e16, "zero": -0.0}',
        '{"huge": 1E+400, "tiny": 1e-16383, "edge": 9.9e131071}',
        '{ "key \\"quoted\\" \\\\ slash" :\n [1, {"é": "\\ud83d\\ude00"}] }',
    ],
    ids=["decimals", "exponents", "escapes"],
)
def test_a_context_travels_as_the_text_the_application_wrote(text: str) -> None:
    assert parse_context(text.encode()) == text


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(b'{"a": "\\ud800"}', "lone surrogate", id="lone-high-surrogate"),
        pytest.param(b'{"a": ["\\uDC00"]}', "lone surrogate", id="lone-low-surrogate"),
        pytest.param(b'{"\\ud800x": 1}', "lone surrogate", id="in-a-key"),
        pytest.param(b'{"a": "\\ud800", "a": 1}', "lone surrogate", id="hidden-by-a-duplicate-key"),
        pytest.param(b'{"a": 1e131072}', "numeric", id="over-numeric"),
        pytest.param(b'{"a": 1.5e-16383}', "numeric", id="under-numeric"),
        pytest.param(b'{"a": 0e-16384}', "numeric", id="zero-with-too-long-a-scale"),
        pytest.param(b'{"a": 1e00000000000000000000000000000000000000000000000000000099999999999}', "numeric",
                     id="huge-exponent"),
        pytest.param(b'{"a": ' + b"[" * 128 + b"]" * 128 + b"}", "deeper than 128", id="depth-129"),
        pytest.param(b'{"a": ' + b"[" * 10000 + b"]" * 10000 + b"}", "deeper than 128", id="depth-10001"),
    ],
)
def test_a_context_jsonb_cannot_store_is_an_error_object(content: bytes, reason: str) -> None:
    value = json.loads(parse_context(content))
    assert set(value) == {"_bemi_error", "_bemi_raw"}
    assert reason in value["_bemi_error"]
    assert value["_bemi_raw"] == content.decode()


def test_a_context_at_the_depth_limit_is_kept() -> None:
    text = '{"a": ' + "[" * 127 + "]" * 127 + "}"
    assert parse_context(text.encode()) == text


def test_a_context_over_the_worker_size_limit_is_an_error_object_with_its_raw_text_cut() -> None:
    content = b'{"a": "' + b"x" * MAX_CONTEXT_BYTES + b'"}'
    value = json.loads(parse_context(content))
    assert "over the worker's limit" in value["_bemi_error"]
    assert len(value["_bemi_raw"]) == MAX_CONTEXT_BYTES


def test_only_real_nul_escapes_become_visible_text() -> None:
    # \u0000 escapes (also after an escaped backslash) become the text \u0000; \\u0000 already is text
    content = rb'{"a": "\u0000|\\u0000|\\\u0000|\u0000\u0000"}'
    assert json.loads(parse_context(content)) == {"a": "\\u0000|\\u0000|\\\\u0000|\\u0000\\u0000"}


def test_a_poisoned_context_marks_its_rows_and_the_next_context_applies_again() -> None:
    s = stitcher(TODO)
    rows = txn(s, Message(True, 0, "bemi", b'{"n": 1e999999}'), Insert(1001, (b"1", b"a", None)))
    rows += txn(s, ctx({"ok": 1}), Insert(1001, (b"2", b"b", None)))
    assert "numeric" in json.loads(rows[0].context)["_bemi_error"]  # type: ignore[union-attr]
    assert json.loads(rows[1].context) == {"ok": 1}  # type: ignore[union-attr]


def test_relation_with_a_new_column_set_records_a_schema_change() -> None:
    s2 = stitcher(TODO)
    s2.feed(9000, Begin(9500, 10**15, 1))
    [change] = s2.add_relation(
        Relation(1001, "public", "todo", "d", (*TODO.columns, Column(False, "done", BOOL, -1))),
        type_names=["integer", "text", "numeric", "boolean"],
    )
    assert (change.table, change.commit_position, change.ordinal) == ("todo", 9500, 0)
    assert json.loads(change.columns)[-1] == {"name": "done", "type": "boolean", "type_oid": 16, "key": False}
    assert (
        s2.add_relation(
            Relation(1001, "public", "todo", "d", (*TODO.columns, Column(False, "done", BOOL, -1))),
            type_names=["integer", "text", "numeric", "boolean"],
        )
        == []
    )


def test_ddl_message_records_columns_with_the_fill_of_existing_rows() -> None:
    s = stitcher(TODO)
    event = {
        "event": "ALTER TABLE",
        "schema": "public",
        "table": "todo",
        "columns": [
            {"name": "id", "type": "integer", "type_oid": 23, "key": True},
            {"name": "price", "type": "numeric(10,2)", "type_oid": 1700, "key": False, "fill_text": "9.50"},
        ],
    }
    out = txn(s, Insert(1001, (b"1", b"a", None)), Message(True, 0, "bemi_ddl", json.dumps(event).encode()))
    [change] = [c for c in out if isinstance(c, SchemaChange)]
    assert change.ordinal == 1
    columns = json.loads(change.columns, parse_float=Decimal)
    assert columns[1]["fill"] == Decimal("9.50")
    assert "fill" not in columns[0]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@given(
    st.binary(max_size=200) | st.dictionaries(st.text(), json_values).map(lambda d: json.dumps(d).encode())
)
def test_parse_context_always_returns_a_json_object(content: bytes) -> None:
    value = json.loads(parse_context(content))
    assert isinstance(value, dict)


@settings(max_examples=60)
@given(
    st.lists(
        st.lists(
            st.one_of(
                st.integers(0, 50),
                st.dictionaries(
                    # no lone surrogates: jsonb cannot store them, so they become _bemi_error (tested above)
                    st.text(
                        st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=3
                    ),
                    st.integers(),
                ),
            ),
            max_size=12,
        ),
        max_size=5,
    )
)
def test_stitching_matches_a_reference_model(transactions: list[list[object]]) -> None:
    """Ints are inserts of that id, dicts are context messages: each row gets the last context before it."""
    s = stitcher(TODO)
    lsn = 100
    for steps in transactions:
        messages: list[object] = []
        expected = []
        current: dict[str, int] = {}
        for step in steps:
            if isinstance(step, dict):
                current = step
                messages.append(ctx(step))
            else:
                messages.append(Insert(1001, (str(step).encode(), None, None)))
                expected.append((str(step), current, len(expected)))
        rows = txn(s, *messages, lsn=lsn)
        lsn += 10_000
        assert [(r.primary_key, json.loads(r.context), r.ordinal) for r in rows] == expected  # type: ignore[union-attr]


_TYPES = st.sampled_from([INT4, TEXT, NUMERIC, BOOL, 20, 1184, 3802, 1007, 2950])
_VALUE = st.one_of(
    st.none(),
    st.just(UNCHANGED),
    st.sampled_from([b"1", b"-7", b"t", b"f", b"2.50", b"NaN", b'{"a": [1, "x\\ty"]}', b"{1,NULL,3}"]),
    st.sampled_from([b"2026-11-27 10:00:00.5+00", b"infinity", b"2026-01-01 00:00:00+05:30", b"\xff"]),
    st.text(max_size=8).map(str.encode),
)


@settings(max_examples=300)
@given(
    types=st.lists(_TYPES, min_size=1, max_size=5),
    key=st.sampled_from(["none", "one", "two"]),
    identity=st.sampled_from("dfn"),
    data=st.data(),
)
def test_the_fast_path_from_bytes_equals_decoding_then_stitching(
    types: list[int], key: str, identity: str, data: st.DataObject
) -> None:
    from capture.errors import BemiError
    from capture.pgoutput import decode, encode
    from capture.stitch import NOT_HANDLED

    names = [f"c{i}" for i in range(len(types))]
    keys = {"none": [], "one": names[:1], "two": names[:2]}[key]
    columns = tuple(Column(n in keys, n, t, -1) for n, t in zip(names, types, strict=True))
    rel = Relation(5000, "public", "t", identity, columns)
    width = len(types) + data.draw(st.sampled_from([0, 0, 0, 1, -1]))
    values = tuple(data.draw(_VALUE) for _ in range(max(width, 0)))
    old = tuple(data.draw(_VALUE) for _ in range(len(types)))
    message = data.draw(
        st.sampled_from(
            [
                Insert(rel.oid, values),
                Update(rel.oid, None, None, values),
                Update(rel.oid, "K", old, values),
                Update(rel.oid, "O", old, values),
                Delete(rel.oid, "K", values),
                Delete(rel.oid, "O", values),
            ]
        )
    )
    raw = encode(message)
    raw = raw[: data.draw(st.integers(0, len(raw)))] if data.draw(st.booleans()) else raw
    outcomes = []
    for fast in (True, False):
        s = Stitcher("db", {})
        s.add_relation(rel, primary_key=keys or None)
        s.feed(1, Begin(100, 0, 7))
        try:
            row = s.change_data(10, raw) if fast else NOT_HANDLED
            if row is NOT_HANDLED:
                row = s.change(10, decode(raw))  # type: ignore[arg-type]
            outcomes.append(("row", row, s._ordinal))
        except (BemiError, ValueError, TypeError, IndexError) as exc:
            outcomes.append(("error", type(exc).__name__, str(exc)))
    assert outcomes[0] == outcomes[1]


def test_a_tuple_longer_than_its_relation_is_a_decode_error_not_an_index_error() -> None:
    from capture.errors import DecodeError

    with pytest.raises(DecodeError, match=r"4 values for public.todo, whose Relation message has 3 columns"):
        txn(stitcher(TODO), Insert(1001, (b"1", b"x", b"2", UNCHANGED)))
