"""capture.pgoutput: golden payloads from a real server, live decoding, round trips and fuzzing."""

from __future__ import annotations

import copy
import json
import pickle
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pgoutput_scenarios import SCENARIOS, TOAST_BODY, run_all

from capture.errors import DecodeError
from capture.pgoutput import (
    UNCHANGED,
    Begin,
    BinaryValue,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputMessage,
    Relation,
    Truncate,
    Type,
    Update,
    decode,
    encode,
    format_lsn,
    parse_lsn,
    pg_timestamp_to_datetime,
)

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "pgoutput"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())


def golden(name: str) -> list[bytes]:
    return [bytes.fromhex(line) for line in (GOLDEN / f"{name}.hex").read_text().split()]


def decoded(name: str) -> list[PgOutputMessage]:
    return [decode(data) for data in golden(name)]


def only(messages: list[PgOutputMessage], kind: type) -> list:
    return [m for m in messages if isinstance(m, kind)]


ALL_GOLDEN = [data for name in MANIFEST["fixtures"] for data in golden(name)]
KIND_LETTERS = {
    Begin: "B",
    Commit: "C",
    Origin: "O",
    Relation: "R",
    Type: "Y",
    Insert: "I",
    Update: "U",
    Delete: "D",
    Truncate: "T",
    Message: "M",
}


# --------------------------------------------------------------------------- golden fixtures


def test_manifest_lists_every_fixture_file_and_every_scenario() -> None:
    files = {p.stem for p in GOLDEN.glob("*.hex")}
    assert files == set(MANIFEST["fixtures"]) == {s.name for s in SCENARIOS}


@pytest.mark.parametrize("name", sorted(MANIFEST["fixtures"]))
def test_golden_messages_decode_to_the_recorded_kinds_and_reencode_byte_for_byte(name: str) -> None:
    payloads = golden(name)
    messages = [decode(p) for p in payloads]
    assert "".join(KIND_LETTERS[type(m)] for m in messages) == MANIFEST["fixtures"][name]["kinds"]
    assert [encode(m) for m in messages] == payloads


def test_golden_fixtures_cover_every_message_kind() -> None:
    kinds = {type(decode(data)) for data in ALL_GOLDEN}
    assert kinds == set(KIND_LETTERS)


def test_begin_and_commit_agree_on_lsn_and_time() -> None:
    messages = decoded("insert")
    begin, commit = messages[0], messages[-1]
    assert isinstance(begin, Begin) and isinstance(commit, Commit)
    assert begin.final_lsn == commit.commit_lsn < commit.end_lsn
    assert begin.commit_time == commit.commit_time
    assert commit.flags == 0
    assert pg_timestamp_to_datetime(commit.commit_time).year >= 2026


def test_insert_carries_text_values_and_nulls_in_column_order() -> None:
    messages = decoded("insert")
    (relation,) = only(messages, Relation)
    assert (relation.namespace, relation.name, relation.replica_identity) == ("public", "items", "d")
    assert [c.name for c in relation.columns] == ["id", "name", "price", "tags", "data", "created", "note"]
    assert [c.key for c in relation.columns] == [True] + [False] * 6
    assert [c.type_oid for c in relation.columns] == [23, 25, 1700, 1009, 3802, 1184, 25]
    assert relation.columns[2].type_modifier == (10 << 16 | 2) + 4  # numeric(10,2)
    first, second = only(messages, Insert)
    assert first.relation_oid == second.relation_oid == relation.oid
    assert first.new == (
        b"1",
        b"widget",
        b"12.50",
        b'{a,"b c",NULL}',
        b'{"k": [1, 2]}',
        b"2026-11-27 10:00:00.123456+00",
        None,
    )
    assert second.new[1] == "gadget ü".encode()
    assert second.new[5] == b"-infinity"


def test_update_without_old_tuple_under_default_identity() -> None:
    (update,) = only(decoded("update_no_old"), Update)
    assert update.old_kind is None and update.old is None
    assert update.new[:3] == (b"1", b"widget", b"13.75")


def test_update_of_the_key_sends_a_key_only_old_tuple() -> None:
    (update,) = only(decoded("update_key"), Update)
    assert update.old_kind == "K"
    assert update.old == (b"1", None, None, None, None, None, None)
    assert update.new[0] == b"10"


