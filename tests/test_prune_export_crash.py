"""Crashes: SIGKILL an export-directory prune at chosen points; the directory is then either the old state
or the new one, readable and exact, and a rerun (of the prune, then of the export) finishes the job.

The killed process is a subprocess that kills itself at the point (while the pruned copy is half written,
right before the swap, right after it; for a Delta export also right after its commit to the staging table's
log), or is killed from outside while its file writes are slowed (as in tests/capture/test_export_crash.py).
Each point runs on a Parquet and on a Delta export."""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from test_prune import TABLES, _answer, _live, _now, _step, workload

import bemi_tt
from capture.errors import ConfigurationError
from capture.export import export_parquet
from capture.prune import export_horizon
from capture.verify import verify_export
from capture.worker import run as capture

History = list[tuple[datetime, dict[str, list[tuple[Any, ...]]]]]

_KILL = "os.kill(os.getpid(), signal.SIGKILL)"
POINTS = {
    # the second new file of the pruned copy is being written
    "mid_copy": ("calls = []\nreal = p.write_atomic\n"
                 "def write(*a, **k):\n    calls.append(1)\n    if len(calls) == 2:\n        " + _KILL
                 + "\n    return real(*a, **k)\np.write_atomic = write\n"),
    "before_swap": f"p._exchange = lambda staging, root: {_KILL}\n",
    "after_swap": ("real = p._exchange\n"
                   f"def exchange(staging, root):\n    real(staging, root)\n    {_KILL}\n"
                   "p._exchange = exchange\n"),
    # Delta only: the staging table's log has the prune's commit, the sidecars are not written yet
    "delta_commit": ("import deltalake\nreal = deltalake.DeltaTable.create_write_transaction\n"
                     f"def commit(*a, **k):\n    real(*a, **k)\n    {_KILL}\n"
                     "deltalake.DeltaTable.create_write_transaction = commit\n"),
}
CASES = [(fmt, point) for fmt in ("parquet", "delta") for point in sorted(POINTS)
         if fmt == "delta" or point != "delta_commit"]


def _prune_and_die(directory: Path, before: datetime, point: str) -> None:
    code = ("import os, signal\nimport capture.export.swap as p\n" + POINTS[point]
            + f"import bemi_tt\nbemi_tt.prune({str(directory)!r}, before={before.isoformat()!r})\n")
    process = subprocess.run([sys.executable, "-c", code], timeout=300)
    assert process.returncode == -signal.SIGKILL


def _exact(directory: Path, instants: History) -> None:
    for ts, live in instants:
        for table in TABLES:
            assert _answer(table, ts, str(directory)) == live[table], (table, ts)


def _version(directory: Path) -> int | None:
    from deltalake import DeltaTable

    return DeltaTable(str(directory)).version() if (directory / "_delta_log").is_dir() else None


@pytest.mark.parametrize(("fmt", "point"), CASES)
def test_a_prune_killed_at_any_point_leaves_the_old_or_the_new_state_and_a_rerun_finishes(
    engine: sa.Engine, dsn: str, tmp_path: Path, fmt: str, point: str
) -> None:
    history = workload(engine, dsn)
    directory = tmp_path / "export"
    export_parquet(dsn, str(directory), batch_rows=3, progress=False, format=fmt)
    version = _version(directory)
    cut_at = history[3][0]
    _prune_and_die(directory, cut_at, point)
    assert list(tmp_path.glob(".export.prune-*.tmp"))  # the kill left the copy (or the old tree) behind
    if version is not None:  # the old table's log has no prune commit until the swap; then exactly one
        assert _version(directory) == version + (point == "after_swap")

    if point == "after_swap":  # the new state: exact from the cut on, refused before it
        assert export_horizon(str(directory)) is not None
        _exact(directory, history[3:])
        with pytest.raises(ConfigurationError, match="before the history"):
            bemi_tt.as_of("users", history[1][0], source=str(directory))
    else:  # the old state, untouched: exact at every instant
        assert export_horizon(str(directory)) is None
        _exact(directory, history)
    verify_export(str(directory))

    rerun = bemi_tt.prune(directory, before=cut_at)
    assert (rerun.horizon is None) == (point == "after_swap")
    assert not list(tmp_path.glob(".export.prune-*"))  # the rerun removed what the kill left
    _exact(directory, history[3:])
    assert verify_export(str(directory)).horizon is not None

    _step(engine, "INSERT INTO users VALUES (9, 'Hal', 2, 3)")
    now = (_now(engine), _live(engine))
    capture(dsn, once=True)
    assert export_parquet(dsn, str(directory), progress=False, format=fmt).changes == 1
    _exact(directory, [*history[3:], now])
    verify_export(str(directory))


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_a_prune_killed_from_outside_while_writing_leaves_the_old_state(
    engine: sa.Engine, dsn: str, tmp_path: Path, fmt: str
) -> None:
    sys.path.insert(0, str(Path(__file__).parent / "capture"))
    from export_rows import run_and_kill

    history = workload(engine, dsn)
    directory = tmp_path / "export"
    export_parquet(dsn, str(directory), batch_rows=2, progress=False, format=fmt)
    code = f"import bemi_tt; bemi_tt.prune({str(directory)!r}, before={history[4][0].isoformat()!r})"

    def copying() -> bool:  # the pruned copy has its first file under way
        return any(p.is_file() for c in tmp_path.glob(".export.prune-*.tmp") for p in c.rglob("*.tmp"))

    run_and_kill(code, copying)
    assert export_horizon(str(directory)) is None
    _exact(directory, history)
    verify_export(str(directory))
    assert bemi_tt.prune(directory, before=history[4][0]).horizon is not None
    _exact(directory, history[4:])
    verify_export(str(directory))


def test_a_prune_after_a_killed_export_keeps_its_unfinished_unit_for_the_rerun(dsn: str, tmp_path: Path
                                                                              ) -> None:
    """Synthetic rows (tests/capture/export_rows.py: their hashes are not a chain, so no verify here)."""
    sys.path.insert(0, str(Path(__file__).parent / "capture"))
    from export_rows import changes_rows, dataset_rows, fill, run_and_kill

    from capture.export.dataset import read_dataset, read_dataset_state, resolve_directory

    fill(dsn, 3000)
    directory = tmp_path / "export"
    code = f"import capture.export as e; e.export_parquet({dsn!r}, {str(directory)!r}, batch_rows=500)"

    def mid_unit() -> bool:
        state = read_dataset_state(*resolve_directory(str(directory)))
        return state.watermark is not None and state.watermark[0] > 0 and state.incomplete is not None \
            and len(state.files) > 20

    run_and_kill(code, mid_unit)
    expected = changes_rows(dsn)
    readable = dataset_rows(read_dataset(str(directory)))
    cut_at = readable[len(readable) // 2][7]  # committed_at of a row in the middle of what is readable
    pruned = bemi_tt.prune(directory, before=cut_at)
    assert pruned.horizon is not None
    cut = pruned.horizon.position
    assert read_dataset_state(*resolve_directory(str(directory))).incomplete is not None  # still there
    kept = [r for r in dataset_rows(read_dataset(str(directory))) if r[12] >= cut]
    assert kept == [r for r in readable if r[12] >= cut]
    export_parquet(dsn, str(directory), progress=False)  # finishes the unit, then the rest
    rows = dataset_rows(read_dataset(str(directory)))
    assert [r for r in rows if r[12] >= cut] == [r for r in expected if r[12] >= cut]
    assert len([r for r in rows if r[12] < cut]) == pruned.horizon.rows
