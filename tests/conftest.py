"""One real PostgreSQL server per test process, a fresh database per test.

The suite runs in pytest-xdist worker processes (``-n``): each worker is a session with its own server,
since replication slots and ``ALTER SYSTEM`` are server-wide and tests create both. The controlling
process starts none.

``BEMI_TT_TEST_DSN`` points the suite at an external server (it must have ``wal_level=logical``);
``BEMI_TT_PG_BINDIR`` picks the binaries of the embedded one (e.g. Debian's PostgreSQL 15).
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from timetravel_history import History
from timetravel_sources import KINDS, Make, build_source

from bemi_tt.embedded import EmbeddedPostgres, find_bindir
from bemi_tt.sources import Source


@dataclass
class Server:
    """The session's PostgreSQL server: ``dsn(db)`` gives a libpq connection string for a database."""

    admin_dsn: str
    version: int
    version_text: str

    def dsn(self, database: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=database)

    def sqlalchemy_url(self, database: str, driver: str = "psycopg") -> sa.URL:
        return to_sqlalchemy_url(self.dsn(database), driver)


def to_sqlalchemy_url(dsn: str, driver: str = "psycopg") -> sa.URL:
    """SQLAlchemy URL for a libpq connection string (unix sockets included)."""
    params = conninfo_to_dict(dsn)
    query = {k: str(v) for k, v in params.items() if k not in {"user", "password", "dbname", "host", "port"}}
    host = str(params.get("host") or "")
    port = int(params["port"]) if params.get("port") else None
    if host.startswith("/"):
        query["host"] = host
        host = ""
        if port is not None:
            query["port"] = str(port)
            port = None
    return sa.URL.create(
        f"postgresql+{driver}",
        username=str(params.get("user") or "postgres"),
        password=str(params["password"]) if params.get("password") else None,
        host=host or None,
        port=port,
        database=str(params.get("dbname") or "postgres"),
        query=query,
    )


def _check_server(dsn: str) -> Server:
    with psycopg.connect(dsn, autocommit=True) as conn:
        level = conn.execute("SHOW wal_level").fetchone()
        num = conn.execute("SHOW server_version_num").fetchone()
        text = conn.execute("SELECT version()").fetchone()
    assert level and num and text
    if level[0] != "logical":
        pytest.exit(
            f"BEMI_TT_TEST_DSN server has wal_level={level[0]!r}; run "
            "ALTER SYSTEM SET wal_level = logical; and restart it, or unset BEMI_TT_TEST_DSN "
            "to use an embedded server",
            returncode=4,
        )
    return Server(admin_dsn=dsn, version=int(num[0]), version_text=str(text[0]))


_server: Server | None = None
_embedded: EmbeddedPostgres | None = None


def _session_server() -> Server:
    global _server, _embedded
    if _server is None:
        external = os.environ.get("BEMI_TT_TEST_DSN")
        if external:
            _server = _check_server(external)
        else:
            _embedded = EmbeddedPostgres().start()
            _server = _check_server(_embedded.dsn)
    return _server


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker per core (at most 4: the largest test file bounds the gain); none against an
    external server, whose slots and settings parallel tests would share."""
    if os.environ.get("BEMI_TT_TEST_DSN"):
        return 0
    return max(1, min(4, len(os.sched_getaffinity(0))))


def _xdist_controller(config: pytest.Config) -> bool:
    """Whether this process only hands tests to xdist workers (it runs none, so it needs no server)."""
    return bool(getattr(config.option, "numprocesses", None)) and "PYTEST_XDIST_WORKER" not in os.environ


def pytest_report_header(config: pytest.Config) -> str:
    if _xdist_controller(config) and not os.environ.get("BEMI_TT_TEST_DSN"):
        done = subprocess.run([str(find_bindir() / "postgres"), "--version"], capture_output=True, text=True)
        return f"postgresql: {done.stdout.strip() or done.stderr.strip()} (one server per worker)"
    return f"postgresql: {_session_server().version_text}"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _embedded is not None:
        _embedded.stop()


@pytest.fixture(scope="session")
def pg_server() -> Server:
    return _session_server()


_counter = itertools.count()


def drop_database(server: Server, name: str) -> None:
    """Drop a test database, its replication slots and connections first."""
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE database = %s AND active_pid IS NOT NULL",
            (name,),
        )
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s",
            (name,),
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def database(pg_server: Server) -> Iterator[str]:
    """Name of a fresh, empty database for this test."""
    name = f"t{os.getpid()}_{next(_counter)}"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield name
    drop_database(pg_server, name)


@pytest.fixture
def dsn(pg_server: Server, database: str) -> str:
    """libpq connection string of this test's fresh database."""
    return pg_server.dsn(database)


@pytest.fixture
def engine(pg_server: Server, database: str) -> Iterator[sa.Engine]:
    """SQLAlchemy engine (psycopg 3) on this test's fresh database."""
    eng = sa.create_engine(pg_server.sqlalchemy_url(database))
    yield eng
    eng.dispose()


@pytest.fixture(params=KINDS)
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Make:
    """Turn a History into a source of each kind (PostgreSQL and Parquet use this test's database)."""
    kind = request.param

    def build(h: History) -> Source:
        dsn = request.getfixturevalue("dsn") if kind != "memory" else None
        return build_source(kind, h.changes, h.schemas, dsn=dsn, tmp_path=tmp_path)

    return build


@pytest.fixture
def make_role(pg_server: Server, database: str) -> Iterator[Callable[[str, str], str]]:
    """``make_role(suffix, attributes)`` creates a login role unique to this test (roles are cluster-wide,
    e.g. attributes ``"REPLICATION"``) and returns its name; each is dropped with what it owns at teardown."""
    created: list[str] = []

    def create(suffix: str, attributes: str = "") -> str:
        name = f"{database}_{suffix}"
        with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN " + attributes).format(sql.Identifier(name)))
        created.append(name)
        return name

    yield create
    for name in reversed(created):
        for dsn in (pg_server.dsn(database), pg_server.admin_dsn):  # DROP OWNED works per database
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(name)))
        with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
