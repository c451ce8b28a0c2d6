"""Pure conversion of PostgreSQL text-format column values (as pgoutput sends them) into JSON text.

The rule: a value becomes the JSON that PostgreSQL's own ``to_jsonb(value)`` gives for it, so that
rows decoded from the WAL and rows read with ``to_jsonb`` compare equal, written in the canonical form of
capture/chain.py (:func:`~capture.chain.canonical_json` of the output is the output: object keys sorted,
no spaces, numbers as numeric prints them), so the sink hashes it without parsing. Concretely:

* ``int2/int4/int8`` and ``numeric`` → JSON numbers with the digits verbatim (numeric stays exact,
  never a float); ``float4/float8`` → numbers, an exponent form (``1e+20``) written out in digits as
  numeric would; ``NaN``/``Infinity``/``-Infinity`` → JSON strings.
* ``bool`` → ``true``/``false``; ``json``/``jsonb`` → the JSON itself, nested (re-written canonically:
  the only values parsed here).
* ``timestamptz`` → ``"2026-11-27T10:00:00.123456+00:00"`` (ISO 8601, ``T``, offset ``±HH:MM[:SS]``;
  the fraction as PostgreSQL prints it, trailing zeros dropped); ``timestamp`` → the same without
  offset; ``'infinity'``/``'-infinity'`` stay those strings; BC values keep PostgreSQL's `` BC`` suffix.
* ``date``, ``time``, ``timetz``, ``interval``, ``uuid``, ``bytea`` (``"\\\\x0102"``, hex kept), enums,
  ranges, money, geometric types, ``oid`` (a string, as ``to_jsonb`` gives it) and anything unknown →
  a JSON string of PostgreSQL's text.
* arrays (any dimension, any lower bound, NULL elements, quoted elements) → JSON arrays whose
  elements follow these same rules by the element type; domains follow their base type.
* SQL NULL → ``null``.
* composite (row) values, also nested, in arrays and behind domains → the JSON object ``to_jsonb``
  gives: attribute names from the catalog, each field converted by its own type, NULL fields
  ``null``. pgoutput sends only record_out text, so the attributes come from :data:`TYPE_INFO_QUERY`.

Composites and ALTER TYPE: the text has one field per attribute the type had when the row was
written (logical decoding prints it with the catalog of that moment), but the names and types can
only come from the catalog as it is when the worker reads: pgoutput sends no attributes and does not
re-send a Relation or Type message after ``ALTER TYPE`` (only at a table's first change in each
decoding session, i.e. each peek, and after the table itself changes), so the worker reloads the
catalog whenever a Relation message of a table with composite columns arrives, and encoders read
attributes from the reloaded mapping. Exact: every change read before its type is altered again (the
usual case: a running worker peeks every few seconds and reloads the catalog each time); a change
written before ``ADD ATTRIBUTE`` but read after it, as long as the type never had an attribute
dropped (its fields are then the first attributes). Not exact (the catalog keeps no history): a
change read after a later ``RENAME ATTRIBUTE`` carries the new name; one read after a later
``DROP ATTRIBUTE`` (any other field-count mismatch, or fields that do not fit the attributes' types)
stays a JSON string of its text, so a stale pairing can never make invalid JSON. SNAPSHOT rows use
the catalog loaded just before the snapshot: an ALTER TYPE while it is copied falls under the same rules.

Deliberate differences from ``to_jsonb``: types that ``to_jsonb`` renders through their own cast to
json (e.g. ``hstore``) are a JSON string of their text, also inside composites; a ``json`` value
containing the escape ``\\u0000`` (which ``jsonb`` cannot hold) becomes a JSON string of its text.

Input assumptions (the capture worker's session guarantees them): ``DateStyle`` ``ISO``, ``TimeZone``
``UTC`` (offsets then read ``+00:00``), ``extra_float_digits`` >= 1, a UTF-8 database, text format
values (not pgoutput's ``binary`` option). Other ``DateStyle`` settings are not supported.

Use: build one :class:`ValueEncoder` per Relation (``ValueEncoder(oids, type_info, names=names)``)
and call ``encoder.row_json(values)`` for whole rows or ``encoder.value_json(i, raw)`` per value.
Types beyond the built-in table come from the catalog: run :data:`TYPE_INFO_QUERY` and pass its rows
to :func:`load_type_info` (rows without its attribute columns leave composites JSON strings of their
text); reload into the same mapping (``dict.update``) and existing encoders follow the new attributes.
"""

