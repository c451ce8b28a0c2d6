"""Signed context: keys, key ids and the HMAC that proves a context came from a process holding a key.

The application and the capture worker share a secret (``BEMI_TT_CONTEXT_KEY``, or
``bemi_tt.configure_context(signing_key=...)`` and ``bemi-tt capture --context-key-file FILE``). The hook
sends each context as the JSON object

    {<context members>, "SQL": "<statement>"   ,"_bemi_sig":"<key id>:<hex HMAC-SHA256>"}

inside the base64 marker: the HMAC covers every byte of the message before ``,"_bemi_sig"`` (context
members, the SQL member and its padding), exactly what the worker receives; the signature member, always
last, is stripped by the worker, which stores ``context_verified``:

- ``True``: the signature verifies with one of the worker's keys (so keys can be rotated: the worker
  accepts several, the application signs with one);
- ``False``: the worker has keys, but the context is unsigned, signed with an unknown key or altered
  (a hand-made ``/*bemi:...*/`` marker, a direct ``pg_logical_emit_message``, a statement without
  context);
- ``NULL``: the worker has no key.

What it proves: the context was produced by a process that holds a key. What it does not prove: that
the context belongs to *that* statement (a signed marker seen in a log can be replayed with another
statement in the same database), nor anything against an attacker who holds a key, or who is superuser
on the database (who can also rewrite ``changes``: see :mod:`capture.chain`).

Keys are text without whitespace, at least :data:`MIN_KEY_BYTES` bytes; several are separated by
whitespace or newlines (a key file holds one per line, ``#`` starts a comment line). A key's id is the
first 8 hex digits of a SHA-256 of the key, so no key needs a name.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capture.errors import ConfigurationError

__all__ = [
    "KEY_ENV",
    "MIN_KEY_BYTES",
    "SIGNATURE_MEMBER",
    "ContextKey",
    "HeadSigner",
    "KeyRing",
    "key_id",
    "keys_from_env",
    "load_key_file",
    "open_context",
    "parse_keys",
    "signature_member",
]

#: Environment variable holding the shared key(s) of the application and the worker.
KEY_ENV = "BEMI_TT_CONTEXT_KEY"
#: Shortest key accepted: an HMAC key guessable by brute force proves nothing.
MIN_KEY_BYTES = 16
#: The JSON member carrying the signature; reserved in contexts.
SIGNATURE_MEMBER = "_bemi_sig"
_SIGNATURE_TAIL = re.compile(rb',"_bemi_sig":"([0-9a-f]{8}):([0-9a-f]{64})"\}\Z')


def key_id(secret: bytes) -> str:
    """The public id of a key: 8 hex digits of a domain-separated SHA-256 (reveals nothing usable)."""
    return hashlib.sha256(b"bemi_tt context key id\x00" + secret).hexdigest()[:8]


@dataclass(frozen=True)
class ContextKey:
    """One signing key and its id."""

    id: str
    secret: bytes = b""

    def __repr__(self) -> str:  # never print the secret
        return f"ContextKey(id={self.id!r})"

    @classmethod
    def of(cls, secret: str | bytes, where: str = "the key") -> ContextKey:
        """A key from its text; ``ConfigurationError`` for a short or whitespace-holding key."""
        raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if len(raw) < MIN_KEY_BYTES:
            raise ConfigurationError(
                f"{where} is {len(raw)} bytes, shorter than {MIN_KEY_BYTES}: use a random key, e.g. "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        if raw.split() != [raw]:
            raise ConfigurationError(f"{where} contains whitespace, which separates keys; remove it")
        return cls(key_id(raw), raw)

    def sign(self, message: bytes) -> bytes:
        """The signature member that goes after ``message`` (an unfinished JSON object)."""
        return signature_member(self.id, hmac.digest(self.secret, message, "sha256").hex())


class HeadSigner:
    """HMAC-SHA256 of ``head + tail`` for many tails, the head hashed once (the hook: one per context).

    RFC 2104 by hand on hashlib states: the inner hash after ``key ^ ipad`` and the head, and the outer
    hash after ``key ^ opad``, are copied per tail (C copies; ``hmac.HMAC.copy`` costs ~10x more).
    """

    def __init__(self, key: ContextKey, head: bytes) -> None:
        pads = _PADS.get(key.secret)
        if pads is None:  # once per key: set_context pays two C hash copies, not the key schedule
            secret = key.secret if len(key.secret) <= 64 else hashlib.sha256(key.secret).digest()
            secret = secret.ljust(64, b"\0")
            pads = _PADS[key.secret] = (
                hashlib.sha256(bytes(b ^ 0x36 for b in secret)),
                hashlib.sha256(bytes(b ^ 0x5C for b in secret)),
            )
        self.key_id = key.id
        self._inner = pads[0].copy()
        self._inner.update(head)
        self._outer = pads[1]

    def member(self, tail: bytes) -> bytes:
        """The signature member closing ``head + tail``."""
        inner = self._inner.copy()
        inner.update(tail)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return signature_member(self.key_id, outer.hexdigest())


#: key secret -> (inner, outer) hash states after the padded key (a handful of keys per process)
_PADS: dict[bytes, tuple[Any, Any]] = {}


def signature_member(kid: str, mac_hex: str) -> bytes:
    """``,"_bemi_sig":"<kid>:<mac>"}``: closes the object whose bytes the MAC covers."""
    return f',"{SIGNATURE_MEMBER}":"{kid}:{mac_hex}"}}'.encode("ascii")


def parse_keys(text: str, where: str = "the context keys") -> tuple[ContextKey, ...]:
    """Keys from text: separated by whitespace or newlines; lines starting with ``#`` are comments."""
    keys: list[ContextKey] = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        for item in line.split():
            keys.append(ContextKey.of(item, f"key {len(keys) + 1} of {where} (line {number})"))
    return tuple(keys)


