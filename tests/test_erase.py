"""Erasure: personal values leave changes, exports and every answer; operations, times, keys and the chain
stay. Real PostgreSQL with the capture worker."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pandas as pd
import psycopg
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

import bemi_tt
from capture.erase import ERASED_MARKER, erase_changes, erase_export, erased_image
from capture.errors import ChainError, ConfigurationError
from capture.export import export_parquet
from capture.export.dataset import read_dataset
from capture.verify import verify_changes, verify_export
from capture.worker import run as capture


def _now(engine: sa.Engine) -> datetime:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()  # type: ignore[no-any-return]


@pytest.fixture
def story(engine: sa.Engine, dsn: str) -> list[datetime]:
    """Users 1 and 2 written by user 7, user 3 by user 8; returns instants between the transactions."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE users (id int PRIMARY KEY, email text, name text, age int)"))
        conn.execute(sa.text("INSERT INTO users VALUES (1, 'ann@example.org', 'Ann', 30)"))
    bemi_tt.install(engine)
    capture(dsn, once=True)
    times = [_now(engine)]
    with bemi_tt.context(user_id=7), engine.begin() as conn:
        conn.execute(sa.text("UPDATE users SET email = 'ann@private.org' WHERE id = 1"))
        conn.execute(sa.text("INSERT INTO users VALUES (2, 'bob@example.org', 'Bob', 40)"))
    times.append(_now(engine))
    with bemi_tt.context(user_id=8), engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users VALUES (3, 'cy@example.org', 'Cy', 50)"))
        conn.execute(sa.text("UPDATE users SET age = 31 WHERE id = 1"))
    times.append(_now(engine))
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM users WHERE id = 2"))
    times.append(_now(engine))
    capture(dsn, once=True)
    return times


def _rows(dsn: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            'SELECT id, primary_key, "table", operation, before, after, context, committed_at,'
            " commit_position, ordinal, row_digest, chain_hash FROM changes ORDER BY commit_position, ordinal"
        ).fetchall()


