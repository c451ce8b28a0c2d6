"""Replacing files of a local export directory at once: the new tree is built beside it and swapped in.

Shared by the prune of an export (capture/prune_export.py) and the erasure of a Delta export
(capture/erase.py). The new state is built in a sibling directory ``.<name>.prune-<uuid>.tmp``: new files
written and fsynced, every other file hard-linked (the lock file too, so the lock stays one inode), for a
Delta export ONE commit on the staging table's log removing the replaced files and adding the new ones;
then the two directories are exchanged in one ``renameat2(RENAME_EXCHANGE)`` and the old tree is deleted.
A kill before the swap leaves the old directory untouched; after it, the new one; the leftover sibling is
removed by the next prune or erase (``_remove_leftovers``). Delta writes every log entry and checkpoint as
a new file and replaces ``_last_checkpoint`` (the one file it rewrites) by a rename, so the old tree's
linked log is never written through; that one file is copied anyway. The staging table holds only the
files of the current version: data files of older versions (replaced by an optimize, or written by a
killed export and never committed) stay behind with the old tree, so time travel to a version before the
swap fails on their missing files instead of showing pruned or erased values.

Only local directories: an object store has no atomic swap of many objects.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from capture.errors import SourceError, StorageError
from capture.export.dataset import write_atomic
from capture.export.layout import DELTA_LOG_DIR, META_DIR, DataFile, Key, format_key, parse_key

__all__ = ["NewFile", "delta_file", "delta_listing", "remove_leftovers", "replace_tree"]

#: The sibling trees' infix (the prune's name, kept: a leftover of either is removed by both).
_STAGING = ".prune-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
#: The Delta log's pointer to its newest checkpoint, the one file a Delta writer rewrites: copied, not linked.
_LAST_CHECKPOINT = "_last_checkpoint"


@dataclass
class _Listing:
    """What a prune or erase reads of an export: its data files (keys and partitions), the files on disk
    the new tree leaves out, and for a Delta export each data file's partition values (None: Parquet)."""

    files: list[DataFile]
    dropped: set[str] = dataclasses.field(default_factory=set)
    delta: dict[str, dict[str, str | None]] | None = None


#: The Delta export's file names: its unit parts (``<k>of<n>``), a prune's compacted files (``c-``) and an
#: erasure's rewritten ones (``e-``).
_DELTA_NAME = re.compile(r"^part-(?P<first>[0-9a-f]{24})-(?P<last>[0-9a-f]{24})-"
                         r"(?:[0-9]+of[0-9]+|[ce]-[0-9a-f]+)\.zstd\.parquet$")


def delta_listing(root: str) -> _Listing:
    """The current version's data files of the Delta table at ``root``; every other data file on disk (of
    older versions, or never committed) is dropped."""
    from capture.export.delta import open_delta_table

    table = open_delta_table(root)
    actions = pa.table(table.get_add_actions(flatten=True))
    files: list[DataFile] = []
    values: dict[str, dict[str, str | None]] = {}
    for logged, size, rows, relation, day in zip(
            *(actions[c].to_pylist() for c in ("path", "size_bytes", "num_records", "partition.relation",
                                               "partition.date")), strict=True):
        relative = unquote(logged)  # the log holds the URI-encoded path
        path = os.path.join(root, relative)
        match = _DELTA_NAME.match(os.path.basename(relative))
        first, last = ((parse_key(match["first"]), parse_key(match["last"])) if match
                       else _file_keys(path))  # written by Delta's optimize: its rows say
        files.append(DataFile(path, os.path.dirname(relative), first, last, int(rows or 0), int(size or 0)))
        values[path] = {"relation": relation, "date": day.isoformat() if day is not None else None}
    listed = set(values)
    on_disk = set()
    for directory, subdirectories, names in os.walk(root):
        if directory == root:
            subdirectories[:] = [d for d in subdirectories if d not in (META_DIR, DELTA_LOG_DIR)]
        on_disk |= {os.path.join(directory, n) for n in names if n.endswith(".parquet")}
    files.sort(key=lambda f: (f.partition, f.first))
    return _Listing(files, on_disk - listed, values)


