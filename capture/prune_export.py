"""Retention for an export directory (Parquet or Delta): fold its history before a time into a baseline.

``prune_export(DIR, before=TS)`` applies the database prune's rule (``capture.prune.fold``, the same
``baseline_rows`` and schema folding) to the rows the directory holds, under the export lock:

- the cut ``C`` is the first commit position stamped after ``TS`` among the exported rows; when every row
  is at or before ``TS``, ``C`` is the newest commit's position (that commit stays: the export may hold
  only the first part of it, the next export brings the rest);
- the rows before ``C`` become ``SNAPSHOT`` rows at ``(C - 1, i)`` stamped ``TS``, exactly the rows the
  database prune would write; the schema versions before ``C`` in ``_bemi_tt/schemas.pq`` become one per
  live relation with the event ``pruned``; ``_bemi_tt/horizon.json`` records the horizon (so ``verify``
  checks the baseline and resumes the chain at ``C``); ``erasures.json`` forgets the rows that are gone.

Layout (capture/export/layout.py): in every partition that held a row before ``C`` or gets baseline rows,
the files inside the key range ``[F, L]`` are replaced by one *compacted* file ``<F>-<L>-c-<rows>`` holding
that partition's baseline rows and its rows at or after ``C`` from those files. ``F`` is the smallest key of
a replaced file; ``L`` the largest key of a replaced file, grown until no file of those partitions straddles
it, so the range never overlaps a kept file, and never past the watermark (the next export continues where
the last one stopped). A compacted file vouches for every unit ending at or before it, so the units whose
other parts stay elsewhere remain complete.

Atomic for readers: the new state is built in a sibling directory ``.<name>.prune-<uuid>.tmp`` (new files
written and fsynced, every other file hard-linked, the lock file too, so the lock stays one inode), then
swapped with the directory in one ``renameat2(RENAME_EXCHANGE)``, and the old tree is deleted. A kill
before the swap leaves the old directory untouched; after it, the new one. The leftover sibling is removed
by the next prune. Readers that listed the directory before the swap and open a replaced file after it
fail with a missing file (as after a compaction), and read the new state when they retry.

A Delta export (``format="delta"``) is pruned the same way: its data files are the table's current file
list (read from ``_delta_log``, keys from the names the Delta export gives its files, or from the rows of a
file Delta's optimize wrote), the staging copy links the log too, and the new state is ONE Delta commit made
on the staging table, removing the replaced files and adding the compacted ones (``part-<F>-<L>-c-...``),
before the swap. Delta writes every log entry and checkpoint as a new file, and replaces ``_last_checkpoint``
(the one file it rewrites) by a rename, so the old tree's linked log is never written through; that one file
is copied anyway, so that no writer updating it in place could reach the old tree. The
staging table holds only the files of the current version: data files of older versions (replaced by an
optimize, or written by a killed export and never committed) are left behind with the old tree, so time
travel to a version before the prune fails on their missing files instead of showing pruned history.

Only local directories: an object store has no atomic swap of many objects; it is refused with what to do
instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from capture.errors import ConfigurationError, SourceError
from capture.export.dataset import (
    is_delta_table,
    read_dataset_state,
    read_horizon,
    refuse_foreign_files,
    resolve_directory,
)
from capture.export.layout import (
    HORIZON_FILE,
    IDENTITY_FILE,
    LEGACY_SCHEMAS_FILE,
    META_DIR,
    SCHEMAS_FILE,
    DataFile,
    Key,
    compacted_name,
    partition_dir,
)
from capture.export.lock import open_lock
from capture.export.swap import (
    NewFile,
    _Listing,
    _plain,
    delta_file,
    delta_listing,
    remove_leftovers,
    replace_tree,
)
from capture.prune import (
    Fold,
    Pruned,
    _Change,
    check_before,
    fold,
    folded_versions,
    group_versions,
    sync_export_horizon,
)

__all__ = ["prune_export", "sync_delta_export"]

_FOLD_COLUMNS = ["schema", "table", "database", "operation", "primary_key", "before", "after",
                 "commit_position", "ordinal", "chain_hash"]


def prune_export(directory: str, *, before: datetime, wait: float = 0.0) -> Pruned:
    """Fold the history of the export at ``directory`` committed at or before ``before`` into a baseline
    (see the module docstring); ``wait``: seconds to wait for a running export or compaction."""
    check_before(before)
    if not isinstance(wait, (int, float)) or isinstance(wait, bool) or wait < 0:
        raise ConfigurationError(f"wait must be a number of seconds >= 0, got {wait!r}")
    before = before.astimezone(timezone.utc)
    filesystem, root = resolve_directory(directory)
    source = f"the export {os.fspath(directory)!r}"
    if not isinstance(filesystem, pafs.LocalFileSystem):
        raise ConfigurationError(
            f"prune of {os.fspath(directory)!r} works on local export directories only: an object store "
            "cannot swap the directory's files at once; prune the database (bemi-tt prune --dsn URL) and "
            "export into a new prefix, or prune a local copy and upload it to a new prefix"
        )
    if not os.path.isdir(root):
        what = "is a file" if os.path.exists(root) else "does not exist"
        raise ConfigurationError(
            f"export directory {os.fspath(directory)!r} {what}: pass the directory `bemi-tt export` wrote"
        )
    delta = is_delta_table(filesystem, root)
    real = os.path.realpath(root)  # the swap exchanges the directory itself, never a symlink to it
    with open_lock(os.fspath(directory), filesystem, real) as held:
        held.acquire(wait)
        remove_leftovers(real)
        listing = delta_listing(real) if delta else _parquet_listing(filesystem, real, os.fspath(directory))
        if not listing.files:
            return Pruned(None, 0, source)
        files = listing.files
        cut = _cut(filesystem, files, before)
        previous = read_horizon(filesystem, real)
        lowest = min(f.first for f in files)
        if cut is None or cut <= lowest[0] or (previous is not None and (
                cut <= previous.position or before <= previous.before)):
            return Pruned(None, 0, source)  # nothing before the cut, or already pruned at or after it
        schemas = _read_schemas(filesystem, real)
        versions = group_versions(_version_rows(schemas, cut))
        result = fold(_changes_before(filesystem, files, cut), versions, cut=cut, before=before,
                      previous=previous)
        _swap_in(real, listing, result, _schemas_after(schemas, versions, cut, before), before)
        return Pruned(result.horizon, result.folded, source)


def _parquet_listing(filesystem: pafs.FileSystem, root: str, directory: str) -> _Listing:
    """A Parquet export's readable files; superseded and temporary files are dropped, the parts of an
    unfinished unit kept (the next export finishes it)."""
    state = read_dataset_state(filesystem, root)
    refuse_foreign_files(state)
    identity = os.path.isfile(os.path.join(root, META_DIR, IDENTITY_FILE))
    if not identity and not state.files and not state.incomplete_files:
        raise ConfigurationError(
            f"{directory!r} is not a bemi_tt export (no {META_DIR}/{IDENTITY_FILE} and no change files): "
            "pass the directory `bemi-tt export` wrote"
        )
    return _Listing(state.files, {f.path for f in state.superseded} | set(state.temporary))


# -- reading --------------------------------------------------------------------------------------------


def _cut(filesystem: pafs.FileSystem, files: list[DataFile], before: datetime) -> int | None:
    """The first commit position stamped after ``before``; with none, the newest commit's position."""
    stamp = pa.scalar(before, pa.timestamp("us", tz="UTC"))
    cut: int | None = None
    newest = max(f.last for f in files)[0]
    for data_file in files:
        data = pq.read_table(data_file.path, filesystem=filesystem,
                             columns=["commit_position", "committed_at"])
        later = data.filter(pc.greater(data["committed_at"], stamp))["commit_position"]
        if len(later):
            first = pc.min(later).as_py()
            cut = first if cut is None else min(cut, first)
    return newest if cut is None else int(cut)


