"""Pure: decoded pgoutput messages of transactions → ``changes`` rows with their statement's context.

Feed messages in stream order to :meth:`Stitcher.feed`; it returns the change rows (and column-set
changes) each message produces. No I/O: what pgoutput does not say (a table's real primary key, the
``format_type`` text of its columns, whether it is one of the worker's own tables) the caller passes
to :meth:`Stitcher.add_relation` with the Relation message.

Rules (docs/architecture.md, "message protocol"):

- Context: every row change gets the last ``bemi`` message before it in its transaction, ``{}`` when
  there is none. The message's JSON text is kept as written (jsonb then holds exactly ``'<text>'::jsonb``;
  ``\\u0000`` escapes become the visible text ``\\\\u0000``); one jsonb cannot store (not UTF-8, not a JSON
  object, lone surrogate escapes, numbers outside numeric's range, deeper than 128 levels, over 16 MiB)
  becomes ``{"_bemi_error": ..., "_bemi_raw": ...}`` (see :func:`parse_context`). A signed context's
  ``"_bemi_sig"`` member is stripped and checked against ``Stitcher.context_keys``
  (:mod:`capture.signing`): ``ChangeRow.context_verified`` is True/False with keys, None without.
- ``ordinal`` counts the changes of a transaction from 0; ``position`` is the change's LSN,
  ``commit_position`` the commit LSN, ``committed_at`` the commit time.
- ``primary_key``: the table's primary key valid at the change (the recorded version; the catalog,
  given by the caller, only for a column set never recorded; else the replica identity key columns
  pgoutput flags, unless the identity is FULL): one column as its text, a composite
  key as a compact JSON array of the typed values, e.g. ``[1,"a"]``. Tables without a key get NULL.
- ``before``: the old row pgoutput sent — the whole row with REPLICA IDENTITY FULL, only the key columns
  with the default identity (sent for DELETE, and for UPDATE only when the key changed), ``{}`` when none
  (an UPDATE under the default identity that kept its key). ``after``: the new row, ``{}`` for DELETE.
  A key change is an UPDATE whose ``primary_key`` is the new key and whose ``before`` holds the old one.
- Unchanged TOAST values (pgoutput's ``'u'``) are taken from the old row when it was sent (FULL);
  otherwise the column is left out of ``after`` and named in :attr:`ChangeRow.missing`, for the sink
  to fill from the previous version of that row in ``changes``.
- Tables without a key: with REPLICA IDENTITY FULL, UPDATE and DELETE carry the whole old row in
  ``before`` and ``primary_key`` is NULL. With REPLICA IDENTITY NOTHING (or no key at all) PostgreSQL
  refuses UPDATE/DELETE on a published table and pgoutput sends no DELETE, so only INSERT and TRUNCATE
  can be recorded.
- TRUNCATE: one row per truncated table, NULL ``primary_key``, ``{}`` before and after. A TRUNCATE of
  a partition (which pgoutput does not send) arrives as ``bemi_truncate`` messages, one per row: a
  DELETE of the root with the whole old row. ``bemi_rewrite`` messages (a DDL rewrite) become UPDATEs
  with ``{}`` before and the new row after.
- ``bemi_ddl`` messages (capture/ddl.py) and Relation messages whose columns differ from the version
  recorded for the relation's OID produce :class:`SchemaChange` rows for ``changes_schemas``, with the
  events between the two versions (:data:`EVENT_KINDS`). Keys come from that record, in stream order.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final, NamedTuple

from capture.errors import DecodeError
from capture.exclude import EXCLUDE_PREFIX, Exclusions, drop_members
from capture.fastpath import RowParser, compile_row_parser, text_tuple, u32_from
from capture.pgoutput import (
    UNCHANGED,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    PgOutputMessage,
    Relation,
    Truncate,
    TupleValue,
    Unchanged,
    Update,
    pg_timestamp_to_datetime,
)
from capture.protocol import BEMI_PREFIX, CONTEXT_PREFIX, DDL_PREFIX, REWRITE_PREFIX, TRUNCATE_PREFIX
from capture.signing import KeyRing, open_context
from capture.values import (
    TypeInfo,
    ValueEncoder,
    row_json,
)

__all__ = [
    "CONTEXT_PREFIX",
    "DDL_PREFIX",
    "ChangeRow",
    "ColumnSpec",
    "KnownSchemas",
    "RelationVersion",
    "SchemaChange",
    "Stitcher",
    "parse_context",
]

EMPTY = "{}"


class _Fallback(enum.Enum):
    NOT_HANDLED = "not handled"


#: What :meth:`Stitcher.change_data` returns for a message it leaves to ``decode`` + ``change``.
NOT_HANDLED: Final = _Fallback.NOT_HANDLED
_I, _U, _D, _N, _K = (ord(c) for c in "IUDNK")


class ChangeRow(NamedTuple):
    """One row of ``changes`` (columns in COPY order, without ``id``) plus TOAST columns to fill."""

    primary_key: str | None
    table: str
    operation: str
    before: str
    after: str
    context: str
    committed_at: datetime
    schema: str
    database: str
    transaction_id: int | None  # NULL for SNAPSHOT rows
    position: int
    commit_position: int
    ordinal: int
    missing: tuple[str, ...] = ()
    previous_key: str | None = None  # where to look for ``missing`` values when the key changed
    #: the context's signature verified (True), not (False), or the worker has no key (None)
    context_verified: bool | None = None
    #: an UPDATE that moved its row's key: the old key, written like ``primary_key``; else None
    before_primary_key: str | None = None


#: The ``changes`` columns a :class:`ChangeRow` fills, in its field order.
CHANGE_COLUMNS = ChangeRow._fields[:13]
_new_row = tuple.__new__


class ColumnSpec(NamedTuple):
    """One column of a table version as stored in ``changes_schemas.columns``.

    ``attnum`` is PostgreSQL's attribute number (stable across renames, never reused after a drop);
    None when only a Relation message described the column (DDL tracking off).
    """

    name: str
    type: str
    type_oid: int
    key: bool
    attnum: int | None = None


@dataclass(frozen=True)
class SchemaChange:
    """A relation's version valid from ``(commit_position, ordinal, step)`` on; ``columns`` is JSON text.

    ``event`` is a JSON array of what happened (see :data:`EVENT_KINDS`), ``context`` the ``bemi``
    context valid when it happened, ``step`` orders the versions recorded at one ``(commit_position,
    ordinal)`` (several DDL statements between two row changes).
    """

    schema: str
    table: str
    commit_position: int
    ordinal: int
    committed_at: datetime
    columns: str
    relation_oid: int | None = None
    event: str = "[]"
    context: str = EMPTY
    replica_identity: str | None = None
    step: int = 0


#: The ``kind`` of each object in ``changes_schemas.event`` (docs: "The schema record").
EVENT_KINDS = (
    "create_table",  # CREATE TABLE (DDL tracking): a new relation, empty at this position
    "new_relation",  # first sight of a relation without its CREATE (snapshot, Relation message)
    "drop_table",  # DROP TABLE: every row of the relation is gone; columns is []
    "rename_table",  # {"old": {"schema", "table"}, "new": {...}}
    "add_column",  # {"attnum", "name", "fill"?}
    "drop_column",  # {"attnum", "name"}
    "rename_column",  # {"attnum", "old", "new"}
    "alter_column_type",  # {"attnum", "name", "old", "new"} (format_type texts)
    "primary_key",  # {"old": [names], "new": [names]}
    "replica_identity",  # {"old", "new"}: pg_class.relreplident letters d/n/f/i
    "attach_partition",  # {"partition": {"oid", "schema", "table"}}: its rows follow as CREATEs of the root
    "detach_partition",  # {"partition": ...}: its rows follow as DELETEs of the root (and start its own)
    "untracked",  # {"what": "ddl" | "context" | "truncate", "reason"}: a tracking gap begins
    "tracked",  # {"what": ..., "empty": bool}: tracking (re)starts; empty says the table had no rows
    "rewrite",  # {"captured": bool, "reason": int, "partition"?}: a DDL gave rows new values; captured:
    # every row follows as an UPDATE (same transaction, next ordinals); not captured: a gap
    "exclude",  # {"columns": [names]}: these columns are not recorded (capture/exclude.py)
)


@dataclass(frozen=True)
class RelationVersion:
    """The last recorded version of one relation: what keys and later versions are computed from."""

    oid: int | None
    schema: str
    table: str
    columns: tuple[ColumnSpec, ...]
    replica_identity: str | None = None
    tracked: bool = True  # False inside a tracking gap (an ``untracked`` event without ``tracked`` after)
    #: commit position of a version loaded from ``changes_schemas`` (0 for one recorded by this stitcher):
    #: a Relation message of a transaction at or before it is a replay of what the destination holds
    position: int = 0


@dataclass
class KnownSchemas:
    """The last recorded version of every live relation, by OID and by its current name.

    ``by_name`` also holds versions recorded before relation OIDs were (first release, ``oid`` None).
    """

    by_oid: dict[int, RelationVersion] = field(default_factory=dict)
    by_name: dict[tuple[str, str], RelationVersion] = field(default_factory=dict)

    def get(self, oid: int | None, schema: str, table: str) -> RelationVersion | None:
        """The version of relation ``oid``; for an OID never recorded, a legacy version of that name."""
        if oid is not None and oid in self.by_oid:
            return self.by_oid[oid]
        legacy = self.by_name.get((schema, table))
        return legacy if legacy is not None and legacy.oid is None else None

    def record(self, version: RelationVersion, previous: RelationVersion | None) -> None:
        if previous is not None:
            self.forget(previous)
        if version.oid is not None:
            self.by_oid[version.oid] = version
        self.by_name[(version.schema, version.table)] = version

    def forget(self, version: RelationVersion) -> None:
        if version.oid is not None:
            self.by_oid.pop(version.oid, None)
        if self.by_name.get((version.schema, version.table)) is version:
            del self.by_name[(version.schema, version.table)]


@dataclass
class _Table:
    relation: Relation
    ignored: bool
    names: tuple[str, ...] = ()
    encoder: ValueEncoder | None = None
    key_indexes: tuple[int, ...] = ()  # primary key columns (catalog, else replica identity)
    identity_indexes: tuple[int, ...] = ()  # columns of a 'K' old tuple
    full_identity: bool = False
    #: ``parse(data)``: (after JSON, primary_key) of an Insert / Update-without-old-tuple, or None
    parse: RowParser | None = None


def _key_text(table: _Table, key_values: Sequence[TupleValue]) -> str | None:
    """``primary_key`` from the key columns' values: one column as its text, several as a JSON array."""
    if len(key_values) == 1:
        raw = key_values[0]
        return raw.decode() if isinstance(raw, bytes) else None
    if not key_values:
        return None
    assert table.encoder is not None
    parts = []
    for i, raw in zip(table.key_indexes, key_values, strict=True):
        if isinstance(raw, Unchanged):
            return None
        parts.append(table.encoder.value_json(i, raw))
    return "[" + ",".join(parts) + "]"


