"""Application context (who, where, how) bound to the current thread or asyncio task.

``set_context``/``context()`` validate and encode the context ONCE, when it is set; the SQLAlchemy hook
(:mod:`bemi_tt.hook`) then only looks a statement up and concatenates strings.

Values: JSON types; ``datetime``/``date``/``time`` as ISO 8601 strings, ``UUID`` as its string,
``Decimal`` as an exact JSON number, ``Enum`` as its value, tuples as arrays, sets as arrays sorted by
their JSON text. Anything else is a ``TypeError`` naming the key. Strings holding NUL (PostgreSQL text
cannot), lone surrogates, NaN/infinity, numbers outside PostgreSQL ``numeric``'s range (jsonb stores
numbers as numeric), nesting deeper than ``MAX_CONTEXT_DEPTH`` (128: the context object is level 1, each
dict, list, tuple or set inside it one more), the reserved key ``"SQL"`` and contexts larger than
``max_bytes`` (UTF-8 JSON, default 1 MiB; see :func:`configure_context`) are a ``ConfigurationError``
(a ``ValueError``), raised before anything reaches the database. An empty context is the same as no
context: statements carry nothing.

Signing: with a key (``BEMI_TT_CONTEXT_KEY`` in the environment when bemi_tt is imported, or
``configure_context(signing_key=...)``), each marker carries an HMAC-SHA256 of its exact JSON bytes as
a last ``"_bemi_sig"`` member (see :mod:`capture.signing`); the worker, given the same key, stores
``changes.context_verified = true``. One HMAC per distinct (context, statement) pair: the HMAC state
over the context's bytes is computed once per context and only the statement's SQL member is added,
and the finished marker is cached per statement like an unsigned one.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import enum
import functools
import inspect
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from capture.errors import ConfigurationError
from capture.protocol import MARKER_PREFIX
from capture.signing import SIGNATURE_MEMBER, ContextKey, HeadSigner, keys_from_env
from capture.stitch import MAX_CONTEXT_DEPTH, numeric_literal_fits

__all__ = [
    "Bemi",
    "ContextSettings",
    "configure_context",
    "context",
    "context_settings",
    "get_context",
    "set_context",
]

#: Key under which the hook adds the statement's SQL text; applications may not use it.
SQL_KEY = "SQL"
_STATEMENT_CACHE_LIMIT = 1024

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class ContextSettings:
    """Limits: ``max_bytes`` of a context's UTF-8 JSON, ``max_sql_bytes`` of the SQL text carried;
    ``signing_key_id``: id of the key contexts are signed with (None: unsigned)."""

    max_bytes: int = 1024 * 1024
    max_sql_bytes: int = 4096
    signing_key_id: str | None = None


def _env_key() -> ContextKey | None:
    """The first key of ``BEMI_TT_CONTEXT_KEY`` (the application signs with one; the worker accepts all)."""
    keys = keys_from_env()
    return keys[0] if keys else None


_signing_key = _env_key()
_settings = ContextSettings(signing_key_id=_signing_key.id if _signing_key else None)
_UNSET: Any = object()


def context_settings() -> ContextSettings:
    """The limits in force (see :func:`configure_context`)."""
    return _settings


def configure_context(
    *,
    max_bytes: int | None = None,
    max_sql_bytes: int | None = None,
    signing_key: str | bytes | None = _UNSET,
) -> ContextSettings:
    """Change the context size limit, the SQL text cap and the signing key (process-wide).

    ``signing_key``: the secret shared with the capture worker (see :mod:`capture.signing`), ``None``
    to stop signing; it applies to contexts set after the call. Returns the new settings.
    """
    global _settings, _signing_key
    for name, value in (("max_bytes", max_bytes), ("max_sql_bytes", max_sql_bytes)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigurationError(f"{name} must be a positive integer of bytes, got {value!r}")
    if signing_key is not _UNSET:
        if signing_key is not None and not isinstance(signing_key, (str, bytes)):
            raise ConfigurationError(
                f"signing_key must be str, bytes or None, got {type(signing_key).__name__}"
            )
        _signing_key = None if signing_key is None else ContextKey.of(signing_key, "signing_key")
    _settings = ContextSettings(
        max_bytes=_settings.max_bytes if max_bytes is None else max_bytes,
        max_sql_bytes=_settings.max_sql_bytes if max_sql_bytes is None else max_sql_bytes,
        signing_key_id=_signing_key.id if _signing_key else None,
    )
    _sql_part_cache.clear()
    _sql_member_cache.clear()
    return _settings


@dataclass(eq=False)
class EncodedContext:
    """A validated context: its JSON, and the base64 marker prefix reused by every statement."""

    data: dict[str, Any]
    json: str
    #: base64 of the JSON object without its closing brace, plus ``,`` and spaces up to a multiple of
    #: 3 bytes, so that ``b64_head + base64('"SQL":...}')`` is the base64 of one JSON object.
    b64_head: str
    #: statement text -> statement to send (marker + statement); filled by the hook.
    statements: dict[str, str] = field(default_factory=dict)
    #: signing: the HMAC state after the head's bytes (copied per statement), or None.
    signer: HeadSigner | None = None

    def marked(self, statement: str) -> str:
        """The statement with this context's ``/*bemi:...*/`` marker prepended (cached)."""
        done = self.statements.get(statement)
        if done is None:
            if len(self.statements) >= _STATEMENT_CACHE_LIMIT:
                self.statements.clear()
            if self.signer is None:
                payload = self.b64_head + _sql_part(statement)
            else:
                raw, b64 = _sql_member(statement)
                payload = self.b64_head + b64 + base64.b64encode(self.signer.member(raw)).decode("ascii")
            done = self.statements[statement] = f"{MARKER_PREFIX}{payload}*/{statement}"
        return done


