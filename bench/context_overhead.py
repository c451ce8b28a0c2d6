"""What context tracking costs: the same workloads with and without it, interleaved in one run.

    python bench/context_overhead.py            # default sizes (a few minutes)
    python bench/context_overhead.py --quick    # small sizes, for a smoke run

"plain" = no hook listener, no triggers (a database without ``install``); "tracked" = hook active with a
context set, ``install(..., replica_identity_full=False)`` so both sides log the same row images (the
cost of REPLICA IDENTITY FULL is a separate, optional line). Each workload runs in rounds; a round runs
plain and tracked back to back (alternating which goes first) on the same embedded server, and the
printed ratio is the median of the per-round ratios. WAL bytes come from ``pg_current_wal_lsn`` deltas.

Signing (issue 14) is on by default for the tracked side (``--no-signing`` to compare): the hook signs
each context with HMAC-SHA256 (capture/signing.py). With a constant context the marker of each statement
is built and signed once and cached, so the hot path is unchanged; the microbench line shows the cost of
building a signed marker for a new (context, statement) pair, paid once per pair (a new context per
request pays it for each statement of the request). ``(e)`` is the write-path goal: single-row
INSERT+UPDATE transactions, constant context, <= 1.10x as the median of at least 5 interleaved rounds;
``--repeat N`` runs it N times and prints the spread of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import orm

from bemi_tt.context import configure_context, encode_context, set_context
from bemi_tt.embedded import EmbeddedPostgres
from bemi_tt.hook import _before_cursor_execute, install_hook, uninstall_hook
from bemi_tt.triggers import install

CONTEXT = {"user_id": 187234, "endpoint": "/todo/complete", "method": "PUT"}

metadata = sa.MetaData()
items = sa.Table(
    "items", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("v", sa.Text, nullable=False),
    sa.Column("n", sa.Integer, nullable=False),
)


class Base(orm.DeclarativeBase):
    pass


class Item(Base):
    __table__ = items


@dataclass
class Result:
    name: str
    rows: int
    seconds: dict[str, list[float]] = field(default_factory=lambda: {"plain": [], "tracked": []})
    wal: dict[str, list[int]] = field(default_factory=lambda: {"plain": [], "tracked": []})

    def ratio(self) -> float:
        pairs = zip(self.seconds["plain"], self.seconds["tracked"], strict=True)
        return statistics.median(t / p for p, t in pairs)

    def wal_per_row(self, side: str) -> float:
        return statistics.median(self.wal[side]) / self.rows

    def line(self) -> str:
        plain, tracked = (sum(self.seconds[s]) for s in ("plain", "tracked"))
        wal_p, wal_t = self.wal_per_row("plain"), self.wal_per_row("tracked")
        return (f"{self.name:<44} {self.rows:>7} {plain:>9.3f} {tracked:>9.3f} {self.ratio():>6.3f}x "
                f"{wal_p:>8.1f} {wal_t:>8.1f} {wal_t / wal_p:>6.3f}x")


def _lsn(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')")).scalar_one())


def _reset(engine: sa.Engine, rows: int = 0) -> None:
    """Empty ``items`` (and optionally fill it with ``rows`` rows), untimed and with no context."""
    set_context(None)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE items"))
        if rows:
            conn.execute(sa.text("INSERT INTO items SELECT g, 'v' || g, g FROM generate_series(1, :n) g"),
                         {"n": rows})
        conn.execute(sa.text("ANALYZE items"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("CHECKPOINT"))


Workload = Callable[[sa.Engine, int, int], None]  # (engine, first id, rows)


def single_insert(engine: sa.Engine, start: int, rows: int) -> None:
    statement = items.insert()
    for i in range(start, start + rows):
        with engine.begin() as conn:
            conn.execute(statement, {"id": i, "v": "task", "n": i})


def single_insert_new_context(engine: sa.Engine, start: int, rows: int) -> None:
    """Like a web app: every transaction (request) sets its own context first."""
    statement = items.insert()
    tracked = _TRACKING["on"]
    for i in range(start, start + rows):
        if tracked:
            set_context({"user_id": i % 1000, "endpoint": "/todo", "method": "POST"})
        with engine.begin() as conn:
            conn.execute(statement, {"id": i, "v": "task", "n": i})


def single_update(engine: sa.Engine, start: int, rows: int) -> None:
    statement = items.update().where(items.c.id == sa.bindparam("key")).values(n=sa.bindparam("value"))
    for i in range(start, start + rows):
        with engine.begin() as conn:
            conn.execute(statement, {"key": i, "value": -i})


def single_insert_update(engine: sa.Engine, start: int, rows: int) -> None:
    """The goal workload: each transaction inserts a row and updates it (two statements, one commit)."""
    insert = items.insert()
    update = items.update().where(items.c.id == sa.bindparam("key")).values(n=sa.bindparam("value"))
    for i in range(start, start + rows):
        with engine.begin() as conn:
            conn.execute(insert, {"id": i, "v": "task", "n": i})
            conn.execute(update, {"key": i, "value": -i})


def orm_insert(engine: sa.Engine, start: int, rows: int) -> None:
    for i in range(start, start + rows):
        with orm.Session(engine) as session:
            session.add(Item(id=i, v="task", n=i))
            session.commit()


def orm_update(engine: sa.Engine, start: int, rows: int) -> None:
    for i in range(start, start + rows):
        with orm.Session(engine) as session:
            item = session.get(Item, i)
            assert item is not None
            item.n = -i
            session.commit()


def bulk_insert(engine: sa.Engine, start: int, rows: int) -> None:
    with engine.begin() as conn:
        conn.execute(items.insert(), [{"id": i, "v": "task", "n": i} for i in range(start, start + rows)])


def bulk_update(engine: sa.Engine, start: int, rows: int) -> None:
    with engine.begin() as conn:
        where = items.c.id.between(start, start + rows - 1)
        conn.execute(items.update().where(where).values(n=items.c.n + 1))


_TRACKING = {"on": False}


def _side(name: str, engines: dict[str, sa.Engine]) -> sa.Engine:
    if name == "tracked":
        install_hook()
        set_context(CONTEXT)
        _TRACKING["on"] = True
    else:
        uninstall_hook()
        set_context(None)
        _TRACKING["on"] = False
    return engines[name]


def run_single(result: Result, work: Workload, engines: dict[str, sa.Engine], rounds: int,
               prefill: bool, block: int = 500) -> None:
    """Single-row transactions in blocks of ``block`` per side, alternating which side goes first, so a
    pair of blocks sees the same machine load; the ratio is the median over pairs."""
    blocks = max(rounds, result.rows // block)
    per_block = result.rows // blocks
    for engine in engines.values():
        _reset(engine, result.rows if prefill else 0)
    for r in range(blocks):
        order = ("plain", "tracked") if r % 2 == 0 else ("tracked", "plain")
        for name in order:
            engine = _side(name, engines)
            before = _lsn(engine)
            t0 = time.perf_counter()
            work(engine, 1 + r * per_block, per_block)
            result.seconds[name].append(time.perf_counter() - t0)
            result.wal[name].append((_lsn(engine) - before) * blocks)
    set_context(None)


def run_bulk(result: Result, work: Workload, engines: dict[str, sa.Engine], rounds: int,
             prefill: bool) -> None:
    """One big statement per side per round, on a freshly reset table."""
    for r in range(rounds):
        order = ("plain", "tracked") if r % 2 == 0 else ("tracked", "plain")
        for name in order:
            _reset(engines[name], result.rows if prefill else 0)
            engine = _side(name, engines)
            before = _lsn(engine)
            t0 = time.perf_counter()
            work(engine, 1, result.rows)
            result.seconds[name].append(time.perf_counter() - t0)
            result.wal[name].append(_lsn(engine) - before)
    set_context(None)


def hook_microbench() -> tuple[float, float, float]:
    """Microseconds: hook with no context, hook with a context (cached), set_context of a small dict."""
    class Dialect:
        name = "postgresql"

    class Conn:
        dialect = Dialect()

    conn, statement = Conn(), "INSERT INTO items (id, v, n) VALUES (%(id)s, %(v)s, %(n)s)"
    n = 200_000
    set_context(None)
    none = timeit.timeit(lambda: _before_cursor_execute(conn, None, statement, None, None, False), number=n)
    set_context(CONTEXT)
    cached = timeit.timeit(lambda: _before_cursor_execute(conn, None, statement, None, None, False), number=n)
    setting = timeit.timeit(lambda: set_context(CONTEXT), number=n // 10)
    set_context(None)
    return none / n * 1e6, cached / n * 1e6, setting / (n // 10) * 1e6


def marker_microbench() -> tuple[float, float]:
    """Microseconds to build the marker of a new (context, statement) pair: unsigned, signed."""
    statement = "INSERT INTO items (id, v, n) VALUES (%(id)s, %(v)s, %(n)s)"
    n = 50_000
    out = []
    for key in (None, "bench-signing-key-0123456789abcdef"):
        configure_context(signing_key=key)
        enc = encode_context(CONTEXT)
        assert enc is not None

        def build(enc: Any = enc) -> None:
            enc.statements.clear()
            enc.marked(statement)

        out.append(timeit.timeit(build, number=n) / n * 1e6)
    configure_context(signing_key=None)
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run (~30 s)")
    parser.add_argument("--single", type=int, default=None, help="single-row transactions per workload")
    parser.add_argument("--bulk", type=int, default=None, help="rows of the bulk workloads")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the bulk workloads")
    parser.add_argument("--only", default="", help="run only workloads whose label contains this text")
    parser.add_argument("--no-signing", action="store_true", help="tracked side without a signing key")
    parser.add_argument("--repeat", type=int, default=1, help="run each workload this many times")
    args = parser.parse_args(argv)
    single = args.single or (1_000 if args.quick else 20_000)
    bulk = args.bulk or (10_000 if args.quick else 100_000)
    rounds = args.rounds or (3 if args.quick else 5)

    none_us, cached_us, set_us = hook_microbench()
    print(f"hook per statement: {none_us:.2f} us without context, {cached_us:.2f} us with a context; "
          f"set_context: {set_us:.2f} us")
    unsigned_us, signed_us = marker_microbench()
    print(f"marker of a new (context, statement) pair: {unsigned_us:.2f} us unsigned, {signed_us:.2f} us "
          "signed (once per pair, then cached)")
    if not args.no_signing:
        configure_context(signing_key="bench-signing-key-0123456789abcdef")
    print(f"signing: {'off' if args.no_signing else 'on (HMAC-SHA256)'}")

    with EmbeddedPostgres() as pg:
        admin = sa.create_engine(pg.url("postgresql+psycopg"), isolation_level="AUTOCOMMIT")
        engines = {}
        for name in ("plain", "tracked"):
            with admin.connect() as conn:
                conn.execute(sa.text(f"CREATE DATABASE bench_{name}"))
            engines[name] = sa.create_engine(pg.url("postgresql+psycopg", f"bench_{name}"))
            metadata.create_all(engines[name])
        admin.dispose()
        install(engines["tracked"], replica_identity_full=False)
        server = engines["plain"].connect().exec_driver_sql("SELECT version()").scalar_one()
        print(f"server: {server}")
        print(f"sizes: single={single} bulk={bulk} rounds={rounds}; psycopg 3, SQLAlchemy {sa.__version__}")

        plans: list[tuple[str, int, Callable[..., None], Workload, bool]] = [
            ("(e) Core single-row INSERT+UPDATE transactions", single, run_single, single_insert_update,
             False),
            ("(a) Core single-row INSERT transactions", single, run_single, single_insert, False),
            ("(a) Core single-row UPDATE transactions", single, run_single, single_update, True),
            ("(a') INSERT, new context per transaction", single, run_single, single_insert_new_context,
             False),
            ("(b) Core executemany INSERT", bulk, run_bulk, bulk_insert, False),
            ("(c) Core one UPDATE of all rows", bulk, run_bulk, bulk_update, True),
            ("(d) ORM single-row INSERT (Session)", single // 2, run_single, orm_insert, False),
            ("(d) ORM single-row UPDATE (Session)", single // 2, run_single, orm_update, True),
        ]
        print(f"{'workload':<44} {'rows':>7} {'plain s':>9} {'track s':>9} {'ratio':>7} "
              f"{'WAL/row':>8} {'WAL/row':>8} {'ratio':>7}")
        print(f"{'':<44} {'':>7} {'':>9} {'':>9} {'':>7} {'plain':>8} {'tracked':>8} {'':>7}")
        for name, rows, runner, work, prefill in plans:
            if args.only not in name:
                continue
            for _ in range(args.repeat):
                result = Result(name, rows)
                runner(result, work, engines, rounds, prefill)
                print(result.line(), flush=True)
                if args.repeat > 1:
                    ratios = sorted(t / p for p, t in zip(result.seconds["plain"], result.seconds["tracked"],
                                                          strict=True))
                    print(f"{'':<44} per-pair ratios: min {ratios[0]:.3f}  quartiles "
                          f"{ratios[len(ratios) // 4]:.3f} {ratios[len(ratios) // 2]:.3f} "
                          f"{ratios[3 * len(ratios) // 4]:.3f}  max {ratios[-1]:.3f}  ({len(ratios)} pairs)",
                          flush=True)
        for engine in engines.values():
            engine.dispose()
    install_hook()
    return 0


if __name__ == "__main__":
    sys.exit(main())
