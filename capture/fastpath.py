"""The capture worker's byte-level fast paths, in one module: what runs for every change and every value.

* **pgoutput TupleData** (:func:`text_tuple`): a tuple of text and NULL values, unchecked; None sends the
  caller to :func:`capture.pgoutput.decode`, the checked decoder that reports every malformed byte.
* **hot scalar converters**, PostgreSQL text output → canonical JSON text (capture/values.py has the
  rules, arrays and composites): numeric, float, timestamptz from ``str`` and from the ``bytes`` pgoutput
  sends, text and jsonb from bytes; and :data:`INLINE_EXPRESSIONS`, the same conversions as Python
  expressions, which must stay in step with the functions (tests/capture/test_values.py checks them).
* **generated row parsers** (:func:`compile_row_parser`): one function per relation reading an Insert's
  new tuple straight into its ``after`` JSON, every column unrolled.
* **COPY text format** (:func:`copy_escape`, :data:`COPY_NULL`, :data:`COPY_BOOL`): how the sink writes
  ``changes`` rows.

Each function here has a slower, checked equal elsewhere (``decode``, ``ValueEncoder``, the general
stitcher); they give up (None) or raise rather than guess, and the callers fall back.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from json.encoder import encode_basestring as _json_string  # the C implementation when available
from typing import Any, Final

from capture.chain import canonical_json, canonical_number

__all__ = [
    "COPY_BOOL",
    "COPY_ESCAPES",
    "COPY_NULL",
    "INLINE_EXPRESSIONS",
    "INLINE_NAMESPACE",
    "NON_FINITE",
    "RowParser",
    "compile_row_parser",
    "copy_escape",
    "float_bytes",
    "float_text",
    "jsonb_bytes",
    "number_bytes",
    "number_text",
    "text_bytes",
    "text_tuple",
    "timestamptz_bytes",
    "timestamptz_text",
]

u32_from: Final = struct.Struct(">I").unpack_from
_t = 116  # ord('t'): a text value
_n = 110  # ord('n'): NULL

# --------------------------------------------------------------------------- pgoutput TupleData


def text_tuple(data: bytes, pos: int) -> tuple[list[bytes | None], int] | None:
    """TupleData at ``pos`` when every value is text or NULL: (values, position after it); else None.

    The capture worker's fast path: no ``UNCHANGED`` or binary values, no error reporting. None means
    "use :func:`capture.pgoutput.decode`", which handles (or reports) everything else; a value running
    past the end of ``data`` shows as a position past ``len(data)``.
    """
    try:
        ncols = (data[pos] << 8) | data[pos + 1]
        pos += 2
        values: list[bytes | None] = []
        append = values.append
        u32 = u32_from
        for _ in range(ncols):
            kind = data[pos]
            if kind == _t:
                start = pos + 5
                pos = start + u32(data, pos + 1)[0]
                append(data[start:pos])
            elif kind == _n:
                append(None)
                pos += 1
            else:
                return None
    except (IndexError, struct.error):
        return None
    return values, pos


# --------------------------------------------------------------------------- hot scalar converters

NON_FINITE: Final = frozenset(("NaN", "Infinity", "-Infinity"))


def number_text(s: str) -> str:
    """numeric: numeric_out's plain digits are already canonical; NaN and ±Infinity become strings."""
    return '"' + s + '"' if s in NON_FINITE else s


def float_text(s: str) -> str:
    """float4/float8: float8out's shortest form may use an exponent ('1e+20', '1.5e-07') or be '-0': the
    canonical number is numeric's (what to_jsonb stores), plain digits."""
    if s in NON_FINITE:
        return '"' + s + '"'
    return canonical_number(s) if "e" in s or s == "-0" else s


def timestamptz_text(s: str) -> str:
    """timestamptz in DateStyle ISO → ISO 8601 with ``T`` and a ``±HH:MM`` offset; else its text."""
    if s[10:11] == " " and s[-3:-2] in ("+", "-") and s[4:5] == "-":  # 'YYYY-MM-DD hh:mm:ss[.f]+HH'
        return '"' + s.replace(" ", "T", 1) + ':00"'
    date, sep, rest = s.partition(" ")
    if not sep:
        return _json_string(s)  # 'infinity', '-infinity' or a DateStyle we do not parse
    suffix = ""
    if rest.endswith(" BC"):
        rest = rest[:-3]
        suffix = " BC"
    cut = max(rest.rfind("+"), rest.rfind("-"))
    if cut < 0:
        return _json_string(s)
    offset = rest[cut:]
    if len(offset) == 3:
        offset += ":00"
    return '"' + date + "T" + rest[:cut] + offset + suffix + '"'


def jsonb_bytes(raw: bytes) -> str:
    return canonical_json(raw.decode())


def float_bytes(raw: bytes) -> str:
    return float_text(raw.decode())


def number_bytes(raw: bytes) -> str:
    s = raw.decode()
    return '"' + s + '"' if s in NON_FINITE else s