_current: ContextVar[EncodedContext | None] = ContextVar("bemi_tt_context", default=None)
_sql_part_cache: dict[str, str] = {}
_sql_member_cache: dict[str, tuple[bytes, str]] = {}


def _sql_part(statement: str) -> str:
    """base64 of ``"SQL":"<statement, capped>"}`` (cached per statement text)."""
    part = _sql_part_cache.get(statement)
    if part is None:
        if len(_sql_part_cache) >= _STATEMENT_CACHE_LIMIT:
            _sql_part_cache.clear()
        part = _sql_part_cache[statement] = base64.b64encode(
            f'"{SQL_KEY}":{json.dumps(_cap_sql(statement), ensure_ascii=False)}}}'.encode(
                "utf-8", "replace"
            )
        ).decode("ascii")
    return part


def _sql_member(statement: str) -> tuple[bytes, str]:
    """``"SQL":"<statement, capped>"`` padded with spaces to whole base64 groups, and its base64 (cached):
    a signed marker is ``head + this + signature member``, the HMAC covering the first two."""
    member = _sql_member_cache.get(statement)
    if member is None:
        if len(_sql_member_cache) >= _STATEMENT_CACHE_LIMIT:
            _sql_member_cache.clear()
        raw = f'"{SQL_KEY}":{json.dumps(_cap_sql(statement), ensure_ascii=False)}'.encode("utf-8", "replace")
        raw += b" " * (-len(raw) % 3)
        member = _sql_member_cache[statement] = (raw, base64.b64encode(raw).decode("ascii"))
    return member


def _cap_sql(statement: str) -> str:
    limit = _settings.max_sql_bytes
    raw = statement.encode("utf-8", "replace")
    if len(raw) <= limit:
        return statement.replace("\x00", "")
    head = raw[:limit].decode("utf-8", "ignore").replace("\x00", "")
    return f"{head} ...[bemi_tt: truncated, {len(raw)} bytes]"


def _path(parent: str, key: object) -> str:
    return f"{parent}[{key!r}]"


