"""Where changes are read from: connect(), BEMI_TT_SOURCE, URLs, conninfo, engines, Parquet (local, S3)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psycopg
import pytest
import sqlalchemy as sa
from timetravel_history import TODO_COLUMNS, History
from timetravel_sources import export_source, write_changes

from bemi_tt.sources import (
    SOURCE_ENV,
    InMemorySource,
    ParquetSource,
    PostgresSource,
    as_source,
    connect,
    get_source,
)
from bemi_tt.timetravel import as_of
from capture.errors import ConfigurationError, SourceError


def _history() -> History:
    h = History()
    h.columns("todo", TODO_COLUMNS)
    h.create("todo", "1", {"id": 1, "task": "Sleep", "done": False, "price": None, "due": None})
    h.create("todo", "2", {"id": 2, "task": "Eat", "done": True, "price": None, "due": None})
    return h


@pytest.fixture
def no_default(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(SOURCE_ENV, raising=False)
    connect(None)
    yield
    connect(None)


def test_connect_sets_the_default_source_of_every_function(no_default: None, dsn: str) -> None:
    h = _history()
    write_changes(dsn, h.changes, h.schemas)
    source = connect(dsn)
    assert isinstance(source, PostgresSource)
    assert list(as_of("todo", h.clock).index) == [1, 2]


def test_bemi_tt_source_environment_variable_is_the_fallback(
    no_default: None, dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = _history()
    write_changes(dsn, h.changes, h.schemas)
    export_source(dsn, tmp_path / "export")
    monkeypatch.setenv(SOURCE_ENV, str(tmp_path / "export"))
    assert isinstance(get_source(), ParquetSource)
    assert list(as_of("todo", h.clock)["task"]) == ["Sleep", "Eat"]


def test_no_source_at_all_says_how_to_set_one(no_default: None) -> None:
    with pytest.raises(ConfigurationError, match=r"bemi_tt\.connect.*BEMI_TT_SOURCE"):
        as_of("todo", "2026-01-01")


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("postgresql://user@localhost/app", id="url"),
        pytest.param("postgresql+psycopg://user@localhost/app", id="sqlalchemy-url"),
        pytest.param("host=/tmp dbname=app", id="conninfo"),
    ],
)
def test_postgresql_urls_and_conninfo_strings_make_a_postgres_source(text: str) -> None:
    source = as_source(text)
    assert isinstance(source, PostgresSource) and "+psycopg" not in source.dsn


def test_a_sqlalchemy_engine_is_a_source(engine: sa.Engine, dsn: str) -> None:
    h = _history()
    write_changes(dsn, h.changes, h.schemas)
    assert list(as_of("todo", h.clock, source=engine)["task"]) == ["Sleep", "Eat"]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("", id="empty"),
        pytest.param(42, id="number"),
        pytest.param("no-such-directory", id="missing-dir"),
    ],
)
def test_unusable_sources_are_clear_errors(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="source"):
        as_source(bad)


def test_missing_export_directory_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        ParquetSource(tmp_path / "nope")


def test_database_without_changes_table_says_to_run_the_worker(dsn: str) -> None:
    with pytest.raises(SourceError, match=r"no public\.changes table: run the capture worker"):
        as_of("todo", "2026-01-01", source=dsn)


def test_in_memory_source_rejects_rows_it_cannot_hold() -> None:
    with pytest.raises(ConfigurationError, match="operation 'MERGE'"):
        InMemorySource(
            [{"table": "t", "operation": "MERGE", "committed_at": "2026-01-01", "commit_position": 1}]
        )
    with pytest.raises(ConfigurationError, match="unknown columns"):
        InMemorySource(
            [
                {
                    "table": "t",
                    "operation": "CREATE",
                    "committed_at": "2026-01-01",
                    "commit_position": 1,
                    "colour": "red",
                }
            ]
        )


def test_parquet_export_in_s3_reads_like_the_local_one(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_module = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    h = _history()
    write_changes(dsn, h.changes, h.schemas)
    local = export_source(dsn, tmp_path / "export")
    server = server_module.ThreadedMotoServer(port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        uri = (
            f"s3://bucket/export?endpoint_override=http://{host}:{port}&scheme=http&region=us-east-1"
            "&allow_bucket_creation=true"
        )
        s3, _ = pafs.FileSystem.from_uri(uri)
        s3.create_dir("bucket")
        pafs.copy_files(str(tmp_path / "export"), "bucket/export", destination_filesystem=s3)
        remote = as_source(uri)
        assert isinstance(remote, ParquetSource)
        pd.testing.assert_frame_equal(
            as_of("todo", h.clock, source=remote), as_of("todo", h.clock, source=local)
        )
    finally:
        server.stop()


def test_postgres_source_reads_a_changes_table_in_another_schema(dsn: str) -> None:
    h = _history()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA audit")
    from bemi_tt.sources import InMemorySource as Memory
    from capture.schema import changes_ddl, schemas_ddl

    rows = Memory(h.changes).changes.to_pylist()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(changes_ddl("audit"))
        conn.execute(schemas_ddl("audit"))
        for r in rows:
            conn.execute(
                'INSERT INTO audit.changes (primary_key, "table", operation, after, committed_at, "schema", '
                '"database", "position", commit_position, ordinal) VALUES (%s, %s, %s, %s::jsonb, %s, %s, '
                "%s, %s, %s, %s)",
                [
                    r["primary_key"],
                    r["table"],
                    r["operation"],
                    r["after"],
                    r["committed_at"],
                    r["schema"],
                    r["database"],
                    r["position"],
                    r["commit_position"],
                    r["ordinal"],
                ],
            )
    frame = as_of("todo", h.clock, source=PostgresSource(dsn, schema="audit"))
    assert sorted(frame["task"]) == ["Eat", "Sleep"]


def test_mirrored_postgres_source_matches_and_reads_only_new_changes(dsn: str) -> None:
    h = _history()
    write_changes(dsn, h.changes, h.schemas)
    plain, mirrored = PostgresSource(dsn), PostgresSource(dsn, mirror=True)
    expected = as_of("todo", h.clock, source=plain)
    pd.testing.assert_frame_equal(as_of("todo", h.clock, source=mirrored), expected)
    first = len(h.changes)
    h.update("todo", "1", {}, {"id": 1, "task": "Later", "done": True, "price": None, "due": None})
    write_changes(dsn, h.changes[first:])
    assert as_of("todo", h.clock, source=mirrored).loc[1, "task"] == "Later"
    assert mirrored.mirrored(("public", "todo")).num_rows == len(h.changes)


def test_parquet_source_tells_apart_tables_whose_qualified_names_share_a_partition(
    dsn: str, tmp_path: Path
) -> None:
    h = History()
    h.create("c", "1", {"id": 1, "v": "schema a.b, table c"}, schema="a.b")
    h.create("b.c", "1", {"id": 1, "v": "schema a, table b.c"}, schema="a")
    write_changes(dsn, h.changes)
    source = export_source(dsn, tmp_path / "export")
    assert source.tables() == [("a", "b.c"), ("a.b", "c")]
    assert list(as_of('a."b.c"', h.clock, source=source)["v"]) == ["schema a, table b.c"]
    assert list(as_of('"a.b".c', h.clock, source=source)["v"]) == ["schema a.b, table c"]
    with pytest.raises(
        ConfigurationError, match=r"'a\.b\.c' is ambiguous: it names a\.\"b\.c\", \"a\.b\"\.c"
    ):
        as_of("a.b.c", h.clock, source=source)
    assert list(as_of("c", h.clock, source=source)["v"]) == ["schema a.b, table c"]


def _many_rows() -> History:
    """30 rows, each updated; row 7 renumbered to 70 and back-filled by a TRUNCATE-free history."""
    h = History()
    h.columns("todo", TODO_COLUMNS)
    rows = {k: {"id": k, "task": f"t{k}", "done": False, "price": None, "due": None} for k in range(1, 31)}
    for k, row in rows.items():
        h.create("todo", str(k), row)
    for k, row in rows.items():
        h.update("todo", str(k), row, {**row, "task": f"u{k}"})
    h.update("todo", "70", {**rows[7], "task": "u7"}, {**rows[7], "id": 70, "task": "u7"})
    return h


def test_postgres_key_lookups_and_diff_read_only_the_changes_that_decide_their_keys(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Push-down: as_of(key=), history, blame(key) and diff fetch the rows of their keys (and of the keys
    those moved from or to), not the table's whole history."""
    from bemi_tt.timetravel import blame, diff, history

    h = _many_rows()
    write_changes(dsn, h.changes, h.schemas)
    source = PostgresSource(dsn)
    fetched: list[int] = []
    fetch = PostgresSource.fetch

    def counting(self: PostgresSource, scope: object) -> object:
        table = fetch(self, scope)  # type: ignore[arg-type]
        fetched.append(table.num_rows)
        return table

    monkeypatch.setattr(PostgresSource, "fetch", counting)
    whole_table: list[str] = []  # the paths that read every key's last change
    for method in ("winners", "latest"):
        original = getattr(PostgresSource, method)

        def recording(*args: object, _m: str = method, _o: object = original, **kwargs: object) -> object:
            whole_table.append(_m)
            return _o(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(PostgresSource, method, recording)
    assert list(as_of("todo", h.clock, key=3, source=source)["task"]) == ["u3"]
    assert whole_table == [] and fetched == [2]  # key 3's CREATE and UPDATE
    fetched.clear()
    assert list(history("todo", 70, source=source)["id"]) == [7, 7, 70]
    assert max(fetched) == 3  # keys 7 and 70: three changes
    fetched.clear()
    assert set(blame("todo", 70, source=source)["value"]) >= {"u7"}
    assert max(fetched) == 3
    fetched.clear()
    step = diff("todo", h.changes[-2]["committed_at"], h.clock, source=source)
    assert set(step.index.get_level_values("id")) == {7, 70}
    assert whole_table == [] and max(fetched) <= 3  # the step touched keys 7 and 70 only


def test_a_postgres_source_reuses_an_idle_connection_and_never_one_left_busy(dsn: str) -> None:
    from bemi_tt.sources import PostgresSource

    source = PostgresSource(dsn)
    with source._connect() as conn:
        first = conn.info.backend_pid
    with source._connect() as conn:  # reused: a key lookup does not pay for connecting again
        assert conn.info.backend_pid == first
        conn.execute("BEGIN")  # left inside a transaction: closed, never handed out again
    with source._connect() as conn:
        assert conn.info.backend_pid != first
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        second = conn.info.backend_pid
    with pytest.raises(ZeroDivisionError), source._connect() as conn:
        assert conn.info.backend_pid == second
        raise ZeroDivisionError  # a block that failed: its connection is closed
    assert conn.closed
    with source._connect() as conn:
        assert conn.info.backend_pid not in (first, second)
    source.close()  # closes the idle ones
    assert conn.closed
