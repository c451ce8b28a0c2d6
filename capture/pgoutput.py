"""Pure decoder of PostgreSQL's ``pgoutput`` logical replication messages (protocol version 1).

``decode(bytes) -> message`` turns one message (one ``data`` value of
``pg_logical_slot_peek_binary_changes``) into a frozen dataclass; ``encode`` is its exact inverse,
used by round-trip tests and in-memory test doubles. No I/O, no logging. Malformed input raises
:class:`capture.errors.DecodeError` naming what is wrong and the byte offset, never anything else.

Column values in tuples are ``bytes`` (PostgreSQL's text output, ``'t'``), ``None`` (SQL NULL,
``'n'``), :data:`UNCHANGED` (an unchanged TOASTed value the server did not send, ``'u'``) or a
:class:`BinaryValue` (a ``bytes`` subclass, for ``'b'``, sent only when the ``binary`` option is on).
Times are raw microseconds since 2000-01-01 UTC (:func:`pg_timestamp_to_datetime` converts them);
a transaction replayed from a replication origin carries the origin's commit time. Names are decoded
as UTF-8 (the database must use UTF8). Facts of pgoutput worth knowing: a key-only old tuple
(``'K'``) has NULL in every non-key column; under REPLICA IDENTITY FULL every column of the Relation
is flagged ``key``; TRUNCATE is preceded by a Relation for each truncated table.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Final, Union

from capture.errors import DecodeError

__all__ = [
    "PG_EPOCH",
    "UNCHANGED",
    "Begin",
    "BinaryValue",
    "Column",
    "Commit",
    "Delete",
    "Insert",
    "Message",
    "Origin",
    "PgOutputMessage",
    "Relation",
    "Truncate",
    "TupleValue",
    "Type",
    "Unchanged",
    "Update",
    "decode",
    "encode",
    "format_lsn",
    "parse_lsn",
    "pg_timestamp_to_datetime",
]


class Unchanged:
    """Type of :data:`UNCHANGED`: a TOASTed value that did not change and was not sent."""

    __slots__ = ()
    _instance: Unchanged | None = None

    def __new__(cls) -> Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        return "UNCHANGED"


#: Sentinel for an unchanged TOASTed column value (``'u'``): never a NULL, never a placeholder.
UNCHANGED: Final = Unchanged()


class BinaryValue(bytes):
    """A column value in PostgreSQL's binary format (``'b'``); only sent with the ``binary`` option."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"BinaryValue({bytes(self)!r})"


TupleValue = Union[bytes, None, Unchanged]  # noqa: UP007 - a runtime alias, also valid on 3.10

REPLICA_IDENTITIES: Final = frozenset("dnfi")
OLD_KINDS: Final = frozenset("KO")


@dataclass(frozen=True, slots=True)
class Begin:
    """Start of a transaction; ``commit_time`` in microseconds since 2000-01-01 UTC."""

    final_lsn: int
    commit_time: int
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """End of a transaction: its commit LSN, the LSN just past it, and the commit time."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclass(frozen=True, slots=True)
class Origin:
    """The replication origin a transaction came from (sent after Begin)."""

    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a Relation; ``key`` is true for replica-identity key columns."""

    key: bool
    name: str
    type_oid: int
    type_modifier: int


@dataclass(frozen=True, slots=True)
class Relation:
    """A table's description, sent before its first change in a session and after it changes."""

    oid: int
    namespace: str
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Type:
    """A non-builtin data type used by a Relation's column (enum, composite, domain, ...)."""

    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """A new row."""

    relation_oid: int
    new: tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class Update:
    """A changed row; ``old`` is the key (``'K'``) or full old row (``'O'``) when sent, else None."""

    relation_oid: int
    old_kind: str | None
    old: tuple[TupleValue, ...] | None
    new: tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class Delete:
    """A removed row: its key (``old_kind='K'``) or full old row (``'O'``)."""

    relation_oid: int
    old_kind: str
    old: tuple[TupleValue, ...]