from __future__ import annotations

import json
import operator
import re
from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring as _json_string  # the C implementation when available
from typing import Any, Final

from capture.chain import canonical_json
from capture.errors import DecodeError
from capture.fastpath import float_bytes as _float_bytes
from capture.fastpath import float_text as _float
from capture.fastpath import jsonb_bytes as _jsonb_bytes
from capture.fastpath import number_bytes as _number_bytes
from capture.fastpath import number_text as _number
from capture.fastpath import text_bytes as _text_bytes
from capture.fastpath import timestamptz_bytes as _timestamptz_bytes
from capture.fastpath import timestamptz_text as _timestamptz

__all__ = [
    "BUILTIN_TYPES",
    "TYPE_INFO_QUERY",
    "TypeInfo",
    "ValueEncoder",
    "json_string",
    "load_type_info",
    "row_json",
    "text_to_json",
    "uses_composite",
]

json_string: Final = _json_string
"""``json_string(s)``: ``s`` as a JSON string literal (quotes and escapes; non-ASCII kept)."""


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """What value conversion needs to know about a type (a row of ``pg_type``).

    ``category`` is ``typcategory`` ('A' array, 'B' bool, 'E' enum, 'N' numeric, 'S' string, ...);
    ``element_oid`` is ``typelem`` for arrays (0 otherwise); ``base_oid`` is ``typbasetype`` for
    domains (0 otherwise); ``delimiter`` is ``typdelim`` (',' except e.g. ``box`` with ';').
    ``attributes`` and ``dropped_attributes`` describe a composite type's fields (``pg_attribute``).
    """

    oid: int
    name: str
    category: str
    element_oid: int = 0
    base_oid: int = 0
    delimiter: str = ","
    #: Composite (row) types: ``(name, type OID)`` of each live attribute in ``attnum`` order; else None.
    attributes: tuple[tuple[str, int], ...] | None = None
    #: Composite types: how many dropped attributes the catalog still holds.
    dropped_attributes: int = 0


#: The SQL that loads every type's :class:`TypeInfo` fields, in order, for :func:`load_type_info`.
#: Composite types (``typtype = 'c'``, table row types included) also get their live attributes'
#: names and type OIDs in ``attnum`` order and the count of dropped ones.
TYPE_INFO_QUERY: Final = (
    "SELECT t.oid::int8, t.typname::text, t.typcategory::text, "
    "CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE 0 END::int8, "
    "t.typbasetype::int8, t.typdelim::text, c.names, c.oids, coalesce(c.dropped, 0)::int8 "
    "FROM pg_catalog.pg_type t LEFT JOIN LATERAL ("
    "SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE NOT a.attisdropped), '{}')"
    " AS names, coalesce(array_agg(a.atttypid::int8 ORDER BY a.attnum) FILTER (WHERE NOT a.attisdropped),"
    " '{}') AS oids, count(*) FILTER (WHERE a.attisdropped) AS dropped"
    " FROM pg_catalog.pg_attribute a WHERE a.attrelid = t.typrelid AND a.attnum > 0"
    ") c ON t.typtype = 'c'"
)