def _texts(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT before::text || after::text || context::text FROM changes").fetchall()
    return "\n".join(str(r[0]) for r in rows)


def test_erase_a_key_removes_its_values_everywhere_and_nothing_else_changes(
    engine: sa.Engine, dsn: str, story: list[datetime], tmp_path: Path
) -> None:
    export = tmp_path / "export"
    export_parquet(dsn, str(export), progress=False)
    before_rows = _rows(dsn)
    states = {t: bemi_tt.as_of("users", t, source=dsn) for t in story}

    erasure = erase_changes(dsn, table="users", key=1, by="dpo@example.org", reason="request 42")
    erased_export = erase_export(str(export), table="users", key=1, by="dpo@example.org")
    assert erasure.rows == erased_export.rows == 3  # the SNAPSHOT and two UPDATEs of user 1

    # gone from changes: the values, the statement text and the context of those changes
    assert "ann@" not in _texts(dsn) and "Ann" not in _texts(dsn)
    after_rows = _rows(dsn)
    assert len(after_rows) == len(before_rows)
    for old, new in zip(before_rows, after_rows, strict=True):
        if old[1] != "1":
            assert new == old  # nothing else changes
            continue
        # operations, times, positions, keys, digests and chain hashes are kept
        assert new[:4] == old[:4] and new[7:] == old[7:]
        for image in (new[4], new[5]):
            assert all(v is None for k, v in image.items() if k != "id")  # type: ignore[attr-defined]
            assert image == {} or image["id"] == 1  # type: ignore[index]
        assert new[6] == {ERASED_MARKER: erasure.id}
    # recorded: who, when, the selector
    with psycopg.connect(dsn) as conn:
        record = conn.execute(
            "SELECT erased_by, selector, what, reason, rows FROM bemi_tt.erasures").fetchall()
        assert record == [("dpo@example.org", {"table": "users", "key": "1"},
                           ["before", "after", "context"], "request 42", 3)]
        # not recorded as changes: schema bemi_tt is never captured
    capture(dsn, once=True)
    assert len(_rows(dsn)) == len(before_rows)

    # as_of shows the erased values as NULL, every other cell as before, at every instant
    for t, old_state in states.items():
        for source in (dsn, str(export)):
            new_state = bemi_tt.as_of("users", t, source=source)
            assert list(new_state.index) == list(old_state.index)
            assert new_state.drop(index=1).equals(old_state.drop(index=1))
            assert new_state.loc[1].isna().all()
    history = bemi_tt.history("users", 1, source=dsn)
    assert history[["email", "name", "age"]].isna().all().all() and len(history) == 3

    # gone from the export's files
    for file in export.rglob("*.parquet"):
        table = pq.read_table(file)
        for column in ("before", "after", "context"):
            assert not any("ann@" in str(v) or "Ann" in str(v) for v in table.column(column).to_pylist())

    # the chain still verifies, and says what was erased
    verified = verify_changes(dsn)
    assert verified.erased == 3 and "3 of them erased" in str(verified)
    assert verify_export(str(export)).erased == 3

    # the live row still holds the values: the application erases it, and that UPDATE's old row (REPLICA
    # IDENTITY FULL) holds them once more, so history is erased after the worker recorded it
    with bemi_tt.context(user_id=9), engine.begin() as conn:
        conn.execute(sa.text("UPDATE users SET email = NULL, name = NULL, age = 32 WHERE id = 1"))
    capture(dsn, once=True)
    assert erase_changes(dsn, table="users", key=1).rows == 4
    export_parquet(dsn, str(export), progress=False)  # incremental: the new change, already erased
    fresh = tmp_path / "fresh"
    export_parquet(dsn, str(fresh), progress=False)
    for directory in (export, fresh):
        for file in directory.rglob("*.parquet"):
            table = pq.read_table(file)
            for column in ("before", "after", "context"):
                assert not any("ann@" in str(v) for v in table.column(column).to_pylist())
        assert bemi_tt.as_of("users", story[-1], source=str(directory)).loc[1].isna().all()
    assert verify_changes(dsn).erased == 4
    assert verify_export(str(fresh)).erased == 4


def test_erase_by_context_removes_the_context_of_the_matching_changes_only(
    dsn: str, story: list[datetime]
) -> None:
    before_rows = _rows(dsn)
    erasure = erase_changes(dsn, context={"user_id": 8}, what=["context"])
    assert erasure.rows == 2
    after_rows = _rows(dsn)
    for old, new in zip(before_rows, after_rows, strict=True):
        was_8 = isinstance(old[6], dict) and old[6].get("user_id") == 8
        assert new[6] == ({ERASED_MARKER: erasure.id} if was_8 else old[6])
        assert new[:6] == old[:6] and new[7:] == old[7:]  # the values stay: only the context was asked for
    assert verify_changes(dsn).erased == 2
    # a second run finds nothing (the context is gone) and changes nothing
    assert erase_changes(dsn, context={"user_id": 8}).rows == 0
    assert _rows(dsn) == after_rows


def test_erasing_twice_keeps_the_original_hashes_and_verifies(dsn: str, story: list[datetime]) -> None:
    erase_changes(dsn, table="users", key=2, what=["after"])
    erase_changes(dsn, table="users", key=2)
    verified = verify_changes(dsn)
    assert verified.erased == 2  # INSERT and DELETE of user 2
    assert "bob@" not in _texts(dsn)


def test_a_value_changed_by_hand_is_still_caught_next_to_erased_rows(dsn: str, story: list[datetime]) -> None:
    erase_changes(dsn, table="users", key=1)
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE changes SET after = jsonb_set(after, '{age}', '99') WHERE primary_key = '3'")
    with pytest.raises(ChainError, match="altered"):
        verify_changes(dsn)


def test_an_erased_row_altered_afterwards_is_caught(dsn: str, story: list[datetime]) -> None:
    erase_changes(dsn, table="users", key=1)
    with psycopg.connect(dsn) as conn:  # the key column of an erased row is still proven
        conn.execute("UPDATE changes SET \"table\" = 'people' WHERE primary_key = '1'")
    with pytest.raises(ChainError, match="altered"):
        verify_changes(dsn)


def test_erase_needs_a_selector() -> None:
    with pytest.raises(ConfigurationError, match="selector"):
        erase_changes("postgresql://localhost/x")
    with pytest.raises(ConfigurationError, match="key= needs table="):
        erase_changes("postgresql://localhost/x", key=1, context={"user_id": 7})


def test_erased_image_keeps_names_and_key_values_exactly() -> None:
    text = '{"id": 12345678901234567890, "n": 1.50, "s": "x\\"y", "o": {"a": [1, 2]}}'
    assert erased_image(text, {"id"}) == '{"id":12345678901234567890,"n":null,"s":null,"o":null}'
    assert json.loads(erased_image("{}", {"id"})) == {}


def test_as_of_from_memory_source_matches_after_erasure(dsn: str, story: list[datetime]) -> None:
    erase_changes(dsn, table="users", key=3)
    frame = bemi_tt.as_of("users", story[-1], source=dsn)
    assert frame.loc[3].isna().all() and frame.loc[1, "name"] == "Ann"
    assert isinstance(frame, pd.DataFrame)


def test_erasing_in_postgresql_then_exporting_again_erases_the_files_written_before(
    dsn: str, story: list[datetime], tmp_path: Path
) -> None:
    export = tmp_path / "export"
    export_parquet(dsn, str(export), progress=False)
    expected = {t: bemi_tt.as_of("users", t, source=dsn) for t in story}
    erase_changes(dsn, context={"user_id": 7})  # user 7 changed rows 1 and 2
    files = list(export.rglob("*.parquet"))
    assert any("bob@" in str(v) for f in files for v in pq.read_table(f)["after"].to_pylist())
    export_parquet(dsn, str(export), progress=False)  # nothing new to export: the erasure alone
    exported = read_dataset(str(export))
    with psycopg.connect(dsn) as conn:
        in_pg = conn.execute("SELECT before::text, after::text, context::text FROM changes"
                             " ORDER BY commit_position, ordinal").fetchall()
    assert [tuple(str(exported[c][i]) for c in ("before", "after", "context"))
            for i in range(exported.num_rows)] == [tuple(r) for r in in_pg]
    assert sum('"_bemi_erased"' in str(c) for c in exported["context"].to_pylist()) == 2
    for t in story:
        assert bemi_tt.as_of("users", t, source=str(export)).equals(bemi_tt.as_of("users", t, source=dsn))
    assert not bemi_tt.as_of("users", story[1], source=dsn).equals(expected[story[1]])
    assert verify_export(str(export)).erased == verify_changes(dsn).erased == 2


def test_cli_erase_by_context_in_database_and_export(dsn: str, story: list[datetime], tmp_path: Path) -> None:
    import subprocess
    import sys

    export = tmp_path / "export"
    export_parquet(dsn, str(export), progress=False)
    result = subprocess.run(
        [sys.executable, "-m", "bemi_tt.cli", "erase", str(export), "--dsn", dsn, "--context", "user_id=8",
         "--by", "dpo", "--reason", "ticket 9"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("erased 2 changes") == 2
    assert "cy@" not in _texts(dsn)
    for file in export.rglob("*.parquet"):
        assert not any("cy@" in str(v) for v in pq.read_table(file)["after"].to_pylist())
    bad = subprocess.run([sys.executable, "-m", "bemi_tt.cli", "erase", "--dsn", dsn, "--context", "x"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
