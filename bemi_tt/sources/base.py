"""What every source is: a place holding ``changes`` and ``changes_schemas`` that puts the rows an
operation needs into DuckDB (:class:`Source`, :class:`Scope`), and what the DuckDB-backed sources share.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any
from uuid import UUID

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute

from capture.errors import ConfigurationError
from capture.schema import CHANGES_COLUMNS, MOVED_KEY_COLUMN

__all__ = ["SCHEMAS_ARROW", "Scope", "Segment", "Source", "TableName", "json_text", "segments_condition"]


#: ``(schema, table)``
TableName = tuple[str, str]

#: Columns of ``changes_schemas`` as the sources hand them to DuckDB (``columns`` is JSON text).
SCHEMAS_ARROW = pa.schema(
    [
        ("schema", pa.string()),
        ("table", pa.string()),
        ("commit_position", pa.int64()),
        ("ordinal", pa.int32()),
        ("committed_at", pa.timestamp("us", tz="UTC")),
        ("columns", pa.string()),
        # the relation's identity and what happened (NULL / 0 / "[]" in rows of the first release)
        ("relation_oid", pa.int64()),
        ("step", pa.int32()),
        ("event", pa.string()),
    ]
)
_ARROW_TYPES = {name: arrow_type for name, _, arrow_type in CHANGES_COLUMNS}


@dataclass(frozen=True)
class Scope:
    """What an operation needs: one table (or all), the columns, and changes committed up to ``until``."""

    table: TableName | None = None
    columns: tuple[str, ...] | None = None
    until: pd.Timestamp | None = None  # prefix of commit order whose committed_at <= until (per table)
    since: pd.Timestamp | None = None  # committed_at >= since (plain time filter, for audits)
    until_time: pd.Timestamp | None = None  # committed_at <= until_time (plain time filter, for audits)
    #: only what decides these keys (``primary_key`` texts): their changes, every TRUNCATE, and the key
    #: UPDATEs whose old key (``before_primary_key``) is one of them (``key_columns``: the key's columns)
    keys: tuple[str, ...] | None = None
    key_columns: tuple[str, ...] = ()
    #: commit_position >= start (a window of commit order, e.g. the changes between two cuts)
    start: int | None = None
    #: ``(key, text)``: the context's member ``key`` reads as ``text`` (a prefilter of audit's filters)
    context_text: tuple[tuple[str, str], ...] = ()
    #: one relation's changes under each name it had (instead of ``table``'s): ``(schema, table, from,
    #: to)``, positions ``(commit_position, ordinal)``, ``from`` inclusive, ``to`` exclusive, None: open
    segments: tuple[Segment, ...] | None = None


#: A stretch of commit order in which a relation had one name: ``(schema, table, from, to)``.
Segment = tuple[str, str, tuple[int, int] | None, tuple[int, int] | None]


def segments_condition(segments: Sequence[Segment], literal: Callable[[str], str]) -> str:
    """The SQL condition (plain SQL, DuckDB and PostgreSQL alike) that a change lies in one of
    ``segments``; ``literal`` quotes a string."""

    def at_or_after(at: tuple[int, int]) -> str:
        cp, o = int(at[0]), int(at[1])
        return f"(commit_position > {cp} OR (commit_position = {cp} AND ordinal >= {o}))"

    def before(at: tuple[int, int]) -> str:
        cp, o = int(at[0]), int(at[1])
        return f"(commit_position < {cp} OR (commit_position = {cp} AND ordinal < {o}))"

    parts = []
    for schema, table, start, end in segments:
        part = f'("schema" = {literal(schema)} AND "table" = {literal(table)}'
        if start is not None:
            part += " AND " + at_or_after(start)
        if end is not None:
            part += " AND " + before(end)
        parts.append(part + ")")
    return "(" + (" OR ".join(parts) or "FALSE") + ")"


class Source(ABC):
    """A place holding ``changes`` and ``changes_schemas``; loads them into DuckDB for an operation.

    ``pushdown`` names what the source computes itself instead of handing DuckDB the rows: ``"present"``
    (:meth:`present`, the rows present at a cut), ``"keys"`` (a :class:`Scope` with ``keys`` reads only
    what decides them: worth it where reading is costly; DuckDB pushes a key filter into its own scans).
    The engine asks for a capability, never for a class.
    """

    @property
    def pushdown(self) -> frozenset[str]:
        return frozenset()

    def present(self, con: duckdb.DuckDBPyConnection, name: str, scope: Scope, keys: Sequence[str]) -> None:
        """Create view ``name`` (k, cp, o, payload) of the rows present at ``scope`` (with ``"present"``)."""
        raise NotImplementedError(f"{type(self).__name__} does not push down 'present'")

    @abstractmethod
    def load(self, con: duckdb.DuckDBPyConnection, name: str, scope: Scope) -> None:
        """Create a view or table ``name`` in ``con`` with the rows of ``changes`` in ``scope``."""

    def stream(self, con: duckdb.DuckDBPyConnection, name: str, scope: Scope) -> bool:
        """Create view ``name`` of the rows in ``scope`` for one pass; True when they come in commit order
        as they are read (then a query over them needs no ORDER BY and runs in bounded memory).

        Sources that DuckDB scans directly need nothing more than :meth:`load`."""
        self.load(con, name, scope)
        return False

    def lazy(self, con: duckdb.DuckDBPyConnection, name: str) -> None:
        """Create view ``name`` of every change, read when a query scans it (default: :meth:`load`)."""
        self.load(con, name, Scope())

    def cut(self, table: TableName, ts: pd.Timestamp) -> int | None:
        """The first ``commit_position`` of ``table`` stamped after ``ts`` (None: none is): the prefix of
        commit order that ``as_of(ts)`` sees ends before it."""
        from bemi_tt.state import _duck

        con = _duck()
        self.load(con, "cut", Scope(table=table, columns=("commit_position", "committed_at")))
        rows = con.execute(
            f'SELECT min(commit_position) FROM "cut" WHERE committed_at > {_literal(ts)}'
        ).fetchall()
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    def first_commit(self, table: TableName) -> pd.Timestamp | None:
        """When ``table``'s first change committed (None: it has none)."""
        from bemi_tt.state import _duck

        con = _duck()
        self.load(con, "first", Scope(table=table, columns=("committed_at",)))
        rows = con.execute('SELECT min(committed_at) FROM "first"').fetchall()
        return pd.Timestamp(rows[0][0]) if rows and rows[0][0] is not None else None

    @abstractmethod
    def schemas(self, table: TableName | None = None) -> pa.Table:
        """Rows of ``changes_schemas`` (of one table, or all) as Arrow with :data:`SCHEMAS_ARROW`."""

    @abstractmethod
    def tables(self, name: str | None = None) -> list[TableName]:
        """Known tables, or those whose table name is ``name`` (cheap where the source allows)."""

    def describe(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


# -- helpers shared by the DuckDB-backed sources ----------------------------------------------------
def _literal(value: Any) -> str:
    """A DuckDB SQL literal (views cannot hold parameters)."""
    if isinstance(value, pd.Timestamp):
        return f"TIMESTAMPTZ '{value.isoformat()}'"
    if isinstance(value, int):
        return str(int(value))
    return "'" + str(value).replace("'", "''") + "'"


def _scope_view(con: duckdb.DuckDBPyConnection, name: str, base: str, scope: Scope) -> None:
    """Create the temp view ``name`` over ``base`` with the rows in ``scope`` (as-of cut computed first)."""
    cols = ", ".join(f'"{c}"' for c in scope.columns) if scope.columns else "*"
    where: list[str] = []
    if scope.segments is not None:
        where.append(segments_condition(scope.segments, _literal))
    elif scope.table is not None:
        where.append(f'"schema" = {_literal(scope.table[0])} AND "table" = {_literal(scope.table[1])}')
    if scope.since is not None:
        where.append(f"committed_at >= {_literal(scope.since)}")
    if scope.until_time is not None:
        where.append(f"committed_at <= {_literal(scope.until_time)}")
    if scope.start is not None:
        where.append(f"commit_position >= {int(scope.start)}")
    for key, text in scope.context_text:
        pointer = "/" + key.replace("~", "~0").replace("/", "~1")
        where.append(f"json_extract_string(context, {_literal(pointer)}) = {_literal(text)}")
    if scope.until is not None:  # the prefix cut of the table (never of the keys alone: a late commit
        # time of another key's change ends the prefix for every key); row-group statistics on
        # committed_at skip most of the files
        inner = f"SELECT min(commit_position) FROM {base} WHERE committed_at > {_literal(scope.until)}"
        if where:
            inner += " AND " + " AND ".join(where)
        rows = con.sql(inner).fetchall()
        cut = rows[0][0] if rows and rows[0][0] is not None else None
        if cut is not None:
            where.append(f"commit_position < {int(cut)}")
    if scope.keys is None:
        text = f"SELECT {cols} FROM {base}" + (" WHERE " + " AND ".join(where) if where else "")
        _replace(con, name, "VIEW", text)
        return
    # a key lookup: the keys' changes, the TRUNCATEs and the key UPDATEs away from the keys, each part a
    # plain comparison DuckDB pushes into the scan (an OR of them is not pushed: every row would be read),
    # kept as a small table, since every later query of the operation reads these rows again
    listed = ", ".join(_literal(k) for k in scope.keys) or "NULL"
    parts = (
        f"primary_key IN ({listed})",
        "operation = 'TRUNCATE'",
        f"{MOVED_KEY_COLUMN} IN ({listed}) AND primary_key NOT IN ({listed})",
    )
    text = " UNION ALL ".join(f"SELECT {cols} FROM {base} WHERE " + " AND ".join([*where, p]) for p in parts)
    _replace(con, name, "TABLE", text)


def _replace(con: duckdb.DuckDBPyConnection, name: str, kind: str, text: str) -> None:
    """``CREATE OR REPLACE TEMP <kind> name AS text``, whichever of a view or table held the name."""
    quoted = '"' + name.replace('"', '""') + '"'
    held = con.execute(
        "SELECT 'TABLE' FROM duckdb_tables() WHERE temporary AND table_name = $1 "
        "UNION ALL SELECT 'VIEW' FROM duckdb_views() WHERE temporary AND view_name = $1",
        [name],
    ).fetchall()
    for (other,) in held:
        if other != kind:
            con.execute(f"DROP {other} {quoted}")
    con.execute(f"CREATE OR REPLACE TEMP {kind} {quoted} AS {text}")


class _ArrowBacked(Source):
    """Shared logic of sources whose data DuckDB scans directly (Arrow tables or Parquet files)."""

    def _tables_from(self, relation: duckdb.DuckDBPyRelation) -> list[TableName]:
        rows = relation.fetchall()
        return sorted({(str(s), str(t)) for s, t in rows})


def json_text(value: Any) -> str:
    """Typed JSON text the way the capture worker writes values (numerics exact, ISO times, ``\\\\x`` hex)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        return str(value) if value.is_finite() else json.dumps(str(value))
    if isinstance(value, float):
        return (
            repr(value)
            if value == value and value not in (float("inf"), float("-inf"))
            else json.dumps({"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}[str(value)])
        )
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if isinstance(value, datetime):
        return json.dumps(value.isoformat())
    if isinstance(value, (date, time)):
        return json.dumps(value.isoformat())
    if isinstance(value, (bytes, bytearray, memoryview)):
        return json.dumps("\\x" + bytes(value).hex())
    if isinstance(value, UUID):
        return json.dumps(str(value))
    if isinstance(value, Mapping):
        return (
            "{"
            + ",".join(f"{json.dumps(str(k), ensure_ascii=False)}:{json_text(v)}" for k, v in value.items())
            + "}"
        )
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(json_text(v) for v in value) + "]"
    raise ConfigurationError(
        f"cannot store {value!r} ({type(value).__name__}) as typed JSON: use JSON "
        "scalars, Decimal, datetime, date, time, bytes, UUID, dicts or lists"
    )


def _filter_schemas(schemas: pa.Table, table: TableName | None) -> pa.Table:
    if table is None:
        return schemas
    mask = [
        s == table[0] and t == table[1]
        for s, t in zip(schemas["schema"].to_pylist(), schemas["table"].to_pylist(), strict=False)
    ]
    return schemas.filter(pa.array(mask, type=pa.bool_()))


# -- the old key of each key UPDATE, for rows written without it ----------------------------------------
_STAMP_OFFSET = re.compile(r"([+-][0-9][0-9]):00( BC)?$")
_TIMESTAMP_TYPES = ("timestamptz", "timestamp", "timestamp with time zone", "timestamp without time zone")


def _key_member_text(value: Any, column: Mapping[str, Any]) -> str:
    """One key column's JSON value as ``primary_key`` writes it: the text PostgreSQL prints (``to_jsonb``
    writes booleans as ``true`` and timestamps with a ``T`` and a full offset: turned back)."""
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, str):
        if str(column.get("type_oid")) in ("1184", "1114") or column.get("base_type") in _TIMESTAMP_TYPES:
            return _STAMP_OFFSET.sub(r"\1\2", value.replace("T", " "))
        return value
    return _member_json(value)


def _member_json(value: Any) -> str:
    """A parsed JSON value (numbers kept as their text) as compact JSON, as jsonb prints a member."""
    if isinstance(value, _Number):
        return str(value)
    if isinstance(value, dict):
        members = (f"{json.dumps(k, ensure_ascii=False)}:{_member_json(v)}" for k, v in value.items())
        return "{" + ",".join(members) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_member_json(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


class _Number(str):
    """A JSON number's text, kept as written (never a float)."""