def load_type_info(rows: Iterable[Sequence[Any]]) -> dict[int, TypeInfo]:
    """Map OID → :class:`TypeInfo` from the rows of :data:`TYPE_INFO_QUERY` (built-ins included).

    Rows of 6 fields (no attribute columns) are accepted too: their composite types stay unknown.
    """
    result = dict(BUILTIN_TYPES)
    for row in rows:
        if len(row) not in (6, 9):
            raise ValueError(f"type info row must have 6 or 9 fields as TYPE_INFO_QUERY returns, got {row!r}")
        oid, name, category, element_oid, base_oid, delimiter = row[:6]
        attributes = None
        dropped = 0
        if len(row) == 9 and row[6] is not None:
            names, oids = row[6], row[7] or ()
            if len(names) != len(oids):
                raise ValueError(f"type info row has {len(names)} attribute names, {len(oids)} OIDs: {row!r}")
            attributes = tuple((str(n), int(o)) for n, o in zip(names, oids, strict=True))
            dropped = int(row[8] or 0)
        info = TypeInfo(
            int(oid),
            str(name),
            str(category),
            int(element_oid or 0),
            int(base_oid or 0),
            str(delimiter),
            attributes,
            dropped,
        )
        result[info.oid] = info
    return result


def _builtin(*rows: tuple[int, str, str, int]) -> dict[int, TypeInfo]:
    return {
        oid: TypeInfo(oid, name, cat, elem, 0, ";" if name in ("box", "_box") else ",")
        for oid, name, cat, elem in rows
    }


#: The common built-in types (OIDs are fixed across PostgreSQL versions), so no catalog is needed for them.
BUILTIN_TYPES: Final[Mapping[int, TypeInfo]] = _builtin(
    (16, "bool", "B", 0),
    (17, "bytea", "U", 0),
    (18, "char", "Z", 0),
    (19, "name", "S", 0),
    (20, "int8", "N", 0),
    (21, "int2", "N", 0),
    (22, "int2vector", "A", 21),
    (23, "int4", "N", 0),
    (24, "regproc", "N", 0),
    (25, "text", "S", 0),
    (26, "oid", "N", 0),
    (30, "oidvector", "A", 26),
    (114, "json", "U", 0),
    (142, "xml", "U", 0),
    (600, "point", "G", 0),
    (603, "box", "G", 0),
    (650, "cidr", "I", 0),
    (700, "float4", "N", 0),
    (701, "float8", "N", 0),
    (774, "macaddr8", "U", 0),
    (790, "money", "N", 0),
    (829, "macaddr", "U", 0),
    (869, "inet", "I", 0),
    (1042, "bpchar", "S", 0),
    (1043, "varchar", "S", 0),
    (1082, "date", "D", 0),
    (1083, "time", "D", 0),
    (1114, "timestamp", "D", 0),
    (1184, "timestamptz", "D", 0),
    (1186, "interval", "T", 0),
    (1266, "timetz", "D", 0),
    (1560, "bit", "V", 0),
    (1562, "varbit", "V", 0),
    (1700, "numeric", "N", 0),
    (2950, "uuid", "U", 0),
    (3614, "tsvector", "U", 0),
    (3802, "jsonb", "U", 0),
    (3904, "int4range", "R", 0),
    (3926, "int8range", "R", 0),
    (3906, "numrange", "R", 0),
    (3910, "tstzrange", "R", 0),
    (3912, "daterange", "R", 0),
    (4072, "jsonpath", "U", 0),
    (143, "_xml", "A", 142),
    (199, "_json", "A", 114),
    (651, "_cidr", "A", 650),
    (791, "_money", "A", 790),
    (1000, "_bool", "A", 16),
    (1001, "_bytea", "A", 17),
    (1002, "_char", "A", 18),
    (1003, "_name", "A", 19),
    (1005, "_int2", "A", 21),
    (1007, "_int4", "A", 23),
    (1009, "_text", "A", 25),
    (1014, "_bpchar", "A", 1042),
    (1015, "_varchar", "A", 1043),
    (1016, "_int8", "A", 20),
    (1017, "_point", "A", 600),
    (1020, "_box", "A", 603),
    (1021, "_float4", "A", 700),
    (1022, "_float8", "A", 701),
    (1028, "_oid", "A", 26),
    (1040, "_macaddr", "A", 829),
    (1041, "_inet", "A", 869),
    (1115, "_timestamp", "A", 1114),
    (1182, "_date", "A", 1082),
    (1183, "_time", "A", 1083),
    (1185, "_timestamptz", "A", 1184),
    (1187, "_interval", "A", 1186),
    (1231, "_numeric", "A", 1700),
    (1270, "_timetz", "A", 1266),
    (1561, "_bit", "A", 1560),
    (1563, "_varbit", "A", 1562),
    (2951, "_uuid", "A", 2950),
    (3807, "_jsonb", "A", 3802),
    (3905, "_int4range", "A", 3904),
)

