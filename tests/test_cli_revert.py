"""``bemi-tt revert`` and ``bemi-tt restore``: a dry run prints the SQL and writes nothing, ``--apply``
runs it, bad input is one ``bemi-tt: error:`` line naming the bad value."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest
from test_cli_bad_input import BAD_DSNS, SECRET, _check

from bemi_tt.cli import main


def _bemi_tt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bemi_tt.cli", *args], capture_output=True, text=True,
                          timeout=120)


def _rows(dsn: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id, task, price FROM todo ORDER BY id").fetchall()


def _write(dsn: str, user: int, statement: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT pg_logical_emit_message(true, 'bemi', %s)", (f'{{"user_id": {user}}}',))
        conn.execute(statement)


@pytest.fixture
def tracked(dsn: str) -> str:
    """A tracked `todo`: user 7 inserts two rows, user 8 renames one and reprices the other; the time between
    the two is in the table `mark`."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE todo (id int PRIMARY KEY, task text NOT NULL, price numeric(8,2))")
        conn.execute("CREATE TABLE mark (at timestamptz)")
    assert main(["install", dsn]) == 0
    assert main(["capture", "--dsn", dsn, "--once"]) == 0
    _write(dsn, 7, "INSERT INTO todo VALUES (1, 'Sleep', 1.50), (2, 'Eat', 2.00)")
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO mark SELECT clock_timestamp()")
    _write(dsn, 8, "UPDATE todo SET task = 'Nap' WHERE id = 1")
    _write(dsn, 8, "UPDATE todo SET price = 9.99 WHERE id = 2")
    assert main(["capture", "--dsn", dsn, "--once"]) == 0
    return dsn


def _mark(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT at FROM mark").fetchone()
    assert row is not None
    return str(row[0].isoformat())


def test_revert_dry_run_is_the_default_and_prints_typed_sql_without_writing(tracked: str) -> None:
    before = _rows(tracked)
    result = _bemi_tt("revert", "--where", "user_id=8", "--source", tracked)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("-- revert of 2 changes: 2 statements (dry run")
    assert lines[1].startswith(
        """UPDATE "public"."todo" SET "price" = '2.00'::numeric(8,2) WHERE "id" = '2'"""
    )
    assert lines[2].startswith("""UPDATE "public"."todo" SET "task" = 'Sleep'::text WHERE "id" = '1'""")
    assert _rows(tracked) == before
    dry = _bemi_tt("revert", "--where", "user_id=8", "--source", tracked, "--dry-run")
    assert dry.stdout == result.stdout


def test_revert_apply_undoes_the_selected_changes(tracked: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["revert", "--table", "todo", "--where", "user_id=8", "--dsn", tracked, "--apply"]) == 0
    assert "2 rows written" in capsys.readouterr().out
    assert [(r[0], r[1], str(r[2])) for r in _rows(tracked)] == [(1, "Sleep", "1.50"), (2, "Eat", "2.00")]


def test_revert_apply_with_a_conflict_fails_naming_the_row_and_force_overrides(
    tracked: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tracked, 9, "UPDATE todo SET task = 'Run' WHERE id = 1")  # after user 8's, same column
    assert main(["revert", "--where", "user_id=8", "--dsn", tracked, "--apply"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("bemi-tt: error: revert not applied") and "todo id=1" in err[0]
    assert _rows(tracked)[0][1] == "Run"
    assert main(["revert", "--where", "user_id=8", "--dsn", tracked, "--apply", "--force"]) == 0
    assert _rows(tracked)[0][1] == "Sleep"


def test_restore_prints_then_applies_the_table_as_it_was(tracked: str) -> None:
    at = _mark(tracked)
    dry = _bemi_tt("restore", "todo", at, "--source", tracked)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("UPDATE") == 2
    applied = _bemi_tt("restore", "todo", at, "--dsn", tracked, "--key", "2", "--apply")
    assert applied.returncode == 0, applied.stderr
    assert [(r[0], r[1], str(r[2])) for r in _rows(tracked)] == [(1, "Nap", "1.50"), (2, "Eat", "2.00")]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["revert", "--transaction-id", "abc"], "'abc'"),
        (["revert", "--since", "yesterday-ish"], "yesterday-ish"),
        (["revert", "--where", "user_id"], "'user_id'"),
        (["revert", "--where", "usr_id=8"], "'usr_id'"),
        (["revert"], "needs a selection"),
        (["revert", "--where", "user_id=8", "--dry-run", "--apply"], "not allowed with"),
        (["restore", "todo", "not a time"], "not a time"),
        (["restore", "nope", "now"], "unknown table 'nope'"),
        (["restore", "todo", "now", "--key", "abc"], "'abc' is not an integer"),
        (["restore", "todo", "1999-01-01"], "before the history"),
    ],
)
def test_bad_input_is_one_line_naming_the_value_and_exit_2(
    tracked: str, capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    assert main([*argv, "--source", tracked]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bemi-tt: error: ") and named in lines[0], err
    assert "Traceback" not in out + err


def test_no_traceback_reaches_the_terminal(tracked: str) -> None:
    result = _bemi_tt("restore", "todo", "now", "--key", "abc", "--source", tracked)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("bemi-tt: error: ")


UNDO_ARGV = {
    "revert-dry-run": lambda dsn: ["revert", "--where", "user_id=1", "--source", dsn],
    "revert-apply": lambda dsn: ["revert", "--where", "user_id=1", "--dsn", dsn, "--apply"],
    "restore": lambda dsn: ["restore", "todo", "now", "--source", dsn],
}


@pytest.mark.parametrize("command", sorted(UNDO_ARGV))
@pytest.mark.parametrize("dsn,code,says", BAD_DSNS)
def test_a_bad_connection_string_exits_with_one_line_and_no_password(
    capsys: pytest.CaptureFixture[str], command: str, dsn: str, code: int, says: str
) -> None:
    line = _check(capsys, UNDO_ARGV[command](dsn), code, f"{SECRET}%zz")
    assert says in line
