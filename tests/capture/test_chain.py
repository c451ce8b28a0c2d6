"""The hash chain over ``changes``: canonical JSON against the real jsonb, verify of PostgreSQL and of a
Parquet export, and every way of tampering by hand being named."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bemi_tt
from capture.chain import GENESIS, canonical_json, canonical_number, chain_next, row_digest
from capture.errors import ChainError
from capture.export import export_parquet
from capture.verify import Anchor, chain_head, verify_changes, verify_export
from capture.worker import run as capture

# -- canonical JSON --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "numeric"),
    [("1e16", "10000000000000000"), ("1.50", "1.50"), ("1E-3", "0.001"), ("-0", "0"), ("-0.0", "0.0"),
     ("1.0e1", "10"), ("-1.5e+2", "-150"), ("12", "12"), ("-7.25", "-7.25"), ("0e5", "0"),
     # zero stays zero whatever its exponent, also past the range a non-zero number may have
     ("-0e+0001073741819", "0"), ("0e+131100", "0"), ("0.000e+5", "0"), ("0.000e1", "0.00")],
)
def test_canonical_number_is_what_numeric_prints(literal: str, numeric: str, dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT %s::jsonb::text", (literal,)).fetchone() == (numeric,)
    assert canonical_number(literal) == numeric


def test_a_context_holding_zero_with_a_huge_exponent_is_digested_not_fatal_to_the_worker() -> None:
    from capture.chain import context_digest
    from capture.stitch import parse_context

    context = parse_context(b'{"a":-0e+0001073741819}')  # jsonb takes it: {"a": 0}
    assert canonical_json(context) == '{"a":0}'
    assert context_digest(context) == context_digest('{"a":0}')  # Sink.write raised ValueError here


def _number() -> st.SearchStrategy[str]:
    """Number literals as values.py and applications write them (float8out, Decimal, ints, exponents)."""
    mantissa = st.from_regex(r"-?(0|[1-9][0-9]{0,20})(\.[0-9]{1,12})?", fullmatch=True)
    return st.one_of(
        st.integers(-(10**30), 10**30).map(str),
        st.floats(allow_nan=False, allow_infinity=False).map(repr).map(lambda r: r.replace("inf", "1")),
        st.floats(allow_nan=False, allow_infinity=False, width=32).map(lambda f: format(f, ".17g")),
        st.tuples(mantissa, st.sampled_from(["e", "E", "e+", "e-", "E-"]), st.integers(0, 40)).map(
            lambda t: f"{t[0]}{t[1]}{t[2]}"
        ),
        mantissa,
    )


_TEXT = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12
)


def _string() -> st.SearchStrategy[str]:
    """JSON string literals, escaped in the several ways writers do (\\u escapes, \\/, raw UTF-8)."""

    def spell(text: str, style: int) -> str:
        if style == 0:
            return json.dumps(text, ensure_ascii=False)
        if style == 1:
            return json.dumps(text, ensure_ascii=True)
        return json.dumps(text, ensure_ascii=False).replace("/", "\\/")

    return st.tuples(_TEXT, st.integers(0, 2)).map(lambda t: spell(*t))


def _space() -> st.SearchStrategy[str]:
    return st.sampled_from(["", " ", "\n", "  ", "\t"])


def _json(depth: int = 3) -> st.SearchStrategy[str]:
    scalar = st.one_of(_number(), _string(), st.sampled_from(["true", "false", "null"]))
    if depth == 0:
        return scalar

    def obj(items: list[tuple[str, str, str]]) -> str:
        return "{" + ",".join(f"{s}{k}{s}:{s}{v}" for k, v, s in items) + "}"

    def arr(items: list[tuple[str, str]]) -> str:
        return "[" + ",".join(f"{s}{v}" for v, s in items) + "]"

    child = _json(depth - 1)
    keys = st.one_of(_string(), st.sampled_from(['"a"', '"id"', '"\\u0061"']))  # duplicates, spelled twice
    return st.one_of(
        scalar,
        st.lists(st.tuples(keys, child, _space()), max_size=5).map(obj),
        st.lists(st.tuples(child, _space()), max_size=4).map(arr),
    )


def _object() -> st.SearchStrategy[str]:
    keys = st.one_of(_string(), st.sampled_from(['"a"', '"id"', '"\\u0061"', '"SQL"']))
    return st.lists(st.tuples(keys, _json(), _space()), max_size=8).map(
        lambda items: "{" + ",".join(f"{s}{k}{s}:{s}{v}" for k, v, s in items) + "}"
    )


def test_canonical_json_of_written_text_equals_canonical_json_of_jsonb_text(dsn: str) -> None:
    """Property: what the worker writes and what jsonb gives back (jsonb::text) canonicalize alike."""
    with psycopg.connect(dsn, autocommit=True) as conn:

        @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(_object(), min_size=1, max_size=10))
        def check(texts: list[str]) -> None:
            stored = conn.execute("SELECT t::jsonb::text FROM unnest(%s::text[]) AS t", (texts,)).fetchall()
            for text, (back,) in zip(texts, stored, strict=True):
                assert canonical_json(text) == canonical_json(back), (text, back)

        check()


def test_canonical_json_of_values_py_images_equals_canonical_json_of_jsonb(dsn: str) -> None:
    """Typed column values through the worker's own encoder (what ``after`` holds) against to_jsonb."""
    from capture.values import TYPE_INFO_QUERY, TypeInfo, ValueEncoder, load_type_info

    columns = {
        "numeric": ["1e16", "1.50", "-0", "123456789012345678901234567890.000001"],
        "float8": ["1e16", "-0", "1.5e-07", "3.141592653589793", "Infinity", "NaN"],
        "float4": ["1e+10", "0.1"],
        "text": ["a/b", "é\"\\\n\t", "\u2028"],
        "jsonb": ['{"b": 1, "a": [1e3, 2.50]}', '{"a":1,"a":2}'],
        "json": ['{"b" : 1e2, "a":"\\u00e9"}'],
        "timestamptz": ["2026-01-01 00:00:00+00"],
        "int8[]": ["{1,2,NULL}"],
        "numeric[]": ["{1e3,2.50}"],
        "bytea": ["\\xdeadbeef"],
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        info: dict[int, TypeInfo] = load_type_info(conn.execute(TYPE_INFO_QUERY).fetchall())
        for type_name, values in columns.items():
            oid = conn.execute("SELECT %s::regtype::oid::int", (type_name,)).fetchone()
            assert oid is not None
            encoder = ValueEncoder([int(oid[0])], info, names=["v"])
            for value in values:
                text_value = conn.execute(f"SELECT %s::{type_name}::text", (value,)).fetchone()
                assert text_value is not None
                written = encoder.row_json([str(text_value[0]).encode()])
                back = conn.execute(
                    f"SELECT jsonb_build_object('v', %s::{type_name})::text", (value,)
                ).fetchone()
                assert back is not None
                assert canonical_json(written) == canonical_json(back[0]), (type_name, value, written, back)


def test_canonical_json_keeps_the_text_backslash_u0000_in_strings() -> None:
    """Numbers are tagged with NULs while re-encoding; a string holding the six characters \u0000 (which
    jsonb can hold, unlike a NUL) must come out unchanged, not be taken for a tag."""
    texts = ['{"a":"\\\\u0000"}', '["\\\\u0000x","x\\\\u0000",1.50]', '{"\\\\u0000":"\\\\u00001\\\\u0000"}']
    for text in texts:
        assert canonical_json(text) == text
        assert json.loads(canonical_json(text)) == json.loads(text)


# -- verify against a real capture -----------------------------------------------------------------------


@pytest.fixture
def captured(engine: sa.Engine, dsn: str) -> str:
    """A tracked table with creates, updates, a delete and a truncate captured; returns the dsn."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE item (id int PRIMARY KEY, name text, price numeric, doc jsonb)"))
        conn.execute(sa.text("INSERT INTO item VALUES (0, 'before tracking', 1.0, '{}')"))
    bemi_tt.install(engine)
    capture(dsn, once=True, context_keys=())
    with bemi_tt.context(user_id=7, note="1e16"), engine.begin() as conn:
        insert = sa.text("INSERT INTO item VALUES (:id, :name, :price, CAST(:doc AS jsonb))")
        conn.execute(insert, {"id": 1, "name": "a", "price": "1.50", "doc": '{"z": 1e16, "a": [1, 2.0]}'})
        conn.execute(insert, {"id": 2, "name": "b/\u00e9", "price": "-0.0", "doc": '{"a":1,"a":2}'})
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE item SET price = 2e3 WHERE id = 1"))
        conn.execute(sa.text("DELETE FROM item WHERE id = 2"))
    with engine.begin() as conn:
        # the text \u0000 (a backslash, not a NUL) in a value: canonical_json's number tags look alike
        conn.execute(sa.text("INSERT INTO item VALUES (3, 'c\\u0000', 3, '{\"k\": \"\\\\u0000\"}')"))
    capture(dsn, once=True, context_keys=())
    return dsn


def _keys(dsn: str) -> list[tuple[int, int, int]]:
    with psycopg.connect(dsn) as conn:
        return [
            (int(a), int(b), int(c))
            for a, b, c in conn.execute("SELECT id, commit_position, ordinal FROM changes ORDER BY 2, 3")
        ]


def test_verify_passes_on_an_intact_history(captured: str) -> None:
    result = verify_changes(captured)
    assert result == 6  # the snapshot row and five changes
    assert result.unhashed == 0
    assert result.head == chain_head(captured)
    assert "6 changes verified" in str(result)
    assert bemi_tt.verify(captured) == 6


def _execute(dsn: str, statement: str, params: tuple[Any, ...] = ()) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement, params)  # type: ignore[arg-type]


def test_verify_names_a_row_updated_by_hand(captured: str) -> None:
    row_id, cp, ordinal = _keys(captured)[2]
    _execute(
        captured, "UPDATE changes SET after = jsonb_set(after, '{name}', '\"x\"') WHERE id = %s", (row_id,)
    )
    named = rf"id {row_id}, commit_position {cp}, ordinal {ordinal}.*was altered"
    with pytest.raises(ChainError, match=named):
        verify_changes(captured)


def test_verify_names_a_row_whose_context_verified_was_flipped(captured: str) -> None:
    row_id = _keys(captured)[1][0]
    _execute(captured, "UPDATE changes SET context_verified = true WHERE id = %s", (row_id,))
    with pytest.raises(ChainError, match=rf"id {row_id},.*was altered"):
        verify_changes(captured)


def test_verify_names_the_row_after_one_deleted_by_hand(captured: str) -> None:
    keys = _keys(captured)
    _execute(captured, "DELETE FROM changes WHERE id = %s", (keys[2][0],))
    with pytest.raises(ChainError, match=rf"id {keys[3][0]},.*does not follow from the row before it \(row "
                                         rf"\(id {keys[1][0]},.*deleted"):
        verify_changes(captured)


def test_verify_catches_the_last_row_deleted_by_hand(captured: str) -> None:
    keys = _keys(captured)
    _execute(captured, "DELETE FROM changes WHERE id = %s", (keys[-1][0],))
    named = rf"ends at row \(id {keys[-2][0]},.*recorded its head at commit_position {keys[-1][1]}, ordinal "
    with pytest.raises(ChainError, match=rf"{named}{keys[-1][2]}"):
        verify_changes(captured)


def test_verify_names_a_row_inserted_by_hand_without_hashes(captured: str) -> None:
    keys = _keys(captured)
    _execute(
        captured,
        "INSERT INTO changes (\"table\", operation, after, committed_at, \"schema\", database, position,"
        " commit_position, ordinal)"
        " VALUES ('item', 'CREATE', '{\"id\": 9}', now(), 'public', 'x', %s, %s, 7)",
        (keys[2][1], keys[2][1]),
    )
    named = rf"commit_position {keys[2][1]}, ordinal 7.*no chain hash.*inserted by hand"
    with pytest.raises(ChainError, match=named):
        verify_changes(captured)


def test_verify_names_a_row_inserted_by_hand_with_a_valid_digest(captured: str) -> None:
    """A forger who computes the row's digest still cannot make it follow from the row before."""
    keys = _keys(captured)
    cp = keys[2][1]
    fields: dict[str, Any] = dict(
        table="item", schema="public", database="x", operation="CREATE", primary_key="9", before="{}",
        after='{"id": 9}', context="{}", context_verified=None, committed_at=1_000_000, transaction_id=None,
        position=cp, commit_position=cp, ordinal=7,
    )
    digest = row_digest(**fields)
    _execute(
        captured,
        "INSERT INTO changes (\"table\", operation, primary_key, after, committed_at, \"schema\", database,"
        " position, commit_position, ordinal, row_digest, chain_hash) VALUES ('item', 'CREATE', '9',"
        " '{\"id\": 9}', to_timestamp(1), 'public', 'x', %s, %s, 7, %s, %s)",
        (cp, cp, digest, chain_next(GENESIS, digest)),
    )
    with pytest.raises(ChainError, match=rf"commit_position {cp}, ordinal 7.*starts a new chain"):
        verify_changes(captured)


def test_anchors_and_stored_digests_catch_a_rewritten_chain(captured: str) -> None:
    head = chain_head(captured)
    assert head is not None
    assert verify_changes(captured, anchors=[str(head)]) == 6
    wrong = Anchor(head.commit_position, head.ordinal, "0" * 64)
    with pytest.raises(ChainError, match="not the anchored"):
        verify_changes(captured, anchors=[wrong])
    _execute(
        captured,
        "INSERT INTO changes_digests (commit_position, ordinal, chain_hash) VALUES (%s, %s, %s)",
        (head.commit_position, head.ordinal, "1" * 64),
    )
    with pytest.raises(ChainError, match="history up to that point was rewritten"):
        verify_changes(captured)
    assert Anchor.parse(str(head)) == head


def test_first_release_table_gets_the_columns_and_the_chain_begins_at_the_first_hashed_row(
    engine: sa.Engine, dsn: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:  # the first release's changes table and a row
        conn.execute(
            "CREATE TABLE changes (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, primary_key text,"
            " \"table\" text NOT NULL, operation text NOT NULL, before jsonb NOT NULL DEFAULT '{}',"
            " after jsonb NOT NULL DEFAULT '{}', context jsonb NOT NULL DEFAULT '{}',"
            " committed_at timestamptz NOT NULL, \"schema\" text NOT NULL, database text NOT NULL,"
            " transaction_id bigint, position bigint NOT NULL, commit_position bigint NOT NULL,"
            " ordinal integer NOT NULL, UNIQUE (commit_position, ordinal))"
        )
        conn.execute(
            "INSERT INTO changes (\"table\", operation, committed_at, \"schema\", database, position,"
            " commit_position, ordinal) VALUES ('old', 'CREATE', now(), 'public', 'x', 1, 1, 0)"
        )
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    bemi_tt.install(engine)
    capture(dsn, once=True, context_keys=())
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO t VALUES (1)"))
    capture(dsn, once=True, context_keys=())
    result = verify_changes(dsn)
    assert (int(result), result.unhashed) == (1, 1)
    assert "after 1 earlier rows without hashes" in str(result)


def test_unchanged_toast_values_filled_from_the_previous_version_are_covered_by_the_digest(
    engine: sa.Engine, dsn: str
) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE doc (id int PRIMARY KEY, body text, n int)"))
    bemi_tt.install(engine, replica_identity_full=False)
    capture(dsn, once=True, context_keys=())
    big = "".join(str(i) for i in range(40_000))  # TOASTed, not compressible to inline
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO doc VALUES (1, :b, 0)"), {"b": big})
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE doc SET n = 1 WHERE id = 1"))
    capture(dsn, once=True, context_keys=())
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT after->>'body' FROM changes WHERE operation = 'UPDATE'").fetchone()
    assert row == (big,)
    assert verify_changes(dsn) == 2


# -- Parquet export --------------------------------------------------------------------------------------


def test_export_carries_the_chain_and_verifies(captured: str, tmp_path: Path) -> None:
    export_parquet(captured, str(tmp_path), progress=False)
    result = verify_export(str(tmp_path))
    assert result == 6
    assert verify_export(str(tmp_path), anchors=[str(chain_head(captured))]) == 6
    assert bemi_tt.verify(tmp_path) == 6


def _rewrite(tmp_path: Path, change: Callable[[pa.Table], pa.Table]) -> None:
    files = sorted(tmp_path.glob("relation=*/date=*/*.parquet"))
    table = pq.read_table(files[0])
    pq.write_table(change(table), files[0])


def test_verify_export_names_the_row_after_a_value_changed_in_a_parquet_file(
    captured: str, tmp_path: Path
) -> None:
    export_parquet(captured, str(tmp_path), progress=False)
    files = sorted(tmp_path.glob("relation=*/date=*/*.parquet"))
    table = pq.read_table(files[0])
    index = table.num_rows - 1
    target = (table["commit_position"][index].as_py(), table["ordinal"][index].as_py())
    after = table["after"].to_pylist()
    after[index] = '{"id": 1, "doc": null, "name": "forged", "price": 1.50}'
    table = table.set_column(table.schema.get_field_index("after"), table.schema.field("after"),
                             pa.array(after, table.schema.field("after").type.storage_type).cast(
                                 table.schema.field("after").type))
    pq.write_table(table, files[0])
    with pytest.raises(ChainError, match=rf"commit_position {target[0]}, ordinal {target[1]}.*was altered"):
        verify_export(str(tmp_path))


def test_sink_stores_and_logs_a_digest_every_n_rows_and_verify_checks_them(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    import datetime as dt
    import logging

    from capture.sink import Sink
    from capture.stitch import ChangeRow

    at = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    with psycopg.connect(dsn) as conn, caplog.at_level(logging.INFO, logger="capture"):
        sink = Sink(conn, "s", digest_every=2)
        sink.setup()
        for cp in (10, 20, 30):
            sink.write(ChangeRow(str(cp), "t", "CREATE", "{}", f'{{"id":{cp}}}', "{}", at, "public", "d",
                                 cp, cp, cp, 0))
            sink.mark(cp, cp, at)
            sink.commit()
        sink.close()
        digests = conn.execute("SELECT commit_position FROM changes_digests ORDER BY 1").fetchall()
    assert digests == [(20,)]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("chain digest ")]
    assert len(logged) == 1
    anchor = Anchor.parse(logged[0].removeprefix("chain digest "))
    assert (anchor.commit_position, anchor.ordinal) == (20, 0)
    assert verify_changes(dsn, anchors=[anchor]) == 3