# --------------------------------------------------------------------------- scalar converters (str → JSON)
# (the hot types' converters, str and bytes, live with the other byte-level fast paths: capture/fastpath.py)


def _verbatim(s: str) -> str:
    return s


_boolean = {"t": "true", "f": "false"}.__getitem__


def _json(s: str) -> str:
    # jsonb cannot hold \u0000, a lone surrogate or a number beyond numeric's range: keep such json values
    # as text rather than fail the whole batch
    if "\\u0000" in s:
        return _json_string(s)
    try:
        out = canonical_json(s)
        if _SURROGATE_ESCAPE.search(s):
            out.encode()  # a lone surrogate (a pair is one character, and fine)
    except (ValueError, UnicodeEncodeError):
        return _json_string(s)
    return out


_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def _jsonb(s: str) -> str:
    return canonical_json(s)  # jsonb_out: keys by length, ", " and ": " separators


def _timestamp(s: str) -> str:
    date, sep, rest = s.partition(" ")
    if not sep:
        return _json_string(s)
    return '"' + date + "T" + rest + '"'


_INTEGER_OIDS: Final = frozenset((20, 21, 23))
_SCALARS: Final[Mapping[int, Callable[[str], str]]] = {
    20: _verbatim,
    21: _verbatim,
    23: _verbatim,
    700: _float,
    701: _float,
    1700: _number,
    16: _boolean,
    114: _json,
    3802: _jsonb,
    1184: _timestamptz,
    1114: _timestamp,
}

# --------------------------------------------------------------------------- arrays

_ARRAY_TOKENS: dict[str, re.Pattern[str]] = {}
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)


def _array_tokens(delimiter: str) -> re.Pattern[str]:
    pattern = _ARRAY_TOKENS.get(delimiter)
    if pattern is None:
        d = re.escape(delimiter)
        pattern = re.compile(rf'"((?:[^"\\]|\\.)*)"|([{{}}])|{d}|([^{d}{{}}"]+)', re.DOTALL)
        _ARRAY_TOKENS[delimiter] = pattern
    return pattern


def _parse_array(s: str, delimiter: str) -> list[Any] | None:
    """Nested lists of element texts (None for NULL) from array_out text; None if not array text."""
    if s.startswith("["):  # explicit bounds, e.g. '[0:1]={1,2}': to_jsonb ignores them too
        s = s[s.find("=") + 1 :]
    if not s.startswith("{") or not s.endswith("}"):
        if "{" not in s and '"' not in s:  # int2vector / oidvector: space-separated
            return s.split()
        return None
    if '"' not in s and "\\" not in s and s.find("{", 1) < 0:  # the common case: 1-D, nothing quoted
        inner = s[1:-1]
        if not inner:
            return []
        return [None if e == "NULL" else e for e in inner.split(delimiter)]
    root: list[Any] = []
    stack: list[list[Any]] = []
    current: list[Any] | None = None
    end = 0
    for match in _array_tokens(delimiter).finditer(s):
        if match.start() != end:
            return None
        end = match.end()
        quoted, brace, bare = match.groups()
        if brace == "{":
            new: list[Any] = []
            if current is None:
                if stack or root:
                    return None
                root = new
            else:
                current.append(new)
                stack.append(current)
            current = new
        elif brace == "}":
            if current is None:
                return None
            current = stack.pop() if stack else None
        elif quoted is not None:
            if current is None:
                return None
            current.append(_UNESCAPE.sub(r"\1", quoted) if "\\" in quoted else quoted)
        elif bare is not None:
            if current is None:
                return None
            bare = bare.strip(" \t\n\r\v\f")  # array_in's whitespace, not str.isspace()
            current.append(None if bare == "NULL" else _UNESCAPE.sub(r"\1", bare))
    if end != len(s) or current is not None or stack:
        return None
    return root


