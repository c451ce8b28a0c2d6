"""The bemi_tt error tree (defined in ``capture.errors`` so the worker shares it without pandas).

    BemiError
    ├── ConfigurationError   bad arguments, settings or server configuration; says the fix
    ├── SourceError          a database or Parquet source cannot be read or is inconsistent
    │   └── SlotLostError    the replication slot vanished or its WAL was removed
    └── DecodeError          malformed pgoutput bytes (what, and at which offset)

    UserWarning
    └── StaleWarning         an answer about "now" misses commits the capture worker has not written yet
"""

from __future__ import annotations

from capture.errors import (
    BemiError,
    ConfigurationError,
    DecodeError,
    SlotLostError,
    SourceError,
    StaleWarning,
)

__all__ = ["BemiError", "ConfigurationError", "DecodeError", "SlotLostError", "SourceError", "StaleWarning"]
