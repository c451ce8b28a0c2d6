"""Incremental, exactly-once export of ``changes`` to a Hive-partitioned Parquet dataset.

Each run reads the rows after the dataset's watermark in key order (``COPY ... (FORMAT csv)`` parsed by
pyarrow), in units of ``batch_rows`` changes, and writes one zstd Parquet file per partition touched by
a unit (naming and listing rules: ``capture.export_dataset``). A unit half written by a killed export is
finished first, from the key range its surviving file names record, so a rerun neither skips nor
duplicates a change. ``DIR/_bemi_tt/schemas.pq`` is rewritten (atomically) with ``changes_schemas``.
The first export into a directory records which ``changes`` table it exports (``_bemi_tt/dataset.json``);
every later one refuses a directory recorded for another, or holding files that are not an export's.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from typing import IO

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from psycopg import sql

from capture.dsn import check_dsn, connect_error, database_error, one_line
from capture.errors import BemiError, ConfigurationError, SourceError, StorageError
from capture.export_dataset import (
    IDENTITY_FILE,
    LEGACY_SCHEMAS_FILE,
    META_DIR,
    SCHEMAS_FILE,
    DatasetState,
    Key,
    delete_files,
    is_delta_table,
    list_dataset_files,
    partition_dir,
    read_dataset_state,
    read_identity,
    refuse_foreign_files,
    resolve_directory,
    unit_name,
    write_atomic,
    write_identity,
)
from capture.export_lock import DatasetLock, open_lock
from capture.export_read import (
    IDENTIFYING_COLUMNS,
    copy_csv,
    export_arrow_schema,
    fetch_range,
    key_condition,
    schemas_arrow_schema,
    source_identity,
    stream_units,
)
from capture.schema import CHANGES_TABLE, SCHEMAS_TABLE

__all__ = [
    "ExportStats",
    "export_arrow_schema",
    "export_parquet",
    "list_dataset_files",
    "schemas_arrow_schema",
]

#: Rows per Parquet row group: big enough to scan fast, small enough to skip by statistics.
ROW_GROUP_ROWS = 128 * 1024
#: Seconds before a progress bar appears when ``progress`` is left to auto-detect a terminal.
PROGRESS_DELAY = 2.0
#: Columns with few distinct values: dictionary-encoded (on JSON columns it only costs time and space).
DICTIONARY_COLUMNS = ["table", "operation", "schema", "database"]
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


class _Progress:
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


def _libpq_dsn(source_dsn: str) -> str:
    """libpq form of ``source_dsn`` (a SQLAlchemy URL is rewritten), checked before anything is locked."""
    return check_dsn(source_dsn, what="source_dsn")


_STORAGE_HINTS = {
    errno.ENOSPC: "the disk is full: free space or export to another directory",
    errno.EDQUOT: "the disk quota is exceeded: free space or export to another directory",
    errno.EFBIG: "a file is larger than this process may write (ulimit -f)",
    errno.EROFS: "the file system is read-only: export to a writable directory",
    errno.EACCES: "permission denied: export to a directory this user may write",
    errno.EPERM: "permission denied: export to a directory this user may write",
}


def _storage_error(exc: OSError, directory: object) -> StorageError:
    """A failed write of the dataset (disk full, read-only, permissions) as a one-line ``StorageError``.

    The dataset stays consistent: a unit is visible only once all its files are renamed into place.
    """
    code = exc.errno
    if code is None:  # pyarrow's OSError carries the errno in its text only: "[errno 28] No space left..."
        found = re.search(r"errno (\d+)", str(exc), re.IGNORECASE)
        code = int(found.group(1)) if found else None
    hint = _STORAGE_HINTS.get(code or -1, "check the directory and retry")
    detail = exc.strerror or one_line(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    return StorageError(f"writing the export to {str(directory)!r} failed: {detail}{where}; {hint}")


def _split(table: pa.Table) -> list[tuple[str, pa.Table]]:
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


def _first_key(table: pa.Table) -> Key:
    return table["commit_position"][0].as_py(), table["ordinal"][0].as_py()


def _last_key(table: pa.Table) -> Key:
    return table["commit_position"][-1].as_py(), table["ordinal"][-1].as_py()


def _write_unit(
    filesystem: pafs.FileSystem, root: str, table: pa.Table, skip: set[str] | None = None
) -> tuple[int, int]:
    """Write the files of one unit (all rows in ``table``); returns (files, bytes) written."""
    first, last = _first_key(table), _last_key(table)
    groups = _split(table)
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


def _export_schemas(
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


def _claim(
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


def _check_prefix(conn: psycopg.Connection, name: sql.Composable, state: DatasetState) -> None:
    """Fail if ``changes`` has more rows at or below the watermark than the dataset: they would be lost."""
    if state.watermark is None:
        return
    from capture.prune import read_horizon

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


def _validate(progress: object, batch_rows: object, wait: object, names: dict[str, object]) -> None:
    if progress is not None and not isinstance(progress, bool):
        raise ConfigurationError(f"progress must be True, False or None (auto), got {progress!r}")
    if not isinstance(batch_rows, int) or isinstance(batch_rows, bool) or batch_rows < 1:
        raise ConfigurationError(f"batch_rows must be a positive integer, got {batch_rows!r}")
    if not isinstance(wait, (int, float)) or isinstance(wait, bool) or wait < 0:
        raise ConfigurationError(f"wait must be a number of seconds >= 0, got {wait!r}")
    for label, value in names.items():
        if not isinstance(value, str) or not value:
            raise ConfigurationError(f"{label} must be a non-empty identifier, got {value!r}")


def export_parquet(
    source_dsn: str,
    directory: str,
    *,
    compact: bool = False,
    progress: bool | None = None,
    table: str = CHANGES_TABLE,
    schema: str = "public",
    schemas_table: str = SCHEMAS_TABLE,
    batch_rows: int = 200_000,
    lock: bool = True,
    wait: float = 0.0,
    lease_seconds: float = 60.0,
    format: str = "parquet",
) -> ExportStats:
    """Append the changes committed since the last run to the Parquet dataset at ``directory``.

    ``format="delta"`` writes an append-only Delta Lake table instead (``capture.export_delta``, needs
    ``deltalake``), with the same exactly-once guarantee, lock and identity check.

    ``directory`` is a local path or a pyarrow filesystem URI (``s3://bucket/prefix``). ``progress``:
    None shows a bar on a terminal (stderr) for exports over a few seconds, False is quiet. ``wait``:
    seconds to wait for another export on the same directory before failing with ``SourceError``;
    ``lease_seconds``: how long an S3 lock outlives a killed export (``capture.export_lock``).
    ``compact=True`` then merges the small files of each partition (``capture.compact``).
    """
    _validate(progress, batch_rows, wait, {"table": table, "schema": schema, "schemas_table": schemas_table})
    if not isinstance(compact, bool):
        raise ConfigurationError(f"compact must be True or False, got {compact!r}")
    if not isinstance(lease_seconds, (int, float)) or isinstance(lease_seconds, bool) or lease_seconds <= 0:
        raise ConfigurationError(f"lease_seconds must be a positive number, got {lease_seconds!r}")
    if format not in ("parquet", "delta"):
        raise ConfigurationError(f"format must be 'parquet' or 'delta', got {format!r}")
    libpq = _libpq_dsn(source_dsn)
    filesystem, root = resolve_directory(directory)
    enabled = sys.stderr.isatty() if progress is None else progress
    bar = _Progress(enabled, sys.stderr, PROGRESS_DELAY if progress is None else 0.0)
    try:
        locked = open_lock(os.fspath(directory), filesystem, root, enabled=lock, lease_seconds=lease_seconds)
        with locked as held:
            held.acquire(wait)
            try:
                conn = psycopg.connect(libpq, autocommit=True)
            except psycopg.Error as exc:
                raise connect_error(exc, source_dsn, what="the source database") from None
            with conn:
                try:
                    names = (schema, table, schemas_table)
                    if format == "delta":
                        from capture.export_delta import export_delta_locked

                        stats = export_delta_locked(
                            conn, os.fspath(directory), filesystem, root, names, batch_rows, held, bar
                        )
                    else:
                        stats = _export(conn, filesystem, root, names, batch_rows, held, bar)
                except psycopg.Error as exc:
                    doing = f"reading {schema}.{table} from the source database"
                    raise database_error(exc, doing, source_dsn) from None
            if compact and format == "delta":
                from capture.export_delta import compact_delta

                stats = replace(stats, compacted_files=compact_delta(os.fspath(directory)))
            elif compact:
                from capture.compact import compact_locked

                stats = replace(stats, compacted_files=compact_locked(filesystem, root).merged)
    except BemiError:
        raise
    except OSError as exc:  # pyarrow's and the OS's write errors alike (ENOSPC, EROFS, EACCES, ...)
        raise _storage_error(exc, directory) from exc
    bar.finish(stats)
    return stats


def _export(
    conn: psycopg.Connection,
    filesystem: pafs.FileSystem,
    root: str,
    names: tuple[str, str, str],
    batch_rows: int,
    held: DatasetLock,
    bar: _Progress,
) -> ExportStats:
    """One export run, under the lock: clean up, finish a half-written unit, stream the rest, schemas."""
    schema, table, schemas_table = names
    name = sql.Identifier(schema, table)
    conn.execute("SET client_encoding TO 'UTF8'")
    found = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name.as_string(conn),)).fetchone()
    if not (found and found[0]):
        raise ConfigurationError(
            f"table {schema}.{table} does not exist in the source database; run the capture worker first "
            "or pass the right table= and schema="
        )
    if is_delta_table(filesystem, root):
        raise ConfigurationError(
            f"export directory {root!r} holds a Delta table: export with format='delta' there, "
            "or export Parquet into an empty directory"
        )
    state = read_dataset_state(filesystem, root)
    _claim(conn, name, state, schema, table)
    delete_files(filesystem, [f.path for f in state.superseded] + state.temporary)
    _check_prefix(conn, name, state)
    files = written = exported = 0
    watermark = state.watermark
    if state.incomplete is not None:  # finish the unit a killed export left half written
        first, last = state.incomplete
        rows = fetch_range(conn, name, first, last)
        if rows.num_rows == 0 or _first_key(rows) != first:
            raise SourceError(
                f"cannot finish export unit {state.incomplete!r}: its first change is gone from "
                f"{schema}.{table}; re-export into an empty directory"
            )
        files, written = _write_unit(filesystem, root, rows, skip=state.incomplete_parts)
        exported, watermark = rows.num_rows, last
    if bar.enabled:
        query = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(name, key_condition(watermark, None))
        count = conn.execute(query).fetchone()
        bar.total = exported + (int(count[0]) if count else 0)

    def write(rows: pa.Table) -> None:
        nonlocal files, written, exported, watermark
        held.renew()
        f, b = _write_unit(filesystem, root, rows)
        files, written, exported = files + f, written + b, exported + rows.num_rows
        watermark = _last_key(rows)
        bar.update(exported)

    stream_units(conn, name, watermark, batch_rows, write)
    _export_schemas(conn, filesystem, root, schema, schemas_table)
    # erasures recorded in PostgreSQL since the last run reach the files written before (capture/erase.py)
    from capture.erase import sync_export_erasures

    sync_export_erasures(conn, filesystem, root, schema, table, held.renew)
    from capture.prune import sync_export_horizon

    sync_export_horizon(conn, filesystem, root, schema)  # an export that starts at a pruned baseline
    return ExportStats(exported, files, written, watermark)