def _array_converter(element: Callable[[str], str], delimiter: str) -> Callable[[str], str]:
    def render(items: list[Any]) -> str:
        return (
            "["
            + ",".join(
                "null" if item is None else render(item) if item.__class__ is list else element(item)
                for item in items
            )
            + "]"
        )

    def generic(s: str) -> str:
        if s[:1] == "{" and '"' not in s and "\\" not in s and s.find("{", 1) < 0:  # 1-D, nothing quoted
            inner = s[1:-1]
            if not inner:
                return "[]"
            items = inner.split(delimiter)
            if "NULL" not in items:
                return "[" + ",".join(map(element, items)) + "]"
        parsed = _parse_array(s, delimiter)
        if parsed is None:
            return _json_string(s)
        return render(parsed)

    # 1-D arrays whose elements need no quoting in array_out (and so contain no delimiter, brace,
    # quote, backslash or whitespace) are rendered with whole-string operations.
    if delimiter == "," and element is _verbatim:

        def convert(s: str) -> str:  # integers: the text between the braces is already JSON
            if s[:1] == "{" and '"' not in s and "NULL" not in s and s.find("{", 1) < 0:
                return "[" + s[1:-1] + "]"
            return generic(s)

    elif delimiter == "," and element is _number:

        def convert(s: str) -> str:  # no 'N' or 'I': no NULL, NaN or Infinity element
            if s[:1] == "{" and "N" not in s and "I" not in s and '"' not in s and s.find("{", 1) < 0:
                return "[" + s[1:-1] + "]"
            return generic(s)

    elif delimiter == "," and element is _float:

        def convert(s: str) -> str:  # also no exponent and no '-0': every element is already canonical
            if (
                s[:1] == "{"
                and "N" not in s
                and "I" not in s
                and "e" not in s
                and "-0" not in s
                and '"' not in s
                and s.find("{", 1) < 0
            ):
                return "[" + s[1:-1] + "]"
            return generic(s)

    elif delimiter == "," and element is _json_string:

        def convert(s: str) -> str:  # escaping never makes a comma, so split after escaping once
            if (
                s[:1] == "{"
                and s != "{}"
                and '"' not in s
                and "\\" not in s
                and "NULL" not in s
                and s.find("{", 1) < 0
            ):
                return "[" + _json_string(s[1:-1]).replace(",", '","') + "]"
            return generic(s)

    else:
        convert = generic
    return convert


# --------------------------------------------------------------------------- composites (record_out text)


def _parse_record(s: str) -> list[str | None] | None:
    """The fields (None for NULL) of record_out text ``(a,"b c",)``, read as record_in does; None if not one.

    record_out leaves a NULL field empty and quotes a field that is empty or holds a quote, backslash,
    parenthesis, comma or white space, doubling quotes and backslashes inside; record_in also takes
    ``\\x`` as ``x`` and ``""`` inside quotes as one quote.
    """
    if len(s) < 2 or s[0] != "(" or s[-1] != ")":
        return None
    inner = s[1:-1]
    if '"' not in inner and "\\" not in inner:
        if "(" in inner or ")" in inner:
            return None  # record_out always quotes these
        return [field or None for field in inner.split(",")]
    fields: list[str | None] = []
    part: list[str] = []
    seen = False  # the field has content (a quoted "" is the empty string, not NULL)
    end = 0
    for match in _RECORD_TOKENS.finditer(inner):
        if match.start() != end:
            return None  # an unquoted parenthesis, an unterminated quote or a lone backslash
        end = match.end()
        quoted, escaped, bare = match.groups()
        if quoted is not None:
            if "\\" in quoted or '""' in quoted:
                quoted = _RECORD_UNESCAPE.sub(_unescape, quoted)
            part.append(quoted)
            seen = True
        elif escaped is not None:
            part.append(escaped)
            seen = True
        elif bare is not None:
            part.append(bare)
            seen = True
        else:  # the comma between fields
            fields.append("".join(part) if seen else None)
            part = []
            seen = False
    if end != len(inner):
        return None
    fields.append("".join(part) if seen else None)
    return fields


