"""Bad input for every ``bemi-tt`` command: exit code, one ``bemi-tt: error:`` line, no traceback or password.

Connection failures are fast and local: 127.0.0.1 on a port nobody listens on, a unix socket directory that
does not exist, a database that does not exist on the test server, a wrong password for a role that must
give one. Most cases run ``bemi_tt.cli.main`` in-process (capsys); a few run the real entry point in a
subprocess to prove that no traceback reaches a terminal.
"""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import hypothesis.strategies as st
import psycopg
import pytest
from hypothesis import given, settings
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bemi_tt.cli import main
from capture.dsn import MASK, redact

SECRET = "Pw_s3cret_Marker"  # must never appear in any output
COMMANDS = ["install", "uninstall", "capture", "status", "export", "verify", "as-of", "diff", "history",
            "audit"]


def _closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CLOSED = _closed_port()


def _argv(command: str, dsn: str, tmp_path: Path) -> list[str]:
    """``command`` run against ``dsn`` with otherwise valid arguments."""
    return {
        "install": ["install", dsn],
        "uninstall": ["uninstall", dsn],
        "capture": ["capture", "--dsn", dsn, "--once"],
        "status": ["status", "--dsn", dsn],
        "export": ["export", "--dsn", dsn, "--to", str(tmp_path / "ds"), "--quiet"],
        "verify": ["verify", "--dsn", dsn],
        "as-of": ["as-of", "todo", "2026-01-01", "--source", dsn],
        "diff": ["diff", "todo", "2026-01-01", "now", "--source", dsn],
        "history": ["history", "todo", "1", "--source", dsn],
        "audit": ["audit", "--source", dsn],
    }[command]


def _check(capsys: pytest.CaptureFixture[str], argv: list[str], code: int, *secrets: str) -> str:
    """Run ``main(argv)``: its exit code, exactly one stderr line, no traceback, no secret; the line."""
    result = main(argv)
    out, err = capsys.readouterr()
    assert result == code, (result, err)
    assert "Traceback" not in out + err
    for secret in (SECRET, *secrets):
        assert secret not in out + err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bemi-tt: error: "), err
    return lines[0]


# -- connection strings that cannot work, for every command that takes one -----------------------------------
BAD_DSNS = [
    pytest.param(
        f"postgresql://u:{SECRET}%zz@127.0.0.1:{CLOSED}/x", 2, "percent-encode", id="bad-percent-escape"
    ),
    pytest.param(f"postgresql://u:{SECRET}%00@127.0.0.1:{CLOSED}/x", 2, "%00", id="percent-zero"),
    pytest.param(f"postgresql://u:{SECRET}@[::1/x", 2, "IPv6", id="unterminated-ipv6"),
    pytest.param(
        f"postgresql://u:{SECRET}@127.0.0.1:{CLOSED}/x?foo=bar", 2, '"foo"', id="unknown-query-option"
    ),
    pytest.param(f"host=127.0.0.1 password='{SECRET}", 2, "unterminated", id="unterminated-quote"),
    pytest.param(f"host=127.0.0.1 password={SECRET} bogus", 2, 'missing "="', id="conninfo-missing-equals"),
    pytest.param(f"postgresql://u:{SECRET}@127.0.0.1:{CLOSED}/x", 1, "Connection refused", id="closed-port"),
    pytest.param(
        f"host=/nonexistent/bemi-socket-dir user=u password={SECRET} dbname=x",
        1,
        "No such file or directory",
        id="missing-socket-dir",
    ),
    pytest.param(f"postgresql://u:{SECRET}@127.0.0.1:notaport/x", 1, "port", id="port-not-a-number"),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("dsn,code,says", BAD_DSNS)
def test_a_bad_connection_string_exits_with_one_line_and_no_password(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str, dsn: str, code: int, says: str
) -> None:
    line = _check(capsys, _argv(command, dsn, tmp_path), code, f"{SECRET}%zz")
    assert says in line


def test_the_password_of_a_url_with_options_is_never_printed_when_it_is_echoed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"postgresql://u:{SECRET}@127.0.0.1:{CLOSED}/x?foo=bar"
    line = _check(capsys, ["diff", "t", "2026-01-01", "now", "--source", url], 2)
    assert "postgresql://u:***@127.0.0.1" in line  # the URL is shown, its password is not


@pytest.fixture
def server_dsn(pg_server, database: str) -> str:  # type: ignore[no-untyped-def]
    """This test's database on the session server, with a password added (trust ignores it)."""
    return make_conninfo(pg_server.dsn(database), password=SECRET)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_database_that_does_not_exist_exits_1_naming_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, server_dsn: str, command: str
) -> None:
    missing = make_conninfo(server_dsn, dbname="bemi_no_such_database")
    line = _check(capsys, _argv(command, missing, tmp_path), 1)
    assert "bemi_no_such_database" in line and "does not exist" in line