def _changes_before(filesystem: pafs.FileSystem, files: list[DataFile], cut: int) -> Iterator[
        tuple[_Change, str | None]]:
    """Every exported change before ``cut``, in commit order, with its ``chain_hash``."""
    pieces = []
    for data_file in files:
        if data_file.first[0] >= cut:
            continue
        data = _plain(pq.read_table(data_file.path, filesystem=filesystem))
        data = data.filter(pc.less(data["commit_position"], cut))
        pieces.append(data.select(_FOLD_COLUMNS))
    if not pieces:
        return
    rows = pa.concat_tables(pieces).sort_by([("commit_position", "ascending"), ("ordinal", "ascending")])
    for batch in rows.to_batches(max_chunksize=10_000):
        columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
        for record in zip(*columns, strict=True):
            yield _Change(*record[:9]), record[9]


def _exported(data: pa.Table) -> pa.Table:
    """Plain rows as the export writes them (JSON columns tagged as Parquet JSON)."""
    from capture.export.layout import export_arrow_schema

    schema = export_arrow_schema()
    arrays = []
    for field in schema:
        column = data[field.name].combine_chunks()
        if isinstance(field.type, pa.BaseExtensionType):
            column = pa.ExtensionArray.from_storage(field.type, column)
        arrays.append(column)
    return pa.Table.from_arrays(arrays, schema=schema)


