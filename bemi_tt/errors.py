"""The bemi_tt error tree: re-exported from ``capture.errors``, where it is defined and drawn once (the
capture worker shares it without importing pandas). ``help(capture.errors)`` shows the tree."""

from __future__ import annotations

from capture.errors import (
    BemiError,
    ChainError,
    ConfigurationError,
    ConflictError,
    ConnectionFailedError,
    DecodeError,
    OperationalError,
    PrivilegeError,
    SlotInUseError,
    SlotLostError,
    SourceError,
    StaleWarning,
    StorageError,
)

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