@pytest.fixture
def password_role(pg_server, database: str) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A role that must log in with a password (scram in pg_hba.conf for it alone); yields its name."""
    role = f"{database}_pw"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        row = conn.execute("SHOW hba_file").fetchone()
        assert row is not None
        hba = Path(str(row[0]))
        if not os.access(hba, os.W_OK):
            pytest.skip(f"cannot edit {hba} to require a password (external server?)")
        original = hba.read_text()
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(role), sql.Literal("the-right-one")
            )
        )
        hba.write_text(
            f"local all {role} scram-sha-256\nhost all {role} 127.0.0.1/32 scram-sha-256\n" + original
        )
        conn.execute("SELECT pg_reload_conf()")
        try:
            yield role
        finally:
            hba.write_text(original)
            conn.execute("SELECT pg_reload_conf()")
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.parametrize("command", COMMANDS)
def test_a_wrong_password_exits_1_and_is_not_printed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, server_dsn: str, password_role: str, command: str
) -> None:
    wrong = make_conninfo(server_dsn, user=password_role, password=SECRET)
    line = _check(capsys, _argv(command, wrong, tmp_path), 1)
    assert "password authentication failed" in line


def test_the_wrong_password_in_a_url_is_not_printed_either(
    capsys: pytest.CaptureFixture[str], server_dsn: str, password_role: str
) -> None:
    params = conninfo_to_dict(server_dsn)
    url = f"postgresql://{password_role}:{SECRET}@/{params['dbname']}?host={params['host']}"
    line = _check(capsys, ["status", "--dsn", url], 1)
    assert "password authentication failed" in line


# -- usage errors: argparse and ConfigurationError, exit 2 --------------------------------------------------
USAGE = [
    pytest.param([], "required", id="no-command"),
    pytest.param(["teleport"], "invalid choice", id="unknown-command"),
    pytest.param(["install"], "required: dsn", id="install-without-dsn"),
    pytest.param(["uninstall", "a", "b"], "unrecognized arguments", id="uninstall-extra-argument"),
    pytest.param(
        ["capture", "--export-every", "soon"], "invalid float value", id="capture-export-every-text"
    ),
    pytest.param(
        ["capture", "--dsn", "dbname=x", "--export-every", "-1"], "export_every", id="capture-negative"
    ),
    pytest.param(["capture", "--dsn", "dbname=x", "--slot", "Bad-Name"], "slot name", id="capture-bad-slot"),
    pytest.param(["capture", "--dsn", "dbname=x", "--slot", ""], "slot", id="capture-empty-slot"),
    pytest.param(["capture", "--dsn", ""], "dsn", id="capture-empty-dsn"),
    pytest.param(["status", "--dsn", "dbname=x", "--slot", "a b"], "slot name", id="status-bad-slot"),
    pytest.param(["export", "--to", "/tmp/x"], "required: --dsn", id="export-without-dsn"),
    pytest.param(["export", "--dsn", "dbname=x", "--to", "/tmp/x", "--wait", "-5"], "wait", id="export-wait"),
    pytest.param(
        ["export", "--dsn", "dbname=x", "--to", "nosuchfs://x/y"], "export directory", id="export-fs"
    ),
    pytest.param(["as-of", "todo"], "required: ts", id="as-of-without-time"),
    pytest.param(
        ["as-of", "todo", "yesterday-ish", "--source", "dbname=x"], "yesterday-ish", id="as-of-bad-time"
    ),
    pytest.param(["as-of", "todo", "now", "--format", "xml"], "invalid choice", id="as-of-bad-format"),
    pytest.param(
        ["as-of", "todo", "now", "--source", "/no/such/dir"], "/no/such/dir", id="as-of-missing-dir"
    ),
    pytest.param(
        ["diff", "todo", "2026-13-45", "now", "--source", "dbname=x"], "2026-13-45", id="diff-bad-time"
    ),
    pytest.param(["history", "todo"], "required: key", id="history-without-key"),
    pytest.param(["audit", "--where", "user_id"], "KEY=VALUE", id="audit-bad-where"),
    pytest.param(["audit", "--since", "noon-ish", "--source", "dbname=x"], "noon-ish", id="audit-bad-since"),
    pytest.param(["demo", "--bindir", "/nonexistent/pg/bin"], "/nonexistent/pg/bin", id="demo-bad-bindir"),
]


@pytest.mark.parametrize("argv,says", USAGE)
def test_bad_usage_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str], says: str
) -> None:
    monkeypatch.delenv("BEMI_TT_SOURCE", raising=False)
    line = _check(capsys, argv, 2)
    assert says in line


def test_help_still_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "usage: bemi-tt" in capsys.readouterr().out


# -- bad names and times against a real, tracked database ---------------------------------------------------
@pytest.fixture
def tracked(dsn: str) -> str:
    """A database with a tracked `todo` table holding two captured rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE todo (id int PRIMARY KEY, task text NOT NULL)")
    assert main(["install", dsn]) == 0
    assert main(["capture", "--dsn", dsn, "--once"]) == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO todo VALUES (1, 'Sleep'), (2, 'Eat')")
    assert main(["capture", "--dsn", dsn, "--once"]) == 0
    return dsn