def _file_keys(path: str) -> tuple[Key, Key]:
    """The smallest and largest key of a data file's rows."""
    keys = pq.read_table(path, columns=["commit_position", "ordinal"]).sort_by(
        [("commit_position", "ascending"), ("ordinal", "ascending")])
    if keys.num_rows == 0:
        raise SourceError(f"the Delta export's data file {path!r} holds no rows; re-export into an empty "
                          "directory")
    return ((keys["commit_position"][0].as_py(), keys["ordinal"][0].as_py()),
            (keys["commit_position"][-1].as_py(), keys["ordinal"][-1].as_py()))



def _plain(data: pa.Table) -> pa.Table:
    """A data file's rows with every column of the export (files of the first release lack some), JSON as
    text."""
    from capture.export.layout import export_arrow_schema

    columns = {}
    for field in export_arrow_schema():
        if field.name in data.column_names:
            column = data[field.name]
            if isinstance(column.type, pa.BaseExtensionType):
                column = column.cast(column.type.storage_type)
            columns[field.name] = column.cast(
                field.type.storage_type if isinstance(field.type, pa.BaseExtensionType) else field.type)
        else:
            kind = field.type.storage_type if isinstance(field.type, pa.BaseExtensionType) else field.type
            columns[field.name] = pa.nulls(data.num_rows, kind)
    return pa.table(columns)



@dataclass
class NewFile:
    """A data file the new tree gets: its path in the tree, its rows (for Delta statistics), its bytes."""

    relative: str
    rows: pa.Table
    data: Any


def delta_file(partition: str, first: Key, last: Key, kind: str, rows: pa.Table) -> NewFile:
    """A new data file of a Delta export named by its key range and ``kind`` (``c``: a prune's compacted
    file, ``e``: an erasure's rewrite), with a unique suffix: a path cannot be both removed and added in
    one Delta commit."""
    from capture.export.write import parquet_bytes
    from capture.schema import changes_arrow_schema

    data = parquet_bytes(_plain(rows).select(changes_arrow_schema().names).cast(changes_arrow_schema()))
    name = f"part-{format_key(first)}-{format_key(last)}-{kind}-{uuid.uuid4().hex}.zstd.parquet"
    relative = f"{partition}/{name}"
    return NewFile(relative, rows, data)


def replace_tree(root: str, listing: _Listing, replaced: list[DataFile], added: list[NewFile],
                 partition_values: dict[str, dict[str, str | None]], sidecars: dict[str, bytes | None],
                 metadata: dict[str, str], *, doing: str) -> None:
    """The new state of the export at ``root`` built beside it and swapped in whole: every file but
    ``replaced``, ``listing.dropped`` and the ``sidecars`` hard-linked, ``added`` written, for a Delta
    export ONE commit on the staging table (remove ``replaced``, add ``added``, ``metadata``), each sidecar
    of ``_bemi_tt`` written (None: left out), then one ``renameat2(RENAME_EXCHANGE)``; the old tree, with
    every file it no longer shares, is deleted. Called under the export lock, ``root`` a real path."""
    local = pafs.LocalFileSystem()
    parent, name = os.path.split(root)
    staging = os.path.join(parent, f".{name}{_STAGING}{uuid.uuid4().hex}.tmp")
    try:
        _link_tree(root, staging, skip={f.path for f in replaced} | listing.dropped | {
            os.path.join(root, META_DIR, n) for n in sidecars},
                   copy={os.path.join(root, DELTA_LOG_DIR, _LAST_CHECKPOINT)})
        for new in added:
            write_atomic(local, f"{staging}/{new.relative}", new.data)
        if listing.delta is not None:
            _commit_delta(root, staging, listing, replaced, added, partition_values, metadata)
        for sidecar, content in sidecars.items():
            if content is not None:
                write_atomic(local, f"{staging}/{META_DIR}/{sidecar}", content)
        _exchange(staging, root)
    except BaseException as exc:
        # before the swap: a half-built copy; right after it (an interrupt): the old tree. Either is garbage.
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise StorageError(
                f"{doing} {root!r} failed: {exc.strerror or exc}"
                f"{f' ({exc.filename})' if exc.filename else ''}; the directory is unchanged: free space or "
                "make its parent directory writable (the new copy is built next to it) and retry"
            ) from exc
        raise
    _fsync_directory(parent)
    shutil.rmtree(staging, ignore_errors=True)  # the old tree, now at the staging path



