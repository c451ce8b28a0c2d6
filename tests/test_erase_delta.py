"""Erasure in a Delta export (``format="delta"``): the values leave every file under the directory, old
versions' files included, ``as_of`` shows the erased marker as the Parquet export does, nothing else changes
and ``verify`` passes; an erasure recorded in PostgreSQL reaches the Delta export at its next run; a kill
during the erasure leaves the old or the new state. Real PostgreSQL, the worker and deltalake (the story of
tests/test_erase.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from deltalake import DeltaTable
from test_erase import story

sys.path.insert(0, str(Path(__file__).parent / "capture"))  # the moto S3 server fixtures live there
from test_export_s3 import bucket, s3_endpoint

import bemi_tt
from capture.erase import ERASED_MARKER
from capture.errors import ConfigurationError
from capture.export import export_parquet
from capture.export.delta import read_delta
from capture.verify import verify_export

__all__ = ["bucket", "s3_endpoint", "story"]


def _export(dsn: str, directory: Path, **options: object) -> None:
    export_parquet(dsn, str(directory), format="delta", progress=False, **options)  # type: ignore[arg-type]


def _bytes_under(directory: Path) -> bytes:
    """Every data file's raw bytes and decoded JSON columns (zstd hides the text from a byte grep)."""
    import pyarrow.parquet as pq

    out = []
    for path in directory.rglob("*.parquet"):
        out.append(path.read_bytes())
        if "_delta_log" not in path.parts:
            table = pq.read_table(path)
            for column in ("before", "after", "context"):
                out.append("".join(str(v) for v in table.column(column).to_pylist()).encode())
    return b"\n".join(out)


def _rows(directory: Path) -> list[dict[str, object]]:
    return read_delta(str(directory)).to_pylist()  # type: ignore[no-any-return]


def _states(source: str, times: list[datetime]) -> list[object]:
    return [bemi_tt.as_of("users", t, source=source) for t in times]


def test_erase_a_key_in_a_delta_export_removes_its_values_from_every_file_and_nothing_else_changes(
    dsn: str, story: list[datetime], tmp_path: Path
) -> None:
    delta, parquet = tmp_path / "delta", tmp_path / "parquet"
    _export(dsn, delta, batch_rows=2, compact=True)  # optimize leaves older versions' files on disk
    export_parquet(dsn, str(parquet), progress=False)
    assert b"ann@" in _bytes_under(delta)
    old = _rows(delta)
    version = DeltaTable(str(delta)).version()

    erasure = bemi_tt.erase(delta, table="users", key=1)
    bemi_tt.erase(parquet, table="users", key=1)
    assert erasure.rows == 3
    assert b"ann@" not in _bytes_under(delta) and b"Ann" not in _bytes_under(delta)
    table = DeltaTable(str(delta))
    assert table.version() == version + 1 and table.history(1)[0]["bemi_tt.operation"] == "erase"
    assert set(table.file_uris()) == {str(p) for p in delta.rglob("*.parquet") if "_delta_log" not in p.parts}
    new = _rows(delta)
    assert len(new) == len(old)
    for before, after in zip(old, new, strict=True):
        if before["primary_key"] != "1":
            assert after == before
        else:
            assert {k: v for k, v in after.items() if k not in ("before", "after", "context")} == {
                k: v for k, v in before.items() if k not in ("before", "after", "context")}
            assert ERASED_MARKER in str(after["context"])
    pairs = zip(_states(str(delta), story), _states(str(parquet), story), strict=True)
    for from_delta, from_parquet in pairs:
        assert from_delta.equals(from_parquet)  # type: ignore[attr-defined]
        assert from_delta.loc[1].isna().all()  # type: ignore[attr-defined]
    assert verify_export(str(delta)).erased == 3
    assert not list(tmp_path.glob(".delta.prune-*"))


