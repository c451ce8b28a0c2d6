"""Crashes: SIGKILL an export or a compaction mid-write, rerun, and the dataset equals ``changes``.

The subprocesses install ``export_rows.slow_writes`` themselves: each file's bytes stop halfway for a while,
so the kill lands while files are half written; only an export that never shows a file before it is
whole passes.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from export_rows import changes_rows, dataset_rows, fill, run_and_kill

import capture.export.run
from capture.compact import compact
from capture.export import export_parquet
from capture.export.dataset import DatasetState, read_dataset, read_dataset_state, resolve_directory


def _state(directory: Path) -> DatasetState:
    return read_dataset_state(*resolve_directory(str(directory)))


def _all_visible_files_are_whole(directory: Path) -> None:
    for path in directory.glob("*/*/*.parquet"):
        pq.read_table(path)  # a torn file would fail to parse


def test_a_kill_during_export_then_a_rerun_gives_exactly_the_changes(dsn: str, tmp_path: Path) -> None:
    fill(dsn, 3000)
    code = f"import capture.export as e; e.export_parquet({dsn!r}, {str(tmp_path)!r}, batch_rows=500)"

    def mid_unit() -> bool:  # a unit done, the next one has files visible (and, slowed, one half written)
        state = _state(tmp_path)
        return state.watermark is not None and state.incomplete is not None

    run_and_kill(code, mid_unit)
    _all_visible_files_are_whole(tmp_path)
    expected = changes_rows(dsn)
    state = _state(tmp_path)
    assert state.incomplete is not None
    before = dataset_rows(read_dataset(str(tmp_path)))
    assert before == expected[: len(before)]  # readers see a prefix: the half-written unit is left out

    stats = export_parquet(dsn, str(tmp_path), progress=False)
    assert stats.changes == len(expected) - len(before)
    assert dataset_rows(read_dataset(str(tmp_path))) == expected
    assert not list(tmp_path.glob("*/*/.*.tmp"))
    assert _state(tmp_path).incomplete is None


def test_a_kill_during_compaction_leaves_the_dataset_correct_and_a_rerun_finishes(
    dsn: str, tmp_path: Path
) -> None:
    fill(dsn, 2000)
    export_parquet(dsn, str(tmp_path), batch_rows=200, progress=False)
    expected = changes_rows(dsn)
    code = f"from capture.compact import compact; compact({str(tmp_path)!r})"

    def some_compacted() -> bool:
        return any(f.compacted for f in _state(tmp_path).files)

    run_and_kill(code, some_compacted)
    _all_visible_files_are_whole(tmp_path)
    assert dataset_rows(read_dataset(str(tmp_path))) == expected

    stats = compact(str(tmp_path))
    assert stats.merged > 0
    assert dataset_rows(read_dataset(str(tmp_path))) == expected
    assert not list(tmp_path.glob("*/*/.*.tmp"))


def test_files_left_by_a_crash_between_compacted_file_and_deletes_are_ignored_then_removed(
    dsn: str, tmp_path: Path
) -> None:
    fill(dsn, 800)
    export_parquet(dsn, str(tmp_path), batch_rows=100, progress=False)
    small = {path: path.read_bytes() for path in tmp_path.glob("*/*/*.parquet")}
    compact(str(tmp_path))
    restored = [path for path in small if not path.exists()]
    assert restored
    for path in restored:  # as if the crash came right after the compacted files appeared
        path.write_bytes(small[path])
    expected = changes_rows(dsn)
    assert {Path(f.path) for f in _state(tmp_path).superseded} == set(restored)
    assert dataset_rows(read_dataset(str(tmp_path))) == expected

    export_parquet(dsn, str(tmp_path), progress=False)
    assert not any(path.exists() for path in restored)
    assert dataset_rows(read_dataset(str(tmp_path))) == expected


def test_a_failing_write_stops_the_export_with_its_error_and_a_rerun_completes(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(dsn, 1200)
    real = capture.export.run.write_unit
    calls = []

    def fail_on_second_unit(*args: object, **kwargs: object) -> tuple[int, int]:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(capture.export.run, "write_unit", fail_on_second_unit)
    with pytest.raises(OSError, match="disk full"):
        export_parquet(dsn, str(tmp_path), batch_rows=200, progress=False)
    monkeypatch.undo()
    expected = changes_rows(dsn)
    assert dataset_rows(read_dataset(str(tmp_path))) == expected[:200]
    assert export_parquet(dsn, str(tmp_path), batch_rows=200, progress=False).changes == 1000
    assert dataset_rows(read_dataset(str(tmp_path))) == expected