def _hide_columns(columns: str, hidden: frozenset[str]) -> str:
    """A ``changes_schemas.columns`` JSON array without the columns named in ``hidden`` (others verbatim)."""
    decoder = json.JSONDecoder()
    items = json.loads(columns)
    if not any(isinstance(c, dict) and c.get("name") in hidden for c in items):
        return columns
    kept: list[str] = []
    pos = columns.index("[") + 1
    for item in items:
        while columns[pos] in " \t\n\r,":
            pos += 1
        _, end = decoder.raw_decode(columns, pos)
        if not (isinstance(item, dict) and item.get("name") in hidden):
            kept.append(columns[pos:end])
        pos = end
    return "[" + ",".join(kept) + "]"


#: Events about one column, and the members naming it.
_COLUMN_EVENTS = {"add_column": ("name",), "drop_column": ("name",), "rename_column": ("old", "new"),
                  "alter_column_type": ("name",)}


def _mentions(event: Mapping[str, Any], hidden: frozenset[str]) -> bool:
    """Whether ``event`` is about an excluded column (then it is left out of the record)."""
    return any(event.get(m) in hidden for m in _COLUMN_EVENTS.get(str(event.get("kind")), ()))


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _columns_text(
    columns: Sequence[ColumnSpec], type_info: Mapping[int, TypeInfo], fills: Mapping[str, str] | None = None
) -> str:
    """``changes_schemas.columns`` of a version (:func:`column_json` each, plus ``fill`` where given)."""
    parts = []
    for col in columns:
        text = column_json(col, type_info)
        if fills and col.name in fills:
            text = f'{text[:-1]},"fill":{fills[col.name]}}}'
        parts.append(text)
    return "[" + ",".join(parts) + "]"


