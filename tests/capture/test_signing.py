"""Keys, key ids and the signature of context markers (pure: no database)."""

from __future__ import annotations

import base64
import hmac
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bemi_tt.context import configure_context, context_settings, encode_context
from capture.errors import ConfigurationError
from capture.signing import (
    MIN_KEY_BYTES,
    ContextKey,
    HeadSigner,
    KeyRing,
    key_id,
    keys_from_env,
    load_key_file,
    open_context,
    parse_keys,
    signature_member,
)
from capture.stitch import parse_context

KEY = "s" * 32
OTHER = "o" * 32
_MARKER = re.compile(r"^/\*bemi:([A-Za-z0-9+/=]*)\*/")


@pytest.fixture(autouse=True)
def _unsigned_after() -> Iterator[None]:
    before = context_settings()
    yield
    configure_context(signing_key=None, max_bytes=before.max_bytes, max_sql_bytes=before.max_sql_bytes)


def _payload(value: dict[str, Any], statement: str) -> bytes:
    enc = encode_context(value)
    assert enc is not None
    match = _MARKER.match(enc.marked(statement))
    assert match is not None
    return base64.b64decode(match.group(1), validate=True)


def test_key_id_is_stable_short_hex_and_differs_per_key() -> None:
    assert key_id(KEY.encode()) == key_id(KEY.encode())
    assert re.fullmatch(r"[0-9a-f]{8}", key_id(KEY.encode()))
    assert key_id(KEY.encode()) != key_id(OTHER.encode())
    assert KEY not in repr(ContextKey.of(KEY))


@pytest.mark.parametrize(
    ("text", "message"),
    [("short", f"shorter than {MIN_KEY_BYTES}"), (b"x" * 10 + b" " + b"y" * 10, "whitespace")],
)
def test_weak_or_malformed_keys_are_refused_naming_the_fix(text: str | bytes, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ContextKey.of(text)


def test_parse_keys_splits_on_whitespace_and_skips_comments() -> None:
    keys = parse_keys(f"# rotated 2026-12\n{KEY}\n\n  {OTHER} \n")
    assert [k.secret for k in keys] == [KEY.encode(), OTHER.encode()]
    with pytest.raises(ConfigurationError, match="key 1 of the context keys \\(line 1\\)"):
        parse_keys("tooshort")


def test_key_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\n{OTHER}\n")
    assert [k.id for k in load_key_file(path)] == [key_id(KEY.encode()), key_id(OTHER.encode())]
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigurationError, match="holds no key"):
        load_key_file(empty)
    with pytest.raises(ConfigurationError, match="cannot read the context key file"):
        load_key_file(tmp_path / "missing")
    assert keys_from_env({}) == ()
    assert [k.secret for k in keys_from_env({"BEMI_TT_CONTEXT_KEY": f" {KEY}\n"})] == [KEY.encode()]


def test_signing_key_is_validated_and_reported_by_id() -> None:
    with pytest.raises(ConfigurationError, match="shorter than"):
        configure_context(signing_key="abc")
    assert configure_context(signing_key=KEY).signing_key_id == key_id(KEY.encode())
    assert configure_context(signing_key=None).signing_key_id is None


@given(st.binary(min_size=1, max_size=200), st.binary(max_size=300), st.binary(max_size=100))
def test_head_signer_is_hmac_sha256_of_head_and_tail(secret: bytes, head: bytes, tail: bytes) -> None:
    key = ContextKey(key_id(secret), secret)
    member = HeadSigner(key, head).member(tail)
    assert member == signature_member(key.id, hmac.digest(secret, head + tail, "sha256").hex())


def test_context_may_not_use_the_signature_member() -> None:
    with pytest.raises(ConfigurationError, match="_bemi_sig"):
        encode_context({"_bemi_sig": "x"})


def test_unsigned_markers_are_unchanged_by_the_signing_code() -> None:
    assert _payload({"a": 1}, "UPDATE t SET a = 1") == b'{"a":1,  "SQL":"UPDATE t SET a = 1"}'


_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)
_CONTEXTS = st.dictionaries(
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1, max_size=8)
    .filter(lambda k: k not in ("SQL", "_bemi_sig")),
    _VALUES,
    min_size=1,
    max_size=5,
)
_STATEMENTS = st.text(max_size=60).map(lambda s: "UPDATE t SET a = 1 -- " + s)


@given(_CONTEXTS, _STATEMENTS)
def test_signed_marker_verifies_and_opens_to_the_unsigned_context(
    value: dict[str, Any], statement: str
) -> None:
    configure_context(signing_key=None)
    unsigned = _payload(value, statement)
    configure_context(signing_key=KEY)
    signed = _payload(value, statement)
    body, verified = open_context(signed, KeyRing([OTHER, KEY]))
    assert verified is True
    assert json.loads(body) == json.loads(unsigned)
    assert parse_context(body) == body.decode()
    assert open_context(signed, None) == (body, None)
    assert open_context(signed, KeyRing([OTHER]))[1] is False
    assert open_context(unsigned, KeyRing([KEY])) == (unsigned, False)


@given(_CONTEXTS, st.data())
def test_any_changed_byte_of_a_signed_marker_fails_verification(
    value: dict[str, Any], data: st.DataObject
) -> None:
    configure_context(signing_key=KEY)
    signed = bytearray(_payload(value, "DELETE FROM t"))
    index = data.draw(st.integers(0, len(signed) - 1))
    replacement = data.draw(st.integers(0, 255).filter(lambda b: b != signed[index]))
    signed[index] = replacement
    assert open_context(bytes(signed), KeyRing([KEY]))[1] is False