@dataclass(frozen=True, slots=True)
class Truncate:
    """TRUNCATE of one or more relations."""

    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class Message:
    """A ``pg_logical_emit_message`` message; ``lsn`` is where it was written."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


PgOutputMessage = Union[Begin, Commit, Origin, Relation, Type, Insert, Update, Delete, Truncate, Message]  # noqa: UP007

_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">BQQq")
_REL_HEAD = struct.Struct(">I")
_COLUMN_TAIL = struct.Struct(">Ii")
_MESSAGE_HEAD = struct.Struct(">BQ")
_TRUNCATE_HEAD = struct.Struct(">IB")
_OID_KIND = struct.Struct(">Ic")
_u32_from = _U32.unpack_from
_u16_from = _U16.unpack_from

_K = 75  # ord('K')
_O = 79  # ord('O')
_N = 78  # ord('N')
_t = 116
_n = 110
_u = 117
_b = 98

# Row messages are built through their slot descriptors: a frozen dataclass's __init__ sets each
# field with object.__setattr__, which costs more than decoding the tuple it carries.
_new = object.__new__
_insert_oid = Insert.__dict__["relation_oid"].__set__
_insert_new = Insert.__dict__["new"].__set__
_update_oid = Update.__dict__["relation_oid"].__set__
_update_old_kind = Update.__dict__["old_kind"].__set__
_update_old = Update.__dict__["old"].__set__
_update_new = Update.__dict__["new"].__set__
_delete_oid = Delete.__dict__["relation_oid"].__set__
_delete_old_kind = Delete.__dict__["old_kind"].__set__
_delete_old = Delete.__dict__["old"].__set__

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=timezone.utc)


def pg_timestamp_to_datetime(us: int) -> datetime:
    """Microseconds since 2000-01-01 UTC (pgoutput's time format) as an aware UTC datetime."""
    if not isinstance(us, int) or isinstance(us, bool):
        raise TypeError(f"pg timestamp must be an int of microseconds, got {us!r}")
    try:
        return PG_EPOCH + timedelta(microseconds=us)
    except OverflowError:
        raise ValueError(f"pg timestamp {us} is outside the range of datetime") from None


def format_lsn(lsn: int) -> str:
    """An LSN as PostgreSQL writes it: ``'16/B374D848'``."""
    if not isinstance(lsn, int) or isinstance(lsn, bool) or not 0 <= lsn < 1 << 64:
        raise ValueError(f"lsn must be an int in [0, 2**64), got {lsn!r}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """Parse PostgreSQL's ``'X/Y'`` LSN text (hex halves) into an int."""
    if not isinstance(text, str):
        raise ValueError(f"lsn text must be a str like '16/B374D848', got {text!r}")
    high, sep, low = text.strip().partition("/")
    try:
        if not sep or not 0 < len(high) <= 8 or not 0 < len(low) <= 8:
            raise ValueError
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError:
        raise ValueError(f"invalid lsn {text!r}: expected two hex numbers like '16/B374D848'") from None


# --------------------------------------------------------------------------- decoding


def _string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    end = data.find(b"\0", pos)
    if end < 0:
        raise DecodeError(f"unterminated {what} string", pos)
    try:
        return data[pos:end].decode(), end + 1
    except UnicodeDecodeError:
        raise DecodeError(f"{what} is not valid UTF-8", pos) from None


def _tuple(data: bytes, pos: int, size: int) -> tuple[tuple[TupleValue, ...], int]:
    """TupleData at ``pos``: (values, position after it)."""
    if pos + 2 > size:
        raise DecodeError("truncated tuple column count", pos)
    ncols = (data[pos] << 8) | data[pos + 1]
    pos += 2
    values: list[TupleValue] = []
    append = values.append
    u32 = _u32_from
    try:
        for _ in range(ncols):
            kind = data[pos]
            if kind == _t:
                start = pos + 5
                pos = start + u32(data, pos + 1)[0]
                if pos > size:
                    pos = start - 5
                    raise DecodeError("column value length runs past the end of the message", pos + 1)
                append(data[start:pos])
            elif kind == _n:
                append(None)
                pos += 1
            elif kind == _u:
                append(UNCHANGED)
                pos += 1
            elif kind == _b:
                start = pos + 5
                pos = start + u32(data, pos + 1)[0]
                if pos > size:
                    pos = start - 5
                    raise DecodeError("column value length runs past the end of the message", pos + 1)
                append(BinaryValue(data[start:pos]))
            else:
                raise DecodeError(f"unknown tuple column kind {kind!r} ({chr(kind)!r})", pos)
    except (IndexError, struct.error):
        raise DecodeError("truncated tuple data", pos) from None
    return tuple(values), pos


def _insert(data: bytes, size: int) -> Insert:
    if size < 6:
        raise DecodeError("truncated insert header", 1)
    oid = _u32_from(data, 1)[0]
    if data[5] != _N:
        raise DecodeError(f"insert expects new tuple marker 'N', got {chr(data[5])!r}", 5)
    new, pos = _tuple(data, 6, size)
    if pos != size:
        raise DecodeError(f"{size - pos} trailing bytes after insert", pos)
    row = _new(Insert)
    _insert_oid(row, oid)
    _insert_new(row, new)
    return row


def _update(data: bytes, size: int) -> Update:
    if size < 6:
        raise DecodeError("truncated update header", 1)
    oid = _u32_from(data, 1)[0]
    marker = data[5]
    old_kind: str | None = None
    old: tuple[TupleValue, ...] | None = None
    pos = 6
    if marker in (_K, _O):
        old_kind = "K" if marker == _K else "O"
        old, pos = _tuple(data, 6, size)
        if pos >= size:
            raise DecodeError("truncated update: no new tuple", pos)
        marker = data[pos]
        pos += 1
    if marker != _N:
        raise DecodeError(f"update expects tuple marker 'K', 'O' or 'N', got {chr(marker)!r}", pos - 1)
    new, pos = _tuple(data, pos, size)
    if pos != size:
        raise DecodeError(f"{size - pos} trailing bytes after update", pos)
    row = _new(Update)
    _update_oid(row, oid)
    _update_old_kind(row, old_kind)
    _update_old(row, old)
    _update_new(row, new)
    return row


def _delete(data: bytes, size: int) -> Delete:
    if size < 6:
        raise DecodeError("truncated delete header", 1)
    oid = _u32_from(data, 1)[0]
    marker = data[5]
    if marker not in (_K, _O):
        raise DecodeError(f"delete expects old tuple marker 'K' or 'O', got {chr(marker)!r}", 5)
    old, pos = _tuple(data, 6, size)
    if pos != size:
        raise DecodeError(f"{size - pos} trailing bytes after delete", pos)
    row = _new(Delete)
    _delete_oid(row, oid)
    _delete_old_kind(row, "K" if marker == _K else "O")
    _delete_old(row, old)
    return row


def _begin(data: bytes, size: int) -> Begin:
    if size != 21:
        raise DecodeError(f"begin message must be 21 bytes, got {size}", min(size, 21))
    return Begin(*_BEGIN.unpack_from(data, 1))


def _commit(data: bytes, size: int) -> Commit:
    if size != 26:
        raise DecodeError(f"commit message must be 26 bytes, got {size}", min(size, 26))
    return Commit(*_COMMIT.unpack_from(data, 1))


def _origin(data: bytes, size: int) -> Origin:
    if size < 10:
        raise DecodeError("truncated origin message", size)
    lsn = struct.unpack_from(">Q", data, 1)[0]
    name, pos = _string(data, 9, "origin name")
    if pos != size:
        raise DecodeError(f"{size - pos} trailing bytes after origin", pos)
    return Origin(lsn, name)


def _relation(data: bytes, size: int) -> Relation:
    if size < 5:
        raise DecodeError("truncated relation header", 1)
    oid = _REL_HEAD.unpack_from(data, 1)[0]
    namespace, pos = _string(data, 5, "relation namespace")
    name, pos = _string(data, pos, "relation name")
    if pos + 3 > size:
        raise DecodeError("truncated relation: no replica identity / column count", pos)
    identity = chr(data[pos])
    if identity not in REPLICA_IDENTITIES:
        raise DecodeError(f"unknown replica identity {identity!r}", pos)
    ncols = _u16_from(data, pos + 1)[0]
    pos += 3
    columns = []
    for _ in range(ncols):
        if pos >= size:
            raise DecodeError("truncated relation column", pos)
        flags = data[pos]
        if flags > 1:
            raise DecodeError(f"unknown column flags {flags}", pos)
        column_name, pos = _string(data, pos + 1, "column name")
        if pos + 8 > size:
            raise DecodeError("truncated relation column type", pos)
        type_oid, typmod = _COLUMN_TAIL.unpack_from(data, pos)
        pos += 8
        columns.append(Column(flags == 1, column_name, type_oid, typmod))
    if pos != size:
        raise DecodeError(f"{size - pos} trailing bytes after relation", pos)
    return Relation(oid, namespace, name, identity, tuple(columns))


def _type(data: bytes, size: int) -> Type:
    if size < 5:
        raise DecodeError("truncated type header", 1)
    oid = _U32.unpack_from(data, 1)[0]
    namespace, pos = _string(data, 5, "type namespace")
    name, pos = _string(data, pos, "type name")
    if pos != size:
        raise DecodeError(f"{size - pos} trailing bytes after type", pos)
    return Type(oid, namespace, name)


def _truncate(data: bytes, size: int) -> Truncate:
    if size < 6:
        raise DecodeError("truncated truncate header", 1)
    count, options = _TRUNCATE_HEAD.unpack_from(data, 1)
    if options > 3:
        raise DecodeError(f"unknown truncate options {options}", 5)
    end = 6 + 4 * count
    if end != size:
        raise DecodeError(f"truncate of {count} relations needs {end} bytes, got {size}", min(end, size))
    oids = struct.unpack_from(f">{count}I", data, 6)
    return Truncate(oids, bool(options & 1), bool(options & 2))


def _message(data: bytes, size: int) -> Message:
    if size < 10:
        raise DecodeError("truncated logical message header", size)
    flags, lsn = _MESSAGE_HEAD.unpack_from(data, 1)
    if flags > 1:
        raise DecodeError(f"unknown logical message flags {flags}", 1)
    prefix, pos = _string(data, 10, "message prefix")
    if pos + 4 > size:
        raise DecodeError("truncated logical message length", pos)
    length = _u32_from(data, pos)[0]
    pos += 4
    if pos + length != size:
        raise DecodeError(
            f"logical message content length {length} does not match the {size - pos} bytes left", pos - 4
        )
    return Message(flags == 1, lsn, prefix, data[pos:size])


_DECODERS: dict[int, Callable[[bytes, int], PgOutputMessage]] = {
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("B"): _begin,
    ord("C"): _commit,
    ord("M"): _message,
    ord("R"): _relation,
    ord("Y"): _type,
    ord("T"): _truncate,
    ord("O"): _origin,
}


def decode(data: bytes | bytearray | memoryview) -> PgOutputMessage:
    """Decode one pgoutput (protocol 1) message; raise ``DecodeError`` on anything malformed."""
    if type(data) is not bytes:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"decode() takes bytes, bytearray or memoryview, got {type(data).__name__}")
        data = bytes(data)
    if not data:
        raise DecodeError("empty message", 0)
    decoder = _DECODERS.get(data[0])
    if decoder is None:
        raise DecodeError(f"unknown message type {chr(data[0])!r} (protocol version 1)", 0)
    return decoder(data, len(data))


# --------------------------------------------------------------------------- encoding


def _encode_string(value: str) -> bytes:
    raw = value.encode()
    if b"\0" in raw:
        raise ValueError(f"string {value!r} contains NUL, which pgoutput cannot carry")
    return raw + b"\0"


def _encode_tuple(values: tuple[TupleValue, ...]) -> bytes:
    if len(values) > 0xFFFF:
        raise ValueError(f"a tuple has at most 65535 columns, got {len(values)}")
    parts = [_U16.pack(len(values))]
    for value in values:
        if value is None:
            parts.append(b"n")
        elif value is UNCHANGED:
            parts.append(b"u")
        elif isinstance(value, bytes):
            parts.append(b"b" if isinstance(value, BinaryValue) else b"t")
            parts.append(_U32.pack(len(value)))
            parts.append(value)
        else:
            raise ValueError(f"tuple value must be bytes, None or UNCHANGED, got {value!r}")
    return b"".join(parts)


def encode(message: PgOutputMessage) -> bytes:
    """The pgoutput (protocol 1) bytes of ``message``: the exact inverse of :func:`decode`."""
    if isinstance(message, Insert):
        return b"I" + _U32.pack(message.relation_oid) + b"N" + _encode_tuple(message.new)
    if isinstance(message, Update):
        head = b"U" + _U32.pack(message.relation_oid)
        if message.old_kind is None:
            if message.old is not None:
                raise ValueError("update with an old tuple needs old_kind 'K' or 'O'")
            return head + b"N" + _encode_tuple(message.new)
        if message.old_kind not in OLD_KINDS or message.old is None:
            raise ValueError(
                f"update old_kind must be 'K' or 'O' with an old tuple, got {message.old_kind!r}"
            )
        return (
            head + message.old_kind.encode() + _encode_tuple(message.old) + b"N" + _encode_tuple(message.new)
        )
    if isinstance(message, Delete):
        if message.old_kind not in OLD_KINDS:
            raise ValueError(f"delete old_kind must be 'K' or 'O', got {message.old_kind!r}")
        return b"D" + _U32.pack(message.relation_oid) + message.old_kind.encode() + _encode_tuple(message.old)
    if isinstance(message, Begin):
        return b"B" + _BEGIN.pack(message.final_lsn, message.commit_time, message.xid)
    if isinstance(message, Commit):
        return b"C" + _COMMIT.pack(message.flags, message.commit_lsn, message.end_lsn, message.commit_time)
    if isinstance(message, Message):
        return (
            b"M"
            + _MESSAGE_HEAD.pack(1 if message.transactional else 0, message.lsn)
            + _encode_string(message.prefix)
            + _U32.pack(len(message.content))
            + bytes(message.content)
        )
    if isinstance(message, Relation):
        if message.replica_identity not in REPLICA_IDENTITIES:
            raise ValueError(
                f"replica_identity must be one of 'd', 'n', 'f', 'i', got {message.replica_identity!r}"
            )
        parts = [
            b"R",
            _U32.pack(message.oid),
            _encode_string(message.namespace),
            _encode_string(message.name),
            message.replica_identity.encode(),
            _U16.pack(len(message.columns)),
        ]
        for column in message.columns:
            parts.append(b"\1" if column.key else b"\0")
            parts.append(_encode_string(column.name))
            parts.append(_COLUMN_TAIL.pack(column.type_oid, column.type_modifier))
        return b"".join(parts)
    if isinstance(message, Type):
        return (
            b"Y" + _U32.pack(message.oid) + _encode_string(message.namespace) + _encode_string(message.name)
        )
    if isinstance(message, Truncate):
        options = (1 if message.cascade else 0) | (2 if message.restart_identity else 0)
        oids = message.relation_oids
        return b"T" + _TRUNCATE_HEAD.pack(len(oids), options) + struct.pack(f">{len(oids)}I", *oids)
    if isinstance(message, Origin):
        return b"O" + struct.pack(">Q", message.commit_lsn) + _encode_string(message.name)
    raise TypeError(f"encode() takes a pgoutput message dataclass, got {type(message).__name__}")