def _commit_delta(root: str, staging: str, listing: _Listing, replaced: list[DataFile],
                  added: list[NewFile], values: dict[str, dict[str, str | None]],
                  metadata: dict[str, str]) -> None:
    """ONE commit on the staging table: remove the replaced files, add the new ones. No application
    transaction: the export's watermark (its last one) stays what it was."""
    from capture.export.delta import _commit_properties, _deltalake, _file_stats

    assert listing.delta is not None
    deltalake = _deltalake()
    try:
        table = deltalake.DeltaTable(staging)
    except (deltalake.exceptions.DeltaError, OSError) as exc:
        raise SourceError(f"cannot open the Delta table copied from {root!r}: {exc}") from exc
    now = int(time.time() * 1000)
    actions: list[Any] = [
        deltalake.transaction.RemoveAction(os.path.relpath(f.path, root), True, now, f.size,
                                           listing.delta[f.path])
        for f in replaced
    ]
    for new in added:
        partition = new.relative.rsplit("/", 1)[0]
        actions.append(deltalake.transaction.AddAction(new.relative, new.data.size, values[partition], now,
                                                       True, _file_stats(new.rows)))
    table.create_write_transaction(actions, "append", table.schema(),
                                   partition_by=table.metadata().partition_columns,
                                   commit_properties=_commit_properties(deltalake, metadata))


def _link_tree(root: str, staging: str, skip: set[str], copy: set[str]) -> None:
    """Recreate ``root``'s directories under ``staging`` and hard-link every file but ``skip`` and the
    temporary files a killed writer left; the files in ``copy`` (rewritten in place by their writer) are
    copied instead."""
    local = pafs.LocalFileSystem()
    for directory, subdirectories, names in os.walk(root):
        target = os.path.join(staging, os.path.relpath(directory, root))
        os.makedirs(target, exist_ok=True)
        for name in names:
            path = os.path.join(directory, name)
            if path in skip or (name.startswith(".") and name.endswith(".tmp")):
                continue
            if path in copy:
                with open(path, "rb") as stream:
                    write_atomic(local, os.path.join(target, name), stream.read())
            else:
                os.link(path, os.path.join(target, name))
        subdirectories[:] = [d for d in subdirectories if not (d.startswith(".") and d.endswith(".tmp"))]


def _exchange(staging: str, root: str) -> None:
    """Swap the two directories atomically (Linux ``renameat2(RENAME_EXCHANGE)``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise StorageError(
            f"cannot prune {root!r}: this system has no atomic directory exchange (renameat2); prune the "
            "database (bemi-tt prune --dsn URL) and export into a new directory"
        )
    if renameat2(_AT_FDCWD, os.fsencode(staging), _AT_FDCWD, os.fsencode(root), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise StorageError(
            f"cannot swap the pruned copy into {root!r}: {os.strerror(code)} "
            f"({errno.errorcode.get(code, code)}); the directory is unchanged; its file system must support"
            " renameat2(RENAME_EXCHANGE) (ext4, xfs,"
            " btrfs, tmpfs do)"
        )


def _fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)



def remove_leftovers(root: str) -> None:
    """Delete the sibling trees a killed prune left (a half-built copy, or the old tree after the swap)."""
    parent, name = os.path.split(root)
    prefix = f".{name}{_STAGING}"
    for entry in os.listdir(parent):
        if entry.startswith(prefix) and entry.endswith(".tmp") and os.path.isdir(os.path.join(parent, entry)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
