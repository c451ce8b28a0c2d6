"""The embedded server: logical WAL, clean shutdown, no orphans, clear errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import pytest

from bemi_tt.embedded import EmbeddedPostgres, find_bindir
from capture.errors import ConfigurationError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): check its state
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_embedded_server_has_logical_wal_and_removes_its_files_on_exit() -> None:
    with EmbeddedPostgres() as pg:
        directory = pg.directory
        assert directory is not None and directory.exists()
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
            slots = conn.execute("SHOW max_replication_slots").fetchone()
            assert slots is not None and int(slots[0]) >= 10
        pid = pg._process.pid if pg._process else -1
    assert not directory.exists()
    assert not _alive(pid)


def test_embedded_server_dies_with_a_crashed_caller_and_its_files_are_cleaned_next_time() -> None:
    script = textwrap.dedent(
        """
        import os, sys
        from bemi_tt.embedded import EmbeddedPostgres
        pg = EmbeddedPostgres().start()
        print(pg._process.pid, pg.directory, flush=True)
        sys.stdin.read()
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None
    pid_text, directory = child.stdout.readline().split()
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdin.close()  # type: ignore[union-attr]
    child.stdout.close()
    deadline = time.monotonic() + 20
    while _alive(int(pid_text)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(int(pid_text)), "the server outlived its killed parent"
    with EmbeddedPostgres():
        assert not Path(directory).exists(), "a stale data directory was not removed"


def test_bindir_without_binaries_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEMI_TT_PG_BINDIR", str(tmp_path))
    with pytest.raises(ConfigurationError, match=r"BEMI_TT_PG_BINDIR=.*no 'postgres'"):
        find_bindir()


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"port {port} .* already in use"):
            EmbeddedPostgres(port=port).start()


@pytest.mark.parametrize("port", [0, 70000, "5432"])
def test_invalid_port_is_rejected(port: object) -> None:
    with pytest.raises(ConfigurationError, match="port must be an integer"):
        EmbeddedPostgres(port=port)  # type: ignore[arg-type]


def test_server_that_cannot_set_wal_level_logical_fails_clearly() -> None:
    with pytest.raises(ConfigurationError, match="wal_level"):
        EmbeddedPostgres(settings={"wal_level": "minimal", "max_wal_senders": "0"}).start()


def test_url_before_start_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="not running"):
        EmbeddedPostgres().url()
