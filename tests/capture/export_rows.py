"""Realistic ``changes`` rows for the export tests: many tables, several UTC dates, awkward JSON and text."""

from __future__ import annotations

import builtins
import datetime as dt
import functools
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from capture.schema import CHANGES_COLUMNS, changes_ddl, schemas_ddl

TABLES = [
    ("public", "todo"),
    ("public", "users"),
    ("sales", "order items"),
    ("public", "naïve/odd=name%"),
    ("a.b", "c"),  # same partition directory as ("a", "b.c"): both share it
    ("a", "b.c"),
    ("public", "unit\x1fseparator"),  # control characters are legal in quoted names
]
START = dt.datetime(2026, 3, 28, 22, 0, tzinfo=dt.timezone.utc)
COLUMNS = [name for name, _, _ in CHANGES_COLUMNS if name != "id"]
SELECT = sql.SQL(
    'SELECT id, primary_key, "table", operation, before::text, after::text, context::text, committed_at,'
    ' "schema", "database", transaction_id, "position", commit_position, ordinal, context_verified,'
    " row_digest, chain_hash, before_primary_key FROM {}"
    " ORDER BY commit_position, ordinal"
)


def create_tables(conn: psycopg.Connection) -> None:
    conn.execute(changes_ddl())
    conn.execute(schemas_ddl())


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.randrange(-(10**18), 10**18)
    if kind == 3:
        return rng.choice(
            ["1.50", "0.1", "-3.14159265358979323846264338327950288", "1e-7", "12345678901234567890.5"]
        )
    if kind in (4, 5):
        return rng.choice(
            ["", "plain", 'quo"te, comma', "new\nline\r\n", "tab\tand \\ back", "ünïcödé ✓", "NULL"]
        )
    if kind in (6, 7):
        return {f"k{i}": _value(rng, depth + 1) for i in range(rng.randrange(4))}
    return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _json(rng: random.Random) -> str:
    obj = {f"c{i}": _value(rng) for i in range(rng.randrange(1, 6))}
    text = json.dumps(obj, ensure_ascii=False)
    # decimal strings become JSON numbers (exact numerics, as the capture worker writes them)
    for literal in (
        "1.50",
        "0.1",
        "-3.14159265358979323846264338327950288",
        "1e-7",
        "12345678901234567890.5",
    ):
        text = text.replace(f'"{literal}"', literal)
    return text


def generate(
    count: int, *, seed: int = 0, start_position: int = 1000, start: dt.datetime = START
) -> Iterator[tuple]:
    """``count`` change rows in key order (transactions of 1..8 changes), spanning several UTC dates."""
    rng = random.Random(seed)
    position = start_position
    at = start
    made = 0
    while made < count:
        size = min(count - made, rng.randrange(1, 9))
        at += dt.timedelta(minutes=rng.randrange(0, 40), microseconds=rng.randrange(10**6))
        commit = position + 100 * size + 50
        xid = rng.choice([None, rng.randrange(1, 10**9)])
        for ordinal in range(size):
            schema, table = rng.choice(TABLES)
            operation = rng.choice(["CREATE", "UPDATE", "DELETE", "SNAPSHOT", "TRUNCATE"])
            key = rng.choice([None, "", str(rng.randrange(10**6)), json.dumps([rng.randrange(9), 'x,"y"'])])
            if rng.random() < 0.001:
                key = "a text key with a\nline feed and a\r\ncarriage return"  # raw breaks inside a CSV value
            before = "{}" if operation in ("CREATE", "SNAPSHOT") else _json(rng)
            after = "{}" if operation in ("DELETE", "TRUNCATE") else _json(rng)
            context = rng.choice(
                ["{}", _json(rng), json.dumps({"user_id": 7, "SQL": "UPDATE t SET a = '%s' /*x*/"})]
            )
            yield (
                key,
                table,
                operation,
                before,
                after,
                context,
                at,
                schema,
                "app",
                xid,
                position + 100 * ordinal,
                commit,
                ordinal,
                (None, True, False)[made % 3],  # the trust columns travel too (not derived from rng)
                f"{made:064x}" if made % 2 else None,
                f"{made + 1:064x}" if made % 2 else None,
                # the old key of a key UPDATE travels too (not derived from rng)
                f"old {key}" if operation == "UPDATE" and key is not None and made % 4 == 0 else None,
            )
            made += 1
        position = commit + 100


