"""The steps every export run shares, Parquet or Delta: claim the directory, check the prefix, split a
unit by partition, write Parquet files in memory, rewrite the schema sidecar, report progress and stats.

``capture.export.run`` (Parquet) and ``capture.export.delta`` both build on it, so neither imports the
other.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import IO

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from psycopg import sql

from capture.errors import ConfigurationError, SourceError
from capture.export.dataset import (
    DatasetState,
    delete_files,
    read_horizon,
    read_identity,
    refuse_foreign_files,
    write_atomic,
    write_identity,
)
from capture.export.layout import (
    DICTIONARY_COLUMNS,
    IDENTIFYING_COLUMNS,
    IDENTITY_FILE,
    LEGACY_SCHEMAS_FILE,
    META_DIR,
    ROW_GROUP_ROWS,
    SCHEMAS_FILE,
    Key,
    partition_dir,
    schemas_arrow_schema,
    unit_name,
)
from capture.export.read import copy_csv, fetch_range, key_condition, source_identity

__all__ = [
    "PROGRESS_DELAY",
    "ExportStats",
    "Progress",
    "check_prefix",
    "claim_directory",
    "export_schemas",
    "first_key",
    "last_key",
    "parquet_bytes",
    "split_partitions",
    "write_unit",
]

#: Seconds before a progress bar appears when ``progress`` is left to auto-detect a terminal.
PROGRESS_DELAY = 2.0
_EPOCH = dt.date(1970, 1, 1)


@dataclass(frozen=True)
class ExportStats:
    """What one export run did; ``str()`` is the final line the CLI prints."""

    changes: int
    files: int
    bytes: int
    watermark: Key | None = None
    compacted_files: int = 0

    def __str__(self) -> str:
        text = f"exported {self.changes} changes in {self.files} files ({self.bytes} bytes)"
        if self.compacted_files:
            text += f", compacted {self.compacted_files} files"
        return text


class Progress:
    """A one-line progress bar on a terminal (stderr); silent when disabled."""

    def __init__(self, enabled: bool, stream: IO[str], delay: float) -> None:
        self.enabled, self.stream, self.delay = enabled, stream, delay
        self.total = 0
        self.started = time.monotonic()
        self.shown = False

    def update(self, done: int) -> None:
        if not self.enabled or time.monotonic() - self.started < self.delay:
            return
        width = 30
        fraction = min(1.0, done / self.total) if self.total else 1.0
        rate = done / max(time.monotonic() - self.started, 1e-9)
        bar = "#" * int(width * fraction) + "-" * (width - int(width * fraction))
        self.stream.write(f"\rexport [{bar}] {done}/{self.total} changes {rate:,.0f}/s")
        self.stream.flush()
        self.shown = True

    def finish(self, stats: ExportStats) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.shown else "") + f"{stats}\n")
            self.stream.flush()


def split_partitions(table: pa.Table) -> list[tuple[str, pa.Table]]:
    """Rows grouped by partition directory (sorted by name), each group still in key order."""
    # NUL separates schema and table: PostgreSQL names can hold any other character
    relations = pc.binary_join_element_wise(table["schema"], table["table"], "\x00").combine_chunks()
    relations = relations.dictionary_encode()
    days = pc.cast(pc.cast(table["committed_at"], pa.date32()), pa.int32()).combine_chunks()  # UTC dates
    combined = pc.add(
        pc.shift_left(relations.indices.cast(pa.int64()), 32), pc.add(days.cast(pa.int64()), 1 << 31)
    )
    encoded = combined.dictionary_encode()
    directories = []
    names_of = relations.dictionary.to_pylist()
    for value in encoded.dictionary.to_pylist():
        schema, name = names_of[value >> 32].split("\x00")
        day = _EPOCH + dt.timedelta(days=(value & 0xFFFFFFFF) - (1 << 31))
        directories.append(partition_dir(schema, name, day.isoformat()))
    names = sorted(set(directories))
    if len(names) == 1:
        return [(names[0], table)]
    slot = {name: i for i, name in enumerate(names)}
    row_partition = pc.take(pa.array([slot[d] for d in directories], pa.int32()), encoded.indices)
    ordered = table.take(pc.sort_indices(row_partition))  # stable: key order kept inside a partition
    counts = pc.value_counts(row_partition)
    sizes = dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True))
    groups, start = [], 0
    for i, name in enumerate(names):
        groups.append((name, ordered.slice(start, sizes[i])))
        start += sizes[i]
    return groups


def parquet_bytes(table: pa.Table) -> pa.Buffer:
    """One Parquet file in memory: zstd, row groups of ``ROW_GROUP_ROWS``, marked sorted by key."""
    sink = pa.BufferOutputStream()
    names = table.schema.names
    sorting = (
        [pq.SortingColumn(names.index("commit_position")), pq.SortingColumn(names.index("ordinal"))]
        if "ordinal" in names
        else None
    )
    pq.write_table(
        table,
        sink,
        compression="zstd",
        row_group_size=ROW_GROUP_ROWS,
        sorting_columns=sorting,
        use_dictionary=[c for c in DICTIONARY_COLUMNS if c in names],
    )
    return sink.getvalue()


def first_key(table: pa.Table) -> Key:
    return table["commit_position"][0].as_py(), table["ordinal"][0].as_py()


def last_key(table: pa.Table) -> Key:
    return table["commit_position"][-1].as_py(), table["ordinal"][-1].as_py()


def write_unit(
    filesystem: pafs.FileSystem, root: str, table: pa.Table, skip: set[str] | None = None
) -> tuple[int, int]:
    """Write the files of one unit (all rows in ``table``); returns (files, bytes) written."""
    first, last = first_key(table), last_key(table)
    groups = split_partitions(table)
    files = written = 0
    for number, (directory, rows) in enumerate(groups, 1):
        name = unit_name(first, last, number, len(groups), rows.num_rows)
        if skip is not None and name in skip:
            continue
        data = parquet_bytes(rows)
        write_atomic(filesystem, f"{root}/{directory}/{name}", data)
        files += 1
        written += data.size
    return files, written


def export_schemas(
    conn: psycopg.Connection, filesystem: pafs.FileSystem, root: str, schema: str, table: str
) -> int:
    """Rewrite ``_bemi_tt/schemas.pq`` from the ``changes_schemas`` table (empty when it is missing)."""
    target = pa.table({f.name: pa.array([], f.type) for f in schemas_arrow_schema()})
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(schema, table).as_string(conn),)
    )
    row = exists.fetchone()
    if row and row[0]:
        query = sql.SQL(
            'SELECT "schema", "table", commit_position, ordinal, '
            "(extract(epoch FROM committed_at) * 1000000)::bigint, columns::text, relation_oid, step,"
            " event::text, context::text, replica_identity FROM {} "
            'ORDER BY "schema", "table", commit_position, ordinal, step'
        ).format(sql.Identifier(schema, table))
        types = {f.name: f.type for f in schemas_arrow_schema()}
        types["committed_at"] = pa.int64()
        types["columns"] = types["event"] = types["context"] = pa.string()
        rows = copy_csv(conn, query, types)
        rows = rows.set_column(4, "committed_at", pc.cast(rows["committed_at"], pa.timestamp("us", tz="UTC")))
        target = rows.cast(schemas_arrow_schema())
    data = parquet_bytes(target)
    write_atomic(filesystem, f"{root}/{META_DIR}/{SCHEMAS_FILE}", data)
    legacy = f"{root}/{META_DIR}/{LEGACY_SCHEMAS_FILE}"  # the first release's name, matched by **/*.parquet
    if filesystem.get_file_info(legacy).type == pafs.FileType.File:
        delete_files(filesystem, [legacy])
    return int(data.size)


def claim_directory(
    conn: psycopg.Connection, name: sql.Identifier, state: DatasetState, schema: str, table: str
) -> None:
    """Make sure the directory holds this ``changes`` table's export (or nothing) before touching it.

    A directory recorded for another table, database or server is refused, as is one holding files that
    are not an export's. One without a record (empty, or exported by the first release) is adopted, after
    checking that its newest change is this table's, and the record is written.
    """
    identity = source_identity(conn, schema, table)
    recorded = read_identity(state.filesystem, state.root)
    record = f"{state.root}/{META_DIR}/{IDENTITY_FILE}"
    if recorded is not None and not recorded.same_source(identity):
        raise ConfigurationError(
            f"export directory {state.root!r} holds the export of {recorded.describe()}, not of "
            f"{identity.describe()}: export each into its own directory (if this is the same database moved "
            f"to another server, delete {record!r}: the next export checks the data and adopts it)"
        )
    refuse_foreign_files(state)
    if recorded is not None:
        return
    files = state.files + state.incomplete_files
    if files:  # the first release wrote no record: adopt its export if its newest change is this table's
        newest = max(files, key=lambda f: f.last)
        exported = pq.read_table(newest.path, filesystem=state.filesystem, columns=list(IDENTIFYING_COLUMNS))
        source = fetch_range(conn, name, newest.last, newest.last).select(list(IDENTIFYING_COLUMNS))
        if source.to_pylist() != exported.slice(exported.num_rows - 1).to_pylist():
            raise ConfigurationError(
                f"export directory {state.root!r} holds an export whose newest change {newest.last!r} "
                f"({newest.path!r}) is not in {identity.describe()}: it is another database's export; "
                "export into an empty directory"
            )
    write_identity(state.filesystem, state.root, identity)


def check_prefix(conn: psycopg.Connection, name: sql.Composable, state: DatasetState) -> None:
    """Fail if ``changes`` has more rows at or below the watermark than the dataset: they would be lost."""
    if state.watermark is None:
        return
    # a pruned dataset holds its baseline (at C - 1) instead of the changes before the horizon C
    horizon = read_horizon(state.filesystem, state.root)
    lower = (horizon.position - 1, (1 << 32) - 1) if horizon is not None else None
    rows = state.rows - (horizon.rows if horizon is not None else 0)
    query = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(name, key_condition(lower, state.watermark))
    row = conn.execute(query).fetchone()
    behind = int(row[0]) if row else 0
    if behind > rows:
        raise SourceError(
            f"{behind - rows} rows of changes have keys at or below the export watermark "
            f"{state.watermark!r} but are not in the dataset {state.root!r} (inserted out of key order); "
            "re-export into an empty directory"
        )