def _read_schemas(filesystem: pafs.FileSystem, root: str) -> pa.Table | None:
    for name in (SCHEMAS_FILE, LEGACY_SCHEMAS_FILE):
        path = f"{root}/{META_DIR}/{name}"
        if os.path.isfile(path):
            try:
                return pq.read_table(path, filesystem=filesystem)
            except (OSError, pa.ArrowInvalid) as exc:
                raise SourceError(f"cannot read {path!r}: {exc}; re-run `bemi-tt export` first") from exc
    return None


def _texts(column: pa.ChunkedArray) -> list[Any]:
    if isinstance(column.type, pa.BaseExtensionType):
        column = column.cast(column.type.storage_type)
    values: list[Any] = column.to_pylist()
    return values


def _version_rows(schemas: pa.Table | None, cut: int) -> list[tuple[Any, ...]]:
    """The schema versions before ``cut`` as ``group_versions`` takes them, in stream order."""
    if schemas is None or schemas.num_rows == 0:
        return []
    schemas = schemas.filter(pc.less(schemas["commit_position"], cut))
    schemas = schemas.sort_by([(n, "ascending") for n in ("commit_position", "ordinal", "step")])
    names = ["schema", "table", "commit_position", "ordinal", "columns", "relation_oid", "event",
             "replica_identity"]
    values = {n: _texts(schemas[n]) if n in schemas.column_names else [None] * schemas.num_rows
              for n in names}
    for n in ("columns", "event"):
        values[n] = [json.loads(v) if v is not None else None for v in values[n]]
    return list(zip(*(values[n] for n in names), strict=True))


