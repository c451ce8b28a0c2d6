"""The error tree shared by the capture worker and the library (re-exported as ``bemi_tt.errors``).

    BemiError
    ├── ConfigurationError        bad arguments, settings or server configuration; says the fix
    ├── ConflictError             an undo (revert/restore) met rows changed after what it undoes; names them
    ├── OperationalError          the environment refused an operation that was asked for correctly
    │   ├── PrivilegeError        the database role lacks a privilege; names the GRANT that fixes it
    │   ├── StorageError          files cannot be written or read: disk full, read-only, permissions
    │   ├── SlotInUseError        another capture worker reads the replication slot (its pid if known)
    │   └── SourceError           a database or Parquet source cannot be read or is inconsistent
    │       ├── ConnectionFailedError  a database cannot be reached, or refused the connection or login
    │       ├── SlotLostError     the replication slot vanished or its WAL was removed
    │       └── ChainError        the hash chain over ``changes`` is broken: names the first row at fault
    └── DecodeError               malformed pgoutput bytes (what, and at which offset)

    UserWarning
    └── StaleWarning              an answer about "now" misses commits capture has not written yet

The ``bemi-tt`` command exits 2 for a ``ConfigurationError`` (bad usage) and 1 for every other error.
Messages never hold a password: those built from a connection string go through ``capture.dsn.redact``.
"""

from __future__ import annotations

__all__ = [
    "BemiError",
    "ChainError",
    "ConfigurationError",
    "ConflictError",
    "ConnectionFailedError",
    "DecodeError",
    "OperationalError",
    "PrivilegeError",
    "SlotInUseError",
    "SlotLostError",
    "SourceError",
    "StaleWarning",
    "StorageError",
]


class BemiError(Exception):
    """Base class of every error raised on purpose by bemi_tt and its capture worker."""


class ConfigurationError(BemiError, ValueError):
    """A bad argument, setting or server configuration; the message says what to change."""


class ConflictError(BemiError):
    """Applying an undo plan (``revert``/``restore``) met rows changed after the changes it undoes, so it
    wrote nothing; ``rows`` names them (``todo id=1``)."""

    def __init__(self, message: str, rows: list[str] | None = None) -> None:
        self.rows = list(rows or [])
        super().__init__(message)


class OperationalError(BemiError):
    """An operation asked for correctly failed in its environment (network, server, disk, another worker).

    Not to be confused with the DB-API's ``psycopg.OperationalError``: this one is raised by bemi_tt,
    with a message that names what failed and says what to do.
    """


class PrivilegeError(OperationalError):
    """The database role lacks a privilege the operation needs; the message names the GRANT."""


class StorageError(OperationalError, OSError):
    """Files cannot be written or read: the disk is full, read-only, or permissions forbid it.

    Also an ``OSError``, so code that caught the operating system's error keeps working.
    """


class SlotInUseError(OperationalError):
    """Another capture worker is reading the replication slot; ``pid`` is its server process if known."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        self.pid = pid
        super().__init__(message)


class SourceError(OperationalError):
    """A source of changes (PostgreSQL or a Parquet export) cannot be read as expected."""


class ConnectionFailedError(SourceError):
    """A database cannot be reached, or it refused the connection or the login."""


class SlotLostError(SourceError):
    """The replication slot is missing or invalidated: changes may have been lost."""


class ChainError(SourceError):
    """``changes`` (or its export) was altered, or rows deleted or inserted by hand (see capture.chain)."""


class DecodeError(BemiError):
    """Malformed pgoutput bytes; ``offset`` is where decoding failed."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        self.offset = offset
        super().__init__(message if offset is None else f"{message} (at byte offset {offset})")


class StaleWarning(UserWarning):
    """An answer about the present misses commits: the capture worker is behind (``bemi_tt.freshness()``)."""