def test_update_under_identity_full_sends_the_whole_old_row() -> None:
    messages = decoded("update_full")
    (relation,) = only(messages, Relation)
    assert relation.replica_identity == "f"
    assert all(c.key for c in relation.columns)  # FULL marks every column as part of the identity
    (insert,) = only(messages, Insert)
    (update,) = only(messages, Update)
    assert update.old_kind == "O"
    assert update.old == insert.new == (b"1", b"ann", b"100.00")
    assert update.new == (b"1", b"ann", b"90.5")


def test_identity_using_index_marks_the_index_columns_as_key() -> None:
    messages = decoded("update_index")
    (relation,) = only(messages, Relation)
    assert relation.replica_identity == "i"
    assert [c.key for c in relation.columns] == [True, True, False]
    (update,) = only(messages, Update)
    assert (update.old_kind, update.old, update.new) == ("K", (b"x", b"1", None), (b"x", b"2", b"5"))


def test_delete_sends_the_key_or_the_full_old_row() -> None:
    (by_key,) = only(decoded("delete_key"), Delete)
    assert (by_key.old_kind, by_key.old[0], set(by_key.old[1:])) == ("K", b"2", {None})
    (full,) = only(decoded("delete_full"), Delete)
    assert (full.old_kind, full.old) == ("O", (b"1", b"ann", b"90.5"))


def test_relation_with_identity_nothing() -> None:
    (relation,) = only(decoded("insert_no_identity"), Relation)
    assert relation.replica_identity == "n"
    assert not any(c.key for c in relation.columns)


def test_truncate_of_several_relations_with_cascade_and_restart_identity() -> None:
    messages = decoded("truncate_cascade")
    truncate = messages[-2]
    assert isinstance(truncate, Truncate)
    assert truncate.cascade and truncate.restart_identity
    names = {r.oid: r.name for r in only(messages, Relation)}
    assert sorted(names[oid] for oid in truncate.relation_oids) == ["child", "other", "parent"]
    (plain,) = only(decoded("truncate_plain"), Truncate)
    assert len(plain.relation_oids) == 1 and not plain.cascade and not plain.restart_identity


def test_transactional_message_comes_inside_the_transaction_before_the_row() -> None:
    messages = decoded("message_transactional")
    assert [type(m) for m in messages] == [Begin, Message, Relation, Insert, Commit]
    message = messages[1]
    assert message.transactional and message.prefix == "bemi"
    assert json.loads(message.content) == {"user": "ann", "n": 1}
    assert messages[0].final_lsn > message.lsn


def test_non_transactional_messages_come_alone_and_keep_raw_bytes() -> None:
    first, second = decoded("message_nontransactional")
    assert (first.transactional, first.prefix, first.content) == (False, "bemi", b"plain")
    assert (second.transactional, second.prefix, second.content) == (False, "raw", b"\xff\x00\xfe")
    assert first.lsn < second.lsn


def test_custom_types_are_announced_with_type_messages() -> None:
    messages = decoded("type_enum_composite")
    types = {t.oid: (t.namespace, t.name) for t in only(messages, Type)}
    assert sorted(types.values()) == [("public", "money_pair"), ("public", "mood")]
    (relation,) = only(messages, Relation)
    assert {c.type_oid for c in relation.columns[1:]} == set(types)
    (insert,) = only(messages, Insert)
    assert insert.new == (b"1", b"happy", b"(12.5,EUR)")


def test_origin_message_names_the_origin_and_its_commit_lsn() -> None:
    messages = decoded("origin")
    origin = messages[1]
    assert isinstance(origin, Origin)
    assert (origin.name, origin.commit_lsn) == ("upstream", parse_lsn("0/ABCDEF"))
    # with an origin, the transaction carries the origin's commit time
    assert pg_timestamp_to_datetime(messages[0].commit_time) == datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_unchanged_toast_value_is_the_unchanged_sentinel_not_null() -> None:
    messages = decoded("toast_unchanged")
    (insert,) = only(messages, Insert)
    assert insert.new[1] == TOAST_BODY.encode()
    (update,) = only(messages, Update)
    assert update.new == (b"1", UNCHANGED, b"2")
    assert update.new[1] is not None


def test_binary_values_are_flagged_as_binary() -> None:
    (insert,) = only(decoded("binary"), Insert)
    assert all(isinstance(v, BinaryValue) for v in insert.new)
    assert insert.new[0] == (1).to_bytes(4, "big")
    assert insert.new[1] == b"\x00\x01\xff"


# --------------------------------------------------------------------------- live server