@pytest.mark.parametrize(
    "argv,says",
    [
        pytest.param(["as-of", "no_such_table", "now"], "no_such_table", id="as-of-unknown-table"),
        pytest.param(
            ["diff", "no_such_table", "2026-01-01", "now"], "no_such_table", id="diff-unknown-table"
        ),
        pytest.param(["history", "no_such_table", "1"], "no_such_table", id="history-unknown-table"),
        pytest.param(["as-of", "todo", "not-a-time"], "not-a-time", id="as-of-bad-time"),
        pytest.param(["diff", "todo", "now", "2026-02-30"], "2026-02-30", id="diff-bad-day"),
        pytest.param(["audit", "--until", "later"], "later", id="audit-bad-until"),
    ],
)
def test_bad_names_and_times_on_a_tracked_database_exit_2(
    capsys: pytest.CaptureFixture[str], tracked: str, argv: list[str], says: str
) -> None:
    line = _check(capsys, [*argv, "--source", make_conninfo(tracked, password=SECRET)], 2)
    assert says in line


def test_capture_with_an_invalid_slot_name_exits_2_before_touching_the_server(
    capsys: pytest.CaptureFixture[str], tracked: str
) -> None:
    line = _check(
        capsys, ["capture", "--dsn", make_conninfo(tracked, password=SECRET), "--slot", "Bad-Name"], 2
    )
    assert "invalid replication slot name 'Bad-Name'" in line
    with psycopg.connect(tracked) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name ILIKE 'bad%'"
        ).fetchone() == (0,)


def test_a_corrupt_parquet_file_exits_1_naming_the_file(
    capsys: pytest.CaptureFixture[str], tracked: str, tmp_path: Path
) -> None:
    directory = tmp_path / "ds"
    assert main(["export", "--dsn", tracked, "--to", str(directory), "--quiet"]) == 0
    (damaged,) = glob.glob(str(directory / "relation=*" / "*" / "*.parquet"))
    Path(damaged).write_bytes(b"not parquet at all")
    line = _check(capsys, ["as-of", "todo", "now", "--source", str(directory)], 1)
    assert os.path.basename(damaged) in line


