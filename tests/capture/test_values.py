"""capture.values: JSON of values decoded from the WAL equals PostgreSQL's ``to_jsonb`` of the same values."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from psycopg import sql

from capture.chain import canonical_json
from capture.errors import DecodeError
from capture.pgoutput import UNCHANGED, Insert, Relation, decode
from capture.values import (
    BUILTIN_TYPES,
    TYPE_INFO_QUERY,
    TypeInfo,
    ValueEncoder,
    json_string,
    load_type_info,
    row_json,
    text_to_json,
)

SETUP = [
    "CREATE EXTENSION citext",
    "CREATE EXTENSION hstore",
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'with \"quote\"')",
    "CREATE DOMAIN posint AS int CHECK (VALUE > 0)",
    "CREATE DOMAIN money2 AS numeric(12, 2)",
    "CREATE DOMAIN small_money AS money2 CHECK (VALUE < 1000)",
    "CREATE DOMAIN label AS text",
    "CREATE TYPE pair AS (a int, b text)",
    "CREATE TYPE outer_pair AS (p pair, ps pair[], n numeric, at timestamptz, m mood, tags text[])",
    "CREATE DOMAIN pair_d AS pair",
    "CREATE TYPE holder AS (o outer_pair, d pair_d, j jsonb, \"we,ird \"\"name\"\"\" text)",
    "CREATE TYPE nothing AS ()",
    "CREATE TYPE one AS (x text)",
    "CREATE TABLE row_source (k int, gone int, \"Weird Name\" text, g int GENERATED ALWAYS AS (-k) STORED)",
    "ALTER TABLE row_source DROP COLUMN gone",
]

#: family → (column type, SQL literals of the values inserted, one row each)
FAMILIES: dict[str, tuple[str, list[str]]] = {
    "int2": ("int2", ["0", "-32768", "32767"]),
    "int4": ("int4", ["0", "-2147483648", "2147483647"]),
    "int8": ("int8", ["-9223372036854775808", "9223372036854775807", "42"]),
    "numeric": (
        "numeric",
        [
            "0",
            "-0.000001",
            "123456789012345678901234567890.123456789012345678901234567890",
            "1e-20",
            "1e40",
            "'NaN'",
            "'Infinity'",
            "'-Infinity'",
        ],
    ),
    "numeric_scale": ("numeric(10, 2)", ["12.5", "-0.01", "99999999.99"]),
    "float4": ("float4", ["0.1", "3.4028235e38", "1e-45", "-0", "'NaN'", "'Infinity'", "'-Infinity'"]),
    "float8": ("float8", ["0.1", "1e300", "5e-324", "-2.5", "'NaN'", "'-Infinity'"]),
    "bool": ("bool", ["true", "false"]),
    "json": ("json", ['\'{"a": 1, "a": 2}\'', "'[1, 2.50, \"x\", null]'", "'\"s\"'", "'  {\"n\" : {}}  '"]),
    "jsonb": (
        "jsonb",
        ['\'{"k": [1, {"x": 1.000000000000000000001}]}\'', "'\"\\\\u00e9\"'", "'[]'", "'1e3'"],
    ),
    "text": (
        "text",
        ["''", "'plain'", "E'q\"uote back\\\\slash\\nnew\\tline\\x01ctl'", "'ünïcödé 😀'", "'NULL'"],
    ),
    "varchar": ("varchar(20)", ["'a,b {c}'", "'  spaced  '"]),
    "bpchar": ("char(5)", ["'ab'", "'abcde'"]),
    "name": ("name", ["'some_name'"]),
    "char": ('"char"', ["'x'"]),
    "citext": ("citext", ["'MiXeD'"]),
    "timestamptz": (
        "timestamptz",
        [
            "'2026-11-27 10:00:00.123456+00'",
            "'2026-11-27 10:00:00.5+02'",
            "'1850-01-01 00:00:00+00'",
            "'0044-03-15 10:00:00+00 BC'",
            "'12345-01-01 00:00:00+00'",
            "'infinity'",
            "'-infinity'",
        ],
    ),
    "timestamp": (
        "timestamp",
        ["'2026-11-27 10:00:00.123456'", "'2026-11-27 10:00:00'", "'0044-03-15 10:00:00 BC'", "'infinity'"],
    ),
    "date": ("date", ["'2026-11-27'", "'0044-03-15 BC'", "'-infinity'"]),
    "time": ("time", ["'10:00:00.123'", "'23:59:59.999999'"]),
    "timetz": ("timetz", ["'10:00:00+02'", "'10:00:00.5-03:30'"]),
    "interval": ("interval", ["'1 day 02:00:00'", "'-1 year 3 months'", "'0.000001 seconds'"]),
    "uuid": ("uuid", ["'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"]),
    "bytea": ("bytea", ["'\\x0001ff'", "''"]),
    "oid": ("oid", ["0", "4294967295"]),
    "money": ("money", ["12.34"]),
    "inet": ("inet", ["'192.168.0.1/24'"]),
    "range": ("int4range", ["'[1,3)'", "'empty'"]),
    "enum": ("mood", ["'happy'", "'with \"quote\"'"]),
    "domain_int": ("posint", ["7"]),
    "domain_numeric": ("money2", ["12.30"]),
    "domain_over_domain": ("small_money", ["999.99"]),
    "domain_text": ("label", ["'lab\"el'"]),
    "int_array": (
        "int4[]",
        ["'{1,NULL,3}'", "'{}'", "'[0:1]={5,6}'", "'{{1,2},{3,NULL}}'", "'{{{1}},{{2}}}'"],
    ),
    "text_array": (
        "text[]",
        [
            "ARRAY['NULL', NULL, 'a b', '', 'x\"y\\z', '{', ',', '}', 'null', ' lead']",
            "'{{a,b},{c,d}}'",
            "ARRAY[E'new\\nline', 'ü']",
        ],
    ),
    "numeric_array": ("numeric[]", ["'{1.50,NaN,-0.001,Infinity}'"]),
    "float_array": ("float8[]", ["'{0.1,-Infinity,NaN,1e300}'"]),
    "bool_array": ("bool[]", ["'{t,f,NULL}'"]),
    "jsonb_array": ("jsonb[]", ["ARRAY['{\"a\": [1, \"x,y\"]}'::jsonb, 'null', '\"s\"', NULL]"]),
    "json_array": ("json[]", ["ARRAY['{\"a\": 1}'::json, '[2]']"]),
    "timestamptz_array": (
        "timestamptz[]",
        ["ARRAY['2026-11-27 10:00:00+00'::timestamptz, 'infinity', NULL]"],
    ),
    "date_array": ("date[]", ["'{2026-01-01,NULL}'"]),
    "bytea_array": ("bytea[]", ["ARRAY['\\x01'::bytea, '']"]),
    "uuid_array": ("uuid[]", ["ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid]"]),
    "enum_array": ("mood[]", ["ARRAY['sad', 'with \"quote\"']::mood[]"]),
    "domain_array": ("posint[]", ["ARRAY[1, 2]::posint[]"]),
    "box_array": ("box[]", ["'{(1,2),(3,4);(5,6),(7,8)}'"]),
    "interval_array": ("interval[]", ["ARRAY['1 day'::interval]"]),
    "citext_array": ("citext[]", ["ARRAY['a b'::citext, 'c']"]),
    "composite": (
        "pair",
        [
            "ROW(1, 'x y')",
            "ROW(NULL, NULL)",
            "ROW(-2, '')",
            "ROW(3, E'q\"uo,te (paren) back\\\\slash\\nünï 😀')",
            "ROW(4, 'NULL')",
            "ROW(5, '()')",
        ],
    ),
    "composite_nested": (
        "outer_pair",
        [
            "ROW(ROW(1, 'a\"b'), ARRAY[ROW(2, 'c,d'), NULL, ROW(NULL, '')]::pair[], 1.50,"
            " '2026-11-27 10:00:00.5+00', 'with \"quote\"', ARRAY['x y', NULL, '{', '\\'])",
            "ROW(NULL, '{}', 'NaN', 'infinity', NULL, '{}')",
        ],
    ),
    "composite_deep": (
        "holder",
        [
            "ROW(ROW(ROW(1, ')'), NULL, 1e-20, NULL, 'ok', NULL), ROW(7, 'd'),"
            " '{\"k\": [1, \"(x,y)\"]}', ' s ')",
            "ROW(NULL, NULL, NULL, NULL)",
        ],
    ),
    "composite_array": ("pair[]", ["ARRAY[ROW(1, 'x'), ROW(2, NULL), NULL]::pair[]", "'{}'"]),
    "composite_domain": ("pair_d", ["ROW(9, 'dom')"]),
    "composite_empty": ("nothing", ["ROW()"]),
    "composite_single": ("one", ["ROW(NULL)", "ROW('')", "ROW('a')"]),
    "composite_table_row": ("row_source", ["ROW(1, 'é', 2)", "ROW(NULL, NULL, NULL)"]),
}

#: Deliberate differences from to_jsonb (see capture/values.py): hstore becomes its text.
TEXT_INSTEAD_OF_OBJECT: dict[str, tuple[str, list[str]]] = {
    "hstore": ("hstore", ["'a=>1'"]),
}


@dataclass
class Captured:
    """Per table: the JSON the encoder made from the WAL, and to_jsonb of the same rows."""

    from_wal: dict[str, list[str]]
    from_sql: dict[str, list[Any]]
    texts: dict[str, list[bytes | None]]


def _tables() -> dict[str, tuple[str, list[str]]]:
    return {**FAMILIES, **TEXT_INSTEAD_OF_OBJECT}


def _read_wal(conn: psycopg.Connection, type_info: dict[int, TypeInfo]) -> tuple[dict, dict]:
    relations: dict[int, Relation] = {}
    encoders: dict[int, ValueEncoder] = {}
    from_wal: dict[str, list[str]] = {}
    texts: dict[str, list[bytes | None]] = {}
    rows = conn.execute(
        "SELECT data FROM pg_logical_slot_peek_binary_changes('values_slot', NULL, NULL,"
        " 'proto_version', '1', 'publication_names', 'values_pub')"
    ).fetchall()
    for (data,) in rows:
        message = decode(data)
        if isinstance(message, Relation):
            relations[message.oid] = message
            encoders[message.oid] = ValueEncoder(
                [c.type_oid for c in message.columns], type_info, names=[c.name for c in message.columns]
            )
        elif isinstance(message, Insert):
            table = relations[message.relation_oid].name.removeprefix("t_")
            encoder = encoders[message.relation_oid]
            value = encoder.value_json(1, message.new[1])  # type: ignore[arg-type]
            row = json.loads(encoder.row_json(message.new), parse_float=Decimal)  # type: ignore[arg-type]
            assert row["v"] == exact(value)
            from_wal.setdefault(table, []).append(value)
            texts.setdefault(table, []).append(message.new[1])  # type: ignore[arg-type]
    return from_wal, texts


@pytest.fixture(scope="module")
def server_db(pg_server: Any) -> Iterator[str]:
    name = f"values_{os.getpid()}"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = pg_server.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in SETUP:
            conn.execute(statement)
        for table, (column_type, _) in _tables().items():
            conn.execute(
                sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY, v {})").format(
                    sql.Identifier(f"t_{table}"), sql.SQL(column_type)
                )
            )
        conn.execute("CREATE PUBLICATION values_pub FOR ALL TABLES")
        conn.execute("SELECT pg_create_logical_replication_slot('values_slot', 'pgoutput')")
        for table, (_, literals) in _tables().items():
            for literal in literals:
                conn.execute(
                    sql.SQL("INSERT INTO {} (v) VALUES ({})").format(
                        sql.Identifier(f"t_{table}"), sql.SQL(literal)
                    )
                )
    yield dsn
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
            " WHERE database = %s AND active_pid IS NOT NULL",
            (name,),
        )
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s",
            (name,),
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _capture(dsn: str, time_zone: str) -> Captured:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT set_config('TimeZone', %s, false), set_config('DateStyle', 'ISO', false)", (time_zone,)
        )
        type_info = load_type_info(conn.execute(TYPE_INFO_QUERY).fetchall())
        from_wal, texts = _read_wal(conn, type_info)
        from_sql = {}
        for table in _tables():
            rows = conn.execute(
                sql.SQL("SELECT to_jsonb(v)::text FROM {} ORDER BY id").format(sql.Identifier(f"t_{table}"))
            ).fetchall()
            from_sql[table] = [row[0] for row in rows]
    return Captured(from_wal, from_sql, texts)


@pytest.fixture(scope="module")
def utc(server_db: str) -> Captured:
    return _capture(server_db, "UTC")


@pytest.fixture(scope="module")
def kolkata(server_db: str) -> Captured:
    return _capture(server_db, "Asia/Kolkata")


def exact(text: str | None) -> Any:
    """Parse JSON keeping every number exact, so 0.1 and 0.10000000000000001 differ."""
    return None if text is None else json.loads(text, parse_float=Decimal)


# --------------------------------------------------------------------------- real server vs to_jsonb


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_value_json_equals_to_jsonb_of_the_same_value(utc: Captured, family: str) -> None:
    wal = [exact(v) for v in utc.from_wal[family]]
    expected = [exact(v) for v in utc.from_sql[family]]
    assert len(wal) == len(FAMILIES[family][1])
    assert wal == expected
    # byte for byte: the canonical text of to_jsonb (what verify recomputes from jsonb), keys sorted
    assert utc.from_wal[family] == [canonical_json(v) for v in utc.from_sql[family]]


def test_value_json_is_accepted_by_jsonb_and_equal_to_to_jsonb_on_the_server(
    utc: Captured, server_db: str
) -> None:
    """What the worker stores in jsonb columns compares equal there too (jsonb numeric equality)."""
    with psycopg.connect(server_db) as conn:
        for family in FAMILIES:
            row = conn.execute(
                sql.SQL(
                    "SELECT count(*), count(*) FILTER (WHERE x.j IS NOT DISTINCT FROM to_jsonb(t.v))"
                    " FROM {} t JOIN unnest(%s::jsonb[]) WITH ORDINALITY x(j, id) USING (id)"
                ).format(sql.Identifier(f"t_{family}")),
                (utc.from_wal[family],),
            ).fetchone()
            assert row == (len(FAMILIES[family][1]),) * 2, family


def test_json_holding_a_nul_escape_is_kept_as_text_because_jsonb_cannot(conn: psycopg.Connection) -> None:
    text = '{"a": "x\\u0000y"}'
    encoded = text_to_json(text, 114)
    assert json.loads(encoded) == text
    row = conn.execute("SELECT %s::jsonb #>> '{}'", (encoded,)).fetchone()
    assert row == (text,)


@pytest.mark.parametrize("family", ["timestamptz", "timestamptz_array", "timetz"])
def test_timestamptz_follows_the_session_time_zone_like_to_jsonb(kolkata: Captured, family: str) -> None:
    wal = [exact(v) for v in kolkata.from_wal[family]]
    assert wal == [exact(v) for v in kolkata.from_sql[family]]


def test_timestamptz_is_iso_8601_with_a_colon_offset(utc: Captured) -> None:
    first = json.loads(utc.from_wal["timestamptz"][0])
    assert first == "2026-11-27T10:00:00.123456+00:00"
    assert datetime.fromisoformat(first) == datetime(2026, 11, 27, 10, 0, 0, 123456, tzinfo=timezone.utc)


def test_numeric_digits_are_kept_verbatim_not_rounded_through_float(utc: Captured) -> None:
    raw = utc.texts["numeric"][2]
    assert raw is not None
    encoder = ValueEncoder([1700])
    assert encoder.value_json(0, raw) == raw.decode()
    assert exact(encoder.value_json(0, raw)) == Decimal(raw.decode())
    assert exact(ValueEncoder([1700]).value_json(0, b"12.50")) == Decimal("12.50")


def test_composite_value_json_is_the_object_to_jsonb_gives(utc: Captured) -> None:
    assert utc.texts["composite"][0] == b'(1,"x y")'
    assert json.loads(utc.from_wal["composite"][0]) == {"a": 1, "b": "x y"}
    assert json.loads(utc.from_wal["composite_empty"][0]) == {}


def test_json_castable_values_are_json_strings_of_their_text(utc: Captured) -> None:
    assert json.loads(utc.from_wal["hstore"][0]) == '"a"=>"1"'
    assert json.loads(utc.from_sql["hstore"][0]) == {"a": "1"}  # to_jsonb uses hstore's own json cast


def test_builtin_type_table_matches_the_catalog(server_db: str) -> None:
    with psycopg.connect(server_db) as conn:
        catalog = load_type_info(conn.execute(TYPE_INFO_QUERY + " WHERE t.oid < 10000").fetchall())
    for oid, info in BUILTIN_TYPES.items():
        assert catalog[oid] == info, info.name


def test_builtin_types_need_no_catalog(utc: Captured) -> None:
    encoder = ValueEncoder([1185, 1231, 3807])
    values = (b'{"2026-01-01 00:00:00+00",NULL}', b"{1.50,NaN}", b'{"{\\"a\\": 1}"}')
    assert [exact(encoder.value_json(i, v)) for i, v in enumerate(values)] == [
        ["2026-01-01T00:00:00+00:00", None],
        [Decimal("1.50"), "NaN"],
        [{"a": 1}],
    ]


# --------------------------------------------------------------------------- hypothesis against the server


@pytest.fixture(scope="module")
def conn(server_db: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(server_db, autocommit=True) as connection:
        connection.execute("SET TimeZone = 'UTC'")
        yield connection


#: to_jsonb's text of the last value ``server_says`` asked for
LAST_TO_JSONB: list[str] = [""]


def server_says(conn: psycopg.Connection, value: object, pg_type: str) -> tuple[str, Any]:
    query = sql.SQL("SELECT v::text, to_jsonb(v)::text FROM (SELECT %s::{} AS v) s").format(sql.SQL(pg_type))
    row = conn.execute(query, (value,)).fetchone()
    assert row is not None
    LAST_TO_JSONB[0] = row[1]
    return row[0], exact(row[1])


def same_canonical_text(encoded: str) -> bool:
    """The encoder's JSON is the canonical text of the server's ``to_jsonb`` (capture/chain.py): the very
    bytes the chain hashes, so the sink can hash it as it is."""
    return encoded == canonical_json(LAST_TO_JSONB[0]) == canonical_json(encoded)


finite_decimals = st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(
    lambda d: abs(d.adjusted()) < 900
)


@settings(max_examples=40, deadline=None)
@given(
    st.one_of(finite_decimals, st.sampled_from([Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity")]))
)
def test_numeric_is_exact_for_any_decimal(conn: psycopg.Connection, value: Decimal) -> None:
    text, expected = server_says(conn, value, "numeric")
    assert exact(text_to_json(text, 1700)) == expected
    assert same_canonical_text(text_to_json(text, 1700))


@settings(max_examples=40, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_float8_matches_to_jsonb(conn: psycopg.Connection, value: float) -> None:
    text, expected = server_says(conn, value, "float8")
    assert exact(text_to_json(text, 701)) == expected
    assert same_canonical_text(text_to_json(text, 701))


text_without_nul = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.none(), text_without_nul), max_size=6))
@example(["", "\x1f", " \u2028 ", "NULL", "a,b", "{}", '"', "\\"])  # \x1f is unquoted: not array whitespace
def test_text_arrays_match_to_jsonb(conn: psycopg.Connection, value: list[str | None]) -> None:
    text, expected = server_says(conn, value, "text[]")
    assert exact(text_to_json(text, 1009)) == expected
    assert same_canonical_text(text_to_json(text, 1009))


ZONES = [
    "UTC",
    "America/Sao_Paulo",
    "Asia/Kolkata",
    "Pacific/Chatham",
    "America/St_Johns",
    "Europe/Amsterdam",
]


@settings(max_examples=40, deadline=None)
@given(
    st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(timezone.utc)
    ),
    st.sampled_from(ZONES),
)
def test_timestamptz_matches_to_jsonb_in_any_session_time_zone(
    conn: psycopg.Connection, value: datetime, zone: str
) -> None:
    conn.execute("SELECT set_config('TimeZone', %s, false)", (zone,))
    try:
        text, expected = server_says(conn, value, "timestamptz")
    finally:
        conn.execute("SET TimeZone = 'UTC'")
    assert exact(text_to_json(text, 1184)) == expected
    assert same_canonical_text(text_to_json(text, 1184))


# --------------------------------------------------------------------------- pure properties


@given(text_without_nul)
def test_any_text_without_nul_round_trips_through_json(value: str) -> None:
    encoded = ValueEncoder([25]).value_json(0, value.encode())
    assert json.loads(encoded) == value


@given(finite_decimals)
def test_numeric_text_round_trips_exactly(value: Decimal) -> None:
    text = format(value, "f")
    assert exact(text_to_json(text, 1700)) == Decimal(text)
    assert text_to_json(text, 1700) == text


@given(
    st.lists(
        st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=4), max_size=4
    )
)
def test_nested_int_arrays_keep_their_shape(value: list[list[int | None]]) -> None:
    width = len(value[0]) if value else 0
    rows = [r[:width] + [None] * (width - len(r)) for r in value]  # rectangular, as PostgreSQL requires
    text = (
        "{" + ",".join("{" + ",".join("NULL" if v is None else str(v) for v in r) + "}" for r in rows) + "}"
    )
    assert json.loads(text_to_json(text, 1016)) == rows


# --------------------------------------------------------------------------- API


def test_row_json_renders_an_object_with_escaped_names() -> None:
    assert row_json(['a"b', "c"], ["1", '"x"']) == '{"a\\"b":1,"c":"x"}'
    assert json.loads(row_json([], [])) == {}


def test_encoder_row_json_matches_value_json_per_column() -> None:
    encoder = ValueEncoder([23, 25, 16, 1700], names=["id", "name", "ok", "amount"])
    values = (b"1", b'say "hi"', b"t", None)
    assert json.loads(encoder.row_json(values)) == {"id": 1, "name": 'say "hi"', "ok": True, "amount": None}
    assert encoder.fragments(values) == ["1", '"say \\"hi\\""', "true", "null"]
    assert encoder.row_json(values) == row_json(["id", "name", "ok", "amount"], encoder.fragments(values))


def test_row_json_handles_column_names_with_percent_signs_and_quotes() -> None:
    names = ["100%", "%s", 'a"b', "ü"]
    encoder = ValueEncoder([23, 25, 25, 16], names=names)
    assert json.loads(encoder.row_json((b"1", b"%d", None, b"f"))) == dict(
        zip(names, [1, "%d", None, False], strict=True)
    )


def test_unknown_type_oid_becomes_a_json_string() -> None:
    assert ValueEncoder([999999]).value_json(0, b'(1,"a")') == json_string('(1,"a")')


def test_unchanged_toast_value_is_refused_not_stored_as_a_placeholder() -> None:
    encoder = ValueEncoder([25, 23], names=["body", "n"])
    with pytest.raises(ValueError, match="UNCHANGED"):
        encoder.value_json(0, UNCHANGED)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="UNCHANGED"):
        encoder.row_json((UNCHANGED, b"1"))  # type: ignore[arg-type]


def test_invalid_utf8_raises_decode_error() -> None:
    with pytest.raises(DecodeError, match="UTF-8"):
        ValueEncoder([25]).value_json(0, b"\xff")


def test_bad_boolean_text_raises_decode_error() -> None:
    with pytest.raises(DecodeError, match="not valid text output"):
        ValueEncoder([16]).value_json(0, b"yes")


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        pytest.param(("int4",), {}, "type OIDs", id="str-oids"),
        pytest.param(([23, -1],), {}, "type OIDs", id="negative-oid"),
        pytest.param(([23],), {"names": ["a", "b"]}, "one column name per type OID", id="names-mismatch"),
    ],
)
def test_encoder_validates_its_arguments(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ValueEncoder(*args, **kwargs)


def test_row_json_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="as many names"):
        row_json(["a"], [])
    with pytest.raises(ValueError, match=r"names=\.\.\."):
        ValueEncoder([23]).row_json([b"1"])
    with pytest.raises(ValueError, match="2 values for 1"):
        ValueEncoder([23], names=["a"]).row_json([b"1", b"2"])


def test_load_type_info_resolves_domains_and_enums_by_catalog_rows() -> None:
    info = load_type_info(
        [
            (50000, "mood", "E", 0, 0, ","),
            (50001, "_mood", "A", 50000, 0, ","),
            (50002, "d", "N", 0, 1700, ","),
        ]
    )
    encoder = ValueEncoder([50000, 50001, 50002], info)
    assert [encoder.value_json(i, v) for i, v in enumerate([b"ok", b"{sad,ok}", b"1.10"])] == [
        '"ok"',
        '["sad","ok"]',
        "1.10",
    ]
    with pytest.raises(ValueError, match="6 or 9 fields"):
        load_type_info([(1, "x")])


@settings(max_examples=400)
@given(
    raw=st.one_of(
        st.binary(max_size=40),
        st.text(max_size=30).map(str.encode),
        st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1.50", b"2026-11-27 10:00:00.5+00",
                         b"2026-11-27 10:00:00+05:30", b"0044-03-15 12:00:00+00 BC", b"infinity"]),
    )
)
def test_inline_expressions_equal_the_converters_they_replace(raw: bytes) -> None:
    from capture.fastpath import INLINE_EXPRESSIONS, INLINE_NAMESPACE

    def outcome(function: Any, *args: Any) -> tuple[str, Any]:
        try:
            return "ok", function(*args)
        except Exception as exc:
            return "error", type(exc)

    for converter, expression in INLINE_EXPRESSIONS.items():
        code = expression.format(v="v", t="t")
        inline = outcome(eval, code, dict(INLINE_NAMESPACE), {"v": raw})
        assert inline == outcome(converter, raw), (converter, raw)


# --------------------------------------------------------------------------- composites


def record_out(fields: list[str | None]) -> str:
    """PostgreSQL's record_out (rowtypes.c), for the parser's property test."""
    out = []
    for field in fields:
        if field is None:
            out.append("")
            continue
        quote = field == "" or any(ch in '"\\(),' or (ch.isspace() and ch.isascii()) for ch in field)
        body = field.replace("\\", "\\\\").replace('"', '""')
        out.append(f'"{body}"' if quote else body)
    return "(" + ",".join(out) + ")"


@given(st.lists(st.one_of(st.none(), text_without_nul), min_size=1, max_size=6))
@example(["", '""', "\\", "(,)", " ", "NULL"])
def test_record_fields_are_read_back_from_record_out_text(fields: list[str | None]) -> None:
    from capture.values import _parse_record

    assert _parse_record(record_out(fields)) == fields


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)), st.one_of(st.none(), text_without_nul))
@example(None, "")
@example(7, '"(a,b)" \\ ü')
def test_composite_matches_to_jsonb(conn: psycopg.Connection, a: int | None, b: str | None) -> None:
    catalog = load_type_info(conn.execute(TYPE_INFO_QUERY).fetchall())
    row = conn.execute(
        "SELECT v::text, to_jsonb(v)::text, pg_typeof(v)::oid::int"
        " FROM (SELECT ROW(%s::int, %s::text)::pair AS v) s",
        (a, b),
    ).fetchone()
    assert row is not None
    assert exact(text_to_json(row[0], row[2], catalog)) == exact(row[1])


PAIR = TypeInfo(60000, "pair", "C", attributes=(("a", 23), ("b", 25)))


def test_an_encoder_reads_composite_attributes_reloaded_into_its_type_info() -> None:
    types = {PAIR.oid: PAIR}
    encoder = ValueEncoder([PAIR.oid], types)
    assert encoder.value_json(0, b"(1,x)") == '{"a":1,"b":"x"}'
    types[PAIR.oid] = TypeInfo(60000, "pair", "C", attributes=(("a", 23), ("bee", 25)))  # RENAME ATTRIBUTE
    assert encoder.value_json(0, b"(1,x)") == '{"a":1,"bee":"x"}'


def test_fewer_fields_than_attributes_are_the_first_ones_only_when_none_was_dropped() -> None:
    grown = TypeInfo(60000, "pair", "C", attributes=(("a", 23), ("b", 25), ("c", 1700)))
    assert text_to_json("(1,x)", 60000, {60000: grown}) == '{"a":1,"b":"x"}'  # written before ADD ATTRIBUTE
    dropped = TypeInfo(60000, "pair", "C", attributes=(("b", 25), ("c", 1700)), dropped_attributes=1)
    assert text_to_json("(x)", 60000, {60000: dropped}) == '"(x)"'  # which of b, c? unknowable
    assert text_to_json("(1,x,2)", 60000, {60000: dropped}) == '"(1,x,2)"'  # written before DROP ATTRIBUTE
    assert text_to_json("(x,2)", 60000, {60000: dropped}) == '{"b":"x","c":2}'


def test_load_type_info_reads_composite_attributes() -> None:
    info = load_type_info(
        [
            (60000, "pair", "C", 0, 0, ",", ["a", "b"], [23, 25], 1),
            (60001, "_pair", "A", 60000, 0, ",", None, None, 0),
        ]
    )
    expected = TypeInfo(60000, "pair", "C", attributes=(("a", 23), ("b", 25)), dropped_attributes=1)
    assert info[60000] == expected
    assert info[60001].attributes is None
    assert text_to_json('{"(1,x)",NULL}', 60001, info) == '[{"a":1,"b":"x"},null]'


def test_fewer_fields_that_do_not_fit_the_first_attributes_stay_text() -> None:
    """A catalog read in a race (e.g. DROP ATTRIBUTE during a snapshot) never yields invalid JSON."""
    misread = TypeInfo(60000, "pair", "C", attributes=(("a", 23), ("b", 16), ("c", 25)))
    assert text_to_json("(x,y)", 60000, {60000: misread}) == '"(x,y)"'  # 'x' is no int4
    assert text_to_json("(1,y)", 60000, {60000: misread}) == '"(1,y)"'  # 'y' is no bool


def test_a_field_that_does_not_fit_its_attribute_type_keeps_the_value_as_text() -> None:
    """E.g. DROP then ADD ATTRIBUTE before the worker read the row: the count fits, the types do not."""
    pair = TypeInfo(60000, "pair", "C", attributes=(("b", 25), ("c", 23)), dropped_attributes=1)
    assert text_to_json("(1,x)", 60000, {60000: pair}) == '"(1,x)"'
    assert text_to_json("(1,NaN)", 60000, {60000: pair}) == '"(1,NaN)"'  # jsonb takes no NaN literal
    assert text_to_json("(x,1)", 60000, {60000: pair}) == '{"b":"x","c":1}'


# --------------------------------------------------------------------------- canonical rows (the chain)

_ints = st.integers(min_value=-(2**63), max_value=2**63 - 1).map(str)
_float_texts = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).flatmap(
        lambda f: st.sampled_from([repr(f), f"{f:e}", f"{f:.17g}"])  # float8out's forms and others
    ),
    st.sampled_from(["-0", "0", "NaN", "Infinity", "-Infinity", "1e+20", "1.5e-07", "-1e-05", "1e+308"]),
)
_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(st.characters(exclude_categories=("Cs",))),
    st.floats(allow_nan=False, allow_infinity=False), finite_decimals,
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


def _json_text(value: Any, separators: tuple[str, str]) -> str:
    """JSON text as a client or jsonb_out may write it: any key order, numbers as written."""
    def render(v: Any) -> str:
        if isinstance(v, Decimal):
            return str(v)  # may carry an exponent: '1E+5'
        if isinstance(v, list):
            return "[" + separators[0].join(render(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + separators[0].join(
                json.dumps(k, ensure_ascii=False) + separators[1] + render(x) for k, x in reversed(v.items())
            ) + "}"
        return json.dumps(v, ensure_ascii=False)

    return render(value)


_jsonb_texts = _json_values.map(lambda v: _json_text(v, (", ", ": ")))  # jsonb_out's spacing
_json_texts = st.tuples(_json_values, st.sampled_from([(",", ":"), (" , ", " : "), (",\n", ":\t")])).map(
    lambda pair: _json_text(*pair)
)
_PAIR_OID = 990001
_CANONICAL_TYPES = {  # type OID -> PostgreSQL text output of a value of that type
    23: st.integers(min_value=-(2**31), max_value=2**31 - 1).map(str),
    20: _ints,
    1700: finite_decimals.map(lambda d: format(d, "f")),
    701: _float_texts,
    16: st.sampled_from(["t", "f"]),
    25: text_without_nul,
    3802: _jsonb_texts,
    114: _json_texts,
    1184: st.sampled_from(["2026-11-27 10:00:00.5+00", "infinity", "2026-11-27 10:00:00+05:30"]),
    1007: st.lists(st.one_of(st.none(), st.integers(-9, 99)), max_size=4).map(
        lambda xs: "{" + ",".join("NULL" if x is None else str(x) for x in xs) + "}"
    ),
    1022: st.lists(_float_texts, max_size=4).map(lambda xs: "{" + ",".join(xs) + "}"),
    _PAIR_OID: st.tuples(st.integers(-5, 5), st.sampled_from(["x", "", "a b"])).map(
        lambda p: f'({p[0]},"{p[1]}")'
    ),
}
_PAIR_TYPES = {_PAIR_OID: TypeInfo(_PAIR_OID, "pair_za", "C", attributes=(("z", 23), ("a", 25)))}


@st.composite
def _rows(draw: st.DrawFn) -> tuple[list[str], list[int], list[bytes | None]]:
    names = draw(st.lists(st.text(st.characters(exclude_characters="\0"), min_size=1, max_size=6),
                          min_size=1, max_size=8, unique=True))
    oids = [draw(st.sampled_from(sorted(_CANONICAL_TYPES))) for _ in names]
    values = [None if draw(st.integers(0, 9)) == 0 else draw(_CANONICAL_TYPES[o]).encode() for o in oids]
    return names, oids, values


@settings(max_examples=300, deadline=None)
@given(_rows())
@example((["b", "a", "ab", "B"], [3802, 701, 114, _PAIR_OID],
          [b'{"z": 1, "a": [1.50, 1e+2]}', b"1e+20", b'{"k":1, "k":2}', b'(1,"x")']))
def test_row_json_is_the_chains_canonical_text_so_the_sink_hashes_it_unparsed(
    row: tuple[list[str], list[int], list[bytes | None]],
) -> None:
    names, oids, values = row
    out = ValueEncoder(oids, _PAIR_TYPES, names=names).row_json(values)
    assert out == canonical_json(out)
    assert list(json.loads(out)) == sorted(names)
    # the per-value path the stitcher takes for partial rows (unchanged TOAST, key-only old tuples)
    encoder = ValueEncoder(oids, _PAIR_TYPES)
    assert row_json(names, [encoder.value_json(i, v) for i, v in enumerate(values)]) == out


def test_json_values_jsonb_cannot_hold_stay_text_so_canonicalising_never_fails(
    conn: psycopg.Connection,
) -> None:
    """json (not jsonb) accepts a lone surrogate escape and any exponent; canonicalising them would fail
    (or write out a billion digits), so they stay JSON strings of their text, which jsonb accepts."""
    for text in ['{"a": 1e999999999}', '["\\ud800"]', '{"x": 1e-999999}']:
        out = text_to_json(text, 114)
        assert json.loads(out) == text
        assert conn.execute("SELECT %s::jsonb #>> '{}'", (out,)).fetchone() == (text,)
    assert text_to_json('["\\ud83d\\ude00", 1e2]', 114) == '["\U0001f600",100]'  # a pair is fine