def test_live_server_produces_the_recorded_message_kinds(dsn: str) -> None:
    """The same workload on this run's server (18, or 15 with BEMI_TT_PG_BINDIR) decodes the same way."""
    for scenario, payloads in run_all(dsn):
        messages = [decode(p) for p in payloads]
        kinds = "".join(KIND_LETTERS[type(m)] for m in messages)
        assert kinds == MANIFEST["fixtures"][scenario.name]["kinds"], scenario.name
        assert [encode(m) for m in messages] == payloads


def test_lsn_text_matches_the_server(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT lsn::text, (lsn - '0/0')::numeric::text FROM (VALUES (pg_current_wal_lsn()),"
            " ('16/B374D848'::pg_lsn), ('0/0'::pg_lsn), ('FFFFFFFF/FFFFFFFF'::pg_lsn)) v(lsn)"
        ).fetchall()
    for text, number in row:
        assert parse_lsn(text) == int(number)
        assert format_lsn(int(number)) == text


def test_timestamps_match_the_server(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT t, (extract(epoch FROM t - '2000-01-01 00:00+00') * 1000000)::int8 FROM (VALUES"
            " ('2026-11-27 10:00:00.123456+00'::timestamptz), ('1999-12-31 23:59:59.999999+00'),"
            " ('2000-01-01+00')) v(t)"
        ).fetchall()
    for moment, micros in rows:
        assert pg_timestamp_to_datetime(micros) == moment


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("data", "what", "offset"),
    [
        pytest.param(b"", "empty", 0, id="empty"),
        pytest.param(b"Z\x00", "unknown message type 'Z'", 0, id="unknown-type"),
        pytest.param(b"I\x00\x00\x00\x01N\x00\x01x", "unknown tuple column kind", 8, id="bad-tuple-kind"),
        pytest.param(
            b"I\x00\x00\x00\x01N\x00\x01t\x00\x00\x00\x05ab", "past the end", 9, id="length-past-end"
        ),
        pytest.param(b"I\x00\x00\x00\x01N\x00\x02n", "truncated tuple", 9, id="missing-column"),
        pytest.param(b"I\x00\x00\x00\x01X\x00\x00", "marker 'N'", 5, id="bad-insert-marker"),
        pytest.param(b"I\x00\x00\x00\x01N\x00\x01n!", "1 trailing bytes", 9, id="trailing-garbage"),
        pytest.param(b"U\x00\x00\x00\x01K\x00\x01n", "no new tuple", 9, id="update-without-new"),
        pytest.param(b"D\x00\x00\x00\x01N\x00\x00", "'K' or 'O'", 5, id="delete-with-new-marker"),
        pytest.param(b"R\x00\x00\x00\x01\xff\x00t\x00d\x00\x00", "not valid UTF-8", 5, id="non-utf8-name"),
        pytest.param(b"R\x00\x00\x00\x01public", "unterminated", 5, id="unterminated-string"),
        pytest.param(b"R\x00\x00\x00\x01p\x00t\x00x\x00\x00", "replica identity 'x'", 9, id="bad-identity"),
        pytest.param(b"B" + bytes(19), "21 bytes", 20, id="short-begin"),
        pytest.param(b"C" + bytes(26), "26 bytes", 26, id="long-commit"),
        pytest.param(b"T\x00\x00\x00\x02\x00\x00\x00\x00\x01", "needs 14 bytes", 10, id="short-truncate"),
        pytest.param(b"T\x00\x00\x00\x00\x04", "truncate options", 5, id="bad-truncate-options"),
        pytest.param(
            b"M\x01" + bytes(8) + b"p\x00\x00\x00\x00\x09ab", "content length 9", 12, id="short-message"
        ),
        pytest.param(
            b"M\x02" + bytes(8) + b"p\x00\x00\x00\x00\x00", "message flags", 1, id="bad-message-flags"
        ),
    ],
)
def test_malformed_input_raises_decode_error_naming_what_and_where(
    data: bytes, what: str, offset: int
) -> None:
    with pytest.raises(DecodeError, match=what) as info:
        decode(data)
    assert info.value.offset == offset
    assert f"offset {offset}" in str(info.value)


def test_unchanged_is_one_sentinel_that_survives_pickling_and_copying() -> None:
    assert pickle.loads(pickle.dumps(UNCHANGED)) is UNCHANGED
    assert copy.deepcopy(UNCHANGED) is UNCHANGED
    update = Update(1, None, None, (b"1", UNCHANGED))
    assert pickle.loads(pickle.dumps(update)) == update
    assert repr(UNCHANGED) == "UNCHANGED"


def test_decode_rejects_non_bytes_with_type_error() -> None:
    with pytest.raises(TypeError, match="bytes"):
        decode("BEGIN")  # type: ignore[arg-type]


def test_decode_accepts_memoryview_and_bytearray() -> None:
    data = ALL_GOLDEN[2]
    assert decode(memoryview(data)) == decode(bytearray(data)) == decode(data)


@pytest.mark.parametrize("index", range(len(ALL_GOLDEN)))
def test_every_truncation_of_a_real_message_raises_decode_error(index: int) -> None:
    data = ALL_GOLDEN[index]
    for end in range(len(data)):
        with pytest.raises(DecodeError):
            decode(data[:end])


# --------------------------------------------------------------------------- hypothesis

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
names = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)), max_size=20)
values = st.one_of(
    st.binary(max_size=40),
    st.none(),
    st.just(UNCHANGED),
    st.binary(max_size=12).map(BinaryValue),
)
tuples = st.lists(values, max_size=12).map(tuple)