def insert(conn: psycopg.Connection, rows: list[tuple]) -> None:
    """Insert rows into ``changes`` with COPY (the way the capture worker writes)."""
    statement = sql.SQL("COPY changes ({}) FROM STDIN").format(
        sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
    )
    with conn.cursor() as cur, cur.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)
    conn.commit()


def fill(dsn: str, count: int, *, seed: int = 0) -> list[tuple]:
    """Create ``changes`` and insert ``count`` rows; returns the rows (for ``more``)."""
    rows = list(generate(count, seed=seed))
    with psycopg.connect(dsn) as conn:
        create_tables(conn)
        insert(conn, rows)
    return rows


def more(dsn: str, previous: list[tuple], count: int, *, seed: int = 1) -> list[tuple]:
    """Insert ``count`` rows after ``previous`` (later keys and times); returns them."""
    last = previous[-1]
    rows = list(generate(count, seed=seed, start_position=last[11] + 100, start=last[6]))
    with psycopg.connect(dsn) as conn:
        insert(conn, rows)
    return rows


def changes_rows(dsn: str) -> list[tuple]:
    """Every row of ``changes`` in key order, as the dataset must hold them."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TimeZone TO 'UTC'")
        return [tuple(r) for r in conn.execute(SELECT.format(sql.Identifier("changes")))]


def dataset_rows(table: Any) -> list[tuple]:
    """Rows of an exported Arrow table, comparable with ``changes_rows``."""
    names = [name for name, _, _ in CHANGES_COLUMNS]
    columns = [table[name].to_pylist() for name in names]
    return list(zip(*columns, strict=True))


class _HalfWritten:
    """A binary file whose ``write`` stops halfway for a while: a crash then finds a torn file."""

    def __init__(self, file: Any, delay: float) -> None:
        self._file = file
        self._delay = delay

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        half = len(view) // 2
        written = self._file.write(view[:half])
        self._file.flush()
        time.sleep(self._delay)
        return int(written) + int(self._file.write(view[half:]))

    def __enter__(self) -> _HalfWritten:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def slow_writes(delay: float) -> Callable[[], None]:
    """Slow every file the export writes down, so that a kill lands while files are half written.

    Installed by the test itself (in the killed child process, or around an in-process call): a local
    file's bytes stop halfway for ``delay`` seconds, whatever the export does to make files appear whole;
    an object store's file waits ``delay`` before its upload; a Delta commit waits ``delay`` after its
    files. Returns the function that undoes it.
    """
    import deltalake

    import capture.compact
    import capture.export.dataset
    import capture.export.delta
    import capture.export.write

    undo: list[Callable[[], None]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        old = getattr(owner, name, None)
        setattr(owner, name, value)
        undo.append(lambda: delattr(owner, name) if old is None else setattr(owner, name, old))

    def slow_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        opened = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 - closed by its caller
        return _HalfWritten(opened, delay) if "w" in mode and "b" in mode else opened

    patch(capture.export.dataset, "open", slow_open)  # shadows the builtin in that module only
    original = capture.export.dataset.write_atomic

    @functools.wraps(original)
    def write_atomic(filesystem: Any, path: str, data: Any) -> None:
        if not capture.export.dataset._is_local(filesystem):
            time.sleep(delay)  # one PUT per file: the wait goes before it
        original(filesystem, path, data)

    for module in (capture.export.dataset, capture.export.write, capture.compact, capture.export.delta):
        patch(module, "write_atomic", write_atomic)
    create = deltalake.DeltaTable.create_write_transaction

    @functools.wraps(create)
    def commit_later(self: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(delay)  # the unit's files are there, its commit not yet
        return create(self, *args, **kwargs)

    patch(deltalake.DeltaTable, "create_write_transaction", commit_later)

    def restore() -> None:
        while undo:
            undo.pop()()

    return restore


def run_and_kill(code: str, until: Callable[[], bool]) -> None:
    """Run Python ``code`` in a subprocess with slowed file writes; SIGKILL it once ``until()`` holds."""
    prelude = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import export_rows; export_rows.slow_writes(0.05); "
    )
    process = subprocess.Popen([sys.executable, "-c", prelude + code])
    try:
        deadline = time.monotonic() + 120
        while not until():
            assert process.poll() is None, "the subprocess ended before the moment to kill it"
            assert time.monotonic() < deadline, "the subprocess never reached the moment to kill it"
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
