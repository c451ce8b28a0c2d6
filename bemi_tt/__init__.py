"""bemi_tt: time travel and audit for PostgreSQL applications written with SQLAlchemy.

    import bemi_tt
    bemi_tt.set_context({"user_id": 7, "endpoint": "/todo"})   # every write now carries it into the WAL
    ...
    bemi_tt.connect("postgresql://…")                           # or a Parquet export directory
    bemi_tt.as_of("todo", "2026-11-27 10:00")                   # the table as it was, as a typed DataFrame

Importing the package activates the SQLAlchemy hook for every PostgreSQL engine. The analysis functions
are loaded on first use, so an application that only sets context never imports pandas or DuckDB.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from bemi_tt import hook as _hook  # noqa: F401  (registers the SQLAlchemy hook on import)
from bemi_tt.context import Bemi, configure_context, context, get_context, set_context
from capture.errors import (
    BemiError,
    ChainError,
    ConfigurationError,
    DecodeError,
    SlotLostError,
    SourceError,
    StaleWarning,
)

try:
    __version__ = version("bemi-tt")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "unknown"

if TYPE_CHECKING:
    from bemi_tt.duckdb_macros import duckdb, register_as_of
    from bemi_tt.embedded import EmbeddedPostgres
    from bemi_tt.middleware import BemiFastAPIMiddleware
    from bemi_tt.plots import plot_activity
    from bemi_tt.retention import erase, prune
    from bemi_tt.sources import InMemorySource, connect
    from bemi_tt.staleness import Freshness, freshness
    from bemi_tt.timetravel import as_of, audit, blame, changes, diff, history
    from bemi_tt.triggers import install, uninstall
    from bemi_tt.undo import restore, revert
    from capture.errors import ConflictError
    from capture.export import export_parquet
    from capture.verify import verify

# Public name -> module that defines it; imported on first attribute access (PEP 562).
_LAZY = {
    "BemiFastAPIMiddleware": "bemi_tt.middleware",
    "ConflictError": "capture.errors",
    "EmbeddedPostgres": "bemi_tt.embedded",
    "Freshness": "bemi_tt.staleness",
    "InMemorySource": "bemi_tt.sources",
    "as_of": "bemi_tt.timetravel",
    "audit": "bemi_tt.timetravel",
    "blame": "bemi_tt.timetravel",
    "changes": "bemi_tt.timetravel",
    "connect": "bemi_tt.sources",
    "diff": "bemi_tt.timetravel",
    "duckdb": "bemi_tt.duckdb_macros",
    "erase": "bemi_tt.retention",
    "export_parquet": "capture.export",
    "freshness": "bemi_tt.staleness",
    "history": "bemi_tt.timetravel",
    "install": "bemi_tt.triggers",
    "plot_activity": "bemi_tt.plots",
    "prune": "bemi_tt.retention",
    "register_as_of": "bemi_tt.duckdb_macros",
    "restore": "bemi_tt.undo",
    "revert": "bemi_tt.undo",
    "uninstall": "bemi_tt.triggers",
    "verify": "capture.verify",
}

__all__ = [
    "Bemi",
    "BemiError",
    "BemiFastAPIMiddleware",
    "ChainError",
    "ConfigurationError",
    "ConflictError",
    "DecodeError",
    "EmbeddedPostgres",
    "Freshness",
    "InMemorySource",
    "SlotLostError",
    "SourceError",
    "StaleWarning",
    "__version__",
    "as_of",
    "audit",
    "blame",
    "changes",
    "configure_context",
    "connect",
    "context",
    "diff",
    "duckdb",
    "erase",
    "export_parquet",
    "freshness",
    "get_context",
    "history",
    "install",
    "plot_activity",
    "prune",
    "register_as_of",
    "restore",
    "revert",
    "set_context",
    "uninstall",
    "verify",
]


# Public classes show ``bemi_tt`` as their module (tracebacks, reprs, pickling all find them here).
for _public in (Bemi, BemiError, ChainError, ConfigurationError, DecodeError, SlotLostError, SourceError,
                StaleWarning, context):
    _public.__module__ = __name__


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bemi_tt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    if isinstance(value, type):
        value.__module__ = __name__
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
