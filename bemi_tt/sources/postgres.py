"""A PostgreSQL database holding ``changes`` as a source (:class:`PostgresSource`): rows reach DuckDB
through ``COPY`` or one CSV value; key lookups, the time cut and the rows present at a cut are pushed down.
"""

from __future__ import annotations

import io
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import duckdb
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.compute
import pyarrow.csv as pacsv
from psycopg import sql

from bemi_tt.sources.base import (
    _ARROW_TYPES,
    SCHEMAS_ARROW,
    Scope,
    Source,
    TableName,
    _scope_view,
    segments_condition,
)
from capture.dsn import check_dsn, connect_error
from capture.errors import ConfigurationError, SourceError
from capture.schema import CHANGES_COLUMNS, CHANGES_TABLE, SCHEMAS_TABLE, changes_arrow_schema

__all__ = ["PostgresSource"]

_MAX_POSITION = (1 << 63) - 1
#: Idle connections a source keeps for its next calls.
_IDLE_CONNECTIONS = 4
_IDLE = psycopg.pq.TransactionStatus.IDLE
#: How many changes the cut hint looks at after its binary search (bounds the work for quiet tables).
_HINT_WALK = 200_000
#: Rows present at a cut, as the PostgreSQL source hands them to DuckDB.
_WINNERS = pa.schema([("k", pa.string()), ("cp", pa.int64()), ("o", pa.int32()), ("payload", pa.string())])


# -- PostgreSQL ---------------------------------------------------------------------------------------------
def _conninfo(url: str) -> str:
    """libpq connection string for a ``postgresql[+driver]://`` URL or a key=value conninfo."""
    if url.startswith(("postgresql+", "postgres+")):
        _scheme, rest = url.split("://", 1)
        url = "postgresql://" + rest
    return url


def _quote(value: str) -> str:
    """A PostgreSQL string literal (standard_conforming_strings, as on every supported server)."""
    return "'" + value.replace("'", "''") + "'"


def _below(cut: int | None) -> sql.Composable:
    """``AND commit_position < cut`` (nothing when there is no cut)."""
    return sql.SQL("AND commit_position < {}").format(sql.Literal(cut)) if cut is not None else sql.SQL("")


def _csv_convert(types: Mapping[str, pa.DataType]) -> pacsv.ConvertOptions:
    """How ``COPY ... (FORMAT csv)`` of ``changes`` reads: unquoted empty is NULL, quoted empty is ''."""
    return pacsv.ConvertOptions(
        column_types=dict(types),
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
        null_values=[""],
        true_values=["t"],  # PostgreSQL's CSV booleans (context_verified)
        false_values=["f"],
    )


class _CopyFile(io.RawIOBase):
    """The chunks of a ``COPY ... TO STDOUT`` as a readable file (for pyarrow's streaming CSV reader)."""

    def __init__(self, first: Any, chunks: Iterator[Any]) -> None:
        self._chunks = chunks
        self._pending = memoryview(first).cast("B")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(target):
            if not self._pending:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._pending = memoryview(chunk).cast("B")
                continue
            n = min(len(target) - filled, len(self._pending))
            target[filled : filled + n] = self._pending[:n]
            self._pending = self._pending[n:]
            filled += n
        return filled


def _close_all(connections: list[psycopg.Connection[Any]]) -> None:
    while connections:
        connections.pop().close()