def _schemas_after(schemas: pa.Table | None, versions: dict[tuple[str, str], list[dict[str, Any]]],
                   cut: int, before: datetime) -> pa.Table:
    """``schemas.pq`` after the prune: the versions at or after ``cut`` plus the folded ones."""
    from capture.export.layout import schemas_arrow_schema

    schema = schemas_arrow_schema()
    records: list[dict[str, Any]] = []
    if schemas is not None and schemas.num_rows:
        kept = schemas.filter(pc.greater_equal(schemas["commit_position"], cut))
        columns = {f.name: (_texts(kept[f.name]) if f.name in kept.column_names else [None] * kept.num_rows)
                   for f in schema}
        records = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    for version in folded_versions(versions, cut, before):
        records.append({**version, "columns": json.dumps(version["columns"]),
                        "event": json.dumps(version["event"]), "context": json.dumps(version["context"])})
    records.sort(key=lambda r: (r["schema"], r["table"], r["commit_position"], r["ordinal"], r["step"]))
    arrays = []
    for field in schema:
        values = [r.get(field.name) for r in records]
        if isinstance(field.type, pa.BaseExtensionType):
            storage = pa.array(values, field.type.storage_type)
            arrays.append(pa.ExtensionArray.from_storage(field.type, storage))
        else:
            arrays.append(pa.array(values, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


# -- the new layout --------------------------------------------------------------------------------------


def _baseline_table(result: Fold, before: datetime) -> pa.Table:
    """The baseline rows as plain export rows (``id`` NULL: they never had one in this directory)."""
    from capture.export.layout import export_arrow_schema

    rows = result.rows
    cut = result.horizon.position
    count = len(rows)
    values: dict[str, list[Any]] = {
        "id": [None] * count, "primary_key": [r.primary_key for r in rows], "table": [r.table for r in rows],
        "operation": ["SNAPSHOT"] * count, "before": ["{}"] * count, "after": [r.after for r in rows],
        "context": [result.context] * count, "committed_at": [before] * count,
        "schema": [r.schema for r in rows], "database": [r.database for r in rows],
        "transaction_id": [None] * count, "position": [cut - 1] * count, "commit_position": [cut - 1] * count,
        "ordinal": [r.ordinal for r in rows], "context_verified": [None] * count,
        "row_digest": [r.row_digest for r in rows], "chain_hash": [r.chain_hash for r in rows],
        "before_primary_key": [None] * count,
    }
    fields = [pa.field(f.name, f.type.storage_type if isinstance(f.type, pa.BaseExtensionType) else f.type)
              for f in export_arrow_schema()]
    return pa.Table.from_arrays([pa.array(values[f.name], f.type) for f in fields], schema=pa.schema(fields))


def _key_range(files: list[DataFile], touched: set[str], base_last: Key | None, cut: int) -> tuple[Key, Key]:
    """``[F, L]``: every file of the touched partitions that starts before the cut lies inside it, and no
    file of those partitions straddles ``L``."""
    inside = [f for f in files if f.partition in touched and f.first[0] < cut]
    first = min([f.first for f in inside] + ([(cut - 1, 0)] if base_last is not None else []))
    last = max([f.last for f in inside] + ([base_last] if base_last is not None else []))
    grown = True
    while grown:
        grown = False
        for f in files:
            if f.partition in touched and f.first <= last < f.last:
                last, grown = f.last, True
    return first, last


def _swap_in(root: str, listing: _Listing, result: Fold, schemas: pa.Table, before: datetime) -> None:
    """Build the pruned directory next to ``root`` (for a Delta export: and commit it to the staging
    table's log) and exchange the two in one rename."""
    from capture.erase import ERASURES_FILE
    from capture.export.write import parquet_bytes

    files = listing.files
    cut = result.horizon.position
    baseline = _baseline_table(result, before)
    day = before.date().isoformat()
    base_parts: dict[str, list[int]] = {}
    partition_values: dict[str, dict[str, str | None]] = {}
    for f in files:
        if listing.delta is not None:
            partition_values.setdefault(f.partition, listing.delta[f.path])
    for i, row in enumerate(result.rows):
        partition = partition_dir(row.schema, row.table, day)
        base_parts.setdefault(partition, []).append(i)
        partition_values.setdefault(partition, {"relation": f"{row.schema}.{row.table}", "date": day})
    touched = {f.partition for f in files if f.first[0] < cut} | set(base_parts)
    base_last = (cut - 1, len(result.rows) - 1) if result.rows else None
    first, last = _key_range(files, touched, base_last, cut)
    replaced = [f for f in files if f.partition in touched and f.last <= last]

    local = pafs.LocalFileSystem()
    added: list[NewFile] = []
    for partition in sorted(touched):
        pieces = [baseline.take(base_parts[partition])] if partition in base_parts else []
        for f in sorted((f for f in replaced if f.partition == partition), key=lambda f: f.first):
            data = _plain(pq.read_table(f.path, filesystem=local))
            pieces.append(data.filter(pc.greater_equal(data["commit_position"], cut)))
        rows = pa.concat_tables(pieces) if pieces else baseline.slice(0, 0)
        rows = rows.sort_by([("commit_position", "ascending"), ("ordinal", "ascending")])
        if listing.delta is None:
            if rows.num_rows == 0 and (added or partition != max(touched)):
                continue  # nothing left here; one file always stays to vouch for the replaced units
            added.append(NewFile(f"{partition}/{compacted_name(first, last, rows.num_rows)}", rows,
                                 parquet_bytes(_exported(rows))))
        elif rows.num_rows:  # the log says which files hold the table: none has to vouch for the range
            added.append(delta_file(partition, first, last, "c", rows))
    sidecars: dict[str, bytes | None] = {SCHEMAS_FILE: parquet_bytes(schemas).to_pybytes(),
                                         LEGACY_SCHEMAS_FILE: None}
    erasures = os.path.join(root, META_DIR, ERASURES_FILE)
    if os.path.isfile(erasures):
        with open(erasures, encoding="utf-8") as stream:
            record = json.load(stream)
        record["rows"] = {k: v for k, v in record.get("rows", {}).items() if int(k.split("/")[0]) >= cut}
        sidecars[ERASURES_FILE] = json.dumps(record, sort_keys=True).encode("utf-8")
    sidecars[HORIZON_FILE] = json.dumps(result.horizon.to_json(), sort_keys=True).encode("utf-8")
    metadata = {"bemi_tt.operation": "prune", "bemi_tt.before": before.isoformat(),
                "bemi_tt.horizon_position": str(result.horizon.position),
                "bemi_tt.baseline_rows": str(result.horizon.rows)}
    replace_tree(root, listing, replaced, added, partition_values, sidecars, metadata, doing="pruning")


def sync_delta_export(conn: Any, directory: str, filesystem: Any, root: str, schema: str, changes_table: str,
                      renew: Callable[[], None] | None = None) -> int:
    """After a Delta export run, under its lock: the erasures recorded in PostgreSQL reach the files written
    before, and the horizon is recorded (``capture.prune.sync_export_horizon``), through
    :func:`capture.erase.apply_rewrites`; the number of files rewritten. A Delta export on an object store
    cannot be rewritten at once: pending erasures there are reported with a warning, never skipped
    silently."""
    import warnings

    from capture.erase import apply_rewrites, delta_files, pending_erasures, sync_export_erasures

    if not isinstance(filesystem, pafs.LocalFileSystem):
        if pending_erasures(conn, filesystem, root, schema, changes_table):
            warnings.warn(
                f"erasures recorded in PostgreSQL are not applied to the Delta export {directory!r}: an "
                "object store cannot swap the table's files at once; export into a new prefix (the new "
                "export holds the erased values only)", UserWarning, stacklevel=2)
        return 0
    real = os.path.realpath(root)
    remove_leftovers(real)  # what a killed erase or prune left beside the directory
    count = 0
    if pending_erasures(conn, filesystem, real, schema, changes_table):  # else no listing: a walk of the tree
        count = sync_export_erasures(conn, filesystem, real, schema, changes_table, renew,
                                     listing=delta_files(real))

    def files() -> list[DataFile]:
        return list(delta_files(real).files)

    def rewrite(record: Mapping[str, Any], rewrites: Iterable[tuple[DataFile, pa.Table]]) -> int:
        return apply_rewrites(filesystem, real, record, rewrites, listing=delta_files(real), renew=renew,
                              metadata={"bemi_tt.operation": "erase", "bemi_tt.erasures": "baseline"})

    sync_export_horizon(conn, filesystem, real, schema, files=files, rewrite=rewrite)
    return count
