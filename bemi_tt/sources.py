"""Where the analysis API reads changes from: PostgreSQL ``changes``, a Parquet export, or memory.

Every source does one thing: put the rows of ``changes`` (optionally one table's, up to a time) and of
``changes_schemas`` into a DuckDB connection, so every operation runs the same SQL on every source.
``connect(url_or_dir)`` sets the default source; the ``BEMI_TT_SOURCE`` environment variable does too.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import duckdb
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.compute
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from psycopg import sql

from bemi_tt.timestamps import to_utc
from capture.dsn import check_dsn, connect_error, redact
from capture.errors import ConfigurationError, SourceError
from capture.schema import CHANGES_COLUMNS, CHANGES_TABLE, SCHEMAS_TABLE, changes_arrow_schema

__all__ = [
    "SOURCE_ENV",
    "InMemorySource",
    "ParquetSource",
    "PostgresSource",
    "Source",
    "TableName",
    "connect",
    "get_source",
    "json_text",
]

SOURCE_ENV = "BEMI_TT_SOURCE"

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
    ]
)
_ARROW_TYPES = {name: arrow_type for name, _, arrow_type in CHANGES_COLUMNS}
_MAX_POSITION = (1 << 63) - 1
#: How many changes the cut hint looks at after its binary search (bounds the work for quiet tables).
_HINT_WALK = 200_000
#: Rows present at a cut, as the PostgreSQL source hands them to DuckDB.
_WINNERS = pa.schema([("k", pa.string()), ("cp", pa.int64()), ("o", pa.int32()), ("payload", pa.string())])


@dataclass(frozen=True)
class Scope:
    """What an operation needs: one table (or all), the columns, and changes committed up to ``until``."""

    table: TableName | None = None
    columns: tuple[str, ...] | None = None
    until: pd.Timestamp | None = None  # prefix of commit order whose committed_at <= until (per table)
    since: pd.Timestamp | None = None  # committed_at >= since (plain time filter, for audits)
    until_time: pd.Timestamp | None = None  # committed_at <= until_time (plain time filter, for audits)
    #: only what decides these keys (``primary_key`` texts): their changes, every TRUNCATE, and the key
    #: UPDATEs whose old key (read from ``before`` by ``key_columns``) is one of them
    keys: tuple[str, ...] | None = None
    key_columns: tuple[str, ...] = ()
    #: commit_position >= start (a window of commit order, e.g. the changes between two cuts)
    start: int | None = None


class Source(ABC):
    """A place holding ``changes`` and ``changes_schemas``; loads them into DuckDB for an operation.

    ``pushdown`` names what the source computes itself instead of handing DuckDB the rows: ``"present"``
    (:meth:`present`, the rows present at a cut). The engine asks for a capability, never for a class.
    """

    @property
    def pushdown(self) -> frozenset[str]:
        return frozenset()

    def present(
        self, con: duckdb.DuckDBPyConnection, name: str, scope: Scope, keys: Sequence[str]
    ) -> None:
        """Create view ``name`` (k, cp, o, payload) of the rows present at ``scope`` (with ``"present"``)."""
        raise NotImplementedError(f"{type(self).__name__} does not push down 'present'")

    @abstractmethod
    def load(self, con: duckdb.DuckDBPyConnection, name: str, scope: Scope) -> None:
        """Create a view or table ``name`` in ``con`` with the rows of ``changes`` in ``scope``."""

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
    if scope.table is not None:
        where.append(f'"schema" = {_literal(scope.table[0])} AND "table" = {_literal(scope.table[1])}')
    if scope.since is not None:
        where.append(f"committed_at >= {_literal(scope.since)}")
    if scope.until_time is not None:
        where.append(f"committed_at <= {_literal(scope.until_time)}")
    if scope.start is not None:
        where.append(f"commit_position >= {int(scope.start)}")
    if scope.keys is not None:
        from bemi_tt.rule import DUCKDB, Rule

        listed = ", ".join(_literal(k) for k in scope.keys) or "NULL"
        rule = Rule(DUCKDB, scope.key_columns)  # key_updates rules out most UPDATEs before parsing JSON
        where.append(
            f"(primary_key IN ({listed}) OR operation = 'TRUNCATE' "
            f"OR ({rule.key_updates()} AND {rule.old_key_of()} IN ({listed})))"
        )
    if scope.until is not None:
        inner = f"SELECT min(commit_position) FROM {base} WHERE committed_at > {_literal(scope.until)}"
        if where:
            inner += " AND " + " AND ".join(where)
        rows = con.sql(inner).fetchall()
        cut = rows[0][0] if rows and rows[0][0] is not None else None
        if cut is not None:
            where.append(f"commit_position < {int(cut)}")
    text = f"SELECT {cols} FROM {base}" + (" WHERE " + " AND ".join(where) if where else "")
    con.execute(f'CREATE OR REPLACE TEMP VIEW "{name}" AS {text}')


class _ArrowBacked(Source):
    """Shared logic of sources whose data DuckDB scans directly (Arrow tables or Parquet files)."""

    def _tables_from(self, relation: duckdb.DuckDBPyRelation) -> list[TableName]:
        rows = relation.fetchall()
        return sorted({(str(s), str(t)) for s, t in rows})


# -- memory ---------------------------------------------------------------------------------------------
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


def _changes_table(rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> pa.Table:
    if isinstance(rows, pd.DataFrame):
        rows = rows.to_dict("records")
    records = list(rows)
    out: dict[str, list[Any]] = {name: [] for name, _, _ in CHANGES_COLUMNS}
    for i, row in enumerate(records):
        if not isinstance(row, Mapping):
            raise ConfigurationError(f"change #{i} is {type(row).__name__}, not a dict of changes columns")
        unknown = set(row) - set(out)
        if unknown:
            raise ConfigurationError(
                f"change #{i} has unknown columns {sorted(unknown)!r}; the columns of "
                f"changes are {list(out)!r}"
            )
        for required in ("table", "operation", "committed_at", "commit_position"):
            if row.get(required) is None:
                raise ConfigurationError(
                    f"change #{i} has no {required!r}: every change needs table, "
                    "operation, committed_at and commit_position"
                )
        if row["operation"] not in ("CREATE", "UPDATE", "DELETE", "TRUNCATE", "SNAPSHOT"):
            raise ConfigurationError(
                f"change #{i} has operation {row['operation']!r}; use CREATE, UPDATE, "
                "DELETE, TRUNCATE or SNAPSHOT"
            )
        for name in out:
            value = row.get(name)
            if name == "id" and value is None:
                value = i + 1
            elif name in ("before", "after", "context"):
                value = "{}" if value is None else value if isinstance(value, str) else json_text(value)
            elif name == "committed_at":
                value = to_utc(value, f"change #{i} committed_at").to_pydatetime()
            elif name == "schema" and value is None:
                value = "public"
            elif name == "database" and value is None:
                value = "memory"
            elif name == "position" and value is None:
                value = row["commit_position"]
            elif name == "ordinal" and value is None:
                value = 0
            out[name].append(value)
    return pa.table({name: pa.array(values, type=_ARROW_TYPES[name]) for name, values in out.items()})


def _schemas_table(rows: Iterable[Mapping[str, Any]] | pd.DataFrame | None) -> pa.Table:
    if rows is None:
        return SCHEMAS_ARROW.empty_table()
    if isinstance(rows, pd.DataFrame):
        rows = rows.to_dict("records")
    out: dict[str, list[Any]] = {f.name: [] for f in SCHEMAS_ARROW}
    for i, row in enumerate(rows):
        if "table" not in row or "columns" not in row or "commit_position" not in row:
            raise ConfigurationError(
                f"schema row #{i} needs table, commit_position and columns, got {sorted(row)!r}"
            )
        out["schema"].append(row.get("schema") or "public")
        out["table"].append(row["table"])
        out["commit_position"].append(row["commit_position"])
        out["ordinal"].append(row.get("ordinal") or 0)
        out["committed_at"].append(
            to_utc(row.get("committed_at", "1970-01-01"), "committed_at").to_pydatetime()
        )
        columns = row["columns"]
        out["columns"].append(columns if isinstance(columns, str) else json.dumps(list(columns)))
    return pa.table(out, schema=SCHEMAS_ARROW)


class InMemorySource(_ArrowBacked):
    """Changes held in memory: a test double shipped with the library, built from dicts or a DataFrame.

    ``changes``: rows with the columns of ``changes`` (``table``, ``operation``, ``committed_at`` and
    ``commit_position`` required; ``before``/``after``/``context`` as dicts or JSON text). ``schemas``:
    rows of ``changes_schemas`` (``table``, ``commit_position``, ``columns`` as a list of dicts).
    """

    def __init__(
        self,
        changes: Iterable[Mapping[str, Any]] | pd.DataFrame | pa.Table = (),
        schemas: Iterable[Mapping[str, Any]] | pd.DataFrame | pa.Table | None = None,
    ) -> None:
        self.changes = (
            changes.select([f.name for f in changes_arrow_schema()]).cast(changes_arrow_schema())
            if isinstance(changes, pa.Table)
            else _changes_table(changes)
        )
        self._schemas = (
            schemas.cast(SCHEMAS_ARROW) if isinstance(schemas, pa.Table) else _schemas_table(schemas)
        )

    def load(self, con: duckdb.DuckDBPyConnection, name: str, scope: Scope) -> None:
        con.register(f"{name}__arrow", self.changes)
        _scope_view(con, name, f'"{name}__arrow"', scope)

    def schemas(self, table: TableName | None = None) -> pa.Table:
        return _filter_schemas(self._schemas, table)

    def tables(self, name: str | None = None) -> list[TableName]:
        pairs = set(zip(self.changes["schema"].to_pylist(), self.changes["table"].to_pylist(), strict=False))
        pairs |= set(
            zip(self._schemas["schema"].to_pylist(), self._schemas["table"].to_pylist(), strict=False)
        )
        return sorted(p for p in pairs if name is None or p[1] == name)

    def describe(self) -> str:
        return f"InMemorySource: {self.changes.num_rows} changes"


def _filter_schemas(schemas: pa.Table, table: TableName | None) -> pa.Table:
    if table is None:
        return schemas
    mask = [
        s == table[0] and t == table[1]
        for s, t in zip(schemas["schema"].to_pylist(), schemas["table"].to_pylist(), strict=False)
    ]
    return schemas.filter(pa.array(mask, type=pa.bool_()))


# -- Parquet ----------------------------------------------------------------------------------------------
def _list_dataset_files(directory: str) -> tuple[pafs.FileSystem, list[str]]:
    try:
        from capture.export import list_dataset_files  # type: ignore[attr-defined, unused-ignore]
    except ImportError:
        from capture.export_dataset import list_dataset_files
    return list_dataset_files(directory)  # type: ignore[no-any-return, unused-ignore]


def _partition_of(path: str) -> str:
    for segment in path.split("/"):
        if segment.startswith(("relation=", "table=")):
            return segment.split("=", 1)[1]
    return ""


class ParquetSource(_ArrowBacked):
    """A Parquet export directory, local or in an object store (``s3://bucket/prefix``)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        if "://" not in self.directory and not os.path.isdir(self.directory):
            raise ConfigurationError(
                f"export directory {self.directory!r} does not exist: run "
                "`bemi-tt export` first or pass the directory it wrote"
            )

    def _files(self, table: TableName | None) -> tuple[pafs.FileSystem, list[str]]:
        from urllib.parse import unquote

        filesystem, paths = _list_dataset_files(self.directory)
        if table is not None:
            wanted = f"{table[0]}.{table[1]}"
            paths = [p for p in paths if unquote(_partition_of(p)) == wanted]
        return filesystem, paths

    def load(self, con: duckdb.DuckDBPyConnection, name: str, scope: Scope) -> None:
        filesystem, paths = self._files(scope.table)
        if not paths:
            con.register(f"{name}__arrow", changes_arrow_schema().empty_table())
            base = f'"{name}__arrow"'
        elif isinstance(filesystem, pafs.LocalFileSystem):
            listed = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
            cols = ", ".join(
                f'CAST("{c}" AS VARCHAR) AS "{c}"' if c in ("before", "after", "context") else f'"{c}"'
                for c, _, _ in CHANGES_COLUMNS
            )
            try:
                con.execute(
                    f'CREATE OR REPLACE TEMP VIEW "{name}__files" AS SELECT {cols} FROM '
                    f"read_parquet([{listed}], hive_partitioning = false, union_by_name = true)"
                )
            except duckdb.Error as exc:  # DuckDB reads every file's footer here: a damaged file fails
                raise self._damaged(exc, paths) from None
            base = f'"{name}__files"'
        else:  # object store: DuckDB scans the pyarrow dataset (projection and filters pushed down)
            dataset = pads.dataset(paths, filesystem=filesystem, format="parquet")
            plain = pa.schema(
                [
                    pa.field(f.name, pa.string()) if isinstance(f.type, pa.ExtensionType) else f
                    for f in dataset.schema
                ]
            )
            con.register(
                f"{name}__arrow", pads.dataset(paths, filesystem=filesystem, format="parquet", schema=plain)
            )
            base = f'"{name}__arrow"'
        _scope_view(con, name, base, scope)

    def _damaged(self, exc: BaseException, paths: Sequence[str]) -> SourceError:
        """A ``SourceError`` naming the damaged file (DuckDB's message names it; else the first listed)."""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        named = re.search(r"[Ff]ile '([^']+)'", first)
        path = named.group(1) if named else None
        culprit = f"file {path!r}" if path else f"one of {len(paths)} files"
        return SourceError(
            f"cannot read {culprit} of the Parquet export {self.directory!r}: {first}; restore the file "
            "from a backup or re-export into an empty directory with `bemi-tt export`"
        )

    def schemas(self, table: TableName | None = None) -> pa.Table:
        import pyarrow.parquet as pq

        from capture.export_dataset import LEGACY_SCHEMAS_FILE, META_DIR, SCHEMAS_FILE, resolve_directory

        filesystem, root = resolve_directory(self.directory)
        for file_name in (SCHEMAS_FILE, LEGACY_SCHEMAS_FILE):  # the first release wrote the legacy name
            path = f"{root}/{META_DIR}/{file_name}"
            if filesystem.get_file_info(path).type == pafs.FileType.File:
                break
        else:
            return SCHEMAS_ARROW.empty_table()
        try:
            raw = pq.read_table(path, filesystem=filesystem)
        except (OSError, pa.ArrowInvalid) as exc:
            raise SourceError(f"cannot read {path!r}: {exc}; re-run `bemi-tt export`") from exc
        raw = raw.select([f.name for f in SCHEMAS_ARROW])
        raw = pa.table({f.name: raw[f.name].cast(f.type) for f in SCHEMAS_ARROW})
        return _filter_schemas(raw, table)

    def tables(self, name: str | None = None) -> list[TableName]:
        from urllib.parse import unquote

        import pyarrow.parquet as pq

        filesystem, paths = _list_dataset_files(self.directory)
        pairs: set[TableName] = set()
        ambiguous: list[str] = []
        for p in paths:
            qualified = unquote(_partition_of(p))
            if qualified.count(".") == 1:
                schema, _, table = qualified.partition(".")
                pairs.add((schema, table))
            else:  # "a.b.c" is ("a.b", "c") or ("a", "b.c"): the file's rows say which
                ambiguous.append(p)
        for p in ambiguous:
            try:
                names = pq.read_table(p, columns=["schema", "table"], filesystem=filesystem)
            except (OSError, pa.ArrowInvalid) as exc:
                raise SourceError(
                    f"cannot read file {p!r} of the Parquet export {self.directory!r}: {exc}; restore the "
                    "file from a backup or re-export into an empty directory with `bemi-tt export`"
                ) from None
            pairs |= set(zip(names["schema"].to_pylist(), names["table"].to_pylist(), strict=True))
        schemas = self.schemas()
        pairs |= set(zip(schemas["schema"].to_pylist(), schemas["table"].to_pylist(), strict=False))
        return sorted(p for p in pairs if name is None or p[1] == name)

    def describe(self) -> str:
        return f"ParquetSource: {self.directory}"


# -- PostgreSQL ---------------------------------------------------------------------------------------------
def _conninfo(url: str) -> str:
    """libpq connection string for a ``postgresql[+driver]://`` URL or a key=value conninfo."""
    if url.startswith(("postgresql+", "postgres+")):
        _scheme, rest = url.split("://", 1)
        url = "postgresql://" + rest
    return url


def _below(cut: int | None) -> sql.Composable:
    """``AND commit_position < cut`` (nothing when there is no cut)."""
    return sql.SQL("AND commit_position < {}").format(sql.Literal(cut)) if cut is not None else sql.SQL("")


class PostgresSource(Source):
    """A PostgreSQL database holding ``changes``; rows reach DuckDB through ``COPY`` or one CSV value.

    ``mirror=True`` keeps each table's changes in memory (Arrow) once read, and on every later call reads
    only the changes committed since (by ``(commit_position, ordinal)``, which the worker writes in
    order): repeated calls in a notebook then run at in-memory DuckDB speed, at the cost of memory.
    """

    def __init__(self, dsn: str, *, schema: str = "public", mirror: bool = False) -> None:
        self.dsn = _conninfo(dsn)
        self.original = dsn
        self.schema = schema
        if not isinstance(mirror, bool):
            raise ConfigurationError(f"mirror must be True or False, got {mirror!r}")
        self.mirror = mirror
        self._mirrors: dict[TableName, pa.Table] = {}
        self._mirror_lock = threading.Lock()
        check_dsn(dsn, what="source")  # a malformed one fails here, its password redacted

    @property
    def pushdown(self) -> frozenset[str]:  # a mirror holds the rows in memory: DuckDB is faster there
        return frozenset() if self.mirror else frozenset({"present"})

    def present(
        self, con: duckdb.DuckDBPyConnection, name: str, scope: Scope, keys: Sequence[str]
    ) -> None:
        from bemi_tt.state import latest_sql

        if not self.winners(con, name, scope, keys):
            self.latest(con, name, scope, keys, latest_sql)

    def cut(self, table: TableName, ts: pd.Timestamp) -> int | None:
        query = sql.SQL(
            "SELECT min(commit_position) FROM (SELECT commit_position FROM {} WHERE committed_at > %s"
            ' AND "table" = %s AND "schema" = %s OFFSET 0) later'
        ).format(self._name(CHANGES_TABLE))
        with self._connect() as conn:
            row = conn.execute(query, (ts.to_pydatetime(), table[1], table[0])).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def first_commit(self, table: TableName) -> pd.Timestamp | None:
        query = sql.SQL('SELECT min(committed_at) FROM {} WHERE "table" = %s AND "schema" = %s').format(
            self._name(CHANGES_TABLE)
        )
        with self._connect() as conn:
            row = conn.execute(query, (table[1], table[0])).fetchone()
        return pd.Timestamp(row[0]) if row and row[0] is not None else None

    @classmethod
    def from_engine(cls, engine: Any) -> PostgresSource:
        """Source for a SQLAlchemy engine or connection (any PostgreSQL driver)."""
        url = engine.engine.url if hasattr(engine, "engine") else engine.url
        if not str(url.get_backend_name()).startswith("postgres"):
            raise ConfigurationError(
                f"engine {url!r} is not PostgreSQL: bemi_tt reads changes from PostgreSQL"
            )
        params: dict[str, Any] = {k: v for k, v in url.query.items() if isinstance(v, str)}
        for key, value in (
            ("host", url.host),
            ("port", url.port),
            ("user", url.username),
            ("password", url.password),
            ("dbname", url.database),
        ):
            if value is not None:
                params[key] = str(value)
        return cls(psycopg.conninfo.make_conninfo(**params))

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.dsn, autocommit=True)
        except psycopg.Error as exc:
            raise connect_error(exc, self.original, what="the changes database") from None

    def _name(self, table: str) -> sql.Identifier:
        return sql.Identifier(self.schema, table)

    def where(self, scope: Scope) -> sql.Composable:
        """The WHERE condition of ``scope`` on ``changes`` (values as literals: COPY takes no parameters)."""
        where: list[sql.Composable] = [sql.SQL("TRUE")]
        in_table: sql.Composable = sql.SQL("")
        if scope.table is not None:
            in_table = sql.SQL(' AND "schema" = {} AND "table" = {}').format(*map(sql.Literal, scope.table))
            where.append(sql.SQL("TRUE{}").format(in_table))
        if scope.since is not None:
            where.append(sql.SQL("committed_at >= {}").format(sql.Literal(scope.since.to_pydatetime())))
        if scope.until_time is not None:
            where.append(sql.SQL("committed_at <= {}").format(sql.Literal(scope.until_time.to_pydatetime())))
        if scope.start is not None:
            where.append(sql.SQL("commit_position >= {}").format(sql.Literal(int(scope.start))))
        if scope.until is not None:
            # the table's first change stamped after ``until``, from the ("table", committed_at) index
            # (OFFSET 0 keeps the planner from walking commit order instead)
            inner = sql.SQL(
                "SELECT min(commit_position) FROM (SELECT commit_position FROM {} WHERE committed_at > {}{}"
                " OFFSET 0) later"
            ).format(self._name(CHANGES_TABLE), sql.Literal(scope.until.to_pydatetime()), in_table)
            where.append(
                sql.SQL("commit_position < coalesce(({}), {})").format(inner, sql.Literal(_MAX_POSITION))
            )
        return sql.SQL(" AND ").join(where)

    def query(self, scope: Scope) -> sql.Composed:
        """The SELECT over ``changes`` for ``scope`` (committed_at as epoch microseconds).

        With ``scope.keys``: the keys' changes and the TRUNCATEs from the ``("table", primary_key, ...)``
        index, plus the key UPDATEs away from them (the old key read from ``before`` in PostgreSQL)."""
        wanted = scope.columns or tuple(c for c, _, _ in CHANGES_COLUMNS)
        cols = sql.SQL(", ").join(
            sql.SQL("(extract(epoch FROM committed_at) * 1000000)::bigint")
            if c == "committed_at"
            else sql.Identifier(c)
            for c in wanted
        )
        if scope.keys is None:
            return sql.SQL("SELECT {} FROM {} WHERE {}").format(
                cols, self._name(CHANGES_TABLE), self.where(scope)
            )
        from bemi_tt.rule import POSTGRES, Rule

        keys = sql.SQL("ARRAY[{}]::text[]").format(sql.SQL(", ").join(map(sql.Literal, scope.keys)))
        old_key = sql.SQL(Rule(POSTGRES, scope.key_columns).old_key_of())  # composed of quoted literals
        where = self.where(replace(scope, keys=None))
        parts = [
            sql.SQL("primary_key = ANY({})").format(keys),
            sql.SQL("primary_key IS NULL AND operation = 'TRUNCATE'"),
            sql.SQL("operation = 'UPDATE' AND {} = ANY({}) AND primary_key <> ALL({})").format(
                old_key, keys, keys
            ),
        ]
        return sql.SQL(" UNION ALL ").join(
            sql.SQL("SELECT {} FROM {} WHERE {} AND {}").format(
                cols, self._name(CHANGES_TABLE), where, part
            )
            for part in parts
        )

    def copy_arrow(
        self,
        query: sql.Composable,
        types: Mapping[str, pa.DataType],
        conn: psycopg.Connection[Any] | None = None,
    ) -> pa.Table:
        """Run ``query`` through ``COPY ... TO STDOUT (FORMAT csv)`` into an Arrow table of ``types``."""
        buffer = io.BytesIO()
        copy_sql = sql.SQL("COPY ({}) TO STDOUT (FORMAT csv)").format(query)
        try:
            if conn is None:
                with self._connect() as own, own.cursor() as cur, cur.copy(copy_sql) as copy:
                    for chunk in copy:
                        buffer.write(chunk)
            else:
                with conn.cursor() as cur, cur.copy(copy_sql) as copy:
                    for chunk in copy:
                        buffer.write(chunk)
        except psycopg.errors.UndefinedTable as exc:
            raise SourceError(
                f"database has no {self.schema}.{CHANGES_TABLE} table: run the capture "
                "worker (`bemi-tt capture`) on it first"
            ) from exc
        if buffer.tell() == 0:
            return pa.table({c: pa.array([], type=t) for c, t in types.items()})
        buffer.seek(0)
        return pacsv.read_csv(
            buffer,
            read_options=pacsv.ReadOptions(column_names=list(types), block_size=1 << 24),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types=dict(types),
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
                null_values=[""],
            ),
        )

    def agg_arrow(
        self,
        fields: Sequence[tuple[str, sql.Composable, pa.DataType]],
        source: sql.Composable,
        conn: psycopg.Connection[Any],
        *,
        keep: sql.Composable | None = None,
        extra: sql.Composable | None = None,
    ) -> tuple[pa.Table, Any]:
        """``SELECT fields FROM source`` as Arrow, PostgreSQL joining the rows into one CSV value: psycopg
        reads COPY output one row per Python call, far slower for hundreds of thousands of rows.

        ``keep``: only rows where it holds become CSV lines; ``extra``: also return ``min(extra)`` over all
        rows of ``source`` (one scan for both)."""
        parts = []
        for _, expr, arrow_type in fields:
            if pa.types.is_string(arrow_type):
                parts.append(sql.SQL("""coalesce('"' || replace({}, '"', '""') || '"', '')""").format(expr))
            else:
                parts.append(sql.SQL("coalesce(({})::text, '')").format(expr))
        query = sql.SQL("SELECT convert_to(string_agg({}, E'\\n'){}, 'UTF8'), {} FROM {}").format(
            sql.SQL(" || ',' || ").join(parts),
            sql.SQL(" FILTER (WHERE {})").format(keep) if keep is not None else sql.SQL(""),
            sql.SQL("min({})").format(extra) if extra is not None else sql.SQL("NULL"),
            source,
        )
        types = {name: arrow_type for name, _, arrow_type in fields}
        try:
            with conn.cursor(binary=True) as cur:
                row = cur.execute(query).fetchone()
        except psycopg.errors.UndefinedTable as exc:
            raise SourceError(
                f"database has no {self.schema}.{CHANGES_TABLE} table: run the capture "
                "worker (`bemi-tt capture`) on it first"
            ) from exc
        data, value = (row[0], row[1]) if row else (None, None)
        if not data:
            return pa.table({c: pa.array([], type=t) for c, t in types.items()}), value
        return pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=list(types), block_size=1 << 24),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types=types,
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
                null_values=[""],
            ),
        ), value

    def fetch(self, scope: Scope) -> pa.Table:
        """Rows of ``changes`` in ``scope`` as Arrow."""
        wanted = scope.columns or tuple(c for c, _, _ in CHANGES_COLUMNS)
        types = {c: (pa.int64() if c == "committed_at" else _ARROW_TYPES[c]) for c in wanted}
        table = self.copy_arrow(self.query(scope), types)
        if "committed_at" in wanted:
            i = table.schema.get_field_index("committed_at")
            table = table.set_column(
                i,
                "committed_at",
                table["committed_at"].cast(pa.timestamp("us")).cast(pa.timestamp("us", tz="UTC")),
            )
        return table

    def _cut_hint(self, conn: psycopg.Connection[Any], scope: Scope) -> int | None:
        """A position ``R`` such that the table's first change committed after ``scope.until`` is at ``R``
        when commit times grow with commit order (a guess, checked by :meth:`winners`): a binary search on
        the ``(commit_position, ordinal)`` index, then the table's first later change at or after it."""
        assert scope.until is not None and scope.table is not None
        until = scope.until.to_pydatetime()
        changes = self._name(CHANGES_TABLE)
        low, high = conn.execute(
            sql.SQL("SELECT min(commit_position), max(commit_position) FROM {}").format(changes)
        ).fetchone() or (None, None)
        if low is None or high is None:
            return None
        probe = sql.SQL(
            "SELECT committed_at > %s FROM {} WHERE commit_position >= %s ORDER BY commit_position LIMIT 1"
        ).format(changes)
        if not conn.execute(probe, (until, high)).fetchone()[0]:  # type: ignore[index]
            return None
        while low < high:  # smallest position whose first change is later than ``until``
            middle = (low + high) // 2
            if conn.execute(probe, (until, middle)).fetchone()[0]:  # type: ignore[index]
                high = middle
            else:
                low = middle + 1
        # from the commit before (a commit's changes may carry different times, then a later one is
        # first), looking at a bounded number of changes: a table quiet since ``until`` finds none (no hint)
        row = conn.execute(
            sql.SQL(
                'SELECT commit_position FROM (SELECT commit_position, committed_at, "schema", "table"'
                " FROM {changes} WHERE commit_position >= coalesce("
                "(SELECT max(commit_position) FROM {changes} WHERE commit_position < %s), %s)"
                " ORDER BY commit_position, ordinal LIMIT %s) s"
                ' WHERE committed_at > %s AND "schema" = %s AND "table" = %s ORDER BY commit_position LIMIT 1'
            ).format(changes=changes),
            (low, low, _HINT_WALK, until, *scope.table),
        ).fetchone()
        return None if row is None else int(row[0])

    def _winner_rows(
        self, conn: psycopg.Connection[Any], scope: Scope, cut: int | None
    ) -> tuple[pa.Table, int]:
        """Each key's last change before ``cut`` (``table`` index, no heap read but the winners): present
        ones as (k, cp, o, payload), and how many winners belong to another schema (then unusable)."""
        assert scope.table is not None
        below = _below(cut)
        query = sql.SQL(
            """SELECT convert_to(string_agg('"' || replace(w.k, '"', '""') || '",' || w.cp || ',' || w.o,
                                            E'\\n') FILTER (WHERE c.operation <> 'DELETE'), 'UTF8'),
                      convert_to(string_agg(c.after::text, E'\\n')
                                 FILTER (WHERE c.operation <> 'DELETE'), 'UTF8'),
                      count(*) FILTER (WHERE c."schema" <> {schema})
               FROM (SELECT DISTINCT ON (primary_key) primary_key AS k, commit_position AS cp, ordinal AS o
                     FROM {changes} WHERE "table" = {table} AND primary_key IS NOT NULL {below}
                     ORDER BY primary_key DESC, commit_position DESC, ordinal DESC) w
               JOIN LATERAL (SELECT c.operation, c."schema", c.after FROM {changes} c
                             WHERE c.commit_position = w.cp AND c.ordinal = w.o LIMIT 1) c ON TRUE"""
        ).format(
            schema=sql.Literal(scope.table[0]),
            table=sql.Literal(scope.table[1]),
            changes=self._name(CHANGES_TABLE),
            below=below,
        )
        with conn.cursor(binary=True) as cur:
            keys, payloads, foreign = cur.execute(query).fetchone()  # type: ignore[misc]
        if not keys:
            return _WINNERS.empty_table(), int(foreign or 0)
        table = pacsv.read_csv(
            io.BytesIO(keys),
            read_options=pacsv.ReadOptions(column_names=["k", "cp", "o"], block_size=1 << 24),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types={"k": pa.string(), "cp": pa.int64(), "o": pa.int32()},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        # jsonb text is one line without control characters (they are escaped): one payload per line
        lines = pacsv.read_csv(
            io.BytesIO(payloads),
            read_options=pacsv.ReadOptions(column_names=["payload"], block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter="\x01", quote_char=False, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(
                column_types={"payload": pa.string()},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        if lines.num_rows != table.num_rows:  # pragma: no cover - guards the one-line assumption
            raise SourceError(f"rows of {scope.table[0]}.{scope.table[1]}: payloads do not align with keys")
        return table.append_column("payload", lines["payload"]), int(foreign or 0)

    def _side_effects(
        self, scope: Scope, cut: int | None, key: str | None
    ) -> tuple[pa.Table, tuple[int, int] | None, int | None]:
        """One pass over the table's changes before ``cut``: key UPDATEs (old key, cp, o), the last
        TRUNCATE, and the first position committed after ``scope.until`` (a commit time out of order)."""
        assert scope.table is not None
        below = _below(cut)
        if key is None:
            moves: sql.Composable = sql.SQL("NULL::text")
        else:
            old = sql.SQL("(before ->> {})").format(sql.Literal(key))
            moves = sql.SQL(
                """string_agg('"' || replace({old}, '"', '""') || '",' || commit_position || ',' || ordinal,
                              E'\\n')
                   FILTER (WHERE operation = 'UPDATE' AND {old} IS NOT NULL
                                 AND {old} IS DISTINCT FROM primary_key)"""
            ).format(old=old)
        late = (
            sql.SQL("min(commit_position) FILTER (WHERE committed_at > {})").format(
                sql.Literal(scope.until.to_pydatetime())
            )
            if scope.until is not None
            else sql.SQL("NULL::bigint")
        )
        query = sql.SQL(
            """SELECT {moves}, max(ARRAY[commit_position, ordinal]) FILTER (WHERE operation = 'TRUNCATE'),
                      {late}
               FROM {changes} WHERE "schema" = {schema} AND "table" = {table} {below}"""
        ).format(
            moves=moves,
            late=late,
            changes=self._name(CHANGES_TABLE),
            schema=sql.Literal(scope.table[0]),
            table=sql.Literal(scope.table[1]),
            below=below,
        )
        with self._connect() as conn:
            text, truncate, first_late = conn.execute(query).fetchone()  # type: ignore[misc]
        moved = (
            pacsv.read_csv(
                io.BytesIO(text.encode()),
                read_options=pacsv.ReadOptions(column_names=["ok", "cp", "o"]),
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(
                    column_types={"ok": pa.string(), "cp": pa.int64(), "o": pa.int32()},
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),
            )
            if text
            else pa.schema([("ok", pa.string()), ("cp", pa.int64()), ("o", pa.int32())]).empty_table()
        )
        return moved, (tuple(truncate) if truncate else None), first_late

    def winners(self, con: duckdb.DuckDBPyConnection, name: str, scope: Scope, keys: Sequence[str]) -> bool:
        """Create view ``name`` (k, cp, o, payload) of the rows present at ``scope`` for a table with one
        key column (or none known); False when this path does not apply (then use :meth:`latest`).

        Two queries run side by side: each key's last change from the ``("table", primary_key, ...)``
        index (reading only the winners' rows), and one pass over the table's changes for key UPDATEs,
        TRUNCATEs and commit times out of order. The cut is guessed by a binary search on commit times and
        checked exactly: when a change before it was committed later, both run again with the true cut."""
        if scope.table is None or len(keys) > 1 or scope.since is not None or scope.until_time is not None:
            return False
        key = keys[0] if keys else None
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool, self._connect() as conn:
            cut = self._cut_hint(conn, scope) if scope.until is not None else None
            for _ in range(2):
                side = pool.submit(self._side_effects, scope, cut, key)
                rows, foreign = self._winner_rows(conn, scope, cut)
                moved, truncate, late = side.result()
                if late is None:
                    break
                cut = int(late)  # a change before the guessed cut was committed after ``until``
            else:  # pragma: no cover - the second round starts at the exact cut, where nothing is late
                return False
        if foreign:
            return False  # another schema's table of the same name interleaves: the index cannot tell
        con.register(f"{name}__winners", rows)
        if not moved.num_rows and truncate is None:
            con.execute(f'CREATE OR REPLACE TEMP VIEW "{name}" AS SELECT * FROM "{name}__winners"')
            return True
        con.register(f"{name}__moved", moved)
        gone = f"AND (w.cp, w.o) > ({int(truncate[0])}, {int(truncate[1])})" if truncate is not None else ""
        con.execute(
            f'CREATE OR REPLACE TEMP VIEW "{name}" AS SELECT w.k, w.cp, w.o, w.payload '
            f'FROM "{name}__winners" w LEFT JOIN (SELECT ok, max((cp, o)) AS at FROM "{name}__moved" '
            f"GROUP BY ok) m ON m.ok = w.k WHERE (m.at IS NULL OR (w.cp, w.o) > m.at) {gone}"
        )
        return True

    def latest(
        self,
        con: duckdb.DuckDBPyConnection,
        name: str,
        scope: Scope,
        keys: Sequence[str],
        latest_sql: Callable[[str, str, str, str], str],
    ) -> None:
        """Create view ``name`` (k, cp, o, payload) of the rows present at ``scope`` in two steps: the
        positions of every change (small columns, old keys computed in PostgreSQL) to find each key's last
        change in DuckDB, then only those changes' ``after`` through a temporary table join."""
        if not keys:
            old_key: sql.Composable = sql.SQL("NULL::text")
            normalise = "old_key"
        elif len(keys) == 1:
            old_key = sql.SQL("before ->> {}").format(sql.Literal(keys[0]))
            normalise = "old_key"
        else:
            old_key = sql.SQL("jsonb_build_array({})::text").format(
                sql.SQL(", ").join(sql.SQL("before -> {}").format(sql.Literal(k)) for k in keys)
            )
            normalise = "CAST(json(old_key) AS VARCHAR)"
        # one scan: the rows committed up to ``until`` and, for the prefix rule, the first position after it
        until = sql.Literal(scope.until.to_pydatetime()) if scope.until is not None else None
        fields = [
            ("primary_key", sql.SQL("primary_key"), pa.string()),
            ("operation", sql.SQL("operation"), pa.string()),
            ("commit_position", sql.SQL("commit_position"), pa.int64()),
            ("ordinal", sql.SQL("ordinal"), pa.int32()),
            (
                "old_key",
                sql.SQL("CASE WHEN operation = 'UPDATE' AND before <> '{{}}'::jsonb THEN {} END").format(
                    old_key
                ),
                pa.string(),
            ),
        ]
        rows = sql.SQL("{} WHERE {}").format(
            self._name(CHANGES_TABLE),
            self.where(Scope(table=scope.table, since=scope.since, until_time=scope.until_time)),
        )
        with self._connect() as conn:
            steps, cut = self.agg_arrow(
                fields,
                rows,
                conn,
                keep=sql.SQL("committed_at <= {}").format(until) if until is not None else None,
                extra=sql.SQL("commit_position) FILTER (WHERE committed_at > {}").format(until)
                if until is not None
                else None,
            )
            if cut is not None:
                steps = steps.filter(
                    pa.compute.less(steps["commit_position"], pa.scalar(int(cut), pa.int64()))
                )
            con.register(f"{name}__positions", steps)
            winners = con.sql(
                latest_sql(
                    f'"{name}__positions"', normalise, "''", "operation = 'UPDATE' AND old_key IS NOT NULL"
                )
            ).to_arrow_table()
            conn.execute("BEGIN")
            conn.execute("CREATE TEMP TABLE bemi_tt_winners (cp bigint, o integer) ON COMMIT DROP")
            data = io.BytesIO()
            pacsv.write_csv(winners.select(["cp", "o"]), data, pacsv.WriteOptions(include_header=False))
            with conn.cursor() as cur, cur.copy("COPY bemi_tt_winners FROM STDIN (FORMAT csv)") as copy:
                copy.write(data.getvalue())
            conn.execute("ANALYZE bemi_tt_winners")
            afters, _ = self.agg_arrow(
                [
                    ("cp", sql.SQL("c.commit_position"), pa.int64()),
                    ("o", sql.SQL("c.ordinal"), pa.int32()),
                    ("payload", sql.SQL("c.after::text"), pa.string()),
                ],
                sql.SQL(
                    "{} c JOIN bemi_tt_winners w ON c.commit_position = w.cp AND c.ordinal = w.o WHERE {}"
                ).format(self._name(CHANGES_TABLE), self.where(Scope(table=scope.table))),
                conn,
            )
            conn.execute("COMMIT")
        con.register(f"{name}__winners", winners.select(["k", "cp", "o"]))
        con.register(f"{name}__afters", afters)
        con.execute(
            f'CREATE OR REPLACE TEMP VIEW "{name}" AS SELECT w.k, w.cp, w.o, a.payload '
            f'FROM "{name}__winners" w JOIN "{name}__afters" a USING (cp, o)'
        )

    def load(self, con: duckdb.DuckDBPyConnection, name: str, scope: Scope) -> None:
        if self.mirror and scope.table is not None:
            con.register(f"{name}__arrow", self.mirrored(scope.table))
            _scope_view(con, name, f'"{name}__arrow"', scope)
            return
        con.register(f"{name}__arrow", self.fetch(scope))
        con.execute(f'CREATE OR REPLACE TEMP VIEW "{name}" AS SELECT * FROM "{name}__arrow"')

    def mirrored(self, table: TableName) -> pa.Table:
        """All changes of ``table``, from memory plus those committed since the last call."""
        with self._mirror_lock:
            known = self._mirrors.get(table)
            parts = [known] if known is not None else []
            last = None
            if known is not None and known.num_rows:
                last = (known["commit_position"][-1].as_py(), known["ordinal"][-1].as_py())
            names = [c for c, _, _ in CHANGES_COLUMNS]
            newer = (
                sql.SQL("TRUE")
                if last is None
                else sql.SQL("(commit_position, ordinal) > ({}, {})").format(
                    sql.Literal(last[0]), sql.Literal(last[1])
                )
            )
            query = sql.SQL("{} AND {} ORDER BY commit_position, ordinal").format(
                self.query(Scope(table=table)), newer
            )
            chunk = self.copy_arrow(
                query, {c: pa.int64() if c == "committed_at" else _ARROW_TYPES[c] for c in names}
            )
            if chunk.num_rows:
                chunk = chunk.set_column(
                    names.index("committed_at"),
                    "committed_at",
                    chunk["committed_at"].cast(pa.timestamp("us")).cast(pa.timestamp("us", tz="UTC")),
                )
                parts.append(chunk)
            result = pa.concat_tables(parts) if parts else changes_arrow_schema().empty_table()
            self._mirrors[table] = result
            return result

    def schemas(self, table: TableName | None = None) -> pa.Table:
        query = sql.SQL(
            'SELECT "schema", "table", commit_position, ordinal, committed_at, columns::text FROM {}'
        ).format(self._name(SCHEMAS_TABLE))
        params: list[Any] = []
        if table is not None:
            query = sql.SQL('{} WHERE "schema" = %s AND "table" = %s').format(query)
            params = list(table)
        with self._connect() as conn:
            try:
                rows = conn.execute(query, params).fetchall()
            except psycopg.errors.UndefinedTable:
                rows = []
        return pa.table(
            {f.name: pa.array([r[i] for r in rows], type=f.type) for i, f in enumerate(SCHEMAS_ARROW)}
        )

    def tables(self, name: str | None = None) -> list[TableName]:
        found: set[TableName] = set()
        with self._connect() as conn:
            for table in (SCHEMAS_TABLE, CHANGES_TABLE):
                query = sql.SQL('SELECT DISTINCT "schema", "table" FROM {}').format(self._name(table))
                params: list[Any] = []
                if name is not None:
                    query = sql.SQL('{} WHERE "table" = %s').format(query)
                    params = [name]
                try:
                    found |= {(str(s), str(t)) for s, t in conn.execute(query, params).fetchall()}
                except psycopg.errors.UndefinedTable:
                    if table == CHANGES_TABLE:
                        raise SourceError(
                            f"database has no {self.schema}.{CHANGES_TABLE} table: run the "
                            "capture worker (`bemi-tt capture`) on it first"
                        ) from None
                if found and name is not None:
                    break
        return sorted(found)

    def describe(self) -> str:
        params = psycopg.conninfo.conninfo_to_dict(self.dsn)
        return f"PostgresSource: database {params.get('dbname', '?')!s}"


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
