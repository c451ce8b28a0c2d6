"""The export's leaf: names, keys, file schemas and partition paths, imported by every other export module.

Layout: ``DIR/relation=<schema.table>/date=<UTC date>/<name>.parquet``, plus ``DIR/_bemi_tt/``: ``schemas.pq``
(``changes_schemas`` as Parquet), ``dataset.json`` (which ``changes`` table the dataset exports) and ``lock``.
Only change files end in ``.parquet``, so ``read_parquet('DIR/**/*.parquet', hive_partitioning=true)`` reads
exactly them (the first release named the sidecar ``schemas.parquet``: read, removed by the next export).
Every data file's name records the range of ``(commit_position, ordinal)`` keys it stands for, so the
dataset describes itself: no manifest or watermark file exists that could disagree with the data.

* A *unit* file ``<first>-<last>-<k>of<n>-<rows>.parquet`` is part k of n of one export unit: all rows of
  ``changes`` with keys in ``[first, last]``, split by partition (n partitions). A unit is complete when
  its n parts are present (or a compacted file reaches past it, see ``capture.export.dataset``).
* A *compacted* file ``<first>-<last>-c-<rows>.parquet`` holds every row of its partition with a key in
  ``[first, last]``; it replaces the files of that partition whose ranges it contains.
* Keys are written as 24 hex digits (16 for ``commit_position``, 8 for ``ordinal``), so names sort by key.

This module imports nothing of the export's own, so no import cycle can run through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

import pyarrow as pa

from capture.errors import SourceError
from capture.schema import JSON_COLUMNS, changes_arrow_schema

__all__ = [
    "DELTA_LOG_DIR",
    "DICTIONARY_COLUMNS",
    "FILE_NAME_RE",
    "HORIZON_FILE",
    "IDENTIFYING_COLUMNS",
    "IDENTITY_FILE",
    "LEGACY_SCHEMAS_FILE",
    "META_DIR",
    "ROW_GROUP_ROWS",
    "SCHEMAS_FILE",
    "DataFile",
    "DatasetIdentity",
    "Key",
    "compacted_name",
    "export_arrow_schema",
    "format_key",
    "parse_key",
    "partition_dir",
    "schemas_arrow_schema",
    "unit_name",
]

#: ``(commit_position, ordinal)``: the order of changes, unique per change.
Key = tuple[int, int]

META_DIR = "_bemi_tt"
#: ``changes_schemas`` as Parquet, named so that no ``**/*.parquet`` glob of the dataset matches it.
SCHEMAS_FILE = "schemas.pq"
#: The first release's name of the sidecar: read when ``SCHEMAS_FILE`` is missing, deleted by exports.
LEGACY_SCHEMAS_FILE = "schemas.parquet"
#: The dataset's identity record (``DatasetIdentity``), written by the first export into a directory.
IDENTITY_FILE = "dataset.json"
#: Where a pruned dataset's history starts (capture/prune.py writes it).
HORIZON_FILE = "horizon.json"
#: The ``format`` member of the identity record.
IDENTITY_FORMAT = "bemi_tt changes export"
#: The transaction log directory that makes a directory a Delta table (``capture.export.delta``).
DELTA_LOG_DIR = "_delta_log"

#: A data file's name: its key range, then its part of a unit (``<k>of<n>``) or ``c`` (compacted), then rows.
FILE_NAME_RE = re.compile(
    r"^(?P<first>[0-9a-f]{24})-(?P<last>[0-9a-f]{24})-(?:(?P<k>[0-9]+)of(?P<n>[0-9]+)|c)-(?P<rows>[0-9]+)\.parquet$"
)


def format_key(key: Key) -> str:
    """24 hex digits that sort like the key."""
    commit_position, ordinal = key
    if not (0 <= commit_position < 1 << 64 and 0 <= ordinal < 1 << 32):
        raise SourceError(f"change key {key!r} is out of range; commit_position and ordinal must be >= 0")
    return f"{commit_position:016x}{ordinal:08x}"


def parse_key(text: str) -> Key:
    """The key ``format_key`` wrote."""
    return int(text[:16], 16), int(text[16:], 16)


def unit_name(first: Key, last: Key, part: int, parts: int, rows: int) -> str:
    """File name of part ``part`` (1-based) of ``parts`` of the export unit ``[first, last]``."""
    return f"{format_key(first)}-{format_key(last)}-{part}of{parts}-{rows}.parquet"


def compacted_name(first: Key, last: Key, rows: int) -> str:
    """File name of a compacted file holding its partition's rows with keys in ``[first, last]``."""
    return f"{format_key(first)}-{format_key(last)}-c-{rows}.parquet"


def partition_dir(schema: str, table: str, date: str) -> str:
    """``relation=<schema.table>/date=<date>``, percent-encoding characters unsafe in a path segment."""
    return f"relation={quote(f'{schema}.{table}', safe='')}/date={date}"


@dataclass(frozen=True)
class DataFile:
    """One data file of the dataset, described by its name."""

    path: str
    partition: str
    first: Key
    last: Key
    rows: int
    size: int
    part: int | None = None  # None for a compacted file
    parts: int | None = None

    @property
    def compacted(self) -> bool:
        return self.part is None


@dataclass(frozen=True)
class DatasetIdentity:
    """Which ``changes`` table a dataset exports; an export refuses a directory recorded for another one."""

    system_identifier: str  # pg_control_system() of the server, "" when the role may not read it
    database: str
    table: str  # schema-qualified, e.g. "public.changes"

    def describe(self) -> str:
        server = self.system_identifier or "unknown"
        return f"table {self.table} of database {self.database!r} (server system identifier {server})"

    def same_source(self, other: DatasetIdentity) -> bool:
        known = self.system_identifier and other.system_identifier
        return (self.database, self.table) == (other.database, other.table) and (
            not known or self.system_identifier == other.system_identifier
        )


#: Rows per Parquet row group: big enough to scan fast, small enough to skip by statistics.
ROW_GROUP_ROWS = 128 * 1024
#: Columns with few distinct values: dictionary-encoded (on JSON columns it only costs time and space).
DICTIONARY_COLUMNS = ["table", "operation", "schema", "database"]
#: Columns that identify a change: a dataset's newest change must have them in the source to be adopted.
IDENTIFYING_COLUMNS = ("commit_position", "ordinal", "transaction_id", "schema", "table", "operation",
                       "primary_key", "committed_at")


def export_arrow_schema() -> pa.Schema:
    """Arrow schema of exported files: ``changes_arrow_schema()`` with JSON columns as ``pa.json_()``."""
    schema = changes_arrow_schema()
    for name in JSON_COLUMNS:
        index = schema.get_field_index(name)
        schema = schema.set(index, pa.field(name, pa.json_(pa.string())))
    return schema


def schemas_arrow_schema() -> pa.Schema:
    """Arrow schema of ``_bemi_tt/schemas.pq`` (the ``changes_schemas`` table)."""
    return pa.schema(
        [
            pa.field("schema", pa.string()),
            pa.field("table", pa.string()),
            pa.field("commit_position", pa.int64()),
            pa.field("ordinal", pa.int32()),
            pa.field("committed_at", pa.timestamp("us", tz="UTC")),
            pa.field("columns", pa.json_(pa.string())),
            pa.field("relation_oid", pa.int64()),
            pa.field("step", pa.int32()),
            pa.field("event", pa.json_(pa.string())),
            pa.field("context", pa.json_(pa.string())),
            pa.field("replica_identity", pa.string()),
        ]
    )