def text_bytes(raw: bytes) -> str:
    return _json_string(raw.decode())


def timestamptz_bytes(raw: bytes) -> str:
    if len(raw) > 19 and raw[10] == 32 and raw[-3] in (43, 45) and raw[4] == 45:  # ' ', '+', '-', '-'
        return '"' + raw.decode().replace(" ", "T", 1) + ':00"'  # the fast path of timestamptz_text
    return timestamptz_text(raw.decode())


#: Python expressions equal to calling the hot bytes converters on ``{v}`` (for generated row parsers),
#: with the names they use in :data:`INLINE_NAMESPACE`. Keep in step with the functions.
INLINE_EXPRESSIONS: Final[Mapping[Callable[[bytes], str], str]] = {
    bytes.decode: "{v}.decode()",
    text_bytes: "_json_string({v}.decode())",
    number_bytes: "({t} if ({t} := {v}.decode()) not in _NON_FINITE else '\"' + {t} + '\"')",
    timestamptz_bytes: (
        "('\"' + {v}.decode().replace(' ', 'T', 1) + ':00\"' if len({v}) > 19 and {v}[10] == 32"
        " and {v}[-3] in (43, 45) and {v}[4] == 45 else _timestamptz({v}.decode()))"
    ),
}
INLINE_NAMESPACE: Final[Mapping[str, Any]] = {
    "_json_string": _json_string,
    "_NON_FINITE": NON_FINITE,
    "_timestamptz": timestamptz_text,
}

# --------------------------------------------------------------------------- generated row parsers

#: ``parse(data)``: (after JSON, primary_key text) of an Insert / Update-without-old-tuple, or None.
RowParser = Callable[[bytes], "tuple[str, str | None] | None"]


def _inline(converter: Callable[[bytes], str], i: int) -> str:
    expression = INLINE_EXPRESSIONS.get(converter)
    if expression is None:
        return f"c{i}(v{i})"
    return expression.format(v=f"v{i}", t=f"t{i}")


def compile_row_parser(
    converters: Sequence[Callable[[bytes], str]],
    names: Sequence[str],
    order: Sequence[int],
    key_indexes: Sequence[int],
) -> RowParser:
    """A function reading one relation's new tuple (at byte 6) straight into its ``after`` JSON and its
    ``primary_key``: the key column's text (None for NULL), a JSON array of the key columns' values for
    several, None without ``key_indexes``.

    ``converters``, ``names`` and ``order`` are a ``ValueEncoder``'s (one converter and name per column,
    the columns in key order). Generated with every column unrolled (no per-value calls but the type's
    converter): returns None for anything but text and NULL values filling the message exactly, so
    ``decode`` handles (or reports) the rest. Converters may raise on malformed values; callers fall back.
    """
    count = len(converters)
    # keys in the encoder's (sorted, canonical) order, as row_json writes them
    template = "{" + ",".join(_json_string(names[i]).replace("%", "%%") + ":%s" for i in order) + "}"
    lines = [
        "def parse(data):",
        f"    if data[6] != {count >> 8} or data[7] != {count & 0xFF}:",
        "        return None",
        "    pos = 8",
    ]
    for i in range(count):
        lines += [
            "    kind = data[pos]",
            "    if kind == 116:",
            "        start = pos + 5",
            "        pos = start + u32(data, pos + 1)[0]",
            f"        v{i} = data[start:pos]",
            f"        j{i} = {_inline(converters[i], i)}",
            "    elif kind == 110:",
            f"        v{i} = None",
            f"        j{i} = 'null'",
            "        pos += 1",
            "    else:",
            "        return None",
        ]
    values = "".join(f"j{i}, " for i in order)
    if len(key_indexes) == 1:  # the key's text as it is; NULL: no key
        key = f"None if v{key_indexes[0]} is None else v{key_indexes[0]}.decode()"
    elif key_indexes:  # the typed values, each as its converter wrote it into ``after``
        key = "'[' + " + " + ',' + ".join(f"j{i}" for i in key_indexes) + " + ']'"
    else:
        key = "None"
    lines += [
        "    if pos != len(data):",
        "        return None",
        f"    return template % ({values}), {key}",
    ]
    namespace: dict[str, Any] = {f"c{i}": c for i, c in enumerate(converters)}
    namespace.update(INLINE_NAMESPACE)
    namespace.update(template=template, u32=u32_from)
    exec(compile("\n".join(lines), f"<capture row parser of {count} columns>", "exec"), namespace)
    parse: RowParser = namespace["parse"]
    return parse


# --------------------------------------------------------------------------- COPY text format

COPY_NULL: Final = "\\N"
COPY_BOOL: Final[Mapping[bool | None, str]] = {None: COPY_NULL, True: "t", False: "f"}
COPY_ESCAPES: Final = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_escape(value: str) -> str:
    """``value`` for COPY's text format."""
    if "\\" in value or "\n" in value or "\t" in value or "\r" in value:  # 4 C scans beat one regex
        return value.translate(COPY_ESCAPES)
    return value