def _diff(
    old: RelationVersion | None, new: RelationVersion, fills: Mapping[str, str], command: str | None
) -> list[dict[str, Any]]:
    """The events that turn ``old`` into ``new``: columns matched by attnum where both sides know it
    (a rename is a rename), else by name; fills of added columns travel in ``columns``."""
    if old is None:
        return [{"kind": "create_table" if command in _CREATES else "new_relation"}]
    events: list[dict[str, Any]] = []
    if (old.schema, old.table) != (new.schema, new.table):
        events.append({"kind": "rename_table", "old": {"schema": old.schema, "table": old.table},
                       "new": {"schema": new.schema, "table": new.table}})
    by_attnum = all(c.attnum is not None for c in old.columns + new.columns)
    def ident(c: ColumnSpec) -> int | str | None:
        return c.attnum if by_attnum else c.name
    before = {ident(c): c for c in old.columns}
    after = {ident(c): c for c in new.columns}
    for k, col in before.items():
        if k not in after:
            events.append({"kind": "drop_column", "attnum": col.attnum, "name": col.name})
    for k, col in after.items():
        was = before.get(k)
        if was is None:
            event: dict[str, Any] = {"kind": "add_column", "attnum": col.attnum, "name": col.name}
            if col.name in fills:
                event["fill"] = json.loads(fills[col.name])
            events.append(event)
            continue
        if was.name != col.name:
            events.append({"kind": "rename_column", "attnum": col.attnum, "old": was.name, "new": col.name})
        if (was.type, was.type_oid) != (col.type, col.type_oid):
            events.append({"kind": "alter_column_type", "attnum": col.attnum, "name": col.name,
                           "old": was.type, "new": col.type})
    old_key = [c for c in old.columns if c.key]
    new_key = [c for c in new.columns if c.key]
    if [ident(c) for c in old_key] != [ident(c) for c in new_key]:
        events.append({"kind": "primary_key", "old": [c.name for c in old_key],
                       "new": [c.name for c in new_key]})
    if old.replica_identity is not None and new.replica_identity is not None and (
        old.replica_identity != new.replica_identity
    ):
        events.append({"kind": "replica_identity", "old": old.replica_identity, "new": new.replica_identity})
    return events


_CREATES = frozenset({"CREATE TABLE", "CREATE TABLE AS", "SELECT INTO"})


#: Deepest nesting of a context (the object itself is level 1): ``set_context`` refuses deeper ones and
#: the worker stores them as an error. jsonb would take a few thousand levels, Python's json about 1000.
MAX_CONTEXT_DEPTH = 128
#: Largest ``bemi`` message the worker stores as a context (jsonb's binary form, up to ~5x the text, must
#: stay under its 256 MB limit); ``set_context``'s own limit (1 MiB by default) is far below.
MAX_CONTEXT_BYTES = 16 * 1024 * 1024
#: numeric's limits (PostgreSQL's numeric.c): at most 16383 digits after the point, the first digit at
#: most at 10^131071, an exponent below INT_MAX / 2 (PostgreSQL 15: exclusive, 18: inclusive).
_NUMERIC_MAX_SCALE = 16383
_NUMERIC_MAX_POWER = 131071
_NUMERIC_MAX_EXPONENT = 1073741822
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def numeric_literal_fits(literal: str) -> bool:
    """Whether a JSON number literal fits PostgreSQL's ``numeric`` (as jsonb stores it), exactly.

    Mirrors ``numeric_in``: the scale is the digits after the point minus the exponent (at least 0), the
    weight is the power of ten of the first non-zero digit; zero has no weight.
    """
    if len(literal) < 300 and "e" not in literal and "E" not in literal:
        return True  # the common case: too few digits to overflow
    mantissa, _, exp_text = literal.lower().partition("e")
    exponent = 0
    if exp_text:
        digits = exp_text.lstrip("+-").lstrip("0")
        if len(digits) > 10:
            return False
        exponent = int(digits or "0")
        if exponent > _NUMERIC_MAX_EXPONENT:
            return False
        if exp_text[0] == "-":
            exponent = -exponent
    whole, _, fraction = mantissa.lstrip("-").partition(".")
    if len(fraction) - exponent > _NUMERIC_MAX_SCALE:
        return False
    digits = whole + fraction
    stripped = digits.lstrip("0")
    if not stripped:
        return True
    power = len(whole) - 1 - (len(digits) - len(stripped)) + exponent
    return power <= _NUMERIC_MAX_POWER


class _ContextRejected(ValueError):
    """A JSON context that jsonb cannot store; the message is the reason."""


