"""Reading ``changes`` out of PostgreSQL as Arrow, fast: one ``COPY ... (FORMAT csv)`` parsed by pyarrow.

JSON columns travel as ``jsonb::text`` and ``committed_at`` as exact epoch microseconds; pyarrow's CSV
reader keeps NULL (unquoted empty) apart from the empty string (quoted). ``stream_units`` cuts one COPY
into units of rows on message boundaries (PostgreSQL sends one COPY message per row).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from psycopg import sql

from capture.errors import SourceError
from capture.export.layout import DatasetIdentity, Key, export_arrow_schema
from capture.schema import CHANGES_COLUMNS, JSON_COLUMNS

__all__ = [
    "changes_table",
    "copy_csv",
    "fetch_range",
    "key_condition",
    "parse_csv",
    "source_identity",
    "stream_units",
]

def source_identity(conn: psycopg.Connection, schema: str, table: str) -> DatasetIdentity:
    """The identity of the ``changes`` table read through ``conn``: server, database, qualified table."""
    try:
        row = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
        system = str(row[0]) if row else ""
    except psycopg.errors.InsufficientPrivilege:  # some hosted servers revoke it: database and table remain
        system = ""
    name = conn.execute("SELECT current_database()").fetchone()
    return DatasetIdentity(system, str(name[0]) if name else "", f"{schema}.{table}")


def _csv_types() -> dict[str, pa.DataType]:
    types = {name: arrow_type for name, _, arrow_type in CHANGES_COLUMNS}
    types["committed_at"] = pa.int64()  # read as epoch microseconds, exact
    return types


def _select_changes(name: sql.Composable) -> sql.Composed:
    columns: list[sql.Composable] = []
    for column, _, _ in CHANGES_COLUMNS:
        ident = sql.Identifier(column)
        if column in JSON_COLUMNS:
            columns.append(sql.SQL("{}::text").format(ident))
        elif column == "committed_at":
            columns.append(sql.SQL("(extract(epoch FROM {}) * 1000000)::bigint").format(ident))
        else:
            columns.append(ident)
    return sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(columns), name)


def parse_csv(data: bytes | bytearray, types: dict[str, pa.DataType], rows: int | None = None) -> pa.Table:
    """Parse ``COPY ... (FORMAT csv)`` output with pyarrow: fast, typed, NULL and empty string kept apart.

    With ``rows`` known, data holding exactly one line feed per row and no carriage return has no line
    break inside a value, and parses with pyarrow's faster line splitting.
    """
    if not data:
        return pa.table({name: pa.array([], t) for name, t in types.items()})
    breaks_in_values = rows is None or data.count(b"\n") != rows or b"\r" in data
    return pacsv.read_csv(
        pa.BufferReader(pa.py_buffer(data)),
        read_options=pacsv.ReadOptions(column_names=list(types), block_size=1 << 23),
        parse_options=pacsv.ParseOptions(newlines_in_values=breaks_in_values),
        convert_options=pacsv.ConvertOptions(
            column_types=types, null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=False,
            true_values=["t"], false_values=["f"],  # PostgreSQL's CSV booleans (context_verified)
        ),
    )


def copy_csv(conn: psycopg.Connection, query: sql.Composed, types: dict[str, pa.DataType]) -> pa.Table:
    """Run ``COPY (query) TO STDOUT (FORMAT csv)`` and parse it."""
    statement = sql.SQL("COPY ({}) TO STDOUT (FORMAT csv)").format(query)
    with conn.cursor() as cur, cur.copy(statement) as copy:
        data = b"".join(copy)
    return parse_csv(data, types)


def changes_table(raw: pa.Table) -> pa.Table:
    """Parsed CSV columns to the export schema (epoch microseconds to UTC timestamps, JSON type)."""
    index = raw.schema.get_field_index("committed_at")
    raw = raw.set_column(index, "committed_at", pc.cast(raw["committed_at"], pa.timestamp("us", tz="UTC")))
    return raw.cast(export_arrow_schema())


def key_condition(lower: Key | None, upper: Key | None, *, from_lower: bool = False) -> sql.Composable:
    parts = []
    if lower is not None:
        operator = sql.SQL(">=" if from_lower else ">")
        parts.append(
            sql.SQL("(commit_position, ordinal) {} ({}, {})").format(operator, *map(sql.Literal, lower))
        )
    if upper is not None:
        parts.append(sql.SQL("(commit_position, ordinal) <= ({}, {})").format(*map(sql.Literal, upper)))
    return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")


def _changes_query(name: sql.Composable, condition: sql.Composable) -> sql.Composed:
    return sql.SQL("{} WHERE {} ORDER BY commit_position, ordinal").format(_select_changes(name), condition)


def fetch_range(conn: psycopg.Connection, name: sql.Composable, first: Key, last: Key) -> pa.Table:
    """Rows with keys in ``[first, last]``, in key order."""
    condition = key_condition(first, last, from_lower=True)
    return changes_table(copy_csv(conn, _changes_query(name, condition), _csv_types()))


def stream_units(
    conn: psycopg.Connection,
    name: sql.Composable,
    after: Key | None,
    batch_rows: int,
    write: Callable[[pa.Table], None],
) -> None:
    """Read every row after ``after`` with one COPY, handing units of ``batch_rows`` rows to ``write``.

    PostgreSQL sends one COPY message per row, so units are cut on row boundaries without parsing.
    ``write`` runs in a second thread, overlapping the read of the next unit (pyarrow releases the GIL).
    """
    statement = sql.SQL("COPY ({}) TO STDOUT (FORMAT csv)").format(
        _changes_query(name, key_condition(after, None))
    )
    types = _csv_types()

    def parse_and_write(data: bytearray, count: int) -> None:
        table = changes_table(parse_csv(data, types, count))
        if table.num_rows != count:
            raise SourceError(f"parsed {table.num_rows} rows from a COPY of {count} rows; please report this")
        write(table)

    pending: Future[None] | None = None
    with ThreadPoolExecutor(1, thread_name_prefix="bemi_tt_export") as pool:
        with conn.cursor() as cur, cur.copy(statement) as copy:
            data, count = bytearray(), 0
            for row in copy:
                data += row
                count += 1
                if count == batch_rows:
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(parse_and_write, data, count)
                    data, count = bytearray(), 0
        if pending is not None:
            pending.result()
        if count:
            parse_and_write(data, count)