def test_a_full_disk_during_export_exits_1_and_leaves_no_partial_file(
    capsys: pytest.CaptureFixture[str], tracked: str, tmp_path: Path
) -> None:
    with psycopg.connect(tracked, autocommit=True) as conn:  # enough incompressible bytes to fill 128 KiB
        conn.execute(
            "INSERT INTO todo SELECT g, md5(g::text) || md5((-g)::text) FROM generate_series(3, 20000) g"
        )
    assert main(["capture", "--dsn", tracked, "--once"]) == 0
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up here: {mounted.stderr.strip()}")
    try:
        line = _check(
            capsys, ["export", "--dsn", make_conninfo(tracked, password=SECRET), "--to", str(mount)], 1
        )
        assert "disk is full" in line and str(mount) in line
        left = [
            p for p in glob.glob(str(mount / "**" / "*"), recursive=True) if p.endswith((".parquet", ".tmp"))
        ]
        assert left == []  # nothing half written is visible, no temporary file left behind
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# -- the real entry point in a subprocess: nothing but the one line reaches a terminal ----------------------
def _bemi_tt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bemi_tt.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "argv,code",
    [
        pytest.param(
            ["install", f"postgresql://u:{SECRET}@127.0.0.1:{CLOSED}/x"], 1, id="install-closed-port"
        ),
        pytest.param(
            ["capture", "--dsn", f"postgresql://u:{SECRET}%zz@127.0.0.1/x"], 2, id="capture-bad-escape"
        ),
        pytest.param(
            ["status", "--dsn", f"host=/nonexistent/dir password={SECRET}"], 1, id="status-no-socket"
        ),
        pytest.param(
            ["export", "--dsn", f"postgresql://u:{SECRET}%zz@h/x", "--to", "/tmp/x"], 2, id="export"
        ),
        pytest.param(["as-of", "todo", "bad-time", "--source", "dbname=x"], 2, id="as-of-bad-time"),
        pytest.param(["-v", "uninstall", f"postgresql://u:{SECRET}@127.0.0.1:{CLOSED}/x"], 1, id="verbose"),
    ],
)
def test_the_entry_point_prints_no_traceback_and_no_password(argv: list[str], code: int) -> None:
    result = _bemi_tt(*argv)
    assert result.returncode == code, result.stderr
    assert SECRET not in result.stdout + result.stderr
    if argv[0] != "-v":
        assert "Traceback" not in result.stderr
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("bemi-tt: error: ")
    else:  # -v shows the traceback, still redacted, then the same one line
        assert result.stderr.splitlines()[-1].startswith("bemi-tt: error: ")


def test_as_of_into_a_closed_pipe_exits_quietly(tracked: str) -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written, as with `| head -0`
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "bemi_tt.cli",
                "as-of",
                "todo",
                "now",
                "--source",
                tracked,
                "--format",
                "csv",
            ],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert result.returncode == 141
    assert result.stderr == ""


def test_environment_passwords_are_redacted_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BEMI_TT_DSN", f"postgresql://u:{SECRET}@127.0.0.1:{CLOSED}/x?foo=bar")
    line = _check(capsys, ["status"], 2)
    assert "BEMI_TT_DSN" in line


# -- the mechanism itself: whatever the password, no message built from its connection string shows it -----
_PASSWORDS = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp")),
    min_size=3,
    max_size=24,
)


def _libpq_message(dsn: str) -> str:
    try:
        conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        return str(exc)
    return ""


@settings(max_examples=300, deadline=None)
@given(password=_PASSWORDS, user=st.sampled_from(["u", "app_user"]))
def test_redact_removes_any_password_from_messages_about_its_connection_string(
    password: str, user: str
) -> None:
    quoted = password.replace("\\", "\\\\").replace("'", "\\'")
    for dsn in (
        f"postgresql://{user}:{quote(password, safe='')}@127.0.0.1:5432/db",  # the right spelling
        f"postgresql://{user}:{password}@127.0.0.1:5432/db",  # raw: often malformed, libpq quotes parts
        f"postgresql+psycopg://{user}:{password}@127.0.0.1/db?sslmode=disable",
        f"host=127.0.0.1 user={user} password='{quoted}' dbname=db",
        f"postgresql://{user}@127.0.0.1/db?password={quote(password, safe='')}",
    ):
        message = f"cannot use {dsn!r} ({dsn}): {_libpq_message(dsn)}"
        redacted = redact(message, dsn)
        assert password not in redacted, (dsn, redacted)
        assert quote(password, safe="") not in redacted or quote(password, safe="") == MASK


def test_redact_keeps_what_is_not_a_password() -> None:
    text = 'cannot connect to app@db.example:5432/shop: password authentication failed for user "app"'
    assert redact(text, "postgresql://app:hunter22@db.example:5432/shop") == text
