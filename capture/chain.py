"""Tamper-evident history: a per-row digest and a hash chain over ``changes`` in commit order.

Every row the worker writes carries

- ``row_digest``: SHA-256 (hex) of the row's canonical content (:func:`row_digest`): every column but
  ``id``, the three JSON columns through their own SHA-256 of :func:`canonical_json`;
- ``chain_hash``: SHA-256 (hex) of the previous row's ``chain_hash`` (32 zero bytes for the first hashed
  row) and this row's ``row_digest``, in ``(commit_position, ordinal)`` order.

:func:`capture.verify.verify_changes` (a PostgreSQL ``changes`` table) and
:func:`capture.verify.verify_export` (a Parquet export, where the two columns travel in the files)
recompute both and raise :class:`~capture.errors.ChainError` naming
the first row altered (its content no longer gives its digest), inserted by hand (no hash, or a hash that
does not follow from the row before) or the place where rows were deleted (the next row's hash does not
follow); rows deleted at the end are caught by the head the worker records with each batch in
``changes_positions`` and by the periodic digests in ``changes_digests`` (PostgreSQL), or by an
``anchor`` the operator kept (both).

What it proves: nobody changed, inserted or deleted rows *without recomputing the chain*. Anyone who can
write ``changes`` can also recompute every later hash (there is no secret in the chain): that is what
the digests are for. Print one (``bemi-tt verify`` shows the head; :func:`capture.verify.chain_head`),
store it elsewhere (a ticket, a log, another system), and pass it later as ``anchor``: history up to that
point is then proven unchanged. Rows from before hashing began (a first-release table) have no hash: the
chain begins at the first hashed row and the result says how many rows came before it.

Erasure (capture/erase.py): the chain covers only ``row_digest``, and the digest covers each JSON value
through its own hash. An erasure records the original hashes of the columns it rewrites; verify checks an
erased row (its context carries ``_bemi_erased``) with them, so the rest of the row and the chain stay
proven, and counts it in ``Verified.erased`` instead of calling it altered.

Canonical JSON: jsonb reformats what it stores (key order, spaces, ``1e16`` → ``10000000000000000``,
duplicate keys: the last wins). :func:`canonical_json` maps any JSON text and what jsonb gives back
(``jsonb::text``, or the Parquet export's JSON) to the same text: keys sorted by code point and
deduplicated like jsonb, separators ``,`` and ``:`` without spaces, non-ASCII kept, strings escaped as
Python's ``json`` does (quote, backslash, newline, CR, tab, backspace and form feed by their short
escapes, other control characters as ``\\u00XX``), numbers as PostgreSQL's numeric prints them (plain
digits, no exponent, ``-0`` → ``0``).
The worker's row images are in that form already (capture/values.py writes it), so the sink hashes them
as they are (:func:`text_digest`); :func:`capture.verify.verify_rows` always canonicalises what is stored.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from decimal import Decimal
from json.encoder import encode_basestring as _json_str

from capture.errors import ConfigurationError

__all__ = [
    "GENESIS",
    "Chain",
    "canonical_json",
    "canonical_number",
    "chain_next",
    "context_digest",
    "digest_with",
    "header_prefix",
    "row_digest",
    "text_digest",
    "value_digest",
]

#: The ``chain_hash`` before the first hashed row.
GENESIS = "0" * 64
_VERSION = b"bemi_tt.changes.v1\n"
_EMPTY_DIGEST = hashlib.sha256(b"{}").digest()
_PLAIN_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?\Z")
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def canonical_number(literal: str) -> str:
    """A JSON number as PostgreSQL's numeric prints it (what jsonb keeps): ``1e16`` → ``10000000000000000``,
    ``1.50`` stays, ``1E-3`` → ``0.001``, ``-0`` → ``0``."""
    if _PLAIN_NUMBER.match(literal) and not (literal.startswith("-") and not literal.strip("-0.")):
        return literal
    value = Decimal(literal)
    exponent = value.as_tuple().exponent
    if value.is_zero() and isinstance(exponent, int) and exponent >= 0:
        return "0"  # numeric's zero, whatever the exponent (adjusted() would call 0e+1073741819 huge)
    if not -16400 < value.adjusted() < 131100:  # jsonb refuses it; never write out a billion digits
        raise ValueError(f"number {literal[:40]!r} is outside the range of PostgreSQL's numeric")
    text = format(value, "f")
    return text[1:] if value.is_zero() and text.startswith("-") else text


def _tag_number(literal: str) -> str:
    # NUL-tagged on both sides (encoded as \u0000): jsonb strings cannot hold a NUL, so no string of a
    # stored value encodes to a quote, the escape \u0000, digits, \u0000 and a quote (a backslash in a
    # string is doubled, so the text \u0000 in a value never matches); one regex pass untags them
    return "\x00" + canonical_number(literal) + "\x00"


_TAGGED = re.compile(r'"\\u0000(-?[0-9]+(?:\.[0-9]+)?)\\u0000"')


#: Decoders made once (``json.loads`` with hooks builds a decoder per call: 10 us of a 13 us call).
_DECODER = json.JSONDecoder(parse_float=_tag_number)
_DECODER_ALL = json.JSONDecoder(parse_float=_tag_number, parse_int=_tag_number)


def canonical_json(text: str) -> str:
    """The canonical text of a JSON value: equal for the worker's text and jsonb's rendering of it."""
    if text == "{}":
        return text
    try:
        value = _DECODER.decode(text)
    except ValueError:  # an integer longer than Python's int-to-text limit: keep every number as text
        value = _DECODER_ALL.decode(text)
    out = _ENCODER.encode(value)
    if "\\u0000" in out:
        out = _TAGGED.sub(r"\1", out)
    return out


def text_digest(text: str) -> bytes:
    """The value digest of JSON text that is canonical already (the worker's images,
    capture/values.py): its SHA-256 as it is, equal to :func:`value_digest` of it, without parsing."""
    if text == "{}":
        return _EMPTY_DIGEST
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _value_digest(text: str | None) -> bytes:
    if text is None or text == "{}":
        return _EMPTY_DIGEST
    return hashlib.sha256(canonical_json(text).encode("utf-8", "surrogatepass")).digest()


def _micros(at: datetime | int) -> int:
    if isinstance(at, int):
        return at
    if at.tzinfo is None:
        raise ConfigurationError(f"committed_at {at!r} has no time zone; pass an aware datetime")
    delta = at - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def header_prefix(
    schema: str,
    table: str,
    database: str,
    context_verified: bool | None,
    committed_at: datetime | int,
    transaction_id: int | None,
    commit_position: int,
) -> bytes:
    """The digest's start for the columns a transaction's rows of one table (and context) share.

    The digest is SHA-256 of: the version line; the JSON array ``[schema, table, database,
    context_verified, committed_at (epoch µs), transaction_id, commit_position, operation, primary_key,
    position, ordinal]``; the SHA-256 of the canonical ``before``, ``after`` and ``context``.
    """
    verified = "null" if context_verified is None else "true" if context_verified else "false"
    xid = "null" if transaction_id is None else str(int(transaction_id))
    text = (
        f"[{_json_str(schema)},{_json_str(table)},{_json_str(database)},{verified},"
        f"{_micros(committed_at)},{xid},{int(commit_position)},"
    )
    return _VERSION + text.encode("utf-8", "surrogatepass")


def digest_with(
    prefix: bytes,
    operation: str,
    primary_key: str | None,
    position: int,
    ordinal: int,
    before: str | None,
    after: str | None,
    context_digest: bytes,
    before_digest: bytes | None = None,
    after_digest: bytes | None = None,
) -> bytes:
    """The row digest (raw bytes) from a :func:`header_prefix` and the row's own columns
    (``before_digest``/``after_digest``: their value digests when the caller has them)."""
    pk = "null" if primary_key is None else _json_str(primary_key)
    h = hashlib.sha256(prefix)
    h.update(f"{_json_str(operation)},{pk},{int(position)},{int(ordinal)}]".encode("utf-8", "surrogatepass"))
    h.update(_value_digest(before) if before_digest is None else before_digest)
    h.update(_value_digest(after) if after_digest is None else after_digest)
    h.update(context_digest)
    return h.digest()


def row_digest(
    *,
    table: str,
    schema: str,
    database: str,
    operation: str,
    primary_key: str | None,
    before: str | None,
    after: str | None,
    context: str | None,
    context_verified: bool | None,
    committed_at: datetime | int,
    transaction_id: int | None,
    position: int,
    commit_position: int,
    ordinal: int,
    context_digest: bytes | None = None,
) -> str:
    """SHA-256 (hex) of one row's canonical content (``committed_at`` as a datetime or epoch µs).

    ``context_digest``: the context's value digest when the caller has it cached (one per distinct
    context).
    """
    prefix = header_prefix(schema, table, database, context_verified, committed_at, transaction_id,
                           commit_position)
    cdigest = context_digest if context_digest is not None else _value_digest(context)
    return digest_with(prefix, operation, primary_key, position, ordinal, before, after, cdigest).hex()


def context_digest(context: str) -> bytes:
    """The value digest of a context (cache it per distinct context)."""
    return _value_digest(context)


value_digest = _value_digest


class Chain:
    """The worker's side: extends the chain one row at a time (``head``: the last chain hash, hex)."""

    def __init__(self, head: str = GENESIS) -> None:
        self._previous = bytes.fromhex(head)

    @property
    def head(self) -> str:
        return self._previous.hex()

    def add(self, digest: bytes) -> str:
        """Chain a row digest on; its chain hash (hex)."""
        self._previous = hashlib.sha256(self._previous + digest).digest()
        return self._previous.hex()


def chain_next(previous: str, digest: str) -> str:
    """The chain hash after ``previous`` for a row with ``digest`` (both hex)."""
    return hashlib.sha256(bytes.fromhex(previous) + bytes.fromhex(digest)).hexdigest()
