"""Parquet export: incremental and exact, partitioned, typed for every reader, locked, with progress."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path
from urllib.parse import unquote

import duckdb
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from export_rows import changes_rows, dataset_rows, fill, more

from capture.errors import ConfigurationError, SourceError
from capture.export import export_parquet
from capture.export.dataset import list_dataset_files, read_dataset, resolve_directory
from capture.export.lock import open_lock


@pytest.fixture
def filled(dsn: str) -> list[tuple]:
    return fill(dsn, 1500)


def test_export_then_more_changes_then_export_again_equals_changes_row_by_row(
    dsn: str, filled: list[tuple], tmp_path: Path
) -> None:
    first = export_parquet(dsn, str(tmp_path), batch_rows=400, progress=False)
    assert first.changes == len(filled)
    assert dataset_rows(read_dataset(str(tmp_path))) == changes_rows(dsn)

    added = more(dsn, filled, 700)
    second = export_parquet(dsn, str(tmp_path), batch_rows=400, progress=False)
    assert second.changes == len(added)
    assert second.watermark == (added[-1][11], added[-1][12])
    assert dataset_rows(read_dataset(str(tmp_path))) == changes_rows(dsn)

    third = export_parquet(dsn, str(tmp_path), progress=False)
    assert (third.changes, third.files, third.bytes) == (0, 0, 0)
    assert dataset_rows(read_dataset(str(tmp_path))) == changes_rows(dsn)


def test_files_are_partitioned_by_relation_and_utc_date_zstd_json_typed_and_sorted_by_key(
    dsn: str, filled: list[tuple], tmp_path: Path
) -> None:
    export_parquet(dsn, str(tmp_path), batch_rows=500, progress=False)
    _, files = list_dataset_files(str(tmp_path))
    assert files
    seen = 0
    for path in files:
        relation_dir, date_dir, _ = Path(path).relative_to(tmp_path).parts
        table = pq.read_table(path)
        seen += table.num_rows
        relations = {
            f"{s}.{t}" for s, t in zip(table["schema"].to_pylist(), table["table"].to_pylist(), strict=True)
        }
        assert {unquote(relation_dir.removeprefix("relation="))} == relations
        dates = {
            ts.astimezone(dt.timezone.utc).date().isoformat() for ts in table["committed_at"].to_pylist()
        }
        assert {date_dir.removeprefix("date=")} == dates
        keys = list(zip(table["commit_position"].to_pylist(), table["ordinal"].to_pylist(), strict=True))
        assert keys == sorted(keys)
        metadata = pq.ParquetFile(path).metadata
        for group in range(metadata.num_row_groups):
            for column in range(metadata.num_columns):
                assert metadata.row_group(group).column(column).compression == "ZSTD"
        parquet_schema = str(metadata.schema)
        for name in ("before", "after", "context"):
            assert f"{name} (JSON)" in parquet_schema
        assert "isAdjustedToUTC=true, timeUnit=microseconds" in parquet_schema
    assert seen == len(filled)


def test_pandas_duckdb_and_pyarrow_dataset_read_the_export_with_right_types(
    dsn: str, filled: list[tuple], tmp_path: Path
) -> None:
    export_parquet(dsn, str(tmp_path), batch_rows=600, progress=False)
    expected = changes_rows(dsn)
    keys = sorted((row[12], row[13]) for row in expected)

    frame = pd.read_parquet(tmp_path)
    assert str(frame["committed_at"].dtype) == "datetime64[us, UTC]"
    assert (frame["commit_position"].dtype, frame["ordinal"].dtype, frame["id"].dtype) == (
        "int64",
        "int32",
        "int64",
    )
    assert sorted(zip(frame["commit_position"], frame["ordinal"], strict=True)) == keys
    by_key = frame.set_index(["commit_position", "ordinal"])
    for row in expected[:50]:
        got = by_key.loc[(row[12], row[13])]
        assert json.loads(got["after"]) == json.loads(row[5])
        assert got["committed_at"] == pd.Timestamp(row[7])

    con = duckdb.connect()
    source = f"read_parquet('{tmp_path / '*' / '*' / '*.parquet'}', hive_partitioning=true)"
    types = {row[0]: row[1] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    assert types["committed_at"] == "TIMESTAMP WITH TIME ZONE"
    assert (types["commit_position"], types["ordinal"], types["before"], types["date"]) == (
        "BIGINT",
        "INTEGER",
        "JSON",
        "DATE",
    )
    query = f"SELECT count(*), count(DISTINCT (commit_position, ordinal)) FROM {source}"
    assert con.execute(query).fetchone() == (len(expected), len(expected))
    query = f"SELECT count(*) FROM {source} WHERE date <> (committed_at AT TIME ZONE 'UTC')::date"
    assert con.execute(query).fetchone() == (0,)
    relations = con.execute(
        f'SELECT DISTINCT relation, "schema" || \'.\' || "table" FROM {source}'
    ).fetchall()
    assert all(unquote(relation) == name for relation, name in relations)

    dataset = pads.dataset(tmp_path, format="parquet", partitioning="hive")
    assert dataset.schema.field("committed_at").type == pa.timestamp("us", tz="UTC")
    assert dataset.schema.field("before").type == pa.json_(pa.string())
    assert dataset.schema.field("ordinal").type == pa.int32()
    assert dataset.count_rows() == len(expected)  # _bemi_tt/ is ignored


def test_schemas_table_is_exported_to_the_meta_directory_and_ignored_by_readers(
    dsn: str, tmp_path: Path
) -> None:
    rows = fill(dsn, 50)
    columns = [
        {"name": "id", "type": "bigint", "type_oid": 20, "key": True},
        {"name": "price", "type": "numeric(10,2)", "type_oid": 1700, "key": False, "fill": 1.50},
    ]
    with psycopg.connect(dsn) as conn:
        for position, cols in ((500, columns[:1]), (rows[10][11], columns)):
            conn.execute(
                'INSERT INTO changes_schemas ("schema", "table", commit_position, ordinal, committed_at,'
                " columns) VALUES ('public', 'todo', %s, 0, %s, %s::jsonb)",
                (position, dt.datetime(2026, 3, 28, tzinfo=dt.timezone.utc), json.dumps(cols)),
            )
    export_parquet(dsn, str(tmp_path), progress=False)
    schemas = pq.read_table(tmp_path / "_bemi_tt" / "schemas.pq")
    assert schemas.schema.field("columns").type == pa.json_(pa.string())
    assert schemas["commit_position"].to_pylist() == [500, rows[10][11]]
    assert [json.loads(c) for c in schemas["columns"].to_pylist()] == [columns[:1], columns]
    assert pads.dataset(tmp_path, format="parquet", partitioning="hive").count_rows() == 50


def test_schemas_file_is_empty_and_typed_when_there_is_no_schemas_table(dsn: str, tmp_path: Path) -> None:
    fill(dsn, 5)
    with psycopg.connect(dsn) as conn:
        conn.execute("DROP TABLE changes_schemas")
    export_parquet(dsn, str(tmp_path), progress=False)
    schemas = pq.read_table(tmp_path / "_bemi_tt" / "schemas.pq")
    assert schemas.num_rows == 0
    assert schemas.schema.field("committed_at").type == pa.timestamp("us", tz="UTC")


def test_rows_inserted_below_the_watermark_fail_clearly_instead_of_being_skipped(
    dsn: str, filled: list[tuple], tmp_path: Path
) -> None:
    export_parquet(dsn, str(tmp_path), progress=False)
    late = list(filled[0])
    late[12] = 99  # an ordinal no row of that transaction has
    with psycopg.connect(dsn) as conn:
        conn.execute(
            'INSERT INTO changes (primary_key, "table", operation, before, after, context, committed_at,'
            ' "schema", "database", transaction_id, "position", commit_position, ordinal)'
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            late[:13],
        )
    with pytest.raises(SourceError, match="1 rows of changes have keys at or below the export watermark"):
        export_parquet(dsn, str(tmp_path), progress=False)


def test_a_second_export_fails_clearly_while_another_holds_the_directory(
    dsn: str, filled: list[tuple], tmp_path: Path
) -> None:
    filesystem, root = resolve_directory(str(tmp_path))
    with open_lock(str(tmp_path), filesystem, root) as held:
        held.acquire(0)
        with pytest.raises(SourceError, match=r"another export or compaction is running on .*\(pid \d+"):
            export_parquet(dsn, str(tmp_path), progress=False)
    assert export_parquet(dsn, str(tmp_path), progress=False).changes == len(filled)


def test_an_export_asked_to_wait_runs_after_the_holder_finishes(
    dsn: str, filled: list[tuple], tmp_path: Path
) -> None:
    filesystem, root = resolve_directory(str(tmp_path))
    held = open_lock(str(tmp_path), filesystem, root)
    held.acquire(0)
    timer = threading.Timer(0.5, held.release)
    timer.start()
    try:
        assert export_parquet(dsn, str(tmp_path), progress=False, wait=60).changes == len(filled)
    finally:
        timer.join()
    assert dataset_rows(read_dataset(str(tmp_path))) == changes_rows(dsn)


def test_progress_shows_a_bar_and_the_final_line_on_stderr(
    dsn: str, filled: list[tuple], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stats = export_parquet(dsn, str(tmp_path), batch_rows=500, progress=True)
    err = capsys.readouterr().err
    assert f"{len(filled)}/{len(filled)} changes" in err
    assert err.endswith(f"exported {len(filled)} changes in {stats.files} files ({stats.bytes} bytes)\n")


def test_quiet_export_writes_nothing_to_the_terminal(
    dsn: str, filled: list[tuple], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export_parquet(dsn, str(tmp_path), progress=False)
    assert capsys.readouterr() == ("", "")


def test_a_sqlalchemy_url_is_accepted_as_source(pg_server, database: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dsn = pg_server.dsn(database)
    fill(dsn, 20)
    url = pg_server.sqlalchemy_url(database).render_as_string(hide_password=False)
    assert url.startswith("postgresql+psycopg://")
    assert export_parquet(url, str(tmp_path), progress=False).changes == 20


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"directory": ""}, "export directory must be", id="empty-directory"),
        pytest.param({"source_dsn": ""}, "source_dsn must be", id="empty-dsn"),
        pytest.param({"progress": "yes"}, "progress must be", id="progress-not-bool"),
        pytest.param({"batch_rows": 0}, "batch_rows must be a positive integer, got 0", id="batch-zero"),
        pytest.param({"wait": -1}, "wait must be a number of seconds", id="negative-wait"),
        pytest.param({"table": ""}, "table must be a non-empty identifier", id="empty-table"),
        pytest.param(
            {"directory": "nosuchfs://x/y"}, "cannot open export directory", id="unknown-filesystem"
        ),
    ],
)
def test_bad_arguments_raise_configuration_error_naming_the_value(
    kwargs: dict[str, object], message: str, tmp_path: Path
) -> None:
    arguments: dict[str, object] = {"source_dsn": "dbname=x", "directory": str(tmp_path), **kwargs}
    with pytest.raises(ConfigurationError, match=message):
        export_parquet(**arguments)  # type: ignore[arg-type]


def test_an_unreachable_database_raises_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot connect to the source database"):
        export_parquet(
            "host=/nonexistent-socket-dir dbname=x connect_timeout=2", str(tmp_path), progress=False
        )


def test_a_missing_changes_table_raises_configuration_error_naming_it(dsn: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"table public\.changes does not exist in the source"):
        export_parquet(dsn, str(tmp_path), progress=False)


def test_a_file_uri_directory_works_like_a_local_path(dsn: str, tmp_path: Path) -> None:
    fill(dsn, 40)
    assert export_parquet(dsn, tmp_path.as_uri(), progress=False).changes == 40
    assert dataset_rows(read_dataset(str(tmp_path))) == changes_rows(dsn)
    assert export_parquet(dsn, str(tmp_path), progress=False).changes == 0


def test_read_dataset_reads_chosen_columns_and_rejects_unknown_ones(
    dsn: str, filled: list[tuple], tmp_path: Path
) -> None:
    export_parquet(dsn, str(tmp_path), progress=False)
    table = read_dataset(str(tmp_path), columns=["table", "after"])
    assert table.column_names == ["table", "after"]
    assert table["after"].to_pylist() == [row[5] for row in changes_rows(dsn)]
    with pytest.raises(ConfigurationError, match=r"unknown columns \['nope'\]"):
        read_dataset(str(tmp_path), columns=["nope"])
