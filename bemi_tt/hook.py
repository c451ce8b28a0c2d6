"""The SQLAlchemy hook: prepends ``/*bemi:<base64 JSON>*/`` to PostgreSQL write statements.

Registered on import for every ``Engine`` (an ``AsyncEngine`` runs on one), whatever the driver
(psycopg 3, psycopg2, asyncpg); other dialects and non-write statements reach the driver unchanged.
The hot path is a dict lookup: the context is encoded when set, each statement is classified once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from bemi_tt.context import _current
from capture.protocol import MARKER_PREFIX

__all__ = ["MARKER_PREFIX", "install_hook", "is_write", "uninstall_hook"]

#: Statements that change rows and so fire the statement-level trigger (TRUNCATE included: who emptied it).
WRITE_KEYWORDS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "TRUNCATE"})
_DML = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE"})
#: Statements whose writes run inside them (procedures, anonymous blocks, prepared statements): the trigger
#: reads current_query(), the top-level text, so the marker goes on them. (A SELECT of a function that
#: writes cannot be told from a read: not marked.)
_WRAPPERS = frozenset({"CALL", "DO", "EXECUTE"})
_CACHE_LIMIT = 4096

# Whitespace, comments, quoted strings/identifiers, dollar quotes and words, in one pass.
_TOKEN = re.compile(
    r"""\s+|--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'|"(?:[^"]|"")*"|\$([A-Za-z_]\w*)?\$.*?\$\1\$|([A-Za-z_][\w$]*)|.""",
    re.S,
)
_classified: dict[str, bool] = {}


def _words(statement: str) -> Iterator[str]:
    """Upper-cased keywords and names, outside literals and comments, lazily (most need only the first)."""
    for match in _TOKEN.finditer(statement):
        if match.group(2):
            yield match.group(2).upper()


def _classify(statement: str) -> bool:
    words = _words(statement)
    first = next(words, None)
    if first is None or first in WRITE_KEYWORDS or first in _WRAPPERS:
        return first is not None
    if first == "EXPLAIN":  # EXPLAIN ANALYZE runs the statement
        rest = list(words)
        return "ANALYZE" in rest and any(word in _DML for word in rest)
    if first != "WITH":
        return False
    # A data-modifying CTE: any DML keyword that is not a locking clause (FOR [NO KEY] UPDATE).
    previous = first
    for word in words:
        if word in _DML and not (word == "UPDATE" and previous in {"FOR", "KEY"}):
            return True
        previous = word
    return False


def is_write(statement: str) -> bool:
    """Whether ``statement`` writes rows (INSERT/UPDATE/DELETE/MERGE/TRUNCATE, also inside WITH)."""
    if not isinstance(statement, str):
        raise TypeError(f"statement must be str, got {type(statement).__name__}")
    known = _classified.get(statement)
    if known is None:
        if len(_classified) >= _CACHE_LIMIT:
            _classified.clear()
        known = _classified[statement] = _classify(statement)
    return known


def _before_cursor_execute(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> tuple[str, Any]:
    enc = _current.get()
    if enc is None or conn.dialect.name != "postgresql":
        return statement, parameters
    marked = enc.statements.get(statement)
    if marked is None:
        if not is_write(statement):
            return statement, parameters
        marked = enc.marked(statement)
    return marked, parameters


def install_hook() -> None:
    """Register the hook on every SQLAlchemy engine (done on import; idempotent)."""
    if not event.contains(Engine, "before_cursor_execute", _before_cursor_execute):
        event.listen(Engine, "before_cursor_execute", _before_cursor_execute, retval=True)


def uninstall_hook() -> None:
    """Stop marking statements (for tests and benchmarks)."""
    if event.contains(Engine, "before_cursor_execute", _before_cursor_execute):
        event.remove(Engine, "before_cursor_execute", _before_cursor_execute)


install_hook()