@st.composite
def updates(draw: st.DrawFn) -> Update:
    kind = draw(st.sampled_from([None, "K", "O"]))
    return Update(draw(u32), kind, None if kind is None else draw(tuples), draw(tuples))


messages = st.one_of(
    st.builds(Begin, u64, i64, u32),
    st.builds(Commit, st.integers(0, 255), u64, u64, i64),
    st.builds(Origin, u64, names),
    st.builds(
        Relation,
        u32,
        names,
        names,
        st.sampled_from("dnfi"),
        st.lists(
            st.builds(Column, st.booleans(), names, u32, st.integers(-(2**31), 2**31 - 1)), max_size=8
        ).map(tuple),
    ),
    st.builds(Type, u32, names, names),
    st.builds(Insert, u32, tuples),
    updates(),
    st.builds(Delete, u32, st.sampled_from("KO"), tuples),
    st.builds(Truncate, st.lists(u32, max_size=8).map(tuple), st.booleans(), st.booleans()),
    st.builds(Message, st.booleans(), u64, names, st.binary(max_size=60)),
)


@given(messages)
def test_encode_then_decode_round_trips_every_message(message: PgOutputMessage) -> None:
    assert decode(encode(message)) == message


@given(st.binary(max_size=80))
@example(b"T\xff\xff\xff\xff\x00")
@example(b"I\x00\x00\x00\x01N\xff\xff" + b"t\xff\xff\xff\xff")
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_random_bytes_either_decode_exactly_or_raise_decode_error(data: bytes) -> None:
    try:
        message = decode(data)
    except DecodeError as exc:
        assert exc.offset is not None and 0 <= exc.offset <= len(data)
    else:
        assert encode(message) == data  # what is accepted is exactly one message


@given(st.sampled_from(ALL_GOLDEN), st.data())
def test_mutated_real_messages_either_decode_exactly_or_raise_decode_error(
    data: bytes, draw: st.DataObject
) -> None:
    mutated = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        position = draw.draw(st.integers(0, len(mutated)))
        action = draw.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "insert" or not mutated:
            mutated.insert(position, draw.draw(st.integers(0, 255)))
        elif action == "delete":
            del mutated[min(position, len(mutated) - 1)]
        else:
            mutated[min(position, len(mutated) - 1)] = draw.draw(st.integers(0, 255))
    try:
        message = decode(bytes(mutated))
    except DecodeError:
        return
    assert encode(message) == bytes(mutated)


@given(u64)
def test_lsn_text_round_trips(lsn: int) -> None:
    text = format_lsn(lsn)
    assert parse_lsn(text) == lsn
    assert text == text.upper() and "/" in text


@pytest.mark.parametrize("text", ["", "16", "16/", "/1", "x/1", "1/2/3", "123456789/0", " / "])
def test_parse_lsn_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ValueError, match="invalid lsn"):
        parse_lsn(text)


@pytest.mark.parametrize("value", [-1, 2**64, 1.5, True, "0/0"])
def test_format_lsn_rejects_non_lsn_values(value: object) -> None:
    with pytest.raises(ValueError, match="lsn must be"):
        format_lsn(value)  # type: ignore[arg-type]


def test_encode_rejects_values_pgoutput_cannot_carry() -> None:
    with pytest.raises(ValueError, match="NUL"):
        encode(Type(1, "public", "a\0b"))
    with pytest.raises(ValueError, match="old_kind"):
        encode(Update(1, "X", (), ()))
    with pytest.raises(ValueError, match="tuple value"):
        encode(Insert(1, ("text",)))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pgoutput message"):
        encode("B")  # type: ignore[arg-type]