def keys_from_env(environ: Mapping[str, str] | None = None) -> tuple[ContextKey, ...]:
    """The keys in ``BEMI_TT_CONTEXT_KEY`` (empty when unset)."""
    value = (os.environ if environ is None else environ).get(KEY_ENV, "")
    return parse_keys(value, KEY_ENV) if value.strip() else ()


def load_key_file(path: str | os.PathLike[str]) -> tuple[ContextKey, ...]:
    """The keys in a file (one per line); ``ConfigurationError`` when it is missing or holds none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read the context key file {str(path)!r}: {exc.strerror}") from None
    keys = parse_keys(text, f"key file {str(path)!r}")
    if not keys:
        raise ConfigurationError(f"the context key file {str(path)!r} holds no key; write one per line")
    return keys


class KeyRing:
    """The worker's accepted keys, by id."""

    def __init__(self, keys: Iterable[ContextKey | str | bytes]) -> None:
        self._by_id: dict[str, bytes] = {}
        for key in keys:
            key = key if isinstance(key, ContextKey) else ContextKey.of(key)
            self._by_id[key.id] = key.secret
        if not self._by_id:
            raise ConfigurationError("a key ring needs at least one key (or pass no keys at all)")

    @property
    def ids(self) -> tuple[str, ...]:
        """The accepted key ids (safe to log)."""
        return tuple(self._by_id)

    def __repr__(self) -> str:
        return f"KeyRing(ids={self.ids!r})"

    def verify(self, content: bytes) -> tuple[bytes, bool]:
        """``content`` without its signature member, and whether the signature verifies."""
        body, kid, mac = _split(content)
        if kid is None:
            return body, False
        secret = self._by_id.get(kid)
        if secret is None:
            return body, False
        expected = hmac.digest(secret, content[: len(body) - 1], "sha256")
        return body, hmac.compare_digest(expected, bytes.fromhex(mac))


def _split(content: bytes) -> tuple[bytes, str | None, str]:
    """(content with the signature member replaced by ``}``, key id, mac hex), or (content, None, "")."""
    if SIGNATURE_MEMBER.encode() not in content[-90:]:
        return content, None, ""
    match = _SIGNATURE_TAIL.search(content)
    if match is None:
        return content, None, ""
    return content[: match.start()] + b"}", match.group(1).decode(), match.group(2).decode()


def open_context(content: bytes, keys: KeyRing | None) -> tuple[bytes, bool | None]:
    """A ``bemi`` message's content as the context to store, and its ``context_verified`` value.

    The signature member is stripped whether or not the worker has keys, so the stored context is the
    same either way; without keys the result is ``None`` (not checked).
    """
    if keys is None:
        return _split(content)[0], None
    return keys.verify(content)

