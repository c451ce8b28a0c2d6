"""Incremental, exactly-once export of ``changes`` to a Hive-partitioned Parquet dataset.

Each run reads the rows after the dataset's watermark in key order (``COPY ... (FORMAT csv)`` parsed by
pyarrow), in units of ``batch_rows`` changes, and writes one zstd Parquet file per partition touched by
a unit (naming rules: ``capture.export.layout``; listing: ``capture.export.dataset``). A unit half
written by a killed export is finished first, from the key range its surviving file names record, so a
rerun neither skips nor duplicates a change. ``DIR/_bemi_tt/schemas.pq`` is rewritten (atomically) with
``changes_schemas``.
The first export into a directory records which ``changes`` table it exports (``_bemi_tt/dataset.json``);
every later one refuses a directory recorded for another, or holding files that are not an export's.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from dataclasses import replace

import psycopg
import pyarrow as pa
import pyarrow.fs as pafs
from psycopg import sql

from capture.dsn import check_dsn, connect_error, database_error, one_line
from capture.errors import BemiError, ConfigurationError, SourceError, StorageError
from capture.export.dataset import delete_files, is_delta_table, read_dataset_state, resolve_directory
from capture.export.lock import DatasetLock, open_lock
from capture.export.read import fetch_range, key_condition, stream_units
from capture.export.write import (
    PROGRESS_DELAY,
    ExportStats,
    Progress,
    check_prefix,
    claim_directory,
    export_schemas,
    first_key,
    last_key,
    write_unit,
)
from capture.schema import CHANGES_TABLE, SCHEMAS_TABLE

__all__ = ["export_parquet"]


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

    ``format="delta"`` writes an append-only Delta Lake table instead (``capture.export.delta``, needs
    ``deltalake``), with the same exactly-once guarantee, lock and identity check.

    ``directory`` is a local path or a pyarrow filesystem URI (``s3://bucket/prefix``). ``progress``:
    None shows a bar on a terminal (stderr) for exports over a few seconds, False is quiet. ``wait``:
    seconds to wait for another export on the same directory before failing with ``SourceError``;
    ``lease_seconds``: how long an S3 lock outlives a killed export (``capture.export.lock``).
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
    bar = Progress(enabled, sys.stderr, PROGRESS_DELAY if progress is None else 0.0)
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
                        from capture.export.delta import export_delta_locked

                        stats = export_delta_locked(
                            conn, os.fspath(directory), filesystem, root, names, batch_rows, held, bar
                        )
                        # erasures recorded in PostgreSQL and its horizon reach the Delta files written
                        # before (here, above capture/export/delta.py: the rewrite reuses the prune's swap)
                        from capture.prune_export import sync_delta_export

                        sync_delta_export(conn, os.fspath(directory), filesystem, root, schema, table,
                                          held.renew)
                    else:
                        stats = _export(conn, filesystem, root, names, batch_rows, held, bar)
                except psycopg.Error as exc:
                    doing = f"reading {schema}.{table} from the source database"
                    raise database_error(exc, doing, source_dsn) from None
            if compact and format == "delta":
                from capture.export.delta import compact_delta

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
    bar: Progress,
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
    claim_directory(conn, name, state, schema, table)
    delete_files(filesystem, [f.path for f in state.superseded] + state.temporary)
    check_prefix(conn, name, state)
    files = written = exported = 0
    watermark = state.watermark
    if state.incomplete is not None:  # finish the unit a killed export left half written
        first, last = state.incomplete
        rows = fetch_range(conn, name, first, last)
        if rows.num_rows == 0 or first_key(rows) != first:
            raise SourceError(
                f"cannot finish export unit {state.incomplete!r}: its first change is gone from "
                f"{schema}.{table}; re-export into an empty directory"
            )
        files, written = write_unit(filesystem, root, rows, skip=state.incomplete_parts)
        exported, watermark = rows.num_rows, last
    if bar.enabled:
        query = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(name, key_condition(watermark, None))
        count = conn.execute(query).fetchone()
        bar.total = exported + (int(count[0]) if count else 0)

    def write(rows: pa.Table) -> None:
        nonlocal files, written, exported, watermark
        held.renew()
        f, b = write_unit(filesystem, root, rows)
        files, written, exported = files + f, written + b, exported + rows.num_rows
        watermark = last_key(rows)
        bar.update(exported)

    stream_units(conn, name, watermark, batch_rows, write)
    export_schemas(conn, filesystem, root, schema, schemas_table)
    # erasures recorded in PostgreSQL since the last run reach the files written before (capture/erase.py)
    from capture.erase import sync_export_erasures

    sync_export_erasures(conn, filesystem, root, schema, table, held.renew)
    from capture.prune import sync_export_horizon

    sync_export_horizon(conn, filesystem, root, schema)  # an export that starts at a pruned baseline
    return ExportStats(exported, files, written, watermark)
