"""Compaction: merge the small files of each partition of an export into one, without a visible gap.

The merged file is named after the key range it covers (``capture.export.layout``) and is made visible
before the files it replaces are deleted. In between, ``list_dataset_files`` drops the contained files, so
readers going through it never see a duplicate or a gap; plain readers that glob the directory can see
both for that instant (milliseconds locally, one DELETE per replaced object on S3). A crash in between
leaves both; the next export or compaction deletes the replaced files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from capture.errors import ConfigurationError
from capture.export.dataset import delete_files, read_dataset_state, resolve_directory, write_atomic
from capture.export.layout import DataFile, compacted_name
from capture.export.lock import open_lock

__all__ = ["CompactStats", "compact", "compact_locked"]

#: Files at least this big are left alone; merged files grow up to about this size.
TARGET_BYTES = 128 * 1024 * 1024


@dataclass(frozen=True)
class CompactStats:
    """What a compaction did; ``str()`` is the line the CLI prints."""

    merged: int
    written: int
    bytes: int

    def __str__(self) -> str:
        return f"compacted {self.merged} files into {self.written} files ({self.bytes} bytes)"


def _runs(files: list[DataFile], target_bytes: int) -> list[list[DataFile]]:
    """Consecutive small files of one partition, grouped up to ``target_bytes``; only groups of 2+."""
    runs: list[list[DataFile]] = []
    current: list[DataFile] = []
    size = 0
    for data_file in files:
        if data_file.size >= target_bytes or (current and size + data_file.size > target_bytes):
            if len(current) > 1:
                runs.append(current)
            current, size = ([], 0) if data_file.size >= target_bytes else ([data_file], data_file.size)
            continue
        current.append(data_file)
        size += data_file.size
    if len(current) > 1:
        runs.append(current)
    return runs


def compact_locked(filesystem: pafs.FileSystem, root: str, target_bytes: int = TARGET_BYTES) -> CompactStats:
    """Compact a dataset whose lock the caller holds."""
    from capture.export.write import parquet_bytes

    state = read_dataset_state(filesystem, root)
    delete_files(filesystem, [f.path for f in state.superseded] + state.temporary)
    by_partition: dict[str, list[DataFile]] = {}
    for data_file in state.files:  # complete files only: an unfinished unit is never merged
        by_partition.setdefault(data_file.partition, []).append(data_file)
    merged = written = size = 0
    for partition, files in sorted(by_partition.items()):
        for run in _runs(files, target_bytes):
            table = pa.concat_tables(pq.read_table(f.path, filesystem=filesystem) for f in run)
            data = parquet_bytes(table)
            name = compacted_name(run[0].first, run[-1].last, table.num_rows)
            write_atomic(filesystem, f"{root}/{partition}/{name}", data)
            delete_files(filesystem, [f.path for f in run])
            merged, written, size = merged + len(run), written + 1, size + data.size
    return CompactStats(merged, written, size)


def compact(
    directory: str,
    *,
    target_bytes: int = TARGET_BYTES,
    lock: bool = True,
    wait: float = 0.0,
    lease_seconds: float = 60.0,
) -> CompactStats:
    """Merge the small files of each partition of the export at ``directory`` (takes the export lock)."""
    if not isinstance(target_bytes, int) or isinstance(target_bytes, bool) or target_bytes < 1:
        raise ConfigurationError(f"target_bytes must be a positive integer, got {target_bytes!r}")
    if not isinstance(wait, (int, float)) or isinstance(wait, bool) or wait < 0:
        raise ConfigurationError(f"wait must be a number of seconds >= 0, got {wait!r}")
    filesystem, root = resolve_directory(directory)
    with open_lock(os.fspath(directory), filesystem, root, enabled=lock, lease_seconds=lease_seconds) as held:
        held.acquire(wait)
        return compact_locked(filesystem, root, target_bytes)
