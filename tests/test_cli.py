"""The command line, end to end against a real database: each command is a thin layer over one function."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from bemi_tt.cli import main


def _bemi_tt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bemi_tt.cli", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def tracked(dsn: str) -> str:
    """A database with a tracked `todo` table and two captured transactions of user 7 and user 8."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE todo (id int PRIMARY KEY, task text NOT NULL)")
    assert main(["install", dsn]) == 0
    assert main(["capture", "--dsn", dsn, "--once"]) == 0
    with psycopg.connect(dsn) as conn:
        conn.execute("""SELECT pg_logical_emit_message(true, 'bemi', '{"user_id": 7}')""")
        conn.execute("INSERT INTO todo VALUES (1, 'Sleep'), (2, 'Eat')")
    with psycopg.connect(dsn) as conn:
        conn.execute("""SELECT pg_logical_emit_message(true, 'bemi', '{"user_id": 8}')""")
        conn.execute("UPDATE todo SET task = 'Nap' WHERE id = 1")
    assert main(["capture", "--dsn", dsn, "--once"]) == 0
    return dsn


def test_as_of_prints_the_table_as_it_is_now(tracked: str) -> None:
    result = _bemi_tt("as-of", "todo", "now", "--source", tracked)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    assert "Nap" in lines and "Eat" in lines and "Sleep" not in lines


def test_history_prints_every_version_as_csv(tracked: str) -> None:
    result = _bemi_tt("history", "todo", "1", "--source", tracked, "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = result.stdout.strip().splitlines()
    assert len(rows) == 3 and "Sleep" in rows[1] and "Nap" in rows[2]


def test_audit_filters_on_context(tracked: str) -> None:
    result = _bemi_tt("audit", "--table", "todo", "--where", "user_id=8", "--source", tracked,
                      "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = result.stdout.strip().splitlines()
    assert len(rows) == 2 and "UPDATE" in rows[1]


def test_diff_between_the_same_instant_has_no_rows(tracked: str) -> None:
    result = _bemi_tt("diff", "todo", "now", "now", "--source", tracked)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("(no rows)")


def test_status_reports_the_slot_and_the_changes_count(tracked: str) -> None:
    result = _bemi_tt("status", "--dsn", tracked)
    assert result.returncode == 0, result.stderr
    assert "slot: bemi_tt" in result.stdout


def test_export_writes_a_dataset_that_reads_back_the_same(tracked: str, tmp_path: Path) -> None:
    result = _bemi_tt("export", "--dsn", tracked, "--to", str(tmp_path / "ds"))
    assert result.returncode == 0, result.stderr
    assert "3 changes" in result.stdout
    offline = _bemi_tt("as-of", "todo", "now", "--source", str(tmp_path / "ds"))
    online = _bemi_tt("as-of", "todo", "now", "--source", tracked)
    assert offline.stdout == online.stdout



def test_export_as_delta_writes_a_delta_table_that_reads_back_the_same(tracked: str, tmp_path: Path) -> None:
    target = tmp_path / "delta"
    result = _bemi_tt("export", "--dsn", tracked, "--to", str(target), "--format", "delta")
    assert result.returncode == 0, result.stderr
    assert (target / "_delta_log").is_dir()
    offline = _bemi_tt("as-of", "todo", "now", "--source", str(target))
    online = _bemi_tt("as-of", "todo", "now", "--source", tracked)
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == online.stdout


def test_verify_passes_on_an_intact_history_and_names_the_row_edited_by_hand(
    tracked: str, tmp_path: Path
) -> None:
    result = _bemi_tt("verify", "--dsn", tracked)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("3 changes verified")
    assert main(["export", "--dsn", tracked, "--to", str(tmp_path / "ds"), "--quiet"]) == 0
    exported = _bemi_tt("verify", "--source", str(tmp_path / "ds"))
    assert exported.returncode == 0 and exported.stdout.startswith("3 changes verified"), exported.stderr
    with psycopg.connect(tracked) as conn:
        conn.execute("""UPDATE changes SET after = '{"id": 1, "task": "Run"}' WHERE operation = 'UPDATE'""")
    edited = _bemi_tt("verify", "--dsn", tracked)
    assert edited.returncode == 1
    assert edited.stderr.startswith("bemi-tt: error: ") and "Traceback" not in edited.stderr
    assert "altered" in edited.stderr or "UPDATE" in edited.stderr, edited.stderr


def test_capture_with_a_context_key_file_stores_context_verified(dsn: str, tmp_path: Path) -> None:
    from bemi_tt.context import configure_context, encode_context

    key = "k" * 32
    (tmp_path / "keys").write_text(f"# the application's key\n{key}\n")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE todo (id int PRIMARY KEY, task text NOT NULL)")
    assert main(["install", dsn]) == 0
    assert main(["capture", "--dsn", dsn, "--once", "--context-key-file", str(tmp_path / "keys")]) == 0
    configure_context(signing_key=key)
    try:
        marked = encode_context({"user_id": 7}).marked("INSERT INTO todo VALUES (1, 'Sleep')")
    finally:
        configure_context(signing_key=None)
    with psycopg.connect(dsn) as conn:
        conn.execute(marked)
        conn.execute("""/*bemi:eyJ1c2VyX2lkIjogMX0=*/ UPDATE todo SET task = 'Nap'""")
    assert main(["capture", "--dsn", dsn, "--once", "--context-key-file", str(tmp_path / "keys")]) == 0
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT operation, context_verified FROM changes WHERE operation <> 'SNAPSHOT' ORDER BY id"
        ).fetchall()
    assert rows == [("CREATE", True), ("UPDATE", False)]


def test_capture_with_a_missing_context_key_file_exits_2_naming_it(dsn: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capture", "--dsn", dsn, "--once", "--context-key-file", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err

def test_uninstall_removes_tracking(tracked: str) -> None:
    assert main(["uninstall", tracked]) == 0
    with psycopg.connect(tracked) as conn:
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'bemi%'").fetchone() == (0,)


@pytest.mark.parametrize(
    "args,message",
    [
        pytest.param(["audit", "--where", "user_id"], "--where takes KEY=VALUE, got 'user_id'",
                     id="bad-where"),
        pytest.param(["as-of", "todo", "yesterday-ish"], "'yesterday-ish' is not an ISO 8601 time",
                     id="bad-ts"),
        pytest.param(["as-of", "nope", "now"], "nope", id="unknown-table"),
    ],
)
def test_bad_input_exits_2_with_a_message_naming_it(tracked: str, args: list[str], message: str) -> None:
    result = _bemi_tt(*args, "--source", tracked) if args[0] != "audit" else _bemi_tt(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
