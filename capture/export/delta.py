"""Exactly-once export of ``changes`` to an append-only Delta Lake table (``format="delta"``).

The table at ``DIR`` has the columns and types of the Parquet export (JSON columns as Delta ``string``) plus
the partition columns ``relation`` (``"<schema>.<table>"``) and ``date`` (UTC date of ``committed_at``):
what a Hive-aware reader of the Parquet export sees. It reuses the Parquet export's reading (one COPY cut
into units, ``capture.export.read``), its partition split and Parquet writer (``capture.export.write``),
atomic writes (``capture.export.dataset``), its lock (``capture.export.lock``), its identity record
(``_bemi_tt/dataset.json``) and its schema sidecar (``_bemi_tt/schemas.pq``); Delta ignores ``_``
folders. ``deltalake`` (delta-rs) only commits the files to the transaction log.

Exactly once: each unit is one Delta commit that carries two application transactions, the key
``(commit_position, ordinal)`` of its last change (``commit_position`` is a PostgreSQL ``bigint`` and the
ordinal an ``integer``, so each fits a transaction version). They are part of the table's snapshot state
(kept through checkpoints and log cleanup), so the watermark is read back from the table itself: a killed
export leaves at most files no commit references, and the rerun continues after the last commit (writing
the unfinished unit's files again under the same names). The commit metadata names the keys and row count
of the unit (``bemi_tt.first_key``, ``bemi_tt.last_key``, ...). ``compact=True`` runs Delta's optimize.
Needs the ``deltalake`` package (``pip install 'bemi-tt[delta]'``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from psycopg import sql

from capture.errors import ConfigurationError, SourceError
from capture.export.dataset import (
    DatasetState,
    delete_files,
    is_delta_table,
    read_dataset_state,
    read_identity,
    resolve_directory,
    write_atomic,
)
from capture.export.layout import IDENTIFYING_COLUMNS, ROW_GROUP_ROWS, Key, export_arrow_schema, format_key
from capture.export.lock import DatasetLock, _s3_client_options
from capture.export.read import fetch_range, key_condition, stream_units
from capture.export.write import (
    ExportStats,
    Progress,
    check_prefix,
    claim_directory,
    export_schemas,
    first_key,
    last_key,
    parquet_bytes,
    split_partitions,
)
from capture.schema import changes_arrow_schema

if TYPE_CHECKING:
    from deltalake import DeltaTable

__all__ = [
    "APP_ID_ORDINAL",
    "APP_ID_POSITION",
    "PARTITION_COLUMNS",
    "compact_delta",
    "delta_arrow_schema",
    "delta_watermark",
    "export_delta_locked",
    "open_delta_table",
    "read_delta",
    "table_uri",
]

#: Application transaction ids whose versions are the last exported key's two halves.
APP_ID_POSITION = "bemi_tt.export.commit_position"
APP_ID_ORDINAL = "bemi_tt.export.ordinal"
PARTITION_COLUMNS = ["relation", "date"]
#: Columns whose min/max go into each file's Delta statistics.
STATS_COLUMNS = ("commit_position", "ordinal", "position")
#: Compaction (Delta optimize) merges a partition's files up to about this size.
TARGET_BYTES = 128 * 1024 * 1024


def _deltalake() -> Any:
    try:
        import deltalake
    except ImportError as exc:
        raise ConfigurationError(
            "a Delta export needs the deltalake package: pip install 'bemi-tt[delta]' (or format='parquet')"
        ) from exc
    return deltalake


def delta_arrow_schema() -> pa.Schema:
    """Arrow schema of the Delta table: the ``changes`` columns (JSON as text), then the partition columns."""
    partitions = [pa.field("relation", pa.string()), pa.field("date", pa.date32())]
    return pa.schema([*changes_arrow_schema(), *partitions])


def table_uri(directory: str) -> tuple[str, dict[str, str]]:
    """The deltalake table URI and storage options of an export directory (local path or ``s3://`` URI).

    pyarrow's URI options (``endpoint_override``, ``scheme``, ``region``) become deltalake's; credentials
    come from the environment, as for pyarrow.
    """
    filesystem, root = resolve_directory(directory)
    if isinstance(filesystem, pafs.LocalFileSystem):
        return root, {}
    parts = urlsplit(str(directory))
    if parts.scheme != "s3":
        raise ConfigurationError(
            f"a Delta export supports local directories and s3:// URIs, not {directory!r}"
        )
    client = _s3_client_options(str(directory))  # the same reading of the URI as the S3 lock's
    options: dict[str, str] = {}
    if "endpoint_url" in client:
        options["AWS_ENDPOINT_URL"] = client["endpoint_url"]
        if client["endpoint_url"].startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    if "region_name" in client:
        options["AWS_REGION"] = client["region_name"]
    # commits are created with a conditional PUT (If-None-Match), so two writers can never both win
    options["conditional_put"] = "etag"
    return f"s3://{root}", options


def open_delta_table(directory: str) -> DeltaTable:
    """The current snapshot of the Delta table at ``directory``."""
    deltalake = _deltalake()
    uri, options = table_uri(directory)
    try:
        table: DeltaTable = deltalake.DeltaTable(uri, storage_options=options or None)
    except deltalake.exceptions.TableNotFoundError:
        raise ConfigurationError(
            f"{directory!r} holds no Delta table: run `bemi-tt export --format delta` first"
        ) from None
    except (deltalake.exceptions.DeltaError, OSError) as exc:
        raise SourceError(f"cannot open the Delta table {directory!r}: {exc}") from exc
    protocol = table.protocol()
    if protocol.min_reader_version > 1 and (protocol.reader_features or []):
        raise SourceError(
            f"the Delta table {directory!r} needs reader features {protocol.reader_features!r} that bemi_tt "
            "does not read (it was changed by another tool): re-export into an empty directory"
        )
    return table


def delta_watermark(table: DeltaTable) -> Key | None:
    """The key of the last exported change, from the table's application transactions."""
    position = table.transaction_version(APP_ID_POSITION)
    ordinal = table.transaction_version(APP_ID_ORDINAL)
    if position is None and ordinal is None:
        return None
    if position is None or ordinal is None:
        raise SourceError(
            f"the Delta table {table.table_uri!r} records only half of its export watermark "
            f"({APP_ID_POSITION}={position!r}, {APP_ID_ORDINAL}={ordinal!r}): "
            "re-export into an empty directory"
        )
    return int(position), int(ordinal)


def _file_stats(rows: pa.Table) -> str:
    """Delta file statistics: row count, and min/max of the key columns (lets readers skip files by key)."""
    minimum: dict[str, int] = {}
    maximum: dict[str, int] = {}
    for column in STATS_COLUMNS:
        bounds = pc.min_max(rows[column])
        minimum[column], maximum[column] = bounds["min"].as_py(), bounds["max"].as_py()
    nulls = {column: rows[column].null_count for column in STATS_COLUMNS}
    return json.dumps(
        {"numRecords": rows.num_rows, "minValues": minimum, "maxValues": maximum, "nullCount": nulls}
    )


def _commit_unit(
    deltalake: Any, delta: DeltaTable, filesystem: pafs.FileSystem, root: str, rows: pa.Table
) -> None:
    """Write one unit's files (one per partition, as the Parquet export splits it), then commit them.

    The files are written with the Parquet export's writer and atomic writes; until the commit they are
    invisible to Delta readers. Their names are the unit's key range, so the rerun after a kill writes
    the same names again (the split is deterministic) instead of leaving more unreferenced files.
    """
    first, last = first_key(rows), last_key(rows)
    # JSON columns as plain text: Delta has no JSON type
    groups = split_partitions(rows.cast(changes_arrow_schema()))
    actions = []
    for number, (directory, part) in enumerate(groups, 1):
        name = f"part-{format_key(first)}-{format_key(last)}-{number}of{len(groups)}.zstd.parquet"
        data = parquet_bytes(part)
        write_atomic(filesystem, f"{root}/{directory}/{name}", data)
        schema, table = part["schema"][0].as_py(), part["table"][0].as_py()
        values = {"relation": f"{schema}.{table}", "date": directory.rsplit("date=", 1)[1]}
        modified = int(time.time() * 1000)
        actions.append(
            deltalake.transaction.AddAction(
                f"{directory}/{name}", data.size, values, modified, True, _file_stats(part)
            )
        )
    metadata = {
        "bemi_tt.first_key": format_key(first),
        "bemi_tt.last_key": format_key(last),
        "bemi_tt.first_commit_position": str(first[0]),
        "bemi_tt.last_commit_position": str(last[0]),
        "bemi_tt.rows": str(rows.num_rows),
    }
    delta.create_write_transaction(
        actions,
        "append",
        delta_arrow_schema(),
        partition_by=PARTITION_COLUMNS,
        commit_properties=_commit_properties(deltalake, metadata, last),
    )
    delta.update_incremental()  # the next unit's commit reads from this one (else: a conflict on our own txn)


def _writer_properties(deltalake: Any) -> Any:
    return deltalake.WriterProperties(compression="ZSTD", max_row_group_size=ROW_GROUP_ROWS)


def _commit_properties(deltalake: Any, metadata: Mapping[str, str], last: Key | None = None) -> Any:
    transactions = (
        [deltalake.Transaction(APP_ID_POSITION, last[0]), deltalake.Transaction(APP_ID_ORDINAL, last[1])]
        if last is not None
        else None
    )
    return deltalake.CommitProperties(custom_metadata=dict(metadata), app_transactions=transactions)


@dataclass
class _DeltaState(DatasetState):
    """What ``check_prefix`` needs of a Delta table: its watermark and row count."""

    row_count: int = 0

    @property
    def rows(self) -> int:
        return self.row_count


def _refuse_parquet_export(directory: str, state: DatasetState) -> None:
    if state.files or state.incomplete_files:
        raise ConfigurationError(
            f"export directory {directory!r} holds a Parquet export: export with format='parquet' "
            "(the default) there, or export the Delta table into an empty directory"
        )


def _check_adoptable(conn: psycopg.Connection, name: sql.Identifier, directory: str) -> None:
    """A Delta table without an identity record is adopted only if its newest change is this table's."""
    delta = open_delta_table(directory)
    last = delta_watermark(delta)
    if last is None:
        return
    columns = list(IDENTIFYING_COLUMNS)
    newest = (pc.field("commit_position") == last[0]) & (pc.field("ordinal") == last[1])
    exported = delta.to_pyarrow_dataset().to_table(columns=columns, filter=newest)
    source = fetch_range(conn, name, last, last).select(columns)
    if source.to_pylist() != exported.to_pylist():
        raise ConfigurationError(
            f"export directory {directory!r} holds a Delta export whose newest change {last!r} is not in "
            f"{name.as_string(conn)}: it is another database's export; export into an empty directory"
        )


def _file_sizes(table: DeltaTable) -> dict[str, int]:
    actions = pa.table(table.get_add_actions(flatten=True))
    return dict(zip(actions["path"].to_pylist(), actions["size_bytes"].to_pylist(), strict=True))


#: Delta's names of the Arrow types of the columns a later release added to ``changes``.
_DELTA_TYPES = {pa.string(): "string", pa.bool_(): "boolean", pa.int64(): "long", pa.int32(): "integer"}


def _add_missing_columns(deltalake: Any, delta: DeltaTable) -> None:
    """Add to a table an earlier release created the ``changes`` columns it lacks (nullable: its files
    read them as NULL), so its schema is the one every unit is committed with."""
    have = {field.name for field in delta.schema().fields}
    missing = [f for f in changes_arrow_schema() if f.name not in have]
    if missing:
        delta.alter.add_columns(
            [deltalake.Field(f.name, _DELTA_TYPES[f.type], nullable=True) for f in missing],
            commit_properties=_commit_properties(deltalake, {"bemi_tt.operation": "add columns"}),
        )
        delta.update_incremental()


def export_delta_locked(
    conn: psycopg.Connection,
    directory: str,
    filesystem: pafs.FileSystem,
    root: str,
    names: tuple[str, str, str],
    batch_rows: int,
    held: DatasetLock,
    bar: Progress,
) -> ExportStats:
    """One Delta export run, under the export lock: claim, create the table if needed, append the units."""
    deltalake = _deltalake()
    schema, table_name, schemas_table = names
    name = sql.Identifier(schema, table_name)
    uri, options = table_uri(directory)
    exists = is_delta_table(filesystem, root)
    listing = read_dataset_state(filesystem, root)
    _refuse_parquet_export(directory, listing)
    # a Delta table's data files are not named like a Parquet export's: only an empty directory is checked
    foreign = [] if exists else listing.foreign
    if exists and read_identity(filesystem, root) is None:
        _check_adoptable(conn, name, directory)
    claim_directory(conn, name, DatasetState(filesystem, root, foreign=foreign), schema, table_name)
    delete_files(filesystem, listing.temporary)  # left by a killed writer, never referenced
    if not exists:
        deltalake.DeltaTable.create(
            uri,
            delta_arrow_schema(),
            mode="ignore",
            partition_by=PARTITION_COLUMNS,
            name=table_name,
            description=f"bemi_tt change log of {schema}.{table_name}",
            storage_options=options or None,
            commit_properties=_commit_properties(deltalake, {"bemi_tt.source": f"{schema}.{table_name}"}),
        )
    delta = open_delta_table(directory)
    _add_missing_columns(deltalake, delta)
    watermark = delta_watermark(delta)
    before = _file_sizes(delta)
    check_prefix(conn, name, _DeltaState(filesystem, root, watermark=watermark, row_count=delta.count()))
    exported = 0
    if bar.enabled:
        query = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(name, key_condition(watermark, None))
        count = conn.execute(query).fetchone()
        bar.total = int(count[0]) if count else 0

    def write(rows: pa.Table) -> None:
        nonlocal exported, watermark
        held.renew()
        _commit_unit(deltalake, delta, filesystem, root, rows)
        exported += rows.num_rows
        watermark = last_key(rows)
        bar.update(exported)

    stream_units(conn, name, watermark, batch_rows, write)
    export_schemas(conn, filesystem, root, schema, schemas_table)
    added = {path: size for path, size in _file_sizes(delta).items() if path not in before}
    return ExportStats(exported, len(added), sum(added.values()), watermark)


def compact_delta(directory: str, target_bytes: int = TARGET_BYTES) -> int:
    """Delta optimize (bin-packing compaction) under the caller's lock; returns how many files it merged."""
    deltalake = _deltalake()
    delta = open_delta_table(directory)
    metrics = delta.optimize.compact(
        target_size=target_bytes,
        writer_properties=_writer_properties(deltalake),
        commit_properties=_commit_properties(deltalake, {"bemi_tt.operation": "compact"}),
    )
    return int(metrics.get("numFilesRemoved", 0))


def read_delta(directory: str, *, version: int | None = None) -> pa.Table:
    """Every change in the Delta table (at ``version``, default the latest) in key order, typed like
    ``capture.export.dataset.read_dataset`` (JSON columns as ``pa.json_()``)."""
    delta = open_delta_table(directory)
    if version is not None:
        delta.load_as_version(version)
    raw = delta.to_pyarrow_table(columns=changes_arrow_schema().names)
    raw = raw.sort_by([("commit_position", "ascending"), ("ordinal", "ascending")])
    return raw.cast(changes_arrow_schema()).cast(export_arrow_schema())

