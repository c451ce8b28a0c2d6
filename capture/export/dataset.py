"""The Parquet dataset on disk or in object storage: listing, watermark, identity record, atomic writes.

The names it lists are those of ``capture.export.layout``. Readers (``list_dataset_files``) keep, per
partition, the files of complete units and compacted files that no bigger file contains. The watermark is
the largest ``last`` among them.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from capture.errors import ConfigurationError, SourceError
from capture.export.layout import (
    DELTA_LOG_DIR,
    FILE_NAME_RE,
    HORIZON_FILE,
    IDENTITY_FILE,
    IDENTITY_FORMAT,
    META_DIR,
    DataFile,
    DatasetIdentity,
    Key,
    export_arrow_schema,
    parse_key,
)

__all__ = [
    "DatasetState",
    "Horizon",
    "delete_files",
    "is_delta_table",
    "list_dataset_files",
    "read_dataset",
    "read_dataset_state",
    "read_horizon",
    "read_identity",
    "refuse_foreign_files",
    "resolve_directory",
    "write_atomic",
    "write_identity",
]


@dataclass(frozen=True)
class Horizon:
    """Where a pruned history starts: ``before`` (TS), the cut position, the folded prefix's chain head
    (``head``: (commit_position, ordinal, chain_hash) of the last folded row; None: no hashed row), and the
    baseline: the SHA-256 over its rows' digests in order and their count (capture/prune.py)."""

    before: datetime
    position: int
    head: tuple[int, int, str] | None
    baseline: str
    rows: int

    def to_json(self) -> dict[str, Any]:
        return {"before": self.before.isoformat(), "position": self.position,
                "head": list(self.head) if self.head else None, "baseline": self.baseline, "rows": self.rows}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Horizon:
        head = data.get("head")
        return cls(datetime.fromisoformat(str(data["before"])), int(data["position"]),
                   (int(head[0]), int(head[1]), str(head[2])) if head else None, str(data["baseline"]),
                   int(data["rows"]))


def read_horizon(filesystem: Any, root: str) -> Horizon | None:
    """``_bemi_tt/horizon.json`` of the dataset at ``root`` of ``filesystem`` (None: never pruned)."""
    try:
        with filesystem.open_input_stream(f"{root}/{META_DIR}/{HORIZON_FILE}") as stream:
            return Horizon.from_json(json.loads(stream.read().decode("utf-8")))
    except FileNotFoundError:
        return None


def _identity_path(root: str) -> str:
    return f"{root}/{META_DIR}/{IDENTITY_FILE}"


