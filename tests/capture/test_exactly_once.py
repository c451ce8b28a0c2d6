"""SIGKILL the worker at random moments during a long workload, restart it: nothing lost, nothing doubled.

Two slots see the same workload: one worker runs uninterrupted into one destination, the other is
killed and restarted over and over into another. Both ``changes`` tables must be identical.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from worker_helpers import changes_rows, run_module, set_context

from capture.worker import run


@pytest.fixture
def destinations(pg_server, database: str) -> Iterator[tuple[str, str]]:  # type: ignore[no-untyped-def]
    names = [f"{database}_killed", f"{database}_steady"]
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_server.dsn(names[0]), pg_server.dsn(names[1])
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def workload(dsn: str, seed: int, seconds: float, done: threading.Event) -> None:
    """Transactions of 1 to 400 row changes with contexts, and one of 10,000 rows, for ``seconds``."""
    try:
        _workload(dsn, seed, seconds)
    finally:
        done.set()


def _workload(dsn: str, seed: int, seconds: float) -> None:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    next_id = 0
    with psycopg.connect(dsn) as conn:
        big_done = False
        while time.monotonic() < deadline or not big_done:
            set_context(conn, {"tx": next_id, "who": rng.choice(["a", "b"])})
            if not big_done and time.monotonic() > deadline - seconds / 2:
                conn.execute(
                    "INSERT INTO t SELECT g, g %% 7, 'big' FROM generate_series(%s::int, %s::int) g",
                    (next_id, next_id + 9_999),
                )
                next_id += 10_000
                big_done = True
            else:
                n = rng.randint(1, 400)
                conn.execute(
                    "INSERT INTO t SELECT g, g %% 7, md5(g::text) FROM generate_series(%s::int, %s::int) g",
                    (next_id, next_id + n - 1),
                )
                next_id += n
                if rng.random() < 0.5:
                    set_context(conn, None)
                    conn.execute(
                        "UPDATE t SET v = v + 1 WHERE id BETWEEN %s AND %s", (next_id - n, next_id - n // 2)
                    )
                if rng.random() < 0.3:
                    conn.execute("DELETE FROM t WHERE id %% 5 = 0 AND id >= %s", (next_id - n,))
            conn.commit()


def test_killed_worker_writes_exactly_what_an_uninterrupted_one_writes(
    dsn: str, destinations: tuple[str, str]
) -> None:
    killed, steady = destinations
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int, s text)")
    run(dsn, destination=killed, slot="killed", once=True, snapshot=False)
    run(dsn, destination=steady, slot="steady", once=True, snapshot=False)
    done = threading.Event()
    load = threading.Thread(target=workload, args=(dsn, 7, 5.0, done))
    load.start()
    rng = random.Random(11)
    kills = 0
    args = [
        sys.executable,
        "-m",
        "capture",
        "--dsn",
        dsn,
        "--destination",
        killed,
        "--slot",
        "killed",
        "--batch-changes",
        "500",
        "--quiet",
    ]
    try:
        while not done.is_set():
            worker = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                time.sleep(rng.uniform(0.3, 1.5))
            finally:
                os.kill(worker.pid, signal.SIGKILL)
                _, err = worker.communicate()
            assert worker.returncode == -signal.SIGKILL, err.decode()
            kills += 1
    finally:
        load.join()
    assert kills >= 3
    final = run_module("--dsn", dsn, "--destination", killed, "--slot", "killed", "--once", "--quiet")
    assert final.returncode == 0, final.stderr
    run(dsn, destination=steady, slot="steady", once=True)
    rows = changes_rows(killed)
    assert len(rows) > 10_000
    assert rows == changes_rows(steady)
