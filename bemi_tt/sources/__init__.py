"""Where the analysis API reads changes from: PostgreSQL ``changes``, a Parquet export, or memory.

Every source does one thing: put the rows of ``changes`` (optionally one table's, up to a time) and of
``changes_schemas`` into a DuckDB connection, so every operation runs the same SQL on every source.
``connect(url_or_dir)`` sets the default source; the ``BEMI_TT_SOURCE`` environment variable does too.
"""

from __future__ import annotations

import os
import threading
from datetime import datetime, timezone
from typing import Any

from bemi_tt.sources.base import SCHEMAS_ARROW, Scope, Source, TableName, json_text
from bemi_tt.sources.memory import InMemorySource
from bemi_tt.sources.parquet import ParquetSource
from bemi_tt.sources.postgres import PostgresSource
from capture.dsn import redact
from capture.errors import ConfigurationError, SourceError

__all__ = [
    "SCHEMAS_ARROW",
    "SOURCE_ENV",
    "InMemorySource",
    "ParquetSource",
    "PostgresSource",
    "Scope",
    "Source",
    "TableName",
    "as_source",
    "connect",
    "get_source",
    "json_text",
]

SOURCE_ENV = "BEMI_TT_SOURCE"

# -- choosing a source --------------------------------------------------------------------------------
_default: Source | None = None
_lock = threading.Lock()


def _directory_source(directory: str | os.PathLike[str]) -> Source:
    """A Delta export (a ``_delta_log/`` directory) or a Parquet export."""
    from bemi_tt.delta_source import DeltaSource, is_delta_directory

    try:
        delta = is_delta_directory(directory)
    except (ConfigurationError, SourceError):  # unreachable or odd URI: the Parquet source reports it on use
        delta = False
    return DeltaSource(directory) if delta else ParquetSource(directory)


def as_source(value: Any) -> Source:
    """A :class:`Source` for a URL, conninfo, directory, SQLAlchemy engine, or a Source itself."""
    if isinstance(value, Source):
        return value
    if hasattr(value, "dialect") and (hasattr(value, "url") or hasattr(value, "engine")):
        return PostgresSource.from_engine(value)
    if isinstance(value, os.PathLike):
        return _directory_source(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(
            f"source {redact(value)!r} is not usable: pass a postgresql:// URL, a libpq conninfo, "
            "a SQLAlchemy engine, a Parquet export directory or a Source"
        )
    text = value.strip()
    if text.startswith(("postgresql://", "postgres://", "postgresql+", "postgres+")):
        return PostgresSource(text)
    if "://" in text or os.path.isdir(text):
        return _directory_source(text)
    if "=" in text:
        return PostgresSource(text)
    raise ConfigurationError(
        f"source {redact(value)!r} is neither a PostgreSQL URL/conninfo nor an existing export "
        "directory: check the path or the URL"
    )


def connect(url_or_dir: Any) -> Source | None:
    """Set (and return) the default source of the module-level functions ``as_of``, ``diff``, ...;
    ``connect(None)`` forgets it (``$BEMI_TT_SOURCE`` applies again)."""
    global _default
    source = None if url_or_dir is None else as_source(url_or_dir)
    with _lock:
        _default = source
    return source


def get_source(source: Any = None) -> Source:
    """``source`` if given, else the one set by :func:`connect`, else ``$BEMI_TT_SOURCE``."""
    if source is not None:
        return as_source(source)
    if _default is not None:
        return _default
    env = os.environ.get(SOURCE_ENV)
    if env:
        return as_source(env)
    raise ConfigurationError(
        f"no source of changes: call bemi_tt.connect(url_or_dir), set {SOURCE_ENV}, or pass source="
    )


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