class _Restartable:
    """An Arrow stream DuckDB can scan any number of times: each scan asks for a new reader (through the
    Arrow PyCapsule interface), which runs its query only when its first batch is read."""

    def __init__(self, make: Callable[[], pa.RecordBatchReader]) -> None:
        self._make = make

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        return self._make().__arrow_c_stream__(requested_schema)


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
        self._idle: list[psycopg.Connection[Any]] = []
        self._pool_lock = threading.Lock()
        self._pool_pid = os.getpid()
        weakref.finalize(self, _close_all, self._idle)
        check_dsn(dsn, what="source")  # a malformed one fails here, its password redacted

    @property
    def pushdown(self) -> frozenset[str]:  # a mirror holds the rows in memory: DuckDB is faster there
        return frozenset({"keys"}) if self.mirror else frozenset({"present", "keys"})

    def present(self, con: duckdb.DuckDBPyConnection, name: str, scope: Scope, keys: Sequence[str]) -> None:
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

    @contextmanager
    def _connect(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection (autocommit) for one block: an idle one kept from an earlier block when there is
        one, since connecting costs more than a key lookup's queries. Kept only when the block left it
        idle (no transaction, no COPY running); at most :data:`_IDLE_CONNECTIONS` are kept, all closed
        when the source is collected or the process exits, and none crosses a fork."""
        conn = self._checkout()
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        self._checkin(conn)

    def _checkout(self) -> psycopg.Connection[Any]:
        with self._pool_lock:
            if self._pool_pid != os.getpid():  # a forked child must not share the parent's sockets
                self._idle.clear()
                self._pool_pid = os.getpid()
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed and conn.info.transaction_status == _IDLE:
                    return conn
                conn.close()
        try:
            return psycopg.connect(self.dsn, autocommit=True)
        except psycopg.Error as exc:
            raise connect_error(exc, self.original, what="the changes database") from None

    def _checkin(self, conn: psycopg.Connection[Any]) -> None:
        if conn.closed or conn.info.transaction_status != _IDLE or os.getpid() != self._pool_pid:
            conn.close()
            return
        with self._pool_lock:
            if len(self._idle) < _IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close the idle connections this source keeps (a later call connects again)."""
        with self._pool_lock:
            _close_all(self._idle)

    def _name(self, table: str) -> sql.Identifier:
        return sql.Identifier(self.schema, table)

    def where(self, scope: Scope, cut: sql.Composable | None = None) -> sql.Composable:
        """The WHERE condition of ``scope`` on ``changes`` (values as literals: COPY takes no parameters);
        ``cut``: an expression standing for :meth:`cut_sql` (a CTE computing it once)."""
        where: list[sql.Composable] = [sql.SQL("TRUE")]
        if scope.segments is not None:  # one relation under every name it had
            where.append(sql.SQL(segments_condition(scope.segments, _quote)))
        elif scope.table is not None:
            where.append(sql.SQL('"schema" = {} AND "table" = {}').format(*map(sql.Literal, scope.table)))
        if scope.since is not None:
            where.append(sql.SQL("committed_at >= {}").format(sql.Literal(scope.since.to_pydatetime())))
        if scope.until_time is not None:
            where.append(sql.SQL("committed_at <= {}").format(sql.Literal(scope.until_time.to_pydatetime())))
        if scope.start is not None:
            where.append(sql.SQL("commit_position >= {}").format(sql.Literal(int(scope.start))))
        for key, text in scope.context_text:
            where.append(sql.SQL("(context ->> {}) = {}").format(sql.Literal(key), sql.Literal(text)))
        if scope.until is not None:
            bound = cut if cut is not None else self.cut_sql(scope)
            where.append(sql.SQL("commit_position < {}").format(bound))
        return sql.SQL(" AND ").join(where)

    def cut_sql(self, scope: Scope) -> sql.Composable:
        """The first position of ``scope``'s table stamped after ``scope.until`` (the largest position when
        none is), from the ``("table", committed_at)`` index: OFFSET 0 keeps the planner from walking commit
        order instead."""
        assert scope.until is not None
        in_table: sql.Composable = sql.SQL("")
        if scope.segments is not None:
            in_table = sql.SQL(" AND " + segments_condition(scope.segments, _quote))
        elif scope.table is not None:
            in_table = sql.SQL(' AND "schema" = {} AND "table" = {}').format(*map(sql.Literal, scope.table))
        inner = sql.SQL(
            "SELECT min(commit_position) FROM (SELECT commit_position FROM {} WHERE committed_at > {}{}"
            " OFFSET 0) later"
        ).format(self._name(CHANGES_TABLE), sql.Literal(scope.until.to_pydatetime()), in_table)
        return sql.SQL("coalesce(({}), {})").format(inner, sql.Literal(_MAX_POSITION))

    def query(self, scope: Scope) -> sql.Composed:
        """The SELECT over ``changes`` for ``scope`` (committed_at as epoch microseconds).

        With ``scope.keys``: the keys' changes and the TRUNCATEs from the ``("table", primary_key, ...)``
        index, plus the key UPDATEs away from them from the ``("table", before_primary_key)`` index (the
        worker writes each key UPDATE's old key there: no ``before`` image is read)."""
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
        keys = sql.SQL("ARRAY[{}]::text[]").format(sql.SQL(", ").join(map(sql.Literal, scope.keys)))
        # the cut once, in a CTE, for the three parts
        prefix: sql.Composable = sql.SQL("")
        cut: sql.Composable | None = None
        if scope.until is not None:
            prefix = sql.SQL("WITH cut AS MATERIALIZED (SELECT {} AS p) ").format(self.cut_sql(scope))
            cut = sql.SQL("(SELECT p FROM cut)")
        where = self.where(replace(scope, keys=None), cut)
        parts = [
            sql.SQL("primary_key = ANY({})").format(keys),
            sql.SQL("primary_key IS NULL AND operation = 'TRUNCATE'"),
            sql.SQL("before_primary_key = ANY({}) AND primary_key <> ALL({})").format(keys, keys),
        ]
        return prefix + sql.SQL(" UNION ALL ").join(
            sql.SQL("SELECT {} FROM {} WHERE {} AND {}").format(cols, self._name(CHANGES_TABLE), where, part)
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
                true_values=["t"],  # PostgreSQL's CSV booleans (context_verified)
                false_values=["f"],
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
        else:  # the old keys the worker wrote: no ``before`` image is parsed
            moves = sql.SQL(
                """string_agg('"' || replace(before_primary_key, '"', '""') || '",' || commit_position
                              || ',' || ordinal, E'\\n') FILTER (WHERE before_primary_key IS NOT NULL)"""
            )
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
        # the old key of a key UPDATE as the worker wrote it (like primary_key: compact JSON when composite)
        old_key: sql.Composable = sql.SQL("before_primary_key") if keys else sql.SQL("NULL::text")
        normalise = "old_key"
        # one scan: the rows committed up to ``until`` and, for the prefix rule, the first position after it
        until = sql.Literal(scope.until.to_pydatetime()) if scope.until is not None else None
        fields = [
            ("primary_key", sql.SQL("primary_key"), pa.string()),
            ("operation", sql.SQL("operation"), pa.string()),
            ("commit_position", sql.SQL("commit_position"), pa.int64()),
            ("ordinal", sql.SQL("ordinal"), pa.int32()),
            ("old_key", old_key, pa.string()),
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

    def batches(self, scope: Scope, *, ordered: bool = False) -> pa.RecordBatchReader:
        """The rows of ``scope`` as a stream of Arrow batches, read from one ``COPY`` as they are consumed:
        memory is one batch, whatever the number of rows. The query starts at the first batch read (a
        reader only asked for its schema opens no connection). ``ordered``: in commit order."""
        wanted = scope.columns or tuple(c for c, _, _ in CHANGES_COLUMNS)
        types = {c: (pa.int64() if c == "committed_at" else _ARROW_TYPES[c]) for c in wanted}
        schema = pa.schema(
            [(c, pa.timestamp("us", tz="UTC") if c == "committed_at" else t) for c, t in types.items()]
        )
        query: sql.Composable = self.query(scope)
        if ordered:
            assert "commit_position" in wanted and "ordinal" in wanted
            query = sql.SQL("{} ORDER BY commit_position, ordinal").format(query)
        copy_sql = sql.SQL("COPY ({}) TO STDOUT (FORMAT csv)").format(query)

        def read() -> Iterator[pa.RecordBatch]:
            try:
                with self._connect() as conn, conn.cursor() as cur, cur.copy(copy_sql) as copy:
                    chunks = iter(copy)
                    first = next(chunks, None)
                    if first is None:
                        return
                    reader = pacsv.open_csv(
                        io.BufferedReader(_CopyFile(first, chunks), 1 << 22),
                        read_options=pacsv.ReadOptions(column_names=list(types), block_size=1 << 22),
                        parse_options=pacsv.ParseOptions(newlines_in_values=True),
                        convert_options=_csv_convert(types),
                    )
                    for batch in reader:
                        if "committed_at" in types:
                            i = batch.schema.get_field_index("committed_at")
                            batch = batch.set_column(
                                i, "committed_at", batch.column(i).cast(pa.timestamp("us", tz="UTC"))
                            )
                        yield batch
            except psycopg.errors.UndefinedTable as exc:
                raise SourceError(
                    f"database has no {self.schema}.{CHANGES_TABLE} table: run the capture "
                    "worker (`bemi-tt capture`) on it first"
                ) from exc

        return pa.RecordBatchReader.from_batches(schema, read())

    def stream(self, con: duckdb.DuckDBPyConnection, name: str, scope: Scope) -> bool:
        if self.mirror:
            return super().stream(con, name, scope)
        con.register(name, self.batches(scope, ordered=True))
        return True

    def lazy(self, con: duckdb.DuckDBPyConnection, name: str) -> None:
        """View ``name`` of every change, streamed from PostgreSQL by each query that scans it (nothing is
        copied up front; ``mirror=True`` keeps the changes in memory instead)."""
        if self.mirror:
            super().lazy(con, name)
            return
        con.register(f"{name}__stream", _Restartable(lambda: self.batches(Scope())))
        con.execute(f'CREATE OR REPLACE TEMP VIEW "{name}" AS SELECT * FROM "{name}__stream"')

    def load(self, con: duckdb.DuckDBPyConnection, name: str, scope: Scope) -> None:
        if self.mirror and scope.table is not None and scope.segments is None:
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
        rows: list[Any] = []
        # a first-release table (no worker has upgraded it yet) lacks the relation's identity and events
        for later in (sql.SQL("relation_oid, step, event::text"), sql.SQL("NULL::bigint, 0, '[]'")):
            query = sql.SQL(
                'SELECT "schema", "table", commit_position, ordinal, committed_at, columns::text, {} FROM {}'
            ).format(later, self._name(SCHEMAS_TABLE))
            params: list[Any] = []
            if table is not None:
                query = sql.SQL('{} WHERE "schema" = %s AND "table" = %s').format(query)
                params = list(table)
            with self._connect() as conn:
                try:
                    rows = conn.execute(query, params).fetchall()
                    break
                except psycopg.errors.UndefinedTable:
                    break
                except psycopg.errors.UndefinedColumn:
                    continue
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
