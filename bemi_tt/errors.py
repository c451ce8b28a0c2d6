"""The bemi_tt error tree (defined in ``capture.errors`` so the worker shares it without pandas).

    BemiError
    ├── ConfigurationError        bad arguments, settings or server configuration; says the fix
    ├── OperationalError          the environment refused an operation that was asked for correctly
    │   ├── PrivilegeError        the database role lacks a privilege; names the GRANT that fixes it
    │   ├── StorageError          files cannot be written or read: disk full, read-only, permissions
    │   ├── SlotInUseError        another capture worker reads the replication slot (its pid if known)
    │   └── SourceError           a database or Parquet source cannot be read or is inconsistent
    │       ├── ConnectionFailedError  a database cannot be reached, or refused the connection or login
    │       ├── SlotLostError     the replication slot vanished or its WAL was removed
    │       └── ChainError        the hash chain over ``changes`` is broken: names the first row at fault
    └── DecodeError               malformed pgoutput bytes (what, and at which offset)
"""

from __future__ import annotations

from capture.errors import (
    BemiError,
    ChainError,
    ConfigurationError,
    ConnectionFailedError,
    DecodeError,
    OperationalError,
    PrivilegeError,
    SlotInUseError,
    SlotLostError,
    SourceError,
    StorageError,
)

__all__ = [
    "BemiError",
    "ChainError",
    "ConfigurationError",
    "ConnectionFailedError",
    "DecodeError",
    "OperationalError",
    "PrivilegeError",
    "SlotInUseError",
    "SlotLostError",
    "SourceError",
    "StorageError",
]