def read_identity(filesystem: pafs.FileSystem, root: str) -> DatasetIdentity | None:
    """The identity recorded in ``DIR/_bemi_tt/dataset.json``; None when there is none (first release)."""
    path = _identity_path(root)
    try:
        with filesystem.open_input_stream(path) as stream:
            raw = stream.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise SourceError(f"cannot read the dataset identity {path!r}: {exc}") from exc
    try:
        record = json.loads(raw)
        if record.get("format") != IDENTITY_FORMAT:
            raise ValueError(f"format is {record.get('format')!r}")
        return DatasetIdentity(
            str(record["system_identifier"]), str(record["database"]), str(record["table"])
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigurationError(
            f"{path!r} is not a bemi_tt dataset identity ({exc}): the directory holds something else; "
            "export into an empty directory"
        ) from None


def write_identity(filesystem: pafs.FileSystem, root: str, identity: DatasetIdentity) -> None:
    """Record (atomically) which ``changes`` table the dataset at ``root`` exports."""
    record = {"format": IDENTITY_FORMAT, "version": 1, **asdict(identity)}
    write_atomic(filesystem, _identity_path(root), json.dumps(record, indent=1).encode() + b"\n")


def refuse_foreign_files(state: DatasetState, limit: int = 3) -> None:
    """Fail if the directory holds files that are not part of a bemi_tt export: readers would mix them in."""
    if not state.foreign:
        return
    prefix = state.root.rstrip("/") + "/"
    shown = [p[len(prefix) :] if p.startswith(prefix) else p for p in state.foreign[:limit]]
    more = f" and {len(state.foreign) - limit} more" if len(state.foreign) > limit else ""
    raise ConfigurationError(
        f"export directory {state.root!r} holds {len(state.foreign)} files that are not part of a bemi_tt "
        f"export ({', '.join(map(repr, shown))}{more}); readers of the directory would mix them with the "
        "changes: export into an empty directory, or move those files away"
    )


@dataclass
class DatasetState:
    """What a listing of the dataset says: readable files, watermark, and leftovers to clean up."""

    filesystem: pafs.FileSystem
    root: str
    files: list[DataFile] = field(default_factory=list)  # complete and not superseded, by partition and key
    watermark: Key | None = None
    incomplete: tuple[Key, Key] | None = None  # the unit a crashed export left half written
    incomplete_parts: set[str] = field(default_factory=set)  # names of that unit's parts present
    superseded: list[DataFile] = field(default_factory=list)  # contained in a bigger file: safe to delete
    temporary: list[str] = field(default_factory=list)  # temporary files left by a killed writer
    incomplete_files: list[DataFile] = field(default_factory=list)  # the parts of ``incomplete`` present
    foreign: list[str] = field(default_factory=list)  # files that are not part of a bemi_tt export

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


def resolve_directory(directory: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and root path of a dataset directory (local path or URI such as ``s3://``)."""
    if not isinstance(directory, (str, os.PathLike)) or not str(directory):
        raise ConfigurationError(f"export directory must be a non-empty path or URI, got {directory!r}")
    directory = os.fspath(directory)
    if "://" in directory:
        if directory.startswith("s3://") and "allow_delayed_open" not in directory:
            # small objects then go up in one PutObject instead of a multipart upload
            directory += ("&" if "?" in directory else "?") + "allow_delayed_open=true"
        try:
            filesystem, path = pafs.FileSystem.from_uri(directory)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise ConfigurationError(f"cannot open export directory {directory!r}: {exc}") from exc
        return filesystem, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(directory)


def is_delta_table(filesystem: pafs.FileSystem, root: str) -> bool:
    """Whether ``root`` holds a Delta table (a ``_delta_log/`` directory) rather than a Parquet export."""
    try:
        info = filesystem.get_file_info(f"{root}/{DELTA_LOG_DIR}")
        return bool(info.type == pafs.FileType.Directory)
    except OSError as exc:
        raise SourceError(f"cannot look into the export directory {root!r}: {exc}") from exc


def _is_local(filesystem: pafs.FileSystem) -> bool:
    return isinstance(filesystem, pafs.LocalFileSystem)


def _list(filesystem: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise SourceError(f"cannot list the export directory {root!r}: {exc}") from exc
    return [info for info in infos if info.type == pafs.FileType.File]


def read_dataset_state(filesystem: pafs.FileSystem, root: str) -> DatasetState:
    """List the dataset and work out which files readers use, the watermark and what is left over."""
    state = DatasetState(filesystem, root)
    units: dict[tuple[Key, Key], list[DataFile]] = {}
    compacted: list[DataFile] = []
    prefix = root.rstrip("/") + "/"
    for info in _list(filesystem, root):
        rel = info.path[len(prefix) :] if info.path.startswith(prefix) else info.path
        segments = rel.split("/")
        temporary = segments[-1].startswith(".") and segments[-1].endswith(".tmp")
        if segments[0] == META_DIR:  # the sidecar, identity record, lock (and their temporary files)
            if temporary and len(segments) == 2:
                state.temporary.append(info.path)
            continue
        if (
            len(segments) != 3
            or not segments[0].startswith("relation=")
            or not segments[1].startswith("date=")
        ):
            state.foreign.append(info.path)
            continue
        if temporary:
            state.temporary.append(info.path)
            continue
        match = FILE_NAME_RE.match(segments[2])
        if match is None:
            state.foreign.append(info.path)
            continue
        first, last = parse_key(match["first"]), parse_key(match["last"])
        data_file = DataFile(
            path=info.path,
            partition=f"{segments[0]}/{segments[1]}",
            first=first,
            last=last,
            rows=int(match["rows"]),
            size=int(info.size or 0),
            part=int(match["k"]) if match["k"] else None,
            parts=int(match["n"]) if match["n"] else None,
        )
        if data_file.compacted:
            compacted.append(data_file)
        else:
            units.setdefault((first, last), []).append(data_file)

    # Compaction only ever runs when every unit is complete, so a compacted file vouches for every
    # unit that ends at or before it, even if some of that unit's parts were merged away.
    compacted_last = max((f.last for f in compacted), default=None)
    candidates = list(compacted)
    incomplete: list[tuple[Key, Key]] = []
    for (first, last), parts in units.items():
        expected = parts[0].parts or 0
        if len({p.part for p in parts}) == expected or (
            compacted_last is not None and last <= compacted_last
        ):
            candidates.extend(parts)
        else:
            incomplete.append((first, last))
    if incomplete:
        complete_last = max((f.last for f in candidates), default=None)
        if len(incomplete) > 1 or (complete_last is not None and incomplete[0][0] <= complete_last):
            raise SourceError(
                f"export directory {root!r} has incomplete export units {sorted(incomplete)!r} that are not "
                "the newest; it was written without a lock: re-export into an empty directory"
            )
        state.incomplete = incomplete[0]
        state.incomplete_files = units[incomplete[0]]
        state.incomplete_parts = {p.path.rsplit("/", 1)[-1] for p in units[incomplete[0]]}

    by_partition: dict[str, list[DataFile]] = {}
    for candidate in candidates:
        by_partition.setdefault(candidate.partition, []).append(candidate)
    for partition in sorted(by_partition):
        files = sorted(by_partition[partition], key=lambda f: (f.first, (-f.last[0], -f.last[1])))
        reach: Key | None = None
        for data_file in files:
            if reach is not None and data_file.last <= reach:
                state.superseded.append(data_file)
                continue
            if reach is not None and data_file.first <= reach:
                raise SourceError(
                    f"export directory {root!r}: file {data_file.path!r} overlaps another file of its "
                    "partition without containing it; re-export into an empty directory"
                )
            state.files.append(data_file)
            reach = data_file.last
    state.watermark = max((f.last for f in candidates), default=None)
    return state


def list_dataset_files(directory: str) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and the data files a reader should read: no duplicate, no gap, even mid-compaction.

    Files of a unit that a crashed export left half written are left out (they come back complete on the
    next export), as are files a compacted file replaces. Paths are sorted by partition, then by key.
    """
    filesystem, root = resolve_directory(directory)
    state = read_dataset_state(filesystem, root)
    return filesystem, [f.path for f in state.files]


def write_atomic(filesystem: pafs.FileSystem, path: str, data: pa.Buffer | bytes) -> None:
    """Make ``path`` appear complete or not at all.

    Locally: write a dot-prefixed temporary file in the same directory, fsync, rename, fsync the directory.
    Object stores: the finished bytes go up in one request, a single PUT (objects up to pyarrow's part
    size, 10 MB) or a multipart upload of the complete buffer, which S3 shows only once it is completed;
    never streamed from a Parquet writer that could fail midway.
    """
    directory, _, name = path.rpartition("/")
    if _is_local(filesystem):
        os.makedirs(directory, exist_ok=True)
        temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "wb") as out:
                out.write(memoryview(data))
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        return
    with filesystem.open_output_stream(path) as out:  # object stores need no directories: none are made
        out.write(data)


def delete_files(filesystem: pafs.FileSystem, paths: Iterable[str]) -> int:
    """Delete files that may already be gone; returns how many were deleted."""
    deleted = 0
    for path in paths:
        try:
            filesystem.delete_file(path)
            deleted += 1
        except FileNotFoundError:
            continue
    return deleted


def read_dataset(directory: str, *, columns: list[str] | None = None, attempts: int = 10) -> pa.Table:
    """Every change in the dataset as one Arrow table in key order; a consistent snapshot even mid-compaction.

    The snapshot is the watermark of the first listing. A file that a concurrent compaction removes
    after the listing makes its partition list again and read the file that replaced it; rows past the
    snapshot's watermark (from exports that finished meanwhile) are left out.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        raise ConfigurationError(f"attempts must be a positive integer, got {attempts!r}")
    schema = export_arrow_schema()
    wanted = list(schema.names) if columns is None else list(columns)
    unknown = [c for c in wanted if c not in schema.names]
    if unknown:
        raise ConfigurationError(f"unknown columns {unknown!r}; the dataset has {schema.names!r}")
    needed = wanted + [c for c in ("commit_position", "ordinal") if c not in wanted]
    filesystem, root = resolve_directory(directory)
    state = read_dataset_state(filesystem, root)
    watermark = state.watermark
    by_partition: dict[str, list[DataFile]] = {}
    for data_file in state.files:
        by_partition.setdefault(data_file.partition, []).append(data_file)
    tables: list[pa.Table] = []
    past_watermark = False
    for partition, files in by_partition.items():
        for attempt in range(attempts):
            try:
                pieces = [pq.read_table(f.path, filesystem=filesystem, columns=needed) for f in files]
                break
            except FileNotFoundError:
                if attempt == attempts - 1:
                    raise SourceError(
                        f"files of partition {partition!r} of {root!r} kept vanishing while read; retry later"
                    ) from None
                fresh = read_dataset_state(filesystem, root)
                files = [
                    f for f in fresh.files if f.partition == partition and watermark and f.first <= watermark
                ]
        past_watermark = past_watermark or any(watermark is not None and f.last > watermark for f in files)
        tables.extend(pieces)
    if not tables:
        return pa.schema([schema.field(c) for c in wanted]).empty_table()
    table = pa.concat_tables(tables)
    if past_watermark and watermark is not None:
        position, ordinal = watermark
        cp, od = table["commit_position"], table["ordinal"]
        keep = pc.or_(pc.less(cp, position), pc.and_(pc.equal(cp, position), pc.less_equal(od, ordinal)))
        table = table.filter(keep)
    table = table.sort_by([("commit_position", "ascending"), ("ordinal", "ascending")])
    return table.select(wanted)