def _parse_image(text: str) -> Any:
    return json.loads(text, parse_float=_Number, parse_int=_Number)


def moved_keys(rows: pa.Table, schemas: pa.Table) -> pa.Array:
    """``before_primary_key`` for ``rows`` (``schema``, ``table``, ``operation``, ``primary_key``,
    ``before``, ``commit_position``, ``ordinal``) written without it: what the worker writes and the
    PostgreSQL backfill (``capture.schema.moved_keys_backfill``) computes, the old key read from ``before``
    by the key columns of the version of ``schemas`` valid at the change (the table's first version for a
    change older than every version); NULL unless an UPDATE moved its key. Used for in-memory rows given
    without the column and for export files of an earlier release."""
    versions: dict[tuple[str, str], list[tuple[tuple[int, int, int], list[Mapping[str, Any]]]]] = {}
    steps = schemas["step"].to_pylist() if "step" in schemas.column_names else [0] * schemas.num_rows
    for s, t, cp, o, step, columns in zip(
        *(schemas[c].to_pylist() for c in ("schema", "table", "commit_position", "ordinal")),
        steps,
        schemas["columns"].to_pylist(),
        strict=True,
    ):
        try:
            parsed = json.loads(columns) if isinstance(columns, str) else columns
        except ValueError:
            continue
        if isinstance(parsed, list):
            versions.setdefault((s, t), []).append(((int(cp), int(o or 0), int(step or 0)), parsed))
    for listed in versions.values():
        listed.sort(key=lambda e: e[0])
    out: list[str | None] = []
    names = ("schema", "table", "operation", "primary_key", "before", "commit_position", "ordinal")
    for s, t, op, pk, before, cp, o in zip(*(rows[c].to_pylist() for c in names), strict=True):
        entries = versions.get((s, t))
        if op != "UPDATE" or not before or before == "{}" or not entries:
            out.append(None)
            continue
        at = (int(cp), int(o))
        valid = [columns for position, columns in entries if position[:2] <= at]
        columns = valid[-1] if valid else entries[0][1]
        keys = [c for c in columns if isinstance(c, Mapping) and c.get("key")]
        image = _parse_image(before) if isinstance(before, str) else before
        if not keys or not isinstance(image, dict) or any(c.get("name") not in image for c in keys):
            out.append(None)
            continue
        if len(keys) == 1:
            value = image[keys[0]["name"]]
            old = None if value is None else _key_member_text(value, keys[0])
        else:
            old = "[" + ",".join(_member_json(image[c["name"]]) for c in keys) + "]"
        out.append(old if old is not None and old != pk else None)
    return pa.array(out, pa.string())