_RECORD_TOKENS: Final = re.compile(  # the quoted form unrolled ([^"\\]* never overlaps \\. or ""): linear
    r'"([^"\\]*(?:(?:\\.|"")[^"\\]*)*)"|\\(.)|([^,"\\()]+)|,', re.DOTALL
)
_RECORD_UNESCAPE: Final = re.compile(r'\\(.)|""', re.DOTALL)


def _unescape(match: re.Match[str]) -> str:
    escaped = match.group(1)
    return '"' if escaped is None else escaped


def _composite_converter(oid: int, types: Mapping[int, TypeInfo], depth: int) -> Callable[[str], str]:
    """record_out text → the JSON object ``to_jsonb`` gives, each field converted by its own type.

    The attributes are looked up in ``types`` at each call (not when the converter is built), so a
    catalog reloaded into the same mapping (the worker's, after ALTER TYPE) applies to every encoder
    at once. The text has one field per attribute the type had when the row was written: with more
    attributes known now and none ever dropped, the text's fields are the first ones (ADD ATTRIBUTE
    appends); any other count mismatch keeps the value as a JSON string of its text. So does a result
    that is not valid JSON: a catalog newer than the row (DROP then ADD ATTRIBUTE, ALTER ATTRIBUTE TYPE
    after the last column of the type was dropped) can pair a field with another type, and invalid
    JSON would make the jsonb COPY fail on every retry.
    """
    built: list[Any] = [None, (), (), ()]  # attributes, name prefixes, converters, key order
    render = _render_record
    check = _strict_json

    def convert(s: str) -> str:
        info = types.get(oid)
        attributes = info.attributes if info is not None else None
        if attributes is None:
            return _json_string(s)
        if attributes is not built[0]:
            built[1] = tuple(_json_string(name) + ":" for name, _ in attributes)
            built[2] = tuple(_str_converter(t, types, depth + 1) for _, t in attributes)
            built[3] = tuple(sorted(range(len(attributes)), key=lambda i: attributes[i][0]))
            built[0] = attributes
        prefixes: tuple[str, ...] = built[1]
        converters: tuple[Callable[[str], str], ...] = built[2]
        order: tuple[int, ...] = built[3]
        if not prefixes and s == "()":
            return "{}"
        fields = _parse_record(s)
        if fields is None:
            return _json_string(s)
        if len(fields) != len(prefixes) and (
            len(fields) > len(prefixes) or info is None or info.dropped_attributes
        ):
            return _json_string(s)  # written under other attributes than the catalog's now
        try:
            result = render(prefixes, converters, fields, order)
            check(result)  # the catalog can be newer than the row (see above): never let a misfit through
        except (ValueError, KeyError):
            return _json_string(s)
        return result

    return convert


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


#: Parses JSON as jsonb would accept it (no NaN/Infinity literals); raises ValueError otherwise.
_strict_json: Final = json.JSONDecoder(parse_constant=_reject_constant).decode


def _render_record(
    prefixes: Sequence[str],
    converters: Sequence[Callable[[str], str]],
    fields: Sequence[str | None],
    order: Sequence[int],
) -> str:
    """The JSON object of record fields, paired with the first ``len(fields)`` attributes, keys in
    ``order`` (sorted: the canonical form, capture/chain.py)."""
    count = len(fields)
    return (
        "{"
        + ",".join(
            [
                prefixes[i] + ("null" if (field := fields[i]) is None else converters[i](field))
                for i in order
                if i < count
            ]
        )
        + "}"
    )


# --------------------------------------------------------------------------- resolution


def _str_converter(oid: int, types: Mapping[int, TypeInfo], depth: int = 0) -> Callable[[str], str]:
    """The str → JSON converter for a type OID, following domains and arrays."""
    scalar = _SCALARS.get(oid)
    if scalar is not None:
        return scalar
    info = types.get(oid)
    if info is None or depth > 32:
        return _json_string
    if info.base_oid:
        return _str_converter(info.base_oid, types, depth + 1)
    if info.category == "A" and info.element_oid:
        element = _str_converter(info.element_oid, types, depth + 1)
        return _array_converter(element, info.delimiter)
    if info.attributes is not None:
        return _composite_converter(oid, types, depth)
    return _json_string


