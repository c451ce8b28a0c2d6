"""Retention for an export directory: ``prune(DIR, before=TS)`` folds the directory's history before TS into
a baseline; every later as_of stays exact (the oracle: copies of the live tables read at each instant, and
the database pruned at the same TS), earlier ones raise; verify, the next export, erasures and compaction
keep working. Real PostgreSQL with the worker (the workload of tests/test_prune.py). The tests marked with
the ``fmt`` parameter run on a Parquet and on a Delta export (``format="delta"``)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from test_prune import TABLES, _answer, _live, _now, _step, workload

import bemi_tt
from capture.compact import compact
from capture.erase import erase_export
from capture.errors import ConfigurationError
from capture.export import export_parquet
from capture.export.dataset import read_dataset, read_dataset_state, resolve_directory
from capture.export.delta import compact_delta, delta_watermark, open_delta_table, read_delta
from capture.prune import export_horizon, prune_changes
from capture.verify import verify_export
from capture.worker import run as capture

History = list[tuple[datetime, dict[str, list[tuple[Any, ...]]]]]
#: every column but ``id`` (the database numbers the baseline rows it inserts; an export has none for them)
COMPARED = ["primary_key", "table", "operation", "before", "after", "context", "committed_at", "schema",
            "database", "transaction_id", "position", "commit_position", "ordinal", "context_verified",
            "row_digest", "chain_hash", "before_primary_key"]


@pytest.fixture
def history(engine: sa.Engine, dsn: str) -> History:
    return workload(engine, dsn)


FORMATS = pytest.mark.parametrize("fmt", ["parquet", "delta"])


def _export(dsn: str, directory: Path, fmt: str, **options: Any) -> Any:
    return export_parquet(dsn, str(directory), format=fmt, progress=False, **options)


def _is_delta(directory: Path) -> bool:
    return (directory / "_delta_log").is_dir()


def _watermark(directory: Path) -> Any:
    if _is_delta(directory):
        return delta_watermark(open_delta_table(str(directory)))
    return read_dataset_state(*resolve_directory(str(directory))).watermark


def _compact(directory: Path) -> None:
    if _is_delta(directory):
        compact_delta(str(directory))
    else:
        compact(str(directory))


def _directory_rows(directory: Path) -> list[tuple[Any, ...]]:
    table = read_delta(str(directory)) if _is_delta(directory) else read_dataset(str(directory))
    data = {c: table[c].to_pylist() for c in COMPARED}
    return list(zip(*data.values(), strict=True))


def _database_rows(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TimeZone TO 'UTC'")
        columns = ", ".join(f'"{c}"' + ("::text" if c in ("before", "after", "context") else "")
                            for c in COMPARED)
        query = f"SELECT {columns} FROM changes ORDER BY commit_position, ordinal"
        return [tuple(r) for r in conn.execute(query)]


def _same_json(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> None:
    """Rows equal, JSON columns compared as values (jsonb prints its own spacing)."""
    import json

    def norm(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        return [tuple(json.loads(v) if COMPARED[i] in ("before", "after", "context") else v
                      for i, v in enumerate(r)) for r in rows]

    assert norm(a) == norm(b)


def _check(directory: Path, dsn: str, instants: History) -> None:
    for ts, live in instants:
        for table in TABLES:
            assert _answer(table, ts, str(directory)) == live[table], (table, ts)
            assert _answer(table, ts, dsn) == live[table], (table, ts)


@FORMATS
def test_prune_of_an_export_keeps_every_later_as_of_exact_equals_the_database_prune_and_refuses_earlier(
    engine: sa.Engine, dsn: str, history: History, tmp_path: Path, fmt: str
) -> None:
    directory = tmp_path / "export"
    _export(dsn, directory, fmt, batch_rows=3)  # many units, some straddle the cut
    cut_at = history[4][0]  # after the ALTER: rows older than it take the fill
    pruned = bemi_tt.prune(directory, before=cut_at)
    assert pruned.horizon is not None and pruned.folded > 0 and "pruned the export" in str(pruned)
    prune_changes(dsn, before=cut_at)  # the database pruned at the same instant: the same rows, hashes too
    _same_json(_directory_rows(directory), _database_rows(dsn))
    _check(directory, dsn, history[4:])
    for ts, _ in history[:4]:
        with pytest.raises(ConfigurationError, match=cut_at.isoformat().replace("+", r"\+")):
            bemi_tt.as_of("users", ts, source=str(directory))
    with pytest.raises(ConfigurationError, match="before the history"):
        bemi_tt.diff("users", history[1][0], history[5][0], source=str(directory))
    verified = verify_export(str(directory))
    assert verified.horizon is not None and "was pruned" in str(verified)
    assert verified == len(_database_rows(dsn))  # every row read and chained, the baseline too
    assert not list(tmp_path.glob(".export.prune-*"))  # the old tree is gone

    # the worker and the export carry on into the pruned directory: no duplicate, no gap
    with bemi_tt.context(step="after"), engine.begin() as conn:
        conn.execute(sa.text("UPDATE users SET age = 99 WHERE id = 4"))
        conn.execute(sa.text("DELETE FROM log"))
    later = (_now(engine), _live(engine))
    capture(dsn, once=True)
    _export(dsn, directory, fmt, batch_rows=3)
    _same_json(_directory_rows(directory), _database_rows(dsn))
    assert verify_export(str(directory)) == len(_database_rows(dsn))

    # a second prune, of both: still the same rows, every later instant exact
    second = history[5][0]
    assert bemi_tt.prune(str(directory), before=second).horizon is not None
    prune_changes(dsn, before=second)
    _same_json(_directory_rows(directory), _database_rows(dsn))
    _check(directory, dsn, [*history[5:], later])
    assert verify_export(str(directory)).horizon == export_horizon(str(directory))
    _compact(directory)  # compaction of the pruned export: still the same rows, every later instant exact
    _same_json(_directory_rows(directory), _database_rows(dsn))
    _check(directory, dsn, [*history[5:], later])
    assert verify_export(str(directory)) == len(_database_rows(dsn))
    assert bemi_tt.prune(directory, before=second).horizon is None  # again: nothing to do
    assert bemi_tt.prune(directory, before=history[2][0]).horizon is None  # earlier: nothing to do


@FORMATS
def test_the_next_export_into_a_pruned_directory_continues_from_its_watermark(
    engine: sa.Engine, dsn: str, history: History, tmp_path: Path, fmt: str
) -> None:
    directory = tmp_path / "export"
    _export(dsn, directory, fmt, batch_rows=4)
    cut_at = history[3][0]
    watermark = _watermark(directory)
    bemi_tt.prune(directory, before=cut_at)
    assert _watermark(directory) == watermark
    _step(engine, "INSERT INTO users VALUES (8, 'Gus', 1, 2)", "INSERT INTO log VALUES ('four')")
    now = (_now(engine), _live(engine))
    capture(dsn, once=True)  # the database keeps its whole history: only the directory was pruned
    stats = _export(dsn, directory, fmt, batch_rows=4)
    assert stats.changes == 2  # exactly the two new rows
    horizon = export_horizon(str(directory))
    assert horizon is not None
    position = COMPARED.index("commit_position")
    rows = _directory_rows(directory)
    baseline = [r for r in rows if r[position] < horizon.position]
    assert len(baseline) == horizon.rows and {r[position] for r in baseline} == {horizon.position - 1}
    _same_json([r for r in rows if r[position] >= horizon.position],
               [r for r in _database_rows(dsn) if r[position] >= horizon.position])
    for ts, live in [*history[3:], now]:
        for table in TABLES:
            assert _answer(table, ts, str(directory)) == live[table], (table, ts)
    assert verify_export(str(directory)) == len(rows)
    _compact(directory)  # compaction merges the baseline files with later ones: still exact
    for ts, live in [*history[3:], now]:
        for table in TABLES:
            assert _answer(table, ts, str(directory)) == live[table], (table, ts)
    assert verify_export(str(directory)) == len(rows)


def test_erasures_stay_applied_through_a_prune_and_reach_the_baseline_after_it(
    dsn: str, history: History, tmp_path: Path
) -> None:
    directory = tmp_path / "export"
    export_parquet(dsn, str(directory), progress=False)
    erase_export(str(directory), table="users", key=1)  # before the prune: the baseline keeps NULLs
    erase_export(str(directory), table="users", key=4)  # key 4 is created after the cut: kept rows
    cut_at = history[5][0]
    bemi_tt.prune(directory, before=cut_at)
    verify_export(str(directory))
    frame = bemi_tt.as_of("users", cut_at, source=str(directory))
    assert frame.loc[1].isna().all() and frame.loc[4].isna().all()
    assert frame.loc[20, "name"] == "Bob"
    erase_export(str(directory), table="users", key=20)  # after the prune: its baseline row is erased too
    frame = bemi_tt.as_of("users", cut_at, source=str(directory))
    assert frame.loc[20].isna().all()
    assert verify_export(str(directory)).erased >= 1
    record = (directory / "_bemi_tt" / "erasures.json").read_text()
    horizon = export_horizon(str(directory))
    assert horizon is not None
    assert all(int(k.split("/")[0]) >= horizon.position - 1 for k in __import__("json").loads(record)["rows"])


@FORMATS
def test_pruning_everything_keeps_the_newest_transaction_and_the_export_continues(
    engine: sa.Engine, dsn: str, history: History, tmp_path: Path, fmt: str
) -> None:
    directory = tmp_path / "export"
    _export(dsn, directory, fmt, batch_rows=5)
    now = _now(engine)
    pruned = bemi_tt.prune(str(directory), before=now)
    assert pruned.horizon is not None
    for table in TABLES:
        assert _answer(table, now, str(directory)) == history[-1][1][table]
    verify_export(str(directory))
    _step(engine, "INSERT INTO users VALUES (6, 'Flo', 20, 0)")
    capture(dsn, once=True)
    assert _export(dsn, directory, fmt).changes == 1
    verify_export(str(directory))
    assert _answer("users", _now(engine), str(directory)) == _live(engine)["users"]


@FORMATS
def test_a_running_export_holds_the_prune_off(dsn: str, history: History, tmp_path: Path, fmt: str) -> None:
    from capture.errors import SourceError
    from capture.export.lock import open_lock

    directory = tmp_path / "export"
    _export(dsn, directory, fmt)
    filesystem, root = resolve_directory(str(directory))
    files = sorted(p.name for p in directory.rglob("*.parquet"))
    with open_lock(str(directory), filesystem, root) as held:
        held.acquire(0)
        with pytest.raises(SourceError, match="another export or compaction is running"):
            bemi_tt.prune(directory, before=history[3][0])
    assert sorted(p.name for p in directory.rglob("*.parquet")) == files


# -- bad arguments --------------------------------------------------------------------------------------


@pytest.fixture
def exported(dsn: str, history: History, tmp_path: Path) -> Path:
    directory = tmp_path / "export"
    export_parquet(dsn, str(directory), progress=False)
    return directory


@pytest.mark.parametrize(("before", "message"), [
    ("2026-01-01T00:00:00", "no time zone"),
    (datetime(2026, 1, 1), "no time zone"),
    ("2026-01-01", "no time zone"),
    ("yesterday-ish", "not an ISO 8601 time"),
    (12, "is not a time"),
    (datetime.now(timezone.utc) + timedelta(days=1), "is in the future"),
])
def test_prune_names_a_bad_time(exported: Path, before: object, message: str) -> None:
    files = sorted(p.name for p in exported.rglob("*.parquet"))
    with pytest.raises(ConfigurationError, match=message) as caught:
        bemi_tt.prune(exported, before=before)
    shown = before.isoformat() if isinstance(before, datetime) and before.tzinfo else repr(before)
    assert f"before={shown}" in str(caught.value)
    assert sorted(p.name for p in exported.rglob("*.parquet")) == files


def test_prune_names_a_target_that_is_not_an_export_directory(tmp_path: Path) -> None:
    when = "2026-01-01T00:00:00Z"
    missing = tmp_path / "missing"
    with pytest.raises(ConfigurationError, match=f"{missing}.*does not exist"):
        bemi_tt.prune(str(missing), before=when)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello")
    with pytest.raises(ConfigurationError, match=f"{a_file}.*is a file"):
        bemi_tt.prune(a_file, before=when)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigurationError, match=f"{empty}.*is not a bemi_tt export"):
        bemi_tt.prune(empty, before=when)
    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    (other / "data" / "x.csv").write_text("a,b\n")
    with pytest.raises(ConfigurationError, match="not part of a bemi_tt export"):
        bemi_tt.prune(other, before=when)
    delta = tmp_path / "delta"
    (delta / "_delta_log").mkdir(parents=True)
    with pytest.raises(ConfigurationError, match=r"holds no Delta table: run `bemi-tt export --format"):
        bemi_tt.prune(delta, before=when)
    with pytest.raises(ConfigurationError, match="local export directories only"):
        bemi_tt.prune("s3://bucket/prefix?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1",
                      before=when)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_cli_prune_of_a_directory(exported: Path, history: History, capsys: pytest.CaptureFixture[str]
                                  ) -> None:
    from bemi_tt.cli import main

    assert main(["prune", str(exported), "--before", history[3][0].isoformat()]) == 0
    assert "pruned the export" in capsys.readouterr().out
    assert export_horizon(str(exported)) is not None
    assert main(["prune", str(exported), "--before", "2026-01-01T00:00:00"]) == 2
    assert "no time zone" in capsys.readouterr().err
    assert main(["prune", str(exported), "--dsn", "postgresql://x@/y", "--before", "now"]) == 2
    assert "either" in capsys.readouterr().err
    assert main(["prune", str(exported / "nope"), "--before", "now"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_pruned_export_is_a_valid_layout(dsn: str, history: History, tmp_path: Path) -> None:
    """Only compacted baseline files and kept files: no superseded, temporary or foreign file; every file
    readable by a plain Parquet reader."""
    directory = tmp_path / "export"
    export_parquet(dsn, str(directory), batch_rows=2, progress=False)
    bemi_tt.prune(directory, before=history[4][0])
    state = read_dataset_state(*resolve_directory(str(directory)))
    assert not state.superseded and not state.temporary and not state.foreign and state.incomplete is None
    assert sum(pq.read_metadata(f.path).num_rows for f in state.files) == state.rows
    assert os.path.isfile(directory / "_bemi_tt" / "horizon.json")
    assert (directory / "_bemi_tt" / "lock").exists()


def test_a_directory_pruned_later_than_the_database_keeps_its_own_horizon_through_the_next_export(
    engine: sa.Engine, dsn: str, history: History, tmp_path: Path
) -> None:
    prune_changes(dsn, before=history[2][0])
    directory = tmp_path / "export"
    export_parquet(dsn, str(directory), progress=False)  # starts at the database's baseline, gets its horizon
    bemi_tt.prune(directory, before=history[4][0])
    own = export_horizon(str(directory))
    assert own is not None and own.before == history[4][0]
    _step(engine, "INSERT INTO tags VALUES (7, 'g')")
    capture(dsn, once=True)
    export_parquet(dsn, str(directory), progress=False)
    assert export_horizon(str(directory)) == own
    verify_export(str(directory))
    for table in TABLES:
        assert _answer(table, history[5][0], str(directory)) == history[5][1][table]


def test_an_erasure_in_the_database_reaches_the_baseline_of_a_directory_pruned_by_itself(
    engine: sa.Engine, dsn: str, history: History, tmp_path: Path
) -> None:
    from capture.erase import erase_changes

    directory = tmp_path / "export"
    export_parquet(dsn, str(directory), progress=False)
    cut_at = history[5][0]
    bemi_tt.prune(directory, before=cut_at)  # users 1, 20 and 4 now live in the baseline rows only
    erase_changes(dsn, table="users", key=20)
    erase_changes(dsn, table="users", key=4, what=("context",))  # the values stay
    _step(engine, "INSERT INTO tags VALUES (8, 'h')")
    capture(dsn, once=True)
    export_parquet(dsn, str(directory), progress=False)
    frame = bemi_tt.as_of("users", cut_at, source=str(directory))
    assert frame.loc[20].isna().all()
    assert frame.loc[4, "name"] == "Di" and frame.loc[1, "name"] == "Anne"
    # the baseline rows of 20 and 4, and the kept DELETE of 20 (reached by its key, as ever)
    assert verify_export(str(directory)).erased == 3
    export_parquet(dsn, str(directory), progress=False)  # again: nothing more to erase
    assert verify_export(str(directory)).erased == 3