def _check_text(text: str, where: str) -> None:
    if "\x00" in text:
        raise ConfigurationError(
            f"context {where} contains a NUL character, which PostgreSQL text cannot hold; remove it"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError(
            f"context {where} contains a lone surrogate, which is not valid UTF-8; fix the string"
        ) from None


def _out_of_range(where: str, text: str) -> ConfigurationError:
    shown = text if len(text) <= 40 else f"{text[:40]}... ({len(text)} characters)"
    return ConfigurationError(
        f"context value at key {where} is {shown}, outside the range of PostgreSQL numeric (which jsonb "
        "stores numbers as: at most 131072 digits before the point and 16383 after); pass it as a str"
    )


def _normalize(value: Any, where: str, decimals: list[str], depth: int) -> Any:
    """A plain JSON-able copy of ``value`` (see the module docstring); ``depth``: its container's level."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, enum.Enum):
        return _normalize(value.value, where, decimals, depth)
    if isinstance(value, str):
        _check_text(value, f"value at key {where}")
        return str(value)
    if isinstance(value, int):
        if value.bit_length() > 1000:  # only huge ints can overflow numeric or Python's int-to-text limit
            try:
                text = str(value)
            except ValueError:
                raise ConfigurationError(
                    f"context value at key {where} is an int too long for Python to write as text "
                    "(sys.get_int_max_str_digits()); pass it as a Decimal or str"
                ) from None
            if not numeric_literal_fits(text):
                raise _out_of_range(where, text)
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigurationError(f"context value at key {where} is {value!r}, which JSON cannot hold")
        return float(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ConfigurationError(f"context value at key {where} is {value!r}, which JSON cannot hold")
        text = str(value)
        if not numeric_literal_fits(text):
            raise _out_of_range(where, text)
        decimals.append(text)
        return f"\x00{len(decimals) - 1}"
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Mapping):
        return _normalize_mapping(value, where, decimals, depth + 1)
    if isinstance(value, (list, tuple)):
        _check_depth(depth + 1, where)
        return [_normalize(item, _path(where, i), decimals, depth + 1) for i, item in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        _check_depth(depth + 1, where)
        items = [_normalize(item, f"{where} (set item)", decimals, depth + 1) for item in value]
        return sorted(items, key=_dumps)
    raise TypeError(
        f"context value at key {where} is of type {type(value).__name__}, which is not JSON; "
        "convert it to str, int, float, bool, None, a list or a dict"
    )


def _check_depth(depth: int, where: str) -> None:
    if depth > MAX_CONTEXT_DEPTH:
        raise ConfigurationError(
            f"context is nested {depth} levels deep at key {where}, over the limit of {MAX_CONTEXT_DEPTH} "
            "levels (or a dict or list contains itself); flatten it"
        )


def _normalize_mapping(
    value: Mapping[Any, Any], where: str, decimals: list[str], depth: int
) -> dict[str, Any]:
    _check_depth(depth, where)
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(
                f"context key {_path(where, key)} is of type {type(key).__name__}; JSON keys must be str"
            )
        _check_text(key, f"key {_path(where, key)}")
        out[str(key)] = _normalize(item, _path(where, key), decimals, depth)
    return out


_DECIMAL_SLOT = re.compile(r'"\\u0000(\d+)"')
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _fast_json(value: Mapping[str, Any]) -> str | None:
    """JSON of a flat context of plain scalars (the common case) without the walk; None if not that case."""
    for key, item in value.items():
        if type(key) is not str or type(item) not in _SCALARS:
            return None
    try:
        text = _ENCODER.encode(value)
        text.encode("utf-8")
    except (ValueError, UnicodeEncodeError):  # NaN, lone surrogates: the walk names the key
        return None
    return None if "\\u0000" in text else text


def _dumps(value: Any, decimals: list[str] | None = None) -> str:
    """Compact UTF-8 JSON; Decimals (held as NUL-tagged slots, NUL being banned in user text) go in exact."""
    text = _ENCODER.encode(value)
    if decimals:
        text = _DECIMAL_SLOT.sub(lambda m: decimals[int(m.group(1))], text)
    return text


def encode_context(value: Mapping[str, Any] | None) -> EncodedContext | None:
    """Validate and encode a context once; ``None`` (and ``{}``) mean no context."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"context must be a dict or None, got {type(value).__name__}")
    if SQL_KEY in value:
        raise ConfigurationError(
            f"context key {SQL_KEY!r} is reserved for the statement text that bemi_tt adds; rename it"
        )
    if SIGNATURE_MEMBER in value:
        raise ConfigurationError(
            f"context key {SIGNATURE_MEMBER!r} is reserved for the signature that bemi_tt adds; rename it"
        )
    if not value:
        return None
    text = _fast_json(value)
    if text is None:
        decimals: list[str] = []
        text = _dumps(_normalize_mapping(value, "", decimals, 1), decimals)
    raw = text.encode("utf-8")
    if len(raw) > _settings.max_bytes:
        raise ConfigurationError(
            f"context is {len(raw)} bytes of JSON, over the limit of {_settings.max_bytes}; make it smaller "
            "or raise the limit with bemi_tt.context.configure_context(max_bytes=...)"
        )
    head = raw[:-1] + b","
    head += b" " * (-len(head) % 3)
    key = _signing_key
    return EncodedContext(
        data=dict(value),
        json=text,
        b64_head=base64.b64encode(head).decode("ascii"),
        signer=None if key is None else HeadSigner(key, head),
    )


def set_context(value: Mapping[str, Any] | None) -> None:
    """Set the context of the current thread / asyncio task; ``None`` clears it."""
    _current.set(encode_context(value))


def get_context() -> dict[str, Any]:
    """A copy of the current context (``{}`` when none is set)."""
    enc = _current.get()
    return {} if enc is None else dict(enc.data)


def current_encoded() -> EncodedContext | None:
    """The encoded context in force (for the hook and middleware)."""
    return _current.get()


def activate(enc: EncodedContext | None) -> Token[EncodedContext | None]:
    """Make an already encoded context current; pass the token to :func:`restore`."""
    return _current.set(enc)


def restore(token: Token[EncodedContext | None]) -> None:
    """Undo :func:`activate`."""
    _current.reset(token)


class context:
    """Scoped context merged over the current one; restores it on exit. Also a decorator for jobs."""

    def __init__(self, values: Mapping[str, Any] | None = None, /, **kv: Any) -> None:
        if values is not None and not isinstance(values, Mapping):
            raise TypeError(f"context() takes a dict or keyword arguments, got {type(values).__name__}")
        self._values = {**(values or {}), **kv}
        self._own = encode_context(self._values)  # validates now, not at the first write
        self._tokens: list[Token[EncodedContext | None]] = []

    def _merged(self) -> EncodedContext | None:
        outer = _current.get()
        if outer is None or not self._values:
            return self._own if outer is None else outer
        return encode_context({**outer.data, **self._values})

    def __enter__(self) -> dict[str, Any]:
        enc = self._merged()
        self._tokens.append(_current.set(enc))
        return {} if enc is None else dict(enc.data)

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._tokens.pop())

    def __call__(self, func: F) -> F:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with _scope(self):
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with _scope(self):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def _scope(ctx: context) -> Iterator[None]:
    """A fresh scope per call, so one decorated function can run in many threads at once."""
    token = _current.set(ctx._merged())
    try:
        yield
    finally:
        _current.reset(token)


class Bemi:
    """Seed-compatible entry points: ``Bemi.set_context(...)`` and the Alembic migration helpers."""

    @staticmethod
    def set_context(value: Mapping[str, Any] | None) -> None:
        """Same as :func:`bemi_tt.set_context`."""
        set_context(value)

    @staticmethod
    def get_context() -> dict[str, Any]:
        """Same as :func:`bemi_tt.get_context`."""
        return get_context()

    @staticmethod
    def migration_upgrade(
        *,
        replica_identity_full: bool = True,
        exclude_tables: Iterable[str] | None = None,
        exclude_columns: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        """Inside an Alembic ``upgrade()``: install tracking (see :func:`bemi_tt.triggers.install`)."""
        from bemi_tt.triggers import migration_upgrade

        migration_upgrade(replica_identity_full=replica_identity_full, exclude_tables=exclude_tables,
                          exclude_columns=exclude_columns)

    @staticmethod
    def migration_downgrade() -> None:
        """Inside an Alembic ``downgrade()``: remove tracking (see :func:`bemi_tt.triggers.uninstall`)."""
        from bemi_tt.triggers import migration_downgrade

        migration_downgrade()
