"""Connection strings: checking them, describing them and keeping their passwords out of every message.

One mechanism, used wherever a message or log line can hold a connection string or a database error:

* :func:`redact` removes passwords from any text: the password of a URL (``scheme://user:PW@``), the
  value of a ``password=`` key (libpq string or URL query), the tokens libpq quotes when it cannot parse a
  URL (``invalid percent-encoded token: "p%zzW"``), and every password this process was given (they are
  remembered by :func:`remember` when a connection string passes :func:`check_dsn`, and by the CLI for its
  arguments), wherever it appears.
* :func:`check_dsn` turns a SQLAlchemy URL into a libpq one and parses it with libpq; a malformed one is a
  ``ConfigurationError`` whose message is already redacted.
* :func:`connect_error` and :func:`database_error` map psycopg's exceptions to the error tree in
  ``capture.errors`` with one-line, redacted messages.

A leaf module (psycopg and ``capture.errors`` only): ``bemi_tt`` and ``capture`` both use it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any
from urllib.parse import unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from capture.errors import (
    BemiError,
    ConfigurationError,
    ConnectionFailedError,
    PrivilegeError,
    SlotInUseError,
    SourceError,
    StorageError,
)

__all__ = [
    "MASK",
    "RedactingFilter",
    "check_dsn",
    "connect_changes",
    "connect_error",
    "database_error",
    "describe",
    "one_line",
    "redact",
    "remember",
    "secrets_of",
]

MASK = "***"
#: Shorter remembered passwords are not replaced inside arbitrary text (it would garble every message);
#: the structural rules below still remove them from URLs and ``password=`` keys.
MIN_SECRET = 3
#: Environment variables whose value is a password libpq or bemi_tt may use.
PASSWORD_ENV = ("PGPASSWORD", "DB_PASSWORD")

# scheme://user:PASSWORD@ (libpq ends the user info at the first "@" or "/"; a password holding either
# is still caught, as the match runs to the last "@" of the token)
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s\"']*:)[^\s\"']*@")
# password=VALUE in a libpq string ('quoted' or bare) or in a URL query (?password=...&)
_KEY_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|[^\s&'\"]+)", re.IGNORECASE)
# libpq quotes the undecodable token of a URL, which is often the password itself
_LIBPQ_TOKEN = re.compile(
    r"(?P<head>(?:invalid percent-encoded token|forbidden value %00 in percent-encoded value): \")[^\"]*"
)
_KEYWORD_VALUE = re.compile(
    r"\bpassword\s*=\s*('(?:[^'\\]|\\.)*'?|\S*)((?:\s+[^\s=]+(?=\s|$))*)", re.IGNORECASE
)
_SCHEMES = ("postgresql+", "postgres+")

_known: set[str] = set()
_known_lock = threading.Lock()


def secrets_of(dsn: object) -> set[str]:
    """Every spelling of the password(s) in ``dsn``, parsed as libpq would and as a person meant it.

    Works on strings libpq cannot parse too (that is when libpq quotes parts of them in its messages).
    """
    if not isinstance(dsn, str) or not dsn:
        return set()
    found: set[str] = set()
    try:
        password = conninfo_to_dict(_libpq_form(dsn)).get("password")
        if password:
            found.add(str(password))
    except (psycopg.Error, TypeError, ValueError):
        pass
    _scheme, sep, rest = dsn.partition("://")
    if sep and "@" in rest:
        query_start = rest.find("?")
        userinfo = rest[: rest.rfind("@", 0, query_start if query_start >= 0 else len(rest))]
        if ":" in userinfo:
            raw = userinfo.split(":", 1)[1]
            found.update({raw, unquote(raw)})
            found.update(part for part in re.split(r"[/@]", raw) if part)  # what libpq may take apart
    for match in _KEYWORD_VALUE.finditer(dsn):
        value = match.group(1)
        if value.startswith("'"):
            value = value[1:-1] if value.endswith("'") and len(value) > 1 else value[1:]
            value = re.sub(r"\\(.)", r"\1", value)
        elif "://" in dsn:
            value = re.split(r"[&#]", value)[0]  # in a URL query the value ends at "&"
        found.update({value, unquote(value)})
        found.update(match.group(2).split())  # words of an unquoted password with spaces
    return {s for s in found if s}


def remember(*dsns: object) -> None:
    """Remember the passwords of ``dsns`` (and of ``$PGPASSWORD``/``$DB_PASSWORD``) for :func:`redact`."""
    found: set[str] = set()
    for dsn in dsns:
        found |= secrets_of(dsn)
    for name in PASSWORD_ENV:
        value = os.environ.get(name)
        if value:
            found.add(value)
    if found:
        with _known_lock:
            _known.update(found)


def redact(text: object, *dsns: object) -> str:
    """``text`` without any password: structural rules, then the passwords of ``dsns`` and remembered ones."""
    result = str(text)
    result = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}{MASK}@", result)
    result = _KEY_PASSWORD.sub(lambda m: f"{m.group('head')}{MASK}", result)
    result = _LIBPQ_TOKEN.sub(lambda m: f"{m.group('head')}{MASK}", result)
    secrets: set[str] = set()
    for dsn in dsns:
        secrets |= secrets_of(dsn)
    with _known_lock:
        secrets |= _known
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: a password holding another
        if len(secret) >= MIN_SECRET and secret != MASK:
            result = result.replace(secret, MASK)
    return result


def one_line(text: object) -> str:
    """``text`` on one line: libpq's multi-line messages (detail, hint, one line per host) joined by '; '."""
    lines = [line.strip() for line in str(text).splitlines()]
    joined = "; ".join(line for line in lines if line)
    return joined or (type(text).__name__ if isinstance(text, BaseException) else "")