def uses_composite(type_oids: Iterable[int], types: Mapping[int, TypeInfo]) -> bool:
    """Whether any of ``type_oids`` is or holds a composite type (through domains and arrays)."""
    for oid in type_oids:
        for _ in range(32):
            info = types.get(oid)
            if info is None:
                break
            if info.attributes is not None:
                return True
            oid = info.base_oid or (info.element_oid if info.category == "A" else 0)
            if not oid:
                break
    return False


def _bytes_converter(oid: int, types: Mapping[int, TypeInfo]) -> Callable[[bytes], str]:
    """The bytes → JSON converter for a column, with the hot types bound without extra frames."""
    base = oid
    for _ in range(32):
        info = types.get(base)
        if info is None or not info.base_oid:
            break
        base = info.base_oid
    if base in _INTEGER_OIDS:
        return bytes.decode
    if base == 3802:
        return _jsonb_bytes
    if base == 16:
        return {b"t": "true", b"f": "false"}.__getitem__
    fast = _BYTES_CONVERTERS.get(base)
    if fast is not None:
        return fast
    convert = _str_converter(base, types)
    if convert is _json_string:
        return _text_bytes

    def from_bytes(raw: bytes) -> str:
        return convert(raw.decode())

    return from_bytes


_BYTES_CONVERTERS: Final[Mapping[int, Callable[[bytes], str]]] = {
    700: _float_bytes,
    701: _float_bytes,
    1700: _number_bytes,
    1184: _timestamptz_bytes,
}


class ValueEncoder:
    """Converts the text values of one relation's columns to JSON text; build once per Relation.

    ``column_type_oids`` are the Relation's column type OIDs; ``type_info`` maps further OIDs
    (from :func:`load_type_info`) — built-in types need none. With ``names``, :meth:`row_json`
    renders a whole row as a JSON object. Values are ``bytes`` or ``None``; an UNCHANGED TOAST
    placeholder must be replaced by its real value first (``ValueError`` otherwise).
    """

    __slots__ = ("_converters", "_pick", "_prefixes", "_sorted", "_template", "converters", "names", "order")

    def __init__(
        self,
        column_type_oids: Sequence[int],
        type_info: Mapping[int, TypeInfo] | None = None,
        *,
        names: Sequence[str] | None = None,
    ) -> None:
        if isinstance(column_type_oids, (str, bytes)) or not all(
            isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in column_type_oids
        ):
            raise ValueError(f"column_type_oids must be a sequence of type OIDs, got {column_type_oids!r}")
        # a live view, not a copy: composite converters read attributes reloaded into type_info later
        types: Mapping[int, TypeInfo] = (
            BUILTIN_TYPES if type_info is None else ChainMap(type_info, BUILTIN_TYPES)  # type: ignore[arg-type]
        )
        #: One ``bytes -> JSON text`` function per column (NULL not handled: test ``is None`` first).
        self.converters: tuple[Callable[[bytes], str], ...] = tuple(
            _bytes_converter(oid, types) for oid in column_type_oids
        )
        self._converters = self.converters
        self.names: tuple[str, ...] | None = None
        #: Column indexes in the order of their names: :meth:`row_json`'s key order, the canonical one
        #: (keys sorted, capture/chain.py), so the sink hashes the text as it is.
        self.order: tuple[int, ...] = tuple(range(len(self.converters)))
        self._prefixes: tuple[str, ...] = ()
        self._template: str | None = None
        self._sorted = self.converters
        self._pick: Callable[[Sequence[bytes | None]], Sequence[bytes | None]] = tuple
        if names is not None:
            if isinstance(names, str) or len(names) != len(self.converters):
                raise ValueError(
                    f"names must give one column name per type OID ({len(self.converters)}), got {names!r}"
                )
            self.names = tuple(names)
            if len(set(self.names)) != len(self.names):
                raise ValueError(f"names must be distinct (one value per JSON key), got {names!r}")
            self.order = tuple(sorted(range(len(self.names)), key=self.names.__getitem__))
            self._prefixes = tuple(_json_string(n) + ":" for n in self.names)
            self._template = "{" + ",".join(
                self._prefixes[i].replace("%", "%%") + "%s" for i in self.order
            ) + "}"
            self._sorted = tuple(self.converters[i] for i in self.order)
            if self.order != tuple(range(len(self.order))):
                # values permuted into key order, in C
                self._pick = operator.itemgetter(*self.order)  # (two columns at least: a permutation)

    def value_json(self, index: int, raw: bytes | None) -> str:
        """JSON text of the value ``raw`` (text-format bytes, or None for NULL) of column ``index``."""
        if raw is None:
            return "null"
        try:
            return self._converters[index](raw)
        except (TypeError, AttributeError, KeyError, UnicodeDecodeError) as exc:
            raise _bad_value(index, raw, exc) from None

    def row_json(self, values: Sequence[bytes | None]) -> str:
        """A whole row as a JSON object text, ``{"col":value,...}`` (needs ``names``), canonical: keys
        sorted, compact, each value canonical (capture/chain.py's form, which the sink hashes as is)."""
        try:
            if len(values) != len(self._converters):
                raise TypeError
            return self._template % tuple(  # type: ignore[operator]
                ["null" if v is None else c(v) for c, v in zip(self._sorted, self._pick(values))]  # noqa: B905
            )
        except (TypeError, AttributeError, KeyError, UnicodeDecodeError):
            if self.names is None or len(values) != len(self._prefixes):
                raise ValueError(
                    f"row has {len(values)} values for {len(self._prefixes)} named columns; "
                    "build the ValueEncoder with names=... matching the Relation"
                ) from None
            for index, value in enumerate(values):
                self.value_json(index, value)
            raise

    def fragments(self, values: Sequence[bytes | None]) -> list[str]:
        """JSON text of each value of a row, in column order."""
        if len(values) != len(self._converters):
            raise ValueError(f"row has {len(values)} values for {len(self._converters)} columns")
        return [self.value_json(i, v) for i, v in enumerate(values)]


