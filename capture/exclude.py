"""Selective tracking: the tables and columns ``bemi_tt.install`` was told never to record.

``install(..., exclude_tables=..., exclude_columns=...)`` stores the exclusions in ``bemi_tt.exclusions``
(one row per table: ``columns`` NULL for a whole table) and, in the same transaction, emits a
``bemi_exclude`` message carrying the whole new configuration, so the worker applies it in stream order
(:class:`capture.stitch.Stitcher`). The worker starts from the stored configuration (the newest one), so
after a restart a change decoded again before the message is filtered at least as strictly as the
configuration it was made under.

Excluded columns are dropped from ``before`` and ``after`` (and from the unchanged-TOAST names the sink
fills) before anything is written, and from the column lists of ``changes_schemas``; every version of a
table with exclusions says so with an ``exclude`` event (``{"kind": "exclude", "columns": [...]}``).
Excluded tables are not recorded at all; a table excluded after it was tracked gets an ``untracked``
version (``{"what": "table", "reason": "excluded"}``). A primary key column cannot be excluded (the key
is kept in ``primary_key``). Exclusions follow names: a renamed column is matched by its new name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from capture.errors import ConfigurationError

__all__ = [
    "EXCLUDE_PREFIX",
    "Exclusions",
    "drop_members",
    "load_exclusions",
    "parse_exclusions",
    "readable",
    "recorded_exclusions",
]

#: The logical message install emits (transactional) whenever the configuration changes.
EXCLUDE_PREFIX = "bemi_exclude"

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
#: ``scanstring(text, index after the opening quote) -> (str, end)`` (untyped in typeshed)
scanstring: Any = getattr(json.decoder, "scanstring")  # noqa: B009


def drop_members(text: str, names: frozenset[str] | set[str]) -> str:
    """The JSON object ``text`` without the members named in ``names``; every other byte as it was.

    Values are skipped with the JSON scanner, never re-serialized, so numbers and strings keep their exact
    text (the row digest is computed over what is written).
    """
    if not names or text == "{}":
        return text
    ws = _WS.match
    pos = ws(text, 0).end()  # type: ignore[union-attr]
    if text[pos:pos + 1] != "{":
        raise ValueError(f"not a JSON object: {text[:40]!r}")
    pos += 1
    kept: list[str] = []
    dropped = False
    while True:
        pos = ws(text, pos).end()  # type: ignore[union-attr]
        if text[pos:pos + 1] == "}":
            break
        start = pos
        if text[pos:pos + 1] != '"':
            raise ValueError(f"not a JSON object: {text[:40]!r}")
        key, pos = scanstring(text, pos + 1)
        pos = ws(text, pos).end()  # type: ignore[union-attr]
        if text[pos:pos + 1] != ":":
            raise ValueError(f"not a JSON object: {text[:40]!r}")
        pos = ws(text, pos + 1).end()  # type: ignore[union-attr]
        _, end = _DECODER.raw_decode(text, pos)
        if key in names:
            dropped = True
        else:
            kept.append(text[start:end])
        pos = ws(text, end).end()  # type: ignore[union-attr]
        if text[pos:pos + 1] == ",":
            pos += 1
            continue
        if text[pos:pos + 1] != "}":
            raise ValueError(f"not a JSON object: {text[:40]!r}")
        break
    return "{" + ",".join(kept) + "}" if dropped else text


@dataclass
class Exclusions:
    """What is never recorded: whole tables, and columns per table (``(schema, table)`` keys)."""

    tables: set[tuple[str, str]] = field(default_factory=set)
    columns: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.tables or self.columns)

    @classmethod
    def from_config(cls, config: Iterable[Mapping[str, Any]]) -> Exclusions:
        """From the message / table form: ``[{"schema", "table", "columns": [...] | None}, ...]``."""
        out = cls()
        for entry in config:
            name = (str(entry["schema"]), str(entry["table"]))
            columns = entry.get("columns")
            if columns is None:
                out.tables.add(name)
            elif columns:
                out.columns[name] = frozenset(str(c) for c in columns)
        return out

    def config(self) -> list[dict[str, Any]]:
        """The message / table form, sorted (so equal configurations have equal text)."""
        entries: list[dict[str, Any]] = [{"schema": s, "table": t, "columns": None} for s, t in self.tables]
        entries += [{"schema": s, "table": t, "columns": sorted(c)} for (s, t), c in self.columns.items()
                    if (s, t) not in self.tables]
        return sorted(entries, key=lambda e: (e["schema"], e["table"]))

    def replace(self, other: Exclusions) -> None:
        """Take ``other``'s configuration in place (stitchers and the session share this object)."""
        self.tables = set(other.tables)
        self.columns = dict(other.columns)

    def table(self, schema: str, table: str) -> bool:
        """Whether the whole table is excluded."""
        return (schema, table) in self.tables

    def columns_of(self, schema: str, table: str) -> frozenset[str]:
        """The excluded columns of a table (empty when none)."""
        return self.columns.get((schema, table), frozenset())


