"""Compaction: small files of a partition become one; readers through bemi_tt never see a duplicate or gap."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from export_rows import changes_rows, dataset_rows, fill, more, slow_writes

from capture.compact import compact
from capture.errors import ConfigurationError
from capture.export import export_parquet
from capture.export.dataset import list_dataset_files, read_dataset, read_dataset_state, resolve_directory


def _partitions(directory: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for data_file in read_dataset_state(*resolve_directory(str(directory))).files:
        counts[data_file.partition] = counts.get(data_file.partition, 0) + 1
    return counts


def test_compaction_merges_each_partition_into_one_file_and_keeps_every_change(
    dsn: str, tmp_path: Path
) -> None:
    fill(dsn, 1500)
    export_parquet(dsn, str(tmp_path), batch_rows=150, progress=False)
    before = _partitions(tmp_path)
    assert max(before.values()) > 1
    stats = compact(str(tmp_path))
    assert stats.merged == sum(n for n in before.values() if n > 1)
    assert stats.written == sum(1 for n in before.values() if n > 1)
    assert set(_partitions(tmp_path).values()) == {1}
    assert sorted(p.name for p in tmp_path.glob("*/*/*.parquet")) == sorted(
        Path(f.path).name for f in read_dataset_state(*resolve_directory(str(tmp_path))).files
    )
    assert dataset_rows(read_dataset(str(tmp_path))) == changes_rows(dsn)


def test_files_at_least_the_target_size_are_left_alone(dsn: str, tmp_path: Path) -> None:
    fill(dsn, 600)
    export_parquet(dsn, str(tmp_path), batch_rows=100, progress=False)
    assert compact(str(tmp_path), target_bytes=1).merged == 0


def test_export_after_compaction_neither_repeats_nor_skips_changes(dsn: str, tmp_path: Path) -> None:
    rows = fill(dsn, 1000)
    stats = export_parquet(dsn, str(tmp_path), batch_rows=100, compact=True, progress=False)
    assert stats.compacted_files > 0
    assert (
        export_parquet(dsn, str(tmp_path), progress=False).changes == 0
    )  # watermark kept by compacted files
    more(dsn, rows, 300)
    assert export_parquet(dsn, str(tmp_path), batch_rows=100, progress=False).changes == 300
    assert dataset_rows(read_dataset(str(tmp_path))) == changes_rows(dsn)


def test_a_reader_running_during_compaction_never_sees_a_duplicate_or_a_gap(
    dsn: str, tmp_path: Path
) -> None:
    fill(dsn, 1500)
    export_parquet(dsn, str(tmp_path), batch_rows=250, progress=False)
    expected = changes_rows(dsn)
    done = threading.Event()
    seen: list[bool] = []
    errors: list[BaseException] = []

    listed: list[bool] = []

    def read_while_compacting() -> None:
        try:
            while not done.is_set():
                seen.append(dataset_rows(read_dataset(str(tmp_path))) == expected)
                filesystem, paths = list_dataset_files(str(tmp_path))
                try:  # as a reader with its own engine does: the listed files, read as they are
                    table = pa.concat_tables(pq.read_table(p, filesystem=filesystem) for p in paths)
                except FileNotFoundError:
                    continue  # replaced by the compaction after the listing: such a reader lists again
                listed.append(
                    dataset_rows(table.sort_by([("commit_position", "ascending"), ("ordinal", "ascending")]))
                    == expected
                )
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    restore = slow_writes(0.05)  # slow each file down so reads interleave with the swaps
    reader = threading.Thread(target=read_while_compacting)
    reader.start()
    try:
        stats = compact(str(tmp_path))
    finally:
        restore()
        done.set()
        reader.join()
    assert not errors
    assert stats.written > 1
    assert len(seen) >= 2
    assert all(seen)
    assert listed
    assert all(listed)


def test_bad_compaction_arguments_raise_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="target_bytes must be a positive integer, got 0"):
        compact(str(tmp_path), target_bytes=0)
    with pytest.raises(ConfigurationError, match="wait must be"):
        compact(str(tmp_path), wait=-2)