def _check_number(literal: str) -> int:
    if not numeric_literal_fits(literal):
        raise _ContextRejected(
            f"context number {_shorten(literal)} is outside the range of PostgreSQL numeric"
        )
    return 0  # the value itself is never used: the text travels verbatim


def _reject_constant(name: str) -> Any:
    raise _ContextRejected(f"context is not valid JSON: {name} is not a JSON value")


#: Checks every number as written and keeps none (the text is what travels).
_DECODER = json.JSONDecoder(
    parse_float=_check_number, parse_int=_check_number, parse_constant=_reject_constant
)


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (an object or array is one level), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _check_strings(items: Iterable[Any]) -> None:
    """Raise if a string among ``items`` (or in their arrays) holds a lone surrogate (objects are checked
    by their own hook call)."""
    stack = list(items)
    while stack:
        item = stack.pop()
        if type(item) is str:
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise _ContextRejected(
                    "context holds a lone surrogate escape (\\ud800-\\udfff), which jsonb cannot store"
                ) from None
        elif type(item) is list:
            stack.extend(item)


def _check_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook: every key and value, also of duplicate keys jsonb drops (its parser sees them)."""
    _check_strings(key for key, _ in pairs)
    _check_strings(value for _, value in pairs)
    return {}


#: Only for texts with a surrogate escape: checks each string as written (the plain decoder would let a
#: duplicate key hide one); returns empty objects, the values are not needed.
_SURROGATE_DECODER = json.JSONDecoder(
    object_pairs_hook=_check_pairs,
    parse_float=_check_number,
    parse_int=_check_number,
    parse_constant=_reject_constant,
)


def _error_context(reason: str, content: bytes) -> str:
    if len(content) > MAX_CONTEXT_BYTES:
        content = content[:MAX_CONTEXT_BYTES]
    raw = content.decode("utf-8", "replace").replace("\x00", "\\u0000")
    return json.dumps({"_bemi_error": reason, "_bemi_raw": raw}, ensure_ascii=False, separators=(",", ":"))


def parse_context(content: bytes) -> str:
    """A ``bemi`` message's content as JSON object text that jsonb stores exactly as the sender wrote it.

    The text is kept verbatim (never re-encoded: jsonb keeps ``10.10``, ``1e400`` and long decimals
    exactly; Python floats would not), only checked against what jsonb rejects. ``\\u0000`` escapes,
    which jsonb cannot hold, become the visible text ``\\\\u0000``. Anything else jsonb would refuse (not
    UTF-8, not a JSON object, lone surrogate escapes, numbers outside numeric's range, nesting deeper than
    :data:`MAX_CONTEXT_DEPTH`, over :data:`MAX_CONTEXT_BYTES`) gives ``{"_bemi_error": <reason>,
    "_bemi_raw": <text>}``, so no message can stop the worker.
    """
    if len(content) > MAX_CONTEXT_BYTES:
        return _error_context(
            f"context is {len(content)} bytes, over the worker's limit of {MAX_CONTEXT_BYTES}", content
        )
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _error_context(f"context is not valid UTF-8: {exc.reason} at byte {exc.start}", content)
    try:
        value = _DECODER.decode(text)
    except _ContextRejected as exc:
        return _error_context(str(exc), content)
    except RecursionError:
        return _error_context(f"context is nested deeper than {MAX_CONTEXT_DEPTH} levels", content)
    except ValueError as exc:
        return _error_context(f"context is not valid JSON: {exc}", content)
    if type(value) is not dict:
        return _error_context(f"context must be a JSON object, got {type(value).__name__}", content)
    if text.count("{") + text.count("[") > MAX_CONTEXT_DEPTH and _depth(value) > MAX_CONTEXT_DEPTH:
        return _error_context(f"context is nested deeper than {MAX_CONTEXT_DEPTH} levels", content)
    if "\\u" in text:
        if _SURROGATE_ESCAPE.search(text):
            try:
                _SURROGATE_DECODER.decode(text)
            except _ContextRejected as exc:
                return _error_context(str(exc), content)
        if "\\u0000" in text:
            text = _NUL_ESCAPE.sub(r"\1\\\\u0000", text)
    return text


def column_json(col: ColumnSpec, type_info: Mapping[int, TypeInfo]) -> str:
    """One column of ``changes_schemas.columns``; a domain also gets ``base_type``, the ``typname`` of the
    type under all its domains (``int4``), so that readers type its values like the base type's; ``attnum``
    when known."""
    item: dict[str, Any] = {"name": col.name, "type": col.type, "type_oid": col.type_oid, "key": col.key}
    if col.attnum is not None:
        item["attnum"] = col.attnum
    info, seen = type_info.get(col.type_oid), 0
    while info is not None and info.base_oid and seen < 32:  # domains over domains
        info, seen = type_info.get(info.base_oid), seen + 1
    if seen and info is not None:
        item["base_type"] = info.name
    return json.dumps(item, ensure_ascii=False, separators=(",", ":"))


@dataclass
class Stitcher:
    """Turns a stream of decoded messages into change rows; keeps relations across transactions.

    ``database`` is the source database's name; ``type_info`` maps type OIDs to
    :class:`capture.values.TypeInfo` (see ``values.TYPE_INFO_QUERY``); ``known_columns`` holds the
    last version of every relation recorded in ``changes_schemas`` (``Sink.known_columns``), the record
    keys are computed from; ``ignored_tables`` are the worker's own tables, whose DDL is not recorded.
    """

    database: str
    type_info: Mapping[int, TypeInfo]
    known_columns: KnownSchemas = field(default_factory=KnownSchemas)
    ignored_tables: set[tuple[str, str]] = field(default_factory=set)
    ignored_schemas: set[str] = field(default_factory=set)
    #: the keys signed contexts are checked with (None: ``context_verified`` stays None)
    context_keys: KeyRing | None = None
    #: tables and columns never recorded (capture/exclude.py); updated in place by ``bemi_exclude``
    exclusions: Exclusions = field(default_factory=Exclusions)
    #: what the schema record last said per table (``capture.exclude.recorded_exclusions``): excluded
    #: columns, or None for an excluded table; a ``bemi_exclude`` message records what differs from it
    recorded_exclusions: dict[tuple[str, str], frozenset[str] | None] = field(default_factory=dict)
    _tables: dict[int, _Table] = field(default_factory=dict)
    _xid: int = 0
    _commit_lsn: int = 0
    _committed_at: datetime | None = None
    _ordinal: int = 0
    _step: int = 0  # versions recorded in the current transaction
    _context: str = EMPTY
    _last_content: bytes | None = None
    _last_context: str = EMPTY
    _verified: bool | None = None
    _last_verified: bool | None = None
    _in_transaction: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.database, str) or not self.database:
            raise ValueError(f"database must be a non-empty str, got {self.database!r}")

    # -- relations ---------------------------------------------------------------------------------
    def add_relation(
        self,
        relation: Relation,
        *,
        primary_key: Sequence[str] | None = None,
        type_names: Sequence[str] | None = None,
        ignored: bool = False,
    ) -> list[SchemaChange]:
        """Register a Relation message; returns a schema change when the relation's version is new.

        Keys come from the version recorded for the relation's OID in stream order (``bemi_ddl``
        messages, the snapshot, earlier Relation messages), so a worker decoding long after a DDL still
        uses the key valid at each change. ``primary_key`` (the catalog's key column names *now*) and
        ``type_names`` (``format_type`` text per column) are used only when the Relation message shows
        a column set the record does not know (DDL tracking off). Without any key: the replica identity
        key flags unless the identity is FULL. ``ignored``: the worker's own tables.
        """
        if not isinstance(relation, Relation):
            raise TypeError(f"add_relation() takes a Relation, got {type(relation).__name__}")
        if ignored:
            self._tables[relation.oid] = _Table(relation, True)
            return []
        columns = relation.columns
        previous = self.known_columns.get(relation.oid, relation.namespace, relation.name)
        if previous is not None and [(c.name, c.type_oid) for c in previous.columns] == [
            (c.name, c.type_oid) for c in columns
        ]:
            spec = previous.columns  # the record describes exactly these columns: its keys and attnums hold
        else:
            if type_names is None:
                type_names = [str(c.type_oid) for c in columns]
            names = [c.name for c in columns]
            keys = set(primary_key or ()) if set(primary_key or ()) <= set(names) else set()
            attnums = {c.name: c.attnum for c in previous.columns} if previous is not None else {}
            spec = tuple(
                ColumnSpec(c.name, type_names[i], c.type_oid, c.name in keys, attnums.get(c.name))
                for i, c in enumerate(columns)
            )
        self._register(relation, spec)
        if previous is not None and self._committed_at is not None and self._commit_lsn <= previous.position:
            # a transaction the destination already holds, decoded again (the worker skips its rows):
            # the record is ahead of this Relation message and stays as it is
            return []
        version = RelationVersion(
            relation.oid, relation.namespace, relation.name, spec, relation.replica_identity,
            previous.tracked if previous is not None else True,
        )
        return self._schema_change(version, previous, None, [])

    def _register(self, relation: Relation, spec: Sequence[ColumnSpec]) -> None:
        """(Re)build the decoding state of ``relation`` with the key columns ``spec`` marks."""
        columns = relation.columns
        names = tuple(c.name for c in columns)
        identity = tuple(i for i, c in enumerate(columns) if c.key)
        full = relation.replica_identity == "f"
        keys = tuple(i for i, col in enumerate(spec) if col.key)
        if not keys and not full:
            keys = identity
        encoder = ValueEncoder([c.type_oid for c in columns], self.type_info, names=names)
        assert encoder.names is not None
        parse = compile_row_parser(encoder.converters, encoder.names, encoder.order, keys)
        # an excluded table is decoded like any other (it may be included again), its rows never emitted
        excluded = self.exclusions.table(relation.namespace, relation.name)
        self._tables[relation.oid] = _Table(relation, excluded, names, encoder, keys, identity, full, parse)

    def _schema_change(
        self,
        version: RelationVersion,
        previous: RelationVersion | None,
        fills: Mapping[str, str] | None,
        events: list[dict[str, Any]],
        *,
        command: str | None = None,
    ) -> list[SchemaChange]:
        """Record ``version`` (after ``previous``) with the events telling them apart; [] if unchanged."""
        events = _diff(previous, version, fills or {}, command) + events
        self.known_columns.record(version, previous)
        if not events or self._committed_at is None:
            return []
        if command is not None:
            events = [{**e, "command": command} for e in events]
        return self._version(version, _columns_text(version.columns, self.type_info, fills), events)

    def _version(
        self, version: RelationVersion, columns: str, events: list[dict[str, Any]]
    ) -> list[SchemaChange]:
        """A ``changes_schemas`` row at the current position, taking the next step; [] when excluded.

        An excluded table gets no version (only the ``untracked`` one its exclusion records); a table with
        excluded columns gets versions without them, without the events about them, and with an
        ``exclude`` event naming them.
        """
        assert self._committed_at is not None
        if self.exclusions:
            name = (version.schema, version.table)
            excluding = any(e.get("command") == "EXCLUDE" for e in events)
            if name in self.exclusions.tables and not excluding:
                return []
            hidden = self.exclusions.columns.get(name)
            if hidden:
                columns = _hide_columns(columns, hidden)
                events = [e for e in events if not _mentions(e, hidden)]
                if not events:
                    return []  # only about excluded columns (e.g. a restart's first Relation message)
                if not any(e.get("kind") == "exclude" for e in events):
                    events = [*events, {"kind": "exclude", "columns": sorted(hidden)}]
            if name in self.exclusions.tables:
                self.recorded_exclusions[name] = None
            elif hidden:
                self.recorded_exclusions[name] = hidden
            else:
                self.recorded_exclusions.pop(name, None)
        step = self._step
        self._step = step + 1
        return [SchemaChange(
            version.schema, version.table, self._commit_lsn, self._ordinal, self._committed_at, columns,
            version.oid, _json(events), self._context, version.replica_identity, step,
        )]

    def _exclude(self, content: bytes) -> list[SchemaChange]:
        """A ``bemi_exclude`` message: take the new configuration, record it for the tables it changes."""
        try:
            new = Exclusions.from_config(json.loads(content.decode("utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError):
            return []  # not ours to interpret; never stop the worker
        self.exclusions.replace(new)
        for table in self._tables.values():
            if table.encoder is not None:  # not one of the worker's own tables
                rel = table.relation
                table.ignored = new.table(rel.namespace, rel.name)
        # compared with what the record says (the worker may have started with this configuration already)
        recorded = self.recorded_exclusions
        out: list[SchemaChange] = []
        for name in sorted(new.tables | set(new.columns) | set(recorded)):
            version = self.known_columns.by_name.get(name)
            if version is None or self._committed_at is None:
                continue
            said = recorded.get(name, frozenset())
            columns = _columns_text(version.columns, self.type_info)
            if new.table(*name) != (said is None):
                if new.table(*name):
                    self.known_columns.record(replace(version, tracked=False), version)
                    event: dict[str, Any] = {"kind": "untracked", "what": "table", "reason": "excluded"}
                else:  # its rows are recorded again from here on, without a baseline
                    self.known_columns.record(replace(version, tracked=True), version)
                    event = {"kind": "tracked", "what": "table", "empty": False}
                out += self._version(version, columns, [{**event, "command": "EXCLUDE"}])
            elif not new.table(*name) and said != new.columns_of(*name):
                out += self._version(version, columns, [
                    {"kind": "exclude", "columns": sorted(new.columns_of(*name)), "command": "EXCLUDE"}])
        return out

    def _ddl(self, content: bytes) -> list[SchemaChange]:
        try:
            event = json.loads(content.decode("utf-8"))
            schema, table = str(event["schema"]), str(event["table"])
            columns = event.get("columns")
            oid = int(event["oid"]) if event.get("oid") is not None else None
            command = str(event.get("event") or "")
        except (ValueError, KeyError, TypeError):
            return []  # not ours to interpret; never stop the worker
        if (schema, table) in self.ignored_tables or schema in self.ignored_schemas:
            return []
        previous = self.known_columns.get(oid, schema, table)
        if command == "UNTRACK" and columns is None:
            # a table without the context trigger (bemi_tt/triggers.py): its rows carry no context
            if previous is None or self._committed_at is None:
                return []
            return self._version(previous, _columns_text(previous.columns, self.type_info), [
                {"kind": "untracked", "what": str(event.get("what") or "context"),
                 "reason": event.get("reason"), "command": command}])
        if columns is None:  # a dropped table: every row of it is gone
            if previous is None or (oid is None and previous.oid is not None):
                return []
            self.known_columns.forget(previous)
            if self._committed_at is None:
                return []
            return self._version(previous, "[]", [{"kind": "drop_table", "command": command}])
        spec = []
        fills: dict[str, str] = {}
        try:
            for col in columns:
                attnum = col.get("attnum")
                spec.append(ColumnSpec(str(col["name"]), str(col["type"]), int(col["type_oid"]),
                                       bool(col["key"]), None if attnum is None else int(attnum)))
                fill = col.get("fill_text")
                if fill is not None:
                    encoder = ValueEncoder([int(col["type_oid"])], self.type_info)
                    fills[str(col["name"])] = encoder.value_json(0, str(fill).encode())
        except (ValueError, KeyError, TypeError, AttributeError):
            return []
        identity = event.get("replica_identity")
        version = RelationVersion(oid, schema, table, tuple(spec),
                                  str(identity) if identity is not None else None,
                                  previous.tracked if previous is not None else True)
        events: list[dict[str, Any]] = []
        if command == "REWRITE":  # the rows follow as UPDATEs (captured) or the values are a gap
            events = [{"kind": "rewrite", "captured": bool(event.get("captured")),
                       "reason": event.get("reason")}]
            if event.get("partition") is not None:
                events[0]["partition"] = event["partition"]
            fills = {}
        elif command in ("ATTACH PARTITION", "DETACH PARTITION") and isinstance(event.get("partition"), dict):
            # the root gained or lost a partition's rows (they follow as CREATEs / DELETEs of the root)
            events = [{"kind": "attach_partition" if command == "ATTACH PARTITION" else "detach_partition",
                       "partition": event["partition"]}]
            fills = {}
        elif command in ("TRACK", "UNTRACK"):
            # install / uninstall: a gap starts, or tracking (re)starts; a repeated install is no event
            what = str(event.get("what") or "ddl")
            if command == "UNTRACK":
                version = replace(version, tracked=False)
                events = [{"kind": "untracked", "what": what}]
                if event.get("reason"):  # DISABLE TRIGGER, DROP TABLE of a partition
                    events[0]["reason"] = event["reason"]
            else:
                version = replace(version, tracked=True)
                if previous is None or not previous.tracked:
                    events = [{"kind": "tracked", "what": what, "empty": event.get("empty")}]
            fills = {}  # attmissingval at install is no new column
        out = self._schema_change(version, previous, fills, events, command=command)
        table_state = self._tables.get(oid) if oid is not None else None
        if table_state is not None and not table_state.ignored and table_state.names == tuple(
            c.name for c in spec
        ):
            self._register(table_state.relation, spec)  # the key may have changed without a new Relation
        return out

    # -- the stream --------------------------------------------------------------------------------
    def feed(self, lsn: int, message: PgOutputMessage) -> list[ChangeRow | SchemaChange]:
        """Process one message at ``lsn``; return the rows it produces (usually zero or one)."""
        kind = type(message)
        if kind is Insert or kind is Update or kind is Delete:
            row = self.change(lsn, message)  # type: ignore[arg-type]
            return [] if row is None else [row]
        if kind is Message:
            assert isinstance(message, Message)
            if not message.transactional or not self._in_transaction:
                return []
            if message.prefix == CONTEXT_PREFIX or message.prefix == BEMI_PREFIX:
                content = message.content
                if content != self._last_content:
                    self._last_content = content
                    body, self._last_verified = open_context(content, self.context_keys)
                    self._last_context = parse_context(body)
                self._context = self._last_context
                self._verified = self._last_verified
            elif message.prefix == DDL_PREFIX:
                return list(self._ddl(message.content))
            elif message.prefix == EXCLUDE_PREFIX:
                return list(self._exclude(message.content))
            elif message.prefix == TRUNCATE_PREFIX or message.prefix == REWRITE_PREFIX:
                return list(self._message_row(lsn, message.prefix, message.content))
            return []
        if kind is Begin:
            assert isinstance(message, Begin)
            self._xid = message.xid
            self._commit_lsn = message.final_lsn
            self._committed_at = pg_timestamp_to_datetime(message.commit_time)
            self._ordinal = 0
            self._step = 0
            self._context = EMPTY
            self._verified = None if self.context_keys is None else False
            self._in_transaction = True
            return []
        if kind is Commit:
            self._in_transaction = False
            self._committed_at = None
            return []
        if kind is Relation:
            assert isinstance(message, Relation)
            if message.oid in self._tables and self._tables[message.oid].relation == message:
                return []
            return list(self.add_relation(message))
        if kind is Truncate:
            assert isinstance(message, Truncate)
            return list(self._truncate(lsn, message))
        return []  # Origin, Type: nothing to record

    def feed_all(self, messages: Iterable[tuple[int, PgOutputMessage]]) -> list[ChangeRow | SchemaChange]:
        """Convenience for tests and small streams: feed every ``(lsn, message)`` pair."""
        out: list[ChangeRow | SchemaChange] = []
        for lsn, message in messages:
            out.extend(self.feed(lsn, message))
        return out

    def knows(self, relation_oid: int) -> bool:
        """Whether a Relation message for ``relation_oid`` was registered."""
        return relation_oid in self._tables

    def _table(self, oid: int) -> _Table:
        try:
            return self._tables[oid]
        except KeyError:
            raise ValueError(f"change for relation {oid} before its Relation message") from None

    def _emit(self, rel: Relation, key: str | None, operation: str, before: str, after: str, lsn: int,
              missing: tuple[str, ...] = (), previous: str | None = None,
              moved_from: str | None = None) -> ChangeRow:
        """A change row of the current transaction, taking the next ordinal."""
        assert self._committed_at is not None
        ordinal = self._ordinal
        self._ordinal = ordinal + 1
        if self.exclusions.columns:
            hidden = self.exclusions.columns.get((rel.namespace, rel.name))
            if hidden:  # excluded columns never reach ``changes`` (nor the TOAST values the sink fills)
                before = drop_members(before, hidden)
                after = drop_members(after, hidden)
                missing = tuple(m for m in missing if m not in hidden)
        # ChangeRow's own __new__ is a Python function building this same tuple: one frame less per row
        return _new_row(ChangeRow, (key, rel.name, operation, before, after, self._context,
                                    self._committed_at, rel.namespace, self.database, self._xid, lsn,
                                    self._commit_lsn, ordinal, missing, previous, self._verified, moved_from))

    def _truncate(self, lsn: int, message: Truncate) -> list[ChangeRow]:
        rows = []
        assert self._committed_at is not None
        for oid in message.relation_oids:
            table = self._table(oid)
            if table.ignored:
                continue
            rows.append(self._emit(table.relation, None, "TRUNCATE", EMPTY, EMPTY, lsn))
        return rows

    def _message_row(self, lsn: int, prefix: str, content: bytes) -> list[ChangeRow]:
        """A row change the WAL has no row message for, from a ``bemi_truncate`` / ``bemi_rewrite`` one.

        TRUNCATE of one partition: a DELETE of the root with the whole old row in ``before``. A DDL
        rewrite: an UPDATE with the new row in ``after`` and ``{}`` in ``before`` (the old values are
        the row's previous version). The columns, their order and the key are the root's version valid
        here (the record); the values are text in the worker's output settings, converted like pgoutput's.
        """
        try:
            event = json.loads(content.decode("utf-8"))
            root = int(event["root"])
            row = event["row"]
            if not isinstance(row, dict):
                return []
        except (ValueError, KeyError, TypeError):
            return []
        version = self.known_columns.by_oid.get(root)
        if version is None or self._committed_at is None:
            return []  # a root never recorded (ignored, or tracked only later): nothing to attribute
        spec = version.columns
        names = tuple(c.name for c in spec)
        table = self._tables.get(root)
        if (table is not None and table.ignored) or self.exclusions.table(version.schema, version.table):
            return []
        if (
            table is not None
            and table.names == names
            and tuple(c.type_oid for c in table.relation.columns) == tuple(c.type_oid for c in spec)
            and table.encoder is not None
        ):  # the Relation message may predate the version (a type change is sent at the next row)
            encoder = table.encoder
        else:
            encoder = ValueEncoder([c.type_oid for c in spec], self.type_info, names=names)
        values = [None if row.get(n) is None else str(row[n]).encode() for n in names]
        keys = [i for i, c in enumerate(spec) if c.key]
        key: str | None = None
        if len(keys) == 1:
            raw = values[keys[0]]
            key = None if raw is None else raw.decode()
        elif keys:
            key = "[" + ",".join(encoder.value_json(i, values[i]) for i in keys) + "]"
        rel = table.relation if table is not None else Relation(
            root, version.schema, version.table, version.replica_identity or "d",
            tuple(Column(c.key, c.name, c.type_oid, -1) for c in spec),
        )
        row_json = encoder.row_json(values)
        if prefix == TRUNCATE_PREFIX:
            return [self._emit(rel, key, "DELETE", row_json, EMPTY, lsn)]
        if event.get("op") == "CREATE":  # rows an ATTACH/DETACH PARTITION brought into the relation
            return [self._emit(rel, key, "CREATE", EMPTY, row_json, lsn)]
        return [self._emit(rel, key, "UPDATE", EMPTY, row_json, lsn)]

    def _key(
        self, table: _Table, values: Sequence[TupleValue], fallback: Sequence[TupleValue] | None
    ) -> str | None:
        """``primary_key`` of a tuple; key values it lacks (unchanged TOAST) come from ``fallback``."""
        keys = table.key_indexes
        if fallback is None:
            return _key_text(table, [values[i] for i in keys])
        single = len(keys) == 1
        return _key_text(table, [
            fallback[i] if values[i] is UNCHANGED or (single and values[i] is None) else values[i]
            for i in keys
        ])

    def _row(
        self, table: _Table, values: Sequence[TupleValue], indexes: Iterable[int] | None = None
    ) -> tuple[str, tuple[str, ...]]:
        """JSON object of ``values`` (only ``indexes`` if given) and the names of unchanged-TOAST columns."""
        encoder = table.encoder
        assert encoder is not None
        if len(values) != len(table.names):
            rel = table.relation
            raise DecodeError(
                f"a tuple of {len(values)} values for {rel.namespace}.{rel.name}, whose Relation message "
                f"has {len(table.names)} columns: the stream is corrupt or out of order"
            )
        if indexes is None and UNCHANGED not in values:
            return encoder.row_json(values), ()  # type: ignore[arg-type]
        encode = encoder.value_json
        names = table.names
        out_names: list[str] = []
        fragments: list[str] = []
        missing: list[str] = []
        for i in range(len(values)) if indexes is None else indexes:
            raw = values[i]
            if isinstance(raw, Unchanged):
                missing.append(names[i])
                continue
            out_names.append(names[i])
            fragments.append(encode(i, raw))
        return row_json(out_names, fragments), tuple(missing)

    def change_data(self, lsn: int, data: bytes) -> ChangeRow | _Fallback | None:
        """The row of an Insert, Update or Delete message given as pgoutput bytes, or :data:`NOT_HANDLED`.

        The worker's fast path, equal to ``change(lsn, decode(data))`` for the common messages (every
        value text or NULL; Update without old tuple; Delete with a key-only old tuple) and for rows of
        ignored tables; anything else (and anything malformed) is :data:`NOT_HANDLED`.
        """
        size = len(data)
        kind = data[0] if size >= 8 else 0
        if kind != _I and kind != _U and kind != _D:
            return NOT_HANDLED
        table = self._tables.get(u32_from(data, 1)[0])
        if table is None:
            return NOT_HANDLED
        if table.ignored:
            return None
        committed_at = self._committed_at
        marker = data[5]
        if committed_at is None or marker != (_K if kind == _D else _N):
            return NOT_HANDLED
        try:
            if kind == _D:
                parsed = text_tuple(data, 6)
                if parsed is None or parsed[1] != size:
                    return NOT_HANDLED
                values = parsed[0]
                before, _ = self._row(table, values, table.identity_indexes)
                after = EMPTY
                operation = "DELETE"
                key = _key_text(table, [values[i] for i in table.key_indexes])
            else:
                assert table.parse is not None
                result = table.parse(data)  # the key too: _key_text's answer, from the same values
                if result is None:
                    return NOT_HANDLED
                after, key = result
                before = EMPTY
                operation = "CREATE" if kind == _I else "UPDATE"
        except Exception:  # malformed: the general path reports it exactly
            return NOT_HANDLED
        return self._emit(table.relation, key, operation, before, after, lsn)

    def change(self, lsn: int, message: Insert | Update | Delete) -> ChangeRow | None:
        """The row of one Insert, Update or Delete (None for ignored tables): the fast path of ``feed``."""
        table = self._tables.get(message.relation_oid)
        if table is None:
            table = self._table(message.relation_oid)
        if table.ignored:
            return None
        committed_at = self._committed_at
        if committed_at is None:
            raise ValueError(f"row change at lsn {lsn} outside a transaction (no Begin before it)")
        rel = table.relation
        if type(message) is Insert:
            new = message.new
            if UNCHANGED in new:  # never sent for inserts; kept exact all the same
                after, missing = self._row(table, new)
            else:
                after, missing = table.encoder.row_json(new), ()  # type: ignore[union-attr, arg-type]
            return self._emit(rel, self._key(table, new, None), "CREATE", EMPTY, after, lsn, missing)
        if type(message) is Update:
            old = message.old
            new = message.new
            before = EMPTY
            if old is not None:
                indexes = table.identity_indexes if message.old_kind == "K" else None
                before, _ = self._row(table, old, indexes)
                if message.old_kind == "O" and UNCHANGED in new:
                    new = tuple(o if n is UNCHANGED else n for n, o in zip(new, old, strict=True))
            after, missing = self._row(table, new)
            old_key = self._key(table, old, None) if old is not None else None
            previous = old_key if missing else None
            key = self._key(table, new, old)
            # the old key, by the key valid at this change: key lookups find moves without ``before``
            moved_from = old_key if old_key is not None and old_key != key else None
            return self._emit(rel, key, "UPDATE", before, after, lsn, missing, previous, moved_from)
        assert isinstance(message, Delete)
        indexes = table.identity_indexes if message.old_kind == "K" else None
        before, _ = self._row(table, message.old, indexes)
        return self._emit(rel, self._key(table, message.old, None), "DELETE", before, EMPTY, lsn)