def _libpq_form(dsn: str) -> str:
    scheme, sep, rest = dsn.partition("://")
    if sep and scheme.startswith(_SCHEMES):
        return f"postgresql://{rest}"  # a SQLAlchemy URL such as postgresql+psycopg://...
    return dsn


def check_dsn(dsn: object, *, what: str = "dsn") -> str:
    """``dsn`` as a libpq connection string (SQLAlchemy URLs rewritten), parsed once by libpq.

    Its passwords are remembered for :func:`redact`; a malformed string raises ``ConfigurationError``
    with a redacted message that says how to fix it.
    """
    if not isinstance(dsn, str) or not dsn.strip():
        raise ConfigurationError(f"{what} must be a non-empty connection string or URL, got {redact(dsn)!r}")
    remember(dsn)
    libpq = _libpq_form(dsn.strip())
    try:
        conninfo_to_dict(libpq)
    except psycopg.Error as exc:
        message = one_line(redact(exc, dsn))
        hint = (
            "; percent-encode special characters of the user name and password (% as %25, @ as %40, "
            "/ as %2F)"
            if "percent-encoded" in message
            else ""
        )
        raise ConfigurationError(
            f"{what} {redact(dsn)!r} is not a valid PostgreSQL URL or connection string: {message}{hint}"
        ) from None
    return libpq


def describe(dsn: object) -> str:
    """Where ``dsn`` points, ``user@host:port/dbname``, never its password (for messages and logs)."""
    if not isinstance(dsn, str):
        return "<no database>"
    try:
        params = conninfo_to_dict(_libpq_form(dsn))
    except (psycopg.Error, TypeError, ValueError):
        return redact(dsn, dsn)
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    port = f":{params['port']}" if params.get("port") else ""
    user = f"{params['user']}@" if params.get("user") else ""
    return redact(f"{user}{host}{port}/{params.get('dbname') or ''}", dsn)


def _original(exc: BaseException) -> BaseException:
    """The driver's exception inside a SQLAlchemy wrapper (``exc.orig``), else ``exc``."""
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


def connect_error(exc: BaseException, dsn: object, *, what: str = "the database") -> BemiError:
    """The error-tree exception for ``exc``, raised while connecting to ``dsn`` (redacted, one line)."""
    inner = _original(exc)
    message = one_line(redact(inner, dsn))
    if isinstance(inner, BemiError):
        return inner
    if isinstance(inner, psycopg.ProgrammingError):  # libpq rejected the connection string itself
        return ConfigurationError(
            f"invalid connection string for {what} {describe(dsn)}: {message}; check the URL or the "
            "key=value options"
        )
    return ConnectionFailedError(
        f"cannot connect to {what} {describe(dsn)}: {message}; check host, port, database name, user "
        "and password, and that the server accepts connections"
    )


_PRIVILEGE_TARGET = re.compile(r"permission denied for (database|schema|table|relation|sequence) (\S+)")


def database_error(exc: BaseException, doing: str, dsn: object, *, role: str | None = None) -> BemiError:
    """The error-tree exception for a database error raised while ``doing`` something on ``dsn``."""
    inner = _original(exc)
    if isinstance(inner, BemiError):
        return inner
    message = one_line(redact(inner, dsn))
    where = describe(dsn)
    if isinstance(inner, psycopg.errors.InsufficientPrivilege):
        who = role or "the role"
        grant = ""
        found = _PRIVILEGE_TARGET.search(message)
        if found:
            kind, name = found.group(1), found.group(2).strip("\"'")
            privilege = {"database": "CREATE", "schema": "USAGE, CREATE"}.get(kind, "SELECT, INSERT, UPDATE")
            target = {"relation": "TABLE"}.get(kind, kind.upper())
            grant = f"; run GRANT {privilege} ON {target} {name} TO {who}; as its owner"
        return PrivilegeError(f"{doing} on {where} failed: {message}{grant}, or use a role that has it")
    if isinstance(inner, psycopg.errors.DiskFull):
        return StorageError(f"{doing} on {where} failed: the server's disk is full: {message}")
    if isinstance(inner, psycopg.errors.ObjectInUse):
        pid = re.search(r"PID (\d+)", message)
        return SlotInUseError(
            f"{doing} on {where} failed: {message}; stop the other reader first",
            int(pid.group(1)) if pid else None,
        )
    if isinstance(inner, psycopg.OperationalError):
        return ConnectionFailedError(f"{doing} on {where} failed: the connection broke: {message}")
    if isinstance(inner, (psycopg.errors.InvalidName, psycopg.errors.InvalidParameterValue)):
        return ConfigurationError(f"{doing} on {where} failed: {message}")
    return SourceError(f"{doing} on {where} failed: {message}")


class RedactingFilter(logging.Filter):
    """A logging filter (for handlers) that passes every record through :func:`redact`, traceback too."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info:
            formatted = logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact(formatted)
            record.exc_info = None
        return True


def connect_changes(dsn: Any) -> Any:
    """A connection to the database holding ``changes`` (``dsn`` itself when it is one)."""
    if isinstance(dsn, psycopg.Connection):
        return dsn
    libpq = check_dsn(dsn, what="dsn")  # names a bad value without its password
    try:
        return psycopg.connect(libpq)
    except psycopg.Error as exc:
        raise connect_error(exc, dsn, what="the database holding changes") from None
