"""The error tree shared by the capture worker and the library (re-exported as ``bemi_tt.errors``).

    BemiError
    ├── ConfigurationError   bad arguments, settings or server configuration; says the fix
    ├── SourceError          a database or Parquet source cannot be read or is inconsistent
    │   └── SlotLostError    the replication slot vanished or its WAL was removed
    └── DecodeError          malformed pgoutput bytes (what, and at which offset)

    UserWarning
    └── StaleWarning         an answer about "now" misses commits the capture worker has not written yet
"""

from __future__ import annotations

__all__ = ["BemiError", "ConfigurationError", "DecodeError", "SlotLostError", "SourceError", "StaleWarning"]


class BemiError(Exception):
    """Base class of every error raised on purpose by bemi_tt and its capture worker."""


class ConfigurationError(BemiError, ValueError):
    """A bad argument, setting or server configuration; the message says what to change."""


class SourceError(BemiError):
    """A source of changes (PostgreSQL or a Parquet export) cannot be read as expected."""


class SlotLostError(SourceError):
    """The replication slot is missing or invalidated: changes may have been lost."""


class DecodeError(BemiError):
    """Malformed pgoutput bytes; ``offset`` is where decoding failed."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        self.offset = offset
        super().__init__(message if offset is None else f"{message} (at byte offset {offset})")


class StaleWarning(UserWarning):
    """An answer about the present misses commits: the capture worker is behind (``bemi_tt.freshness()``)."""
