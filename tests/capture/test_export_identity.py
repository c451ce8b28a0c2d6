"""One dataset per export directory: exports refuse another one's directory; globs see only change files.

The first export into a directory records which ``changes`` table it exports (``_bemi_tt/dataset.json``);
the first release wrote no record and named the schemas sidecar ``_bemi_tt/schemas.parquet``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import Server, drop_database
from export_rows import changes_rows, dataset_rows, fill, more, run_and_kill
from psycopg import sql

from bemi_tt.sources import ParquetSource
from capture.compact import compact
from capture.errors import ConfigurationError
from capture.export import export_parquet
from capture.export.dataset import read_dataset, read_dataset_state, resolve_directory

HIVE_GLOB = "SELECT count(*) FROM read_parquet('{}/**/*.parquet', hive_partitioning = true)"


@pytest.fixture
def other_dsn(pg_server: Server, database: str) -> Iterator[str]:
    """A second fresh database on the same server."""
    name = f"{database}_other"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_server.dsn(name)
    drop_database(pg_server, name)


def _listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def _as_first_release(directory: Path) -> None:
    """Make a fresh export look like the first release's: no identity record, the old sidecar name."""
    (directory / "_bemi_tt" / "dataset.json").unlink()
    (directory / "_bemi_tt" / "schemas.pq").rename(directory / "_bemi_tt" / "schemas.parquet")


def _globbed_rows(directory: Path) -> int:
    """The most natural DuckDB query of an export, and pandas' whole-directory read, agree on the count."""
    with duckdb.connect() as con:
        row = con.execute(HIVE_GLOB.format(directory)).fetchone()
    assert row is not None
    assert len(pd.read_parquet(directory)) == row[0]
    return int(row[0])


def test_export_refuses_a_directory_holding_another_databases_export(
    dsn: str, other_dsn: str, database: str, tmp_path: Path
) -> None:
    fill(dsn, 200)
    fill(other_dsn, 200, seed=5)
    export_parquet(dsn, str(tmp_path), progress=False)
    before = _listing(tmp_path)
    expected = (rf"{tmp_path}.* holds the export of table public.changes of database '{database}'.*"
                rf"not of table public.changes of database '{database}_other'")
    with pytest.raises(ConfigurationError, match=expected):
        export_parquet(other_dsn, str(tmp_path), progress=False)
    assert _listing(tmp_path) == before
    assert dataset_rows(read_dataset(str(tmp_path))) == changes_rows(dsn)


def test_export_refuses_another_changes_table_of_the_same_database(dsn: str, tmp_path: Path) -> None:
    fill(dsn, 50)
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE changes_copy (LIKE changes INCLUDING ALL)")
        conn.execute("INSERT INTO changes_copy SELECT * FROM changes")
    export_parquet(dsn, str(tmp_path), progress=False)
    with pytest.raises(ConfigurationError, match=r"holds the export of table public.changes .*changes_copy"):
        export_parquet(dsn, str(tmp_path), table="changes_copy", progress=False)


@pytest.mark.parametrize(
    "stray", ["part-0.parquet", "notes.txt", "relation=public.todo/date=2026-03-28/part-0.parquet"]
)
def test_export_refuses_a_directory_holding_files_that_are_not_an_export(
    dsn: str, tmp_path: Path, stray: str
) -> None:
    fill(dsn, 50)
    path = tmp_path / stray
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": [1, 2]}), path)
    with pytest.raises(ConfigurationError, match=rf"{tmp_path}.* holds 1 files that are not part of a "
                       rf"bemi_tt export \('{stray}'\)"):
        export_parquet(dsn, str(tmp_path), progress=False)
    assert not [p for p in tmp_path.rglob("*.parquet") if p != path]  # nothing exported next to them


def test_export_refuses_files_added_to_its_own_directory_later(dsn: str, tmp_path: Path) -> None:
    rows = fill(dsn, 50)
    export_parquet(dsn, str(tmp_path), progress=False)
    pq.write_table(pa.table({"x": [1]}), tmp_path / "extra.parquet")
    more(dsn, rows, 10)
    with pytest.raises(ConfigurationError, match=r"holds 1 files that are not part of a bemi_tt export"):
        export_parquet(dsn, str(tmp_path), progress=False)