def _normalized(rows: list[dict[str, object]], ids: dict[str, str]) -> list[tuple[object, ...]]:
    """The JSON columns of each row, each erasure id replaced by its label."""
    out = []
    for row in rows:
        texts = [str(row[c]) for c in ("before", "after", "context")]
        for ident, label in ids.items():
            texts = [t.replace(ident, label) for t in texts]
        out.append((row["commit_position"], row["ordinal"], *texts))
    return out


def test_erase_by_context_in_a_delta_export_and_with_the_cli_is_exactly_the_parquet_exports_erasure(
    dsn: str, story: list[datetime], tmp_path: Path
) -> None:
    from capture.export.dataset import read_dataset

    delta, parquet = tmp_path / "delta", tmp_path / "parquet"
    _export(dsn, delta)
    export_parquet(dsn, str(parquet), progress=False)
    seven = [bemi_tt.erase(d, context={"user_id": 7}) for d in (delta, parquet)]
    assert [e.rows for e in seven] == [2, 2]  # user 7's UPDATE of user 1 and INSERT of user 2
    assert b"ann@private" in _bytes_under(delta)  # still in the before image of user 8's later UPDATE
    assert b"bob@" in _bytes_under(delta)  # and in the DELETE's (no context: not selected)
    eight = []
    for directory in (delta, parquet):
        result = subprocess.run(
            [sys.executable, "-m", "bemi_tt.cli", "erase", str(directory), "--context", "user_id=8"],
            capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        assert "erased 2 changes" in result.stdout
        eight.append(result.stdout.rsplit("(erasure ", 1)[1].split(")")[0])
    assert b"cy@" not in _bytes_under(delta) and b"ann@private" not in _bytes_under(delta)
    labels = [{seven[i].id: "seven", eight[i]: "eight"} for i in (0, 1)]
    assert _normalized(_rows(delta), labels[0]) == _normalized(
        read_dataset(str(parquet)).to_pylist(), labels[1])
    pairs = zip(_states(str(delta), story), _states(str(parquet), story), strict=True)
    for from_delta, from_parquet in pairs:
        assert from_delta.equals(from_parquet)  # type: ignore[attr-defined]
    assert verify_export(str(delta)).erased == verify_export(str(parquet)).erased == 4


def test_an_erasure_recorded_in_postgresql_reaches_an_existing_delta_export_on_its_next_run(
    dsn: str, story: list[datetime], tmp_path: Path
) -> None:
    import psycopg

    delta = tmp_path / "delta"
    _export(dsn, delta, batch_rows=2, compact=True)  # optimize leaves older versions' files on disk
    bemi_tt.erase(dsn, context={"user_id": 7})
    with psycopg.connect(dsn) as conn:
        in_pg = [tuple(r) for r in conn.execute(
            "SELECT commit_position, ordinal, before::text, after::text, context::text FROM changes"
            " ORDER BY commit_position, ordinal").fetchall()]
    assert _normalized(_rows(delta), {}) != in_pg
    _export(dsn, delta)  # nothing new: the erasure alone
    assert _normalized(_rows(delta), {}) == in_pg
    on_disk = {str(p) for p in delta.rglob("*.parquet") if "_delta_log" not in p.parts}
    assert set(DeltaTable(str(delta)).file_uris()) == on_disk  # no older version's file holds the values
    for t in story:
        assert bemi_tt.as_of("users", t, source=str(delta)).equals(bemi_tt.as_of("users", t, source=dsn))
    assert verify_export(str(delta)).erased == 2
    version = DeltaTable(str(delta)).version()
    _export(dsn, delta)  # applied: no further commit
    assert DeltaTable(str(delta)).version() == version


_KILL = "os.kill(os.getpid(), signal.SIGKILL)"
POINTS = {
    "mid_copy": ("calls = []\nreal = p.write_atomic\n"
                 "def write(*a, **k):\n    calls.append(1)\n    if len(calls) == 1:\n        " + _KILL
                 + "\n    return real(*a, **k)\np.write_atomic = write\n"),
    "delta_commit": ("import deltalake\nreal = deltalake.DeltaTable.create_write_transaction\n"
                     f"def commit(*a, **k):\n    real(*a, **k)\n    {_KILL}\n"
                     "deltalake.DeltaTable.create_write_transaction = commit\n"),
    "before_swap": f"p._exchange = lambda staging, root: {_KILL}\n",
    "after_swap": ("real = p._exchange\n"
                   f"def exchange(staging, root):\n    real(staging, root)\n    {_KILL}\n"
                   "p._exchange = exchange\n"),
}


@pytest.mark.parametrize("point", sorted(POINTS))
def test_a_delta_erase_killed_at_any_point_leaves_the_old_or_the_new_state_and_a_rerun_finishes(
    dsn: str, story: list[datetime], tmp_path: Path, point: str
) -> None:
    delta = tmp_path / "delta"
    _export(dsn, delta, batch_rows=2)
    expected = _states(str(delta), story)
    code = ("import os, signal\nimport capture.export.swap as p\n" + POINTS[point]
            + f"import bemi_tt\nbemi_tt.erase({str(delta)!r}, table='users', key=2)\n")
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == -signal.SIGKILL
    done = point == "after_swap"
    assert (b"bob@" in _bytes_under(delta)) != done
    states = _states(str(delta), story)
    if done:
        assert all(s.loc[2].isna().all() for s in states if 2 in s.index)  # type: ignore[attr-defined]
    else:
        assert all(s.equals(e) for s, e in zip(states, expected, strict=True))  # type: ignore[attr-defined]
    verify_export(str(delta))
    assert bemi_tt.erase(delta, table="users", key=2).rows == 2
    assert not list(tmp_path.glob(".delta.prune-*"))  # the rerun removed what the kill left
    assert b"bob@" not in _bytes_under(delta)
    assert verify_export(str(delta)).erased == 2


def test_a_delta_export_of_a_pruned_database_records_its_horizon_and_verifies(
    dsn: str, story: list[datetime], tmp_path: Path
) -> None:
    from capture.prune import export_horizon, prune_changes

    prune_changes(dsn, before=story[1])
    delta = tmp_path / "delta"
    _export(dsn, delta)  # it starts at the database's baseline
    assert export_horizon(str(delta)) is not None
    assert verify_export(str(delta)).horizon is not None
    for t in story[1:]:
        assert bemi_tt.as_of("users", t, source=str(delta)).equals(bemi_tt.as_of("users", t, source=dsn))


def test_an_erasure_in_postgresql_reaches_the_baseline_of_a_delta_export_pruned_by_itself(
    dsn: str, story: list[datetime], tmp_path: Path
) -> None:
    delta = tmp_path / "delta"
    _export(dsn, delta)
    bemi_tt.prune(delta, before=story[1])  # user 2's INSERT is folded into the directory's own baseline
    bemi_tt.erase(dsn, table="users", key=2)
    assert b"bob@" in _bytes_under(delta)
    _export(dsn, delta)
    assert b"bob@" not in _bytes_under(delta)
    assert bemi_tt.as_of("users", story[1], source=str(delta)).loc[2].isna().all()
    on_disk = {str(p) for p in delta.rglob("*.parquet") if "_delta_log" not in p.parts}
    assert set(DeltaTable(str(delta)).file_uris()) == on_disk
    assert verify_export(str(delta)).erased == 2  # the baseline row and the DELETE


def test_a_delta_export_on_s3_refuses_erase_and_its_export_run_warns_of_pending_erasures(
    dsn: str, story: list[datetime], s3_endpoint: str, bucket: str
) -> None:
    uri = f"s3://{bucket}/exports/delta?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    export_parquet(dsn, uri, format="delta", progress=False)
    with pytest.raises(ConfigurationError, match="local directories only"):
        bemi_tt.erase(uri, table="users", key=2)
    bemi_tt.erase(dsn, table="users", key=2)
    with pytest.warns(UserWarning, match="not applied to the Delta export"):
        export_parquet(dsn, uri, format="delta", progress=False)
