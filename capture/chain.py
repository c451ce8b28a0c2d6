"""Tamper-evident history: a per-row digest and a hash chain over ``changes`` in commit order.

Every row the worker writes carries

- ``row_digest``: SHA-256 (hex) of the row's canonical content (:func:`row_digest`): every column but
  ``id``, the three JSON columns through their own SHA-256 of :func:`canonical_json`;
- ``chain_hash``: SHA-256 (hex) of the previous row's ``chain_hash`` (32 zero bytes for the first hashed
  row) and this row's ``row_digest``, in ``(commit_position, ordinal)`` order.

:func:`verify_changes` (a PostgreSQL ``changes`` table) and :func:`verify_export` (a Parquet export, where
the two columns travel in the files) recompute both and raise :class:`~capture.errors.ChainError` naming
the first row altered (its content no longer gives its digest), inserted by hand (no hash, or a hash that
does not follow from the row before) or the place where rows were deleted (the next row's hash does not
follow); rows deleted at the end are caught by the head the worker records with each batch in
``changes_positions`` and by the periodic digests in ``changes_digests`` (PostgreSQL), or by an
``anchor`` the operator kept (both).

What it proves: nobody changed, inserted or deleted rows *without recomputing the chain*. Anyone who can
write ``changes`` can also recompute every later hash (there is no secret in the chain): that is what
the digests are for. Print one (``bemi-tt verify`` shows the head; :func:`chain_head`), store it
elsewhere (a ticket, a log, another system), and pass it later as ``anchor``: history up to that point
is then proven unchanged. Rows from before hashing began (a first-release table) have no hash: the
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
as they are (:func:`text_digest`); :func:`verify_rows` always canonicalises what is stored.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from json.encoder import encode_basestring as _json_str
from typing import Any

from capture.errors import ChainError, ConfigurationError

__all__ = [
    "GENESIS",
    "Anchor",
    "Chain",
    "ChainRow",
    "Verified",
    "canonical_json",
    "canonical_number",
    "chain_head",
    "chain_next",
    "context_digest",
    "digest_with",
    "header_prefix",
    "row_digest",
    "text_digest",
    "value_digest",
    "verify",
    "verify_changes",
    "verify_export",
    "verify_rows",
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


@dataclass(frozen=True)
class Anchor:
    """A head hash at a point of history (printed by ``bemi-tt verify``, stored in ``changes_digests``)."""

    commit_position: int
    ordinal: int
    chain_hash: str

    def __str__(self) -> str:
        return f"{self.commit_position}/{self.ordinal}:{self.chain_hash}"

    @classmethod
    def parse(cls, text: str) -> Anchor:
        """``<commit_position>/<ordinal>:<chain hash>`` (what ``str()`` gives)."""
        match = re.fullmatch(r"\s*(\d+)/(\d+):([0-9a-f]{64})\s*", text)
        if match is None:
            raise ConfigurationError(
                f"anchor {text!r} is not <commit_position>/<ordinal>:<64 hex digits>, as bemi-tt verify "
                "prints it"
            )
        return cls(int(match.group(1)), int(match.group(2)), match.group(3))


class Verified(int):
    """The number of changes verified (an int), with what the chain says about the rest."""

    unhashed: int
    head: Anchor | None
    source: str
    #: of the verified changes, those whose values were erased (checked with their recorded hashes)
    erased: int
    #: the pruning horizon the chain resumed at (capture/prune.py), None when history was never pruned
    horizon: Any
    #: anchors before the horizon, which nothing can check any more
    skipped_anchors: int

    def __new__(
        cls, verified: int, *, unhashed: int, head: Anchor | None, source: str, erased: int = 0,
        horizon: Any = None, skipped_anchors: int = 0,
    ) -> Verified:
        self = super().__new__(cls, verified)
        self.unhashed = unhashed
        self.head = head
        self.source = source
        self.erased = erased
        self.horizon = horizon
        self.skipped_anchors = skipped_anchors
        return self

    def __str__(self) -> str:
        text = f"{int(self)} changes verified in {self.source}"
        if self.erased:
            text += f" ({self.erased} of them erased: values removed, original hashes recorded)"
        if self.horizon is not None:
            text += (
                f"; history before {self.horizon.before.isoformat()} was pruned: its {self.horizon.rows} "
                "baseline rows match the horizon record and the chain resumes from the pruned prefix's head"
            )
            if self.skipped_anchors:
                text += f" ({self.skipped_anchors} anchors before it cannot be checked)"
        if self.unhashed:
            text += (
                f"; the chain begins after {self.unhashed} earlier rows without hashes "
                "(written before hashing began), which are not covered"
            )
        if self.head is not None:
            text += f"; head {self.head}"
        return text

    def __repr__(self) -> str:
        return f"Verified({int(self)}, unhashed={self.unhashed}, head={self.head!r})"


@dataclass(frozen=True)
class ChainRow:
    """What verify needs of one ``changes`` row (JSON columns as text, ``committed_at`` in epoch µs)."""

    id: int | None
    table: str
    schema: str
    database: str
    operation: str
    primary_key: str | None
    before: str | None
    after: str | None
    context: str | None
    context_verified: bool | None
    committed_at: int
    transaction_id: int | None
    position: int
    commit_position: int
    ordinal: int
    row_digest: str | None
    chain_hash: str | None

    def name(self) -> str:
        ident = "" if self.id is None else f"id {self.id}, "
        return (
            f"row ({ident}commit_position {self.commit_position}, ordinal {self.ordinal}, "
            f"{self.operation} on {self.schema}.{self.table})"
        )


#: ``changes`` columns verify reads, in :class:`ChainRow` order.
CHAIN_COLUMNS = tuple(ChainRow.__dataclass_fields__)


def verify_rows(
    rows: Iterable[ChainRow], *, source: str, anchors: Sequence[Anchor] = (), head: Anchor | None = None,
    erased: Mapping[tuple[int, int], tuple[str, str, str]] | None = None,
    horizon: Any = None,
) -> Verified:
    """Check rows given in ``(commit_position, ordinal)`` order; ``anchors``: known hashes at points of
    history; ``head``: where the chain must end (the worker's record); ``erased``: the original
    (before, after, context) hashes of erased rows (capture/erase.py). Raises ``ChainError``."""
    wanted = {(a.commit_position, a.ordinal): a for a in anchors}
    previous = GENESIS
    last: ChainRow | None = None
    unhashed = verified = erased_rows = skipped = baseline_rows = 0
    baseline = hashlib.sha256()
    start: Anchor | None = None
    if horizon is not None:  # pruned (capture/prune.py): the chain resumes at the recorded head
        if horizon.head is not None:
            start = Anchor(*horizon.head)
            previous = start.chain_hash
            anchored = wanted.pop((start.commit_position, start.ordinal), None)
            if anchored is not None and anchored.chain_hash != start.chain_hash:
                raise ChainError(
                    f"the pruned prefix's head in {source} is {start.chain_hash}, not the anchored "
                    f"{anchored.chain_hash}: history up to that point was rewritten"
                )
        before = {k for k in wanted if k[0] < horizon.position}
        skipped = len(before)
        for k in before:
            del wanted[k]
    context_cache: dict[str, bytes] = {}
    for row in rows:
        if horizon is not None and row.commit_position < horizon.position:
            digest = row_digest(
                table=row.table, schema=row.schema, database=row.database, operation=row.operation,
                primary_key=row.primary_key, before=row.before, after=row.after,
                context=row.context if row.context is not None else "{}",
                context_verified=row.context_verified, committed_at=row.committed_at,
                transaction_id=row.transaction_id, position=row.position,
                commit_position=row.commit_position, ordinal=row.ordinal,
            )
            if (row.row_digest is not None and digest != row.row_digest and erased
                    and _erased_digest(row, erased) == row.row_digest):
                digest, erased_rows = row.row_digest, erased_rows + 1
            if row.row_digest is None or digest != row.row_digest or row.chain_hash != (
                    horizon.head[2] if horizon.head is not None else None):
                raise ChainError(
                    f"{row.name()} in {source} lies before the pruning horizon but is not an unaltered "
                    "baseline row: it was altered or inserted by hand"
                )
            baseline.update(bytes.fromhex(digest))
            baseline_rows += 1
            verified += 1
            continue
        if row.chain_hash is None or row.row_digest is None:
            if verified == baseline_rows and start is None:
                unhashed += 1
                last = row
                continue
            raise ChainError(
                f"{row.name()} in {source} has no chain hash but follows hashed rows: it was inserted "
                "by hand (or its hash was removed)"
            )
        ctx = row.context if row.context is not None else "{}"
        cdigest = context_cache.get(ctx)
        if cdigest is None:
            if len(context_cache) > 4096:
                context_cache.clear()
            cdigest = context_cache[ctx] = context_digest(ctx)
        digest = row_digest(
            table=row.table, schema=row.schema, database=row.database, operation=row.operation,
            primary_key=row.primary_key, before=row.before, after=row.after, context=ctx,
            context_verified=row.context_verified, committed_at=row.committed_at,
            transaction_id=row.transaction_id, position=row.position, commit_position=row.commit_position,
            ordinal=row.ordinal, context_digest=cdigest,
        )
        if digest != row.row_digest and erased and _erased_digest(row, erased) == row.row_digest:
            digest = row.row_digest  # erased: the rest of the row is proven by the recorded hashes
            erased_rows += 1
        if digest != row.row_digest:
            raise ChainError(
                f"{row.name()} in {source} was altered: its content no longer matches its row_digest"
            )
        expected = chain_next(previous, digest)
        if expected != row.chain_hash:
            after_text = ("the start of the chain" if last is None or verified == baseline_rows
                          else last.name())
            if chain_next(GENESIS, digest) == row.chain_hash:
                raise ChainError(
                    f"{row.name()} in {source} starts a new chain after {after_text}: rows before it were "
                    "replaced or it was inserted by hand"
                )
            raise ChainError(
                f"{row.name()} in {source} does not follow from the row before it ({after_text}): a row "
                "between them was deleted, or this one was inserted by hand"
            )
        previous = expected
        verified += 1
        last = row
        anchor = wanted.pop((row.commit_position, row.ordinal), None)
        if anchor is not None and anchor.chain_hash != expected:
            raise ChainError(
                f"the chain at {row.name()} in {source} is {expected}, not the anchored {anchor.chain_hash}: "
                "history up to that point was rewritten"
            )
    if horizon is not None and (baseline_rows != horizon.rows or baseline.hexdigest() != horizon.baseline):
        raise ChainError(
            f"the baseline in {source} ({baseline_rows} rows before the pruning horizon) does not match the "
            f"horizon record ({horizon.rows} rows): baseline rows were altered, inserted or deleted"
        )
    chained = verified - baseline_rows
    end = None if last is None or chained == 0 else Anchor(last.commit_position, last.ordinal, previous)
    if end is None and start is not None:
        end = start  # everything was folded: the chain ends where the pruned prefix did
    if wanted:
        missing = min(wanted)
        raise ChainError(
            f"anchored row (commit_position {missing[0]}, ordinal {missing[1]}) is not in {source}: "
            "it was deleted, or the anchor is from another history"
        )
    if head is not None and end != head:
        where = "no hashed row" if end is None else f"at {last.name() if last else ''}"
        raise ChainError(
            f"{source} ends {where}, but the worker recorded its head at commit_position "
            f"{head.commit_position}, ordinal {head.ordinal}: rows at the end were deleted or rewritten"
        )
    return Verified(verified, unhashed=unhashed, head=end, source=source, erased=erased_rows, horizon=horizon,
                    skipped_anchors=skipped)


def _erased_digest(row: ChainRow, erased: Mapping[tuple[int, int], tuple[str, str, str]]) -> str | None:
    """The digest of an erased row from its recorded column hashes; None unless it is in erased form."""
    hashes = erased.get((row.commit_position, row.ordinal))
    if hashes is None or row.context is None or '"_bemi_erased"' not in row.context:
        return None
    prefix = header_prefix(row.schema, row.table, row.database, row.context_verified, row.committed_at,
                           row.transaction_id, row.commit_position)
    before, after, ctx = (bytes.fromhex(h) for h in hashes)
    return digest_with(prefix, row.operation, row.primary_key, row.position, row.ordinal, None, None, ctx,
                       before, after).hex()


# -- PostgreSQL -----------------------------------------------------------------------------------------


def _pg_rows(conn: Any, name: Any) -> Iterator[ChainRow]:
    from psycopg import sql

    columns: list[Any] = []
    for column in CHAIN_COLUMNS:
        ident = sql.Identifier(column)
        if column in ("before", "after", "context"):
            columns.append(sql.SQL("{}::text").format(ident))
        elif column == "committed_at":
            columns.append(sql.SQL("(extract(epoch FROM {}) * 1000000)::bigint").format(ident))
        else:
            columns.append(ident)
    query = sql.SQL("SELECT {} FROM {} ORDER BY commit_position, ordinal").format(
        sql.SQL(", ").join(columns), name
    )
    with conn.cursor(name="bemi_tt_verify") as cur:
        cur.itersize = 10_000
        cur.execute(query)
        for record in cur:
            yield ChainRow(*record)


def _connect(dsn: Any) -> Any:
    import psycopg

    if isinstance(dsn, psycopg.Connection):
        return dsn
    from capture.dsn import check_dsn, connect_error

    libpq = check_dsn(dsn, what="dsn")  # names a bad value without its password
    try:
        return psycopg.connect(libpq)
    except psycopg.Error as exc:
        raise connect_error(exc, dsn, what="the database holding changes") from None


def _recorded(conn: Any, schema: str) -> tuple[Anchor | None, list[Anchor]]:
    """The head the worker recorded (the newest over its slots) and the stored digests."""
    from psycopg import sql

    from capture.protocol import DIGESTS_TABLE, POSITIONS_TABLE

    head = None
    row = conn.execute(
        sql.SQL(
            "SELECT chain_position, chain_ordinal, chain_hash FROM {} WHERE chain_hash IS NOT NULL "
            "ORDER BY chain_position DESC, chain_ordinal DESC LIMIT 1"
        ).format(sql.Identifier(schema, POSITIONS_TABLE))
    ).fetchone()
    if row is not None:
        head = Anchor(int(row[0]), int(row[1]), str(row[2]))
    digests = [
        Anchor(int(a), int(b), str(c))
        for a, b, c in conn.execute(
            sql.SQL("SELECT commit_position, ordinal, chain_hash FROM {}").format(
                sql.Identifier(schema, DIGESTS_TABLE)
            )
        )
    ]
    return head, digests


def verify_changes(
    dsn: Any, *, schema: str = "public", anchors: Iterable[Anchor | str] = ()
) -> Verified:
    """Recompute the chain of the ``changes`` table at ``dsn``; the number of changes verified.

    Also checks the head the worker recorded in ``changes_positions``, the digests in
    ``changes_digests`` and any ``anchors`` (``Anchor`` or ``"<commit_position>/<ordinal>:<hash>"``).
    Raises ``ChainError`` naming the first row altered, inserted by hand, or where rows were deleted.
    """
    from psycopg import sql

    from capture.schema import CHANGES_TABLE

    kept = [a if isinstance(a, Anchor) else Anchor.parse(a) for a in anchors]
    conn = _connect(dsn)
    own = conn is not dsn
    try:
        try:
            head, digests = _recorded(conn, schema)
        except Exception as exc:  # a first-release table: no chain columns at all
            import psycopg

            if not isinstance(exc, (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn)):
                raise
            raise ChainError(
                f"{schema}.{CHANGES_TABLE} has no hash chain yet: run the capture worker of this version "
                "once (it adds the columns), and verify the rows it writes from then on"
            ) from None
        finally:
            conn.rollback()
        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                from capture.erase import pg_erased_digests
                from capture.prune import pg_horizon

                return verify_rows(
                    _pg_rows(conn, sql.Identifier(schema, CHANGES_TABLE)),
                    source=f"{schema}.{CHANGES_TABLE}",
                    anchors=[*kept, *digests],
                    head=head,
                    erased=pg_erased_digests(conn, schema),
                    horizon=pg_horizon(conn, schema),
                )
        finally:
            conn.rollback()
    finally:
        if own:
            conn.close()


def chain_head(dsn: Any, *, schema: str = "public") -> Anchor | None:
    """The last hashed row's chain hash: the digest to print and store elsewhere (None: no hashed row)."""
    from psycopg import sql

    from capture.schema import CHANGES_TABLE

    conn = _connect(dsn)
    try:
        row = conn.execute(
            sql.SQL(
                "SELECT commit_position, ordinal, chain_hash FROM {} WHERE chain_hash IS NOT NULL "
                "ORDER BY commit_position DESC, ordinal DESC LIMIT 1"
            ).format(sql.Identifier(schema, CHANGES_TABLE))
        ).fetchone()
        return None if row is None else Anchor(int(row[0]), int(row[1]), str(row[2]))
    finally:
        conn.rollback()
        if conn is not dsn:
            conn.close()


# -- Parquet export -------------------------------------------------------------------------------------


def _export_rows(directory: str) -> Iterator[ChainRow]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from capture.export.dataset import list_dataset_files

    filesystem, paths = list_dataset_files(directory)
    tables = []
    for path in paths:
        table = pq.read_table(path, filesystem=filesystem)
        for column in ("context_verified", "row_digest", "chain_hash"):  # files of the first release
            if column not in table.column_names:
                kind = pa.bool_() if column == "context_verified" else pa.string()
                table = table.append_column(column, pa.nulls(table.num_rows, kind))
        columns = {}
        for column in CHAIN_COLUMNS:
            data = table[column]
            if column == "committed_at":
                data = pc.cast(pc.cast(data, pa.timestamp("us", tz="UTC")), pa.int64())
            elif isinstance(data.type, pa.ExtensionType):
                data = data.cast(data.type.storage_type)
            columns[column] = data
        tables.append(pa.table(columns))
    if not tables:
        return
    merged = pa.concat_tables(tables).sort_by([("commit_position", "ascending"), ("ordinal", "ascending")])
    for batch in merged.to_batches(max_chunksize=10_000):
        values = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
        for record in zip(*values, strict=True):
            yield ChainRow(*record)


def verify_export(directory: str, *, anchors: Iterable[Anchor | str] = ()) -> Verified:
    """Recompute the chain of a Parquet export (local or ``s3://``); the number of changes verified.

    The export holds the complete, non-superseded files (see ``capture.export.dataset``); rows deleted at
    its end are only caught by an ``anchor`` at or after them. Raises ``ChainError`` like
    :func:`verify_changes`, naming the row (its key; ``id`` as exported).
    """
    from capture.erase import export_erased_digests
    from capture.prune import export_horizon

    kept = [a if isinstance(a, Anchor) else Anchor.parse(a) for a in anchors]
    return verify_rows(_export_rows(directory), source=f"the export {directory!r}", anchors=kept,
                       erased=export_erased_digests(directory), horizon=export_horizon(directory))


def verify(source: Any, *, schema: str = "public", anchors: Iterable[Anchor | str] = ()) -> Verified:
    """``bemi_tt.verify``: :func:`verify_export` for an export directory (local or ``s3://``), else
    :func:`verify_changes` for a PostgreSQL URL, libpq string or psycopg connection."""
    import os

    if isinstance(source, os.PathLike) or (
        isinstance(source, str) and (source.startswith(("s3://", "file://")) or os.path.isdir(source))
    ):
        return verify_export(os.fspath(source), anchors=anchors)
    return verify_changes(source, schema=schema, anchors=anchors)