def test_a_first_release_export_is_adopted_continued_and_its_sidecar_renamed(
    dsn: str, tmp_path: Path
) -> None:
    rows = fill(dsn, 300)
    with psycopg.connect(dsn) as conn:
        conn.execute(
            'INSERT INTO changes_schemas ("schema", "table", commit_position, ordinal, committed_at, columns)'
            """ VALUES ('public', 'todo', 1, 0, now(), '[{"name": "id", "type": "bigint", "key": true}]')"""
        )
    export_parquet(dsn, str(tmp_path), batch_rows=100, progress=False)
    _as_first_release(tmp_path)
    assert ParquetSource(tmp_path).schemas().num_rows == 1  # readers still find the old sidecar
    more(dsn, rows, 100)
    stats = export_parquet(dsn, str(tmp_path), batch_rows=100, progress=False)
    assert stats.changes == 100
    assert dataset_rows(read_dataset(str(tmp_path))) == changes_rows(dsn)
    assert (tmp_path / "_bemi_tt" / "dataset.json").is_file()
    assert not (tmp_path / "_bemi_tt" / "schemas.parquet").exists()
    assert ParquetSource(tmp_path).schemas().num_rows == 1
    assert _globbed_rows(tmp_path) == 400


def test_a_first_release_export_of_another_database_is_refused(
    dsn: str, other_dsn: str, tmp_path: Path
) -> None:
    fill(dsn, 200)
    fill(other_dsn, 200, seed=5)
    export_parquet(dsn, str(tmp_path), progress=False)
    _as_first_release(tmp_path)
    before = _listing(tmp_path)
    with pytest.raises(ConfigurationError, match=r"holds an export whose newest change .* is not in table "
                       r"public.changes of database '.*_other'"):
        export_parquet(other_dsn, str(tmp_path), progress=False)
    assert _listing(tmp_path) == before


def test_an_unreadable_identity_record_is_a_clear_error(dsn: str, tmp_path: Path) -> None:
    fill(dsn, 20)
    (tmp_path / "_bemi_tt").mkdir()
    (tmp_path / "_bemi_tt" / "dataset.json").write_text('{"name": "someone else"}')
    with pytest.raises(ConfigurationError, match=r"dataset.json' is not a bemi_tt dataset identity"):
        export_parquet(dsn, str(tmp_path), progress=False)


def test_duckdb_hive_glob_and_pandas_read_exactly_the_changes_of_a_fresh_and_a_compacted_export(
    dsn: str, tmp_path: Path
) -> None:
    rows = fill(dsn, 1000)
    export_parquet(dsn, str(tmp_path), batch_rows=200, progress=False)
    assert _globbed_rows(tmp_path) == len(rows)
    compact(str(tmp_path))
    assert _globbed_rows(tmp_path) == len(rows)
    with duckdb.connect() as con:
        hive = con.execute(
            f"SELECT DISTINCT relation FROM read_parquet('{tmp_path}/**/*.parquet', hive_partitioning = true)"
        ).fetchall()
    assert {r[0] for r in hive} == {f"{s}.{t}" for s, t in {(r[7], r[1]) for r in rows}}


def test_duckdb_hive_glob_and_pandas_read_an_export_killed_while_writing(dsn: str, tmp_path: Path) -> None:
    fill(dsn, 2000)
    code = f"import capture.export as e; e.export_parquet({dsn!r}, {str(tmp_path)!r}, batch_rows=400)"

    def writing() -> bool:  # files visible and one more being written: a temporary file is left
        state = read_dataset_state(*resolve_directory(str(tmp_path)))
        return state.watermark is not None and bool(state.temporary)

    run_and_kill(code, writing)
    assert list(tmp_path.glob("*/*/.*.tmp"))
    assert _globbed_rows(tmp_path) >= read_dataset(str(tmp_path)).num_rows > 0
    export_parquet(dsn, str(tmp_path), progress=False)
    assert _globbed_rows(tmp_path) == len(changes_rows(dsn))


def test_the_identity_record_names_the_source(dsn: str, database: str, tmp_path: Path) -> None:
    fill(dsn, 5)
    export_parquet(dsn, str(tmp_path), progress=False)
    import json

    record = json.loads((tmp_path / "_bemi_tt" / "dataset.json").read_text())
    with psycopg.connect(dsn) as conn:
        system = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
    assert record["database"] == database and record["table"] == "public.changes"
    assert system is not None and record["system_identifier"] == system[0]
    assert os.path.getsize(tmp_path / "_bemi_tt" / "dataset.json") < 1000
