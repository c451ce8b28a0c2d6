"""Prune of a Delta export (``prune(DIR, before=TS)`` where DIR holds ``format="delta"``): the pruned table is
one Delta commit on a staging copy swapped in whole; its log's file list is exactly the files on disk, it
equals the database pruned at the same TS, and it stays exact through a Delta optimize before and after.
Real PostgreSQL, the worker and deltalake (the workload of tests/test_prune.py)."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from deltalake import DeltaTable
from test_prune import TABLES, _answer, _live, _now, _step, workload
from test_prune_export import _database_rows, _directory_rows, _same_json

import bemi_tt
from capture.export import export_parquet
from capture.prune import prune_changes
from capture.verify import verify_export
from capture.worker import run as capture

History = list[tuple[datetime, dict[str, list[tuple[Any, ...]]]]]


@pytest.fixture
def history(engine: sa.Engine, dsn: str) -> History:
    return workload(engine, dsn)


def _export(dsn: str, directory: Path, **options: Any) -> Any:
    return export_parquet(dsn, str(directory), format="delta", progress=False, **options)


def _data_files_on_disk(directory: Path) -> set[str]:
    return {str(p) for p in directory.rglob("*.parquet") if "_delta_log" not in p.parts}


def test_a_pruned_delta_export_is_one_commit_whose_file_list_is_exactly_the_files_on_disk(
    dsn: str, history: History, tmp_path: Path
) -> None:
    directory = tmp_path / "export"
    _export(dsn, directory, batch_rows=2)
    before = DeltaTable(str(directory))
    version, watermark = before.version(), before.transaction_version("bemi_tt.export.commit_position")
    bemi_tt.prune(directory, before=history[4][0])
    table = DeltaTable(str(directory))
    assert table.version() == version + 1  # one commit: the removes and the adds together
    commit = table.history(1)[0]
    assert commit["bemi_tt.operation"] == "prune" and commit["bemi_tt.before"] == history[4][0].isoformat()
    assert table.transaction_version("bemi_tt.export.commit_position") == watermark  # the watermark stays
    assert set(table.file_uris()) == _data_files_on_disk(directory)
    prune_changes(dsn, before=history[4][0])
    _same_json(_directory_rows(directory), _database_rows(dsn))
    assert table.to_pyarrow_table().num_rows == len(_database_rows(dsn))  # Delta's own reader agrees
    assert verify_export(str(directory)).horizon is not None
    assert not list(tmp_path.glob(".export.prune-*"))


def test_a_delta_export_optimized_before_the_prune_is_pruned_exactly_and_keeps_no_older_files(
    engine: sa.Engine, dsn: str, history: History, tmp_path: Path
) -> None:
    """Delta's optimize names its files itself (their rows give their keys) and leaves the files it
    replaced on disk for older versions: the pruned tree holds the current version's files only."""
    directory = tmp_path / "export"
    _export(dsn, directory, batch_rows=2, compact=True)
    table = DeltaTable(str(directory))
    assert _data_files_on_disk(directory) > set(table.file_uris())  # the replaced files are still there
    # optimize's own names (part-<n>-<uuid>-c000...), not the export's part-<first key>-<last key>-...
    ours = re.compile(r"part-[0-9a-f]{24}-[0-9a-f]{24}-")
    assert any(not ours.match(os.path.basename(u)) for u in table.file_uris())
    cut_at = history[3][0]
    bemi_tt.prune(directory, before=cut_at)
    assert set(DeltaTable(str(directory)).file_uris()) == _data_files_on_disk(directory)
    prune_changes(dsn, before=cut_at)
    _same_json(_directory_rows(directory), _database_rows(dsn))
    for ts, live in history[3:]:
        for name in TABLES:
            assert _answer(name, ts, str(directory)) == live[name], (name, ts)
    assert verify_export(str(directory)) == len(_database_rows(dsn))

    _step(engine, "INSERT INTO users VALUES (7, 'Eve', 3, 4)")
    now = (_now(engine), _live(engine))
    capture(dsn, once=True)
    assert _export(dsn, directory, compact=True).changes == 1
    for ts, live in [*history[3:], now]:
        for name in TABLES:
            assert _answer(name, ts, str(directory)) == live[name], (name, ts)
    assert verify_export(str(directory)).horizon is not None


def test_a_checkpointed_delta_export_is_pruned_and_the_old_trees_last_checkpoint_is_never_shared(
    dsn: str, history: History, tmp_path: Path
) -> None:
    directory = tmp_path / "export"
    _export(dsn, directory, batch_rows=3)
    DeltaTable(str(directory)).create_checkpoint()
    pointer = directory / "_delta_log" / "_last_checkpoint"
    old = json.loads(pointer.read_text())
    bemi_tt.prune(directory, before=history[4][0])
    table = DeltaTable(str(directory))
    table.create_checkpoint()  # a checkpoint of the pruned table: read from the pruned log
    assert json.loads(pointer.read_text())["version"] == table.version() > old["version"]
    prune_changes(dsn, before=history[4][0])
    _same_json(_directory_rows(directory), _database_rows(dsn))
    verify_export(str(directory))