def parse_exclusions(
    exclude_tables: Iterable[str] | None, exclude_columns: Mapping[str, Iterable[str]] | None
) -> Exclusions:
    """Install's arguments → :class:`Exclusions`; unqualified names are in schema ``public``."""
    out = Exclusions()
    if isinstance(exclude_tables, str):
        raise ConfigurationError(
            f"exclude_tables must be a list of table names, got the string {exclude_tables!r}; "
            f"write exclude_tables=[{exclude_tables!r}]"
        )
    for name in exclude_tables or ():
        out.tables.add(_qualified(name, "exclude_tables"))
    if exclude_columns is not None and not isinstance(exclude_columns, Mapping):
        raise ConfigurationError(
            "exclude_columns must map table names to lists of column names, e.g. "
            f"{{'users': ['password_hash']}}, got {exclude_columns!r}"
        )
    for name, columns in (exclude_columns or {}).items():
        if isinstance(columns, str):
            raise ConfigurationError(
                f"exclude_columns[{name!r}] must be a list of column names, got the string {columns!r}; "
                f"write [{columns!r}]"
            )
        cols = frozenset(columns)
        if not cols or not all(isinstance(c, str) and c for c in cols):
            raise ConfigurationError(
                f"exclude_columns[{name!r}] must be a non-empty list of column names, got {columns!r}"
            )
        key = _qualified(name, "exclude_columns")
        out.columns[key] = out.columns.get(key, frozenset()) | cols
    return out


def _qualified(name: object, what: str) -> tuple[str, str]:
    schema, _, table = name.rpartition(".") if isinstance(name, str) else ("", "", "")
    if not table or "." in schema:
        raise ConfigurationError(
            f"{what}: expected a table name like 'users' or 'public.users', got {name!r}"
        )
    return (schema or "public", table)


#: Whether ``bemi_tt.<name>`` exists and this role may read it (catalog lookups: ``to_regclass`` fails
#: without USAGE on the schema, e.g. when a superuser's worker created it).
READABLE = (
    "SELECT EXISTS (SELECT FROM pg_catalog.pg_class c"
    " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'bemi_tt'"
    " AND c.relname = %s AND pg_catalog.has_schema_privilege(n.oid, 'USAGE')"
    " AND pg_catalog.has_table_privilege(c.oid, 'SELECT'))"
)


def readable(conn: psycopg.Connection, name: str) -> bool:
    """Whether table ``bemi_tt.<name>`` exists and this role may read it."""
    row = conn.execute(READABLE, (name,)).fetchone()
    return bool(row and row[0])


def recorded_exclusions(
    conn: psycopg.Connection, schemas: sql.Composable
) -> dict[tuple[str, str], frozenset[str] | None]:
    """What the schema record last said per table: its excluded columns, or None for an excluded table.

    Read from the latest version of each table: every version of a table with excluded columns carries
    an ``exclude`` event, and an excluded table's last version is its ``untracked {what: table}`` one.
    ``conn`` is left without an open transaction.
    """
    rows = conn.execute(sql.SQL(
        'SELECT DISTINCT ON ("schema", "table") "schema", "table", event FROM {}'
        ' ORDER BY "schema", "table", commit_position DESC, ordinal DESC, step DESC'
    ).format(schemas)).fetchall()
    conn.rollback()
    out: dict[tuple[str, str], frozenset[str] | None] = {}
    for schema, table, events in rows:
        said: frozenset[str] | None = frozenset()
        for event in events or ():
            if event.get("kind") == "untracked" and event.get("what") == "table":
                said = None
            elif event.get("kind") == "exclude":
                said = frozenset(str(c) for c in event.get("columns") or ())
        if said != frozenset():
            out[(str(schema), str(table))] = said
    return out


def load_exclusions(conn: psycopg.Connection) -> Exclusions:
    """The configuration stored in the source database (empty when install never stored one)."""
    if not readable(conn, "exclusions"):
        return Exclusions()
    rows = conn.execute('SELECT "schema", "table", columns FROM bemi_tt.exclusions').fetchall()
    return Exclusions.from_config({"schema": s, "table": t, "columns": c} for s, t, c in rows)