def _bad_value(index: int, raw: object, exc: Exception) -> Exception:
    if isinstance(exc, UnicodeDecodeError):
        return DecodeError(f"column {index} value is not valid UTF-8: {raw!r}; the database must use UTF8")
    if isinstance(raw, bytes):
        return DecodeError(f"column {index} value {raw!r} is not valid text output for its type")
    return ValueError(
        f"column {index} value must be bytes or None, got {raw!r}; "
        "replace UNCHANGED TOAST values with the row's previous value first"
    )


def row_json(names: Sequence[str], fragments: Sequence[str]) -> str:
    """A JSON object text from distinct column names (escaped here) and JSON value texts:
    ``{"a":1,"b":"x"}``, keys sorted (canonical when the fragments are)."""
    if isinstance(names, str) or isinstance(fragments, str) or len(names) != len(fragments):
        raise ValueError(f"row_json needs as many names as fragments, got {names!r} and {fragments!r}")
    pairs = sorted(zip(names, fragments, strict=False), key=lambda pair: pair[0])
    return "{" + ",".join([_json_string(n) + ":" + f for n, f in pairs]) + "}"


def text_to_json(text: str | None, type_oid: int, type_info: Mapping[int, TypeInfo] | None = None) -> str:
    """JSON text of one value given as PostgreSQL's text output; convenient, not for hot loops."""
    if text is None:
        return "null"
    if not isinstance(text, str):
        raise ValueError(f"text must be a str or None, got {text!r}")
    if not isinstance(type_oid, int) or type_oid < 0:
        raise ValueError(f"type_oid must be a type OID, got {type_oid!r}")
    types: Mapping[int, TypeInfo] = BUILTIN_TYPES if type_info is None else {**BUILTIN_TYPES, **type_info}
    try:
        return _str_converter(type_oid, types)(text)
    except KeyError:
        raise DecodeError(f"{text!r} is not valid text output for type {type_oid}") from None
