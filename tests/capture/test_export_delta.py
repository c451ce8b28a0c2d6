"""The Delta Lake export (``export_parquet(..., format="delta")``): exactly once, across kills and reruns.

Every test compares the Delta table, read through its transaction log, with ``changes`` row by row.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import Server, drop_database
from deltalake import DeltaTable
from export_rows import changes_rows, dataset_rows, fill, insert, more, run_and_kill
from psycopg import sql
from test_export_s3 import bucket, s3_endpoint  # noqa: F401  (the moto S3 server fixtures)

import bemi_tt
from bemi_tt.delta_source import DeltaSource
from bemi_tt.sources import as_source
from capture.errors import ConfigurationError, SourceError
from capture.export import export_parquet
from capture.export.dataset import read_dataset, resolve_directory
from capture.export.delta import APP_ID_ORDINAL, APP_ID_POSITION, delta_watermark, read_delta
from capture.export.layout import format_key
from capture.export.lock import open_lock


@pytest.fixture
def other_dsn(pg_server: Server, database: str) -> Iterator[str]:
    """A second fresh database on the same server."""
    name = f"{database}_other"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_server.dsn(name)
    drop_database(pg_server, name)


def _export(dsn: str, directory: Path, **options: object) -> object:
    return export_parquet(dsn, str(directory), format="delta", progress=False, **options)  # type: ignore[arg-type]


def _rows(directory: Path) -> list[tuple]:
    return dataset_rows(read_delta(str(directory)))


def test_export_more_changes_export_again_gives_a_delta_table_equal_to_changes(
    dsn: str, tmp_path: Path
) -> None:
    rows = fill(dsn, 1500)
    first = _export(dsn, tmp_path, batch_rows=400)
    assert first.changes == 1500 and first.files > 0 and first.bytes > 0  # type: ignore[attr-defined]
    assert (tmp_path / "_delta_log").is_dir()
    assert _rows(tmp_path) == changes_rows(dsn)
    version_after_first = DeltaTable(str(tmp_path)).version()

    more(dsn, rows, 600)
    assert _export(dsn, tmp_path, batch_rows=400).changes == 600  # type: ignore[attr-defined]
    expected = changes_rows(dsn)
    assert _rows(tmp_path) == expected
    # Delta time travel: the first run's version holds exactly the first run's changes
    assert _rows_at(tmp_path, version_after_first) == expected[:1500]


def _rows_at(directory: Path, version: int) -> list[tuple]:
    return dataset_rows(read_delta(str(directory), version=version))


def test_each_unit_is_one_commit_naming_its_keys_and_carrying_the_watermark(dsn: str, tmp_path: Path) -> None:
    fill(dsn, 1000)
    _export(dsn, tmp_path, batch_rows=300)
    table = DeltaTable(str(tmp_path))
    expected = changes_rows(dsn)
    last = (expected[-1][12], expected[-1][13])
    assert delta_watermark(table) == last
    assert (table.transaction_version(APP_ID_POSITION), table.transaction_version(APP_ID_ORDINAL)) == last
    writes = [c for c in reversed(table.history()) if c["operation"] == "WRITE"]
    assert [int(c["bemi_tt.rows"]) for c in writes] == [300, 300, 300, 100]
    starts = [0, 300, 600, 900]
    for commit, start in zip(writes, starts, strict=True):
        first, end = expected[start], expected[min(start + 300, len(expected)) - 1]
        assert commit["bemi_tt.first_key"] == format_key((first[12], first[13]))
        assert commit["bemi_tt.last_key"] == format_key((end[12], end[13]))
    assert table.metadata().partition_columns == ["relation", "date"]
    assert (tmp_path / "_bemi_tt" / "schemas.pq").is_file()
    assert (tmp_path / "_bemi_tt" / "dataset.json").is_file()


def test_a_rerun_with_nothing_new_writes_no_commit(dsn: str, tmp_path: Path) -> None:
    fill(dsn, 500)
    _export(dsn, tmp_path, batch_rows=200)
    version = DeltaTable(str(tmp_path)).version()
    stats = _export(dsn, tmp_path, batch_rows=200)
    assert (stats.changes, stats.files) == (0, 0)  # type: ignore[attr-defined]
    assert DeltaTable(str(tmp_path)).version() == version
    assert _rows(tmp_path) == changes_rows(dsn)


def test_an_empty_changes_table_gives_an_empty_delta_table(dsn: str, tmp_path: Path) -> None:
    fill(dsn, 0)
    assert _export(dsn, tmp_path).changes == 0  # type: ignore[attr-defined]
    assert _rows(tmp_path) == []
    assert isinstance(as_source(tmp_path), DeltaSource)


def test_kills_at_random_points_then_a_rerun_give_exactly_the_changes(dsn: str, tmp_path: Path) -> None:
    rows = fill(dsn, 2400)
    rng = random.Random(15)
    code = (
        "import capture.export as e; "
        f"e.export_parquet({dsn!r}, {str(tmp_path)!r}, format='delta', batch_rows=150)"
    )
    left_behind: list[int] = []  # files of the unit being written when the kill came: never read
    for round_ in range(6):
        log = tmp_path / "_delta_log"
        commits = len(list(log.glob("*.json"))) if log.is_dir() else 0
        target = commits + rng.randrange(1, 4)

        pause = rng.uniform(0, 0.1)  # the kill lands anywhere in the next unit: reading, writing, committing

        mid_file = round_ == 3  # one kill for certain while a unit's file is half written

        def far_enough(
            log: Path = log, target: int = target, pause: float = pause, mid_file: bool = mid_file
        ) -> bool:
            if not (log.is_dir() and len(list(log.glob("*.json"))) >= target):
                return False
            if mid_file:
                return any(tmp_path.glob("*/*/.*.tmp"))
            time.sleep(pause)
            return True

        run_and_kill(code, far_enough)
        committed = {Path(uri) for uri in DeltaTable(str(tmp_path)).file_uris()}
        on_disk = set(tmp_path.glob("relation=*/date=*/*.parquet")) | set(tmp_path.glob("*/*/.*.tmp"))
        left_behind.append(len(on_disk - committed))
        got = _rows(tmp_path)
        expected = changes_rows(dsn)
        assert got == expected[: len(got)]  # a consistent prefix, no duplicate
        assert len(got) < len(expected)
        if round_ == 1:
            rows += more(dsn, rows, 600, seed=round_)
    assert any(left_behind)
    stats = _export(dsn, tmp_path)
    expected = changes_rows(dsn)
    assert _rows(tmp_path) == expected
    assert stats.changes < len(expected)  # type: ignore[attr-defined]
    assert not list(tmp_path.glob("*/*/.*.tmp"))
    keys = [(r[12], r[13]) for r in _rows(tmp_path)]
    assert len(keys) == len(set(keys))


def test_data_files_a_killed_writer_left_uncommitted_are_never_read(dsn: str, tmp_path: Path) -> None:
    rows = fill(dsn, 600)
    _export(dsn, tmp_path, batch_rows=200)
    for number, path in enumerate(sorted(tmp_path.glob("relation=*/date=*/*.parquet"))[:5]):  # no commit
        shutil.copy(path, path.with_name(f"part-00000-orphan{number}-c000.zstd.parquet"))
    assert _rows(tmp_path) == changes_rows(dsn)
    more(dsn, rows, 150)
    assert _export(dsn, tmp_path).changes == 150  # type: ignore[attr-defined]
    assert _rows(tmp_path) == changes_rows(dsn)
    assert as_source(tmp_path).tables() == sorted({(r[8], r[2]) for r in changes_rows(dsn)})


def test_compaction_keeps_the_rows_and_merges_files(dsn: str, tmp_path: Path) -> None:
    rows = fill(dsn, 1200)
    _export(dsn, tmp_path, batch_rows=100)
    files_before = len(DeltaTable(str(tmp_path)).file_uris())
    extra = more(dsn, rows, 300)
    stats = _export(dsn, tmp_path, batch_rows=100, compact=True)
    assert stats.changes == 300 and stats.compacted_files > 0  # type: ignore[attr-defined]
    table = DeltaTable(str(tmp_path))
    assert len(table.file_uris()) < files_before
    assert table.history(1)[0]["operation"] == "OPTIMIZE"
    expected = changes_rows(dsn)
    assert _rows(tmp_path) == expected
    assert delta_watermark(table) == (expected[-1][12], expected[-1][13])  # optimize keeps the watermark
    more(dsn, extra, 50, seed=9)
    assert _export(dsn, tmp_path).changes == 50  # type: ignore[attr-defined]
    assert _rows(tmp_path) == changes_rows(dsn)


def test_a_parquet_export_directory_is_refused_for_delta_and_a_delta_one_for_parquet(
    dsn: str, tmp_path: Path
) -> None:
    fill(dsn, 300)
    parquet, delta = tmp_path / "parquet", tmp_path / "delta"
    export_parquet(dsn, str(parquet), progress=False)
    _export(dsn, delta)
    with pytest.raises(ConfigurationError, match="holds a Parquet export"):
        _export(dsn, parquet)
    with pytest.raises(ConfigurationError, match="holds a Delta table"):
        export_parquet(dsn, str(delta), progress=False)
    assert not (parquet / "_delta_log").exists()
    assert dataset_rows(read_dataset(str(parquet))) == changes_rows(dsn) == _rows(delta)


def test_a_directory_with_other_files_or_another_databases_export_is_refused(
    dsn: str, other_dsn: str, tmp_path: Path
) -> None:
    fill(dsn, 200)
    fill(other_dsn, 100, seed=3)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigurationError, match="not part of a bemi_tt export"):
        _export(dsn, foreign)
    assert not (foreign / "_delta_log").exists()

    _export(dsn, tmp_path / "delta")
    with pytest.raises(ConfigurationError, match="holds the export of"):
        _export(other_dsn, tmp_path / "delta")
    assert _rows(tmp_path / "delta") == changes_rows(dsn)


def test_rows_inserted_below_the_watermark_fail_the_export_instead_of_being_skipped(
    dsn: str, tmp_path: Path
) -> None:
    rows = fill(dsn, 300)
    _export(dsn, tmp_path)
    late = list(rows[0])
    late[11], late[12] = rows[0][11] - 10, 0  # a commit position before every exported one
    with psycopg.connect(dsn) as conn:
        insert(conn, [tuple(late)])
    with pytest.raises(SourceError, match="below the export watermark"):
        _export(dsn, tmp_path)


def test_connect_recognises_a_delta_export_and_lists_its_tables(dsn: str, tmp_path: Path) -> None:
    fill(dsn, 800)
    _export(dsn, tmp_path)
    source = bemi_tt.connect(str(tmp_path))
    try:
        assert isinstance(source, DeltaSource)
        assert isinstance(as_source(tmp_path), DeltaSource)
        present = {(r[8], r[2]) for r in changes_rows(dsn)}
        assert set(source.tables()) == present
        assert ("a.b", "c") in present and ("a", "b.c") in present  # one relation value, told apart
        assert source.tables("c") == [("a.b", "c")]
    finally:
        bemi_tt.connect(None)


def test_export_to_s3_is_exact_across_reruns_and_readable_as_a_source(
    dsn: str, s3_endpoint: str, bucket: str  # noqa: F811  (fixtures from test_export_s3)
) -> None:
    uri = f"s3://{bucket}/exports/delta?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    rows = fill(dsn, 700)
    assert _export_uri(dsn, uri, batch_rows=300).changes == 700  # type: ignore[attr-defined]
    more(dsn, rows, 200)
    assert _export_uri(dsn, uri, batch_rows=300, compact=True).changes == 200  # type: ignore[attr-defined]
    assert _export_uri(dsn, uri).changes == 0  # type: ignore[attr-defined]
    expected = changes_rows(dsn)
    assert dataset_rows(read_delta(uri)) == expected
    source = as_source(uri)
    assert isinstance(source, DeltaSource)
    assert set(source.tables()) == {(r[8], r[2]) for r in expected}
    todo = bemi_tt.changes("todo", source=source)
    assert len(todo) == sum(1 for r in expected if (r[8], r[2]) == ("public", "todo"))


def _export_uri(dsn: str, uri: str, **options: object) -> object:
    return export_parquet(dsn, uri, format="delta", progress=False, **options)  # type: ignore[arg-type]


def test_a_delta_export_without_its_identity_record_is_adopted_only_by_its_own_database(
    dsn: str, other_dsn: str, tmp_path: Path
) -> None:
    rows = fill(dsn, 300)
    fill(other_dsn, 300, seed=3)
    _export(dsn, tmp_path)
    record = tmp_path / "_bemi_tt" / "dataset.json"
    record.unlink()
    with pytest.raises(ConfigurationError, match="another database's export"):
        _export(other_dsn, tmp_path)
    assert not record.exists()
    more(dsn, rows, 40)
    assert _export(dsn, tmp_path).changes == 40  # type: ignore[attr-defined]
    assert record.is_file()
    assert _rows(tmp_path) == changes_rows(dsn)


def test_a_second_export_while_one_holds_the_directory_lock_fails_at_once(dsn: str, tmp_path: Path) -> None:
    fill(dsn, 100)
    filesystem, root = resolve_directory(str(tmp_path))
    with open_lock(str(tmp_path), filesystem, root) as held:
        held.acquire(0)
        with pytest.raises(SourceError, match="another export or compaction is running"):
            _export(dsn, tmp_path)
    assert _export(dsn, tmp_path).changes == 100  # type: ignore[attr-defined]
