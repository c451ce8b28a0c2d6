"""Benchmark: capture worker throughput, memory and latency against ``pg_recvlogical`` on the same backlog.

One run, one embedded server:
1. builds a backlog of about ``--changes`` row changes with a context message per statement (inserts,
   updates and deletes in transactions of 1 to 1,000 rows), with every slot created before it;
2. floor: ``pg_recvlogical`` streams the backlog with pgoutput (proto 1, messages) to /dev/null
   (``--endpos``); worker: ``python -m capture --once`` drains it into ``changes`` in another database,
   once with the streaming reader (``--reader stream``, the default) and once with the old peek path
   (``--reader sql``, ``pg_logical_slot_peek_binary_changes``), in the same run. Prints medians of
   ``--runs`` runs (a fresh slot each), the ratios to the floor and the worker's peak RSS; then one run
   with ``changes`` in the source database itself (its own writes are decoded too). The destinations
   live on a second server: on the source's, every run after the first would also decode the WAL of
   the earlier runs' COPY (``--once`` reads up to the flush position at its start), which
   pg_recvlogical's ``--endpos`` never reads;
3. one transaction of ``--changes`` rows: worker rate and peak RSS (it must not hold it in memory);
4. latency from commit to row in ``changes`` at a steady ``--rate`` changes/s for ``--seconds``.

    python bench/capture_throughput.py                       # 1M changes, 3 runs
    python bench/capture_throughput.py --changes 100000 --runs 1 --seconds 5
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psycopg
from psycopg import sql

from bemi_tt.embedded import EmbeddedPostgres, find_bindir
from capture.schema import changes_ddl
from capture.stitch import CHANGE_COLUMNS
from capture.worker import run

LOAD = """
CREATE PROCEDURE bench_load(target int) LANGUAGE plpgsql AS $$
DECLARE
  done int := 0; next_id int := 0; k int; i int := 0;
BEGIN
  WHILE done < target LOOP
    i := i + 1;
    k := least(1 + (i * 7919) % 1000, target - done);           -- 1 .. 1000 rows per transaction
    PERFORM pg_logical_emit_message(true, 'bemi', jsonb_build_object(
      'user_id', i % 97, 'endpoint', '/api/items', 'SQL', 'INSERT INTO items ...')::text);
    IF i % 3 = 0 AND next_id > k THEN                                -- update k existing rows
      UPDATE items SET qty = qty + 1, price = price + 0.25, updated_at = clock_timestamp()
        WHERE id BETWEEN next_id - k AND next_id - 1;
    ELSIF i % 7 = 0 AND next_id > 2 * k THEN                         -- delete k rows
      DELETE FROM items WHERE id BETWEEN next_id - 2 * k AND next_id - k - 1;
    ELSE
      INSERT INTO items SELECT g, g % 50, (g % 10000) / 100.0, 'item number ' || g, g % 2 = 0,
        clock_timestamp() FROM generate_series(next_id, next_id + k - 1) g;
      next_id := next_id + k;
    END IF;
    GET DIAGNOSTICS k = ROW_COUNT;
    done := done + greatest(k, 1);
    COMMIT;
  END LOOP;
END $$
"""


def create_database(admin: psycopg.Connection, name: str) -> None:
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def count_changes(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM changes WHERE operation <> 'SNAPSHOT'").fetchone()
    return int(row[0]) if row else 0


def worker(dsn: str, destination: str, slot: str, reader: str = "stream") -> tuple[float, float, float]:
    """Run ``python -m capture --once --reader <reader>``; return (seconds, peak RSS in MB, CPU seconds).

    The CPU seconds (user + system of the worker process, start-up included) tell the worker's own cost
    apart from the wall time, which the servers and the machine's load decide as much.
    """
    args = [
        sys.executable,
        "-m",
        "capture",
        "--dsn",
        dsn,
        "--destination",
        destination,
        "--slot",
        slot,
        "--once",
        "--no-snapshot",
        "--quiet",
        "--reader",
        reader,
    ]
    started = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"worker failed with exit code {process.returncode}")
    return seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def write_floor(destination: str, rows: int = 200_000) -> float:
    """Changes/s of COPYing (text format, like the worker) up to ``rows`` captured rows into an empty
    ``changes`` table with the same DDL: what the destination alone costs, whatever the worker does."""
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in CHANGE_COLUMNS)
    with psycopg.connect(destination) as conn, tempfile.TemporaryFile() as spool:
        # spooled through a file: holding the rows in memory would inflate the next worker's peak RSS
        with (
            conn.cursor() as cur,
            cur.copy(
                sql.SQL("COPY (SELECT {} FROM changes ORDER BY id LIMIT {}) TO STDOUT").format(
                    columns, sql.Literal(rows)
                )
            ) as copy,
        ):
            count = 0
            for chunk in copy:
                count += bytes(chunk).count(b"\n")
                spool.write(chunk)
        conn.execute("DROP TABLE IF EXISTS changes_write_floor")
        conn.execute(changes_ddl("public", "changes_write_floor"))
        conn.commit()
        spool.seek(0)
        started = time.perf_counter()
        with (
            conn.cursor() as cur,
            cur.copy(sql.SQL("COPY changes_write_floor ({}) FROM STDIN").format(columns)) as copy,
        ):
            while piece := spool.read(1 << 20):
                copy.write(piece)
        conn.commit()
        seconds = time.perf_counter() - started
        conn.execute("DROP TABLE changes_write_floor")
        conn.commit()
    return count / seconds


def recvlogical(dsn: str, slot: str, endpos: str) -> float:
    args = [
        str(find_bindir() / "pg_recvlogical"),
        "-d",
        dsn,
        "--slot",
        slot,
        "--start",
        "--endpos",
        endpos,
        "--no-loop",
        "-o",
        "proto_version=1",
        "-o",
        "publication_names=bemi_tt",
        "-o",
        "messages=true",
        "-f",
        "/dev/null",
    ]
    started = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - started


def latency(destination: str, source: str, rate: int, seconds: float) -> list[float]:
    """Seconds from commit to row in ``changes`` at ``destination`` for rows written at ``rate`` changes/s."""
    run(source, destination=destination, slot="latency", once=True, snapshot=False)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "capture",
            "--dsn",
            source,
            "--destination",
            destination,
            "--slot",
            "latency",
            "--no-snapshot",
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
    )
    samples: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        last = 0
        with psycopg.connect(destination, autocommit=True) as conn:
            while not stop.is_set() or len(samples) < expected:
                for row_id, lag in conn.execute(
                    "SELECT id, extract(epoch FROM clock_timestamp() - committed_at)::float8 FROM changes"
                    " WHERE id > %s AND \"table\" = 'ticks' ORDER BY id",
                    (last,),
                ):
                    last = row_id
                    samples.append(lag)
                time.sleep(0.005)

    per_txn = 10
    expected = int(seconds * rate) // per_txn * per_txn
    poller = threading.Thread(target=poll, daemon=True)
    try:
        # steady state: rows are written once the worker streams (its start-up is reported on its own)
        started = time.perf_counter()
        with psycopg.connect(source, autocommit=True) as conn:
            while not conn.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'latency'"
            ).fetchone()[0]:  # type: ignore[index]
                if time.perf_counter() - started > 60 or process.poll() is not None:
                    raise RuntimeError("the latency worker did not start streaming")
                time.sleep(0.01)
        print(f"latency worker: streaming {time.perf_counter() - started:.2f} s after its start", flush=True)
        poller.start()
        with psycopg.connect(source, autocommit=True) as conn:
            start = time.perf_counter()
            for i in range(expected // per_txn):
                due = start + i * per_txn / rate
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                with conn.transaction():
                    conn.execute("SELECT pg_logical_emit_message(true, 'bemi', '{\"job\": \"ticks\"}')")
                    conn.execute(
                        "INSERT INTO ticks SELECT g FROM generate_series(%s::int, %s::int) g",
                        (i * per_txn, i * per_txn + per_txn - 1),
                    )
        stop.set()
        poller.join(60)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    return samples


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--changes", type=int, default=1_000_000, help="size of the backlog (row changes)")
    parser.add_argument("--runs", type=int, default=3, help="floor and worker runs (medians)")
    parser.add_argument("--rate", type=int, default=1000, help="changes/s for the latency measurement")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of the latency measurement")
    args = parser.parse_args()
    if args.changes < 1000 or args.runs < 1:
        parser.error("--changes must be >= 1000 and --runs >= 1")
    settings = {"max_wal_size": "4GB", "checkpoint_timeout": "30min"}
    with EmbeddedPostgres(settings=settings) as pg, EmbeddedPostgres(settings=settings) as target:
        source = pg.url(database="bench_source")
        with psycopg.connect(pg.dsn, autocommit=True) as admin:
            create_database(admin, "bench_source")
        with psycopg.connect(target.dsn, autocommit=True) as admin:
            for name in ["bench_big", "bench_latency"] + [
                f"bench_{kind}_{i}" for i in range(args.runs) for kind in ("dest", "peek")
            ]:
                create_database(admin, name)
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE items (id int PRIMARY KEY, qty int, price numeric(12,2), title text,"
                " done bool, updated_at timestamptz)"
            )
            conn.execute("CREATE TABLE ticks (id int PRIMARY KEY)")
            conn.execute(LOAD)
        for i in range(args.runs):  # every slot exists before the backlog
            for kind, slot in (("dest", "worker"), ("peek", "peek")):
                run(
                    source,
                    destination=target.url(database=f"bench_{kind}_{i}"),
                    slot=f"{slot}_{i}",
                    once=True,
                    snapshot=False,
                )
        same = pg.url(database="bench_source")
        with psycopg.connect(source, autocommit=True) as conn:
            for i in range(args.runs):
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (f"floor_{i}",))
            conn.execute("SELECT pg_create_logical_replication_slot('same', 'pgoutput')")
            started = time.perf_counter()
            conn.execute("CALL bench_load(%s)", (args.changes,))
            built = time.perf_counter() - started
            endpos = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0]  # type: ignore[index]
            wal = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_flush_lsn(), confirmed_flush_lsn)"
                " FROM pg_replication_slots WHERE slot_name = 'same'"
            ).fetchone()[0]  # type: ignore[index]
        print(f"backlog: {args.changes:,} changes, {int(wal) / 2**20:.0f} MB of WAL, built in {built:.1f} s")
        floors, workers, peeks, rss, writes, cpus = [], [], [], [], [], []
        for i in range(args.runs):
            floors.append(args.changes / recvlogical(source, f"floor_{i}", endpos))
            rates = {}
            for kind, slot, reader in (("dest", "worker", "stream"), ("peek", "peek", "sql")):
                destination = target.url(database=f"bench_{kind}_{i}")
                seconds, peak, cpu = worker(source, destination, f"{slot}_{i}", reader)
                captured = count_changes(destination)
                if captured != args.changes:
                    raise SystemExit(
                        f"worker ({reader}) captured {captured} changes, expected {args.changes}"
                    )
                rates[reader] = args.changes / seconds
                rss.append(peak)
                if reader == "stream":
                    cpus.append(cpu / args.changes * 1e6)
            workers.append(rates["stream"])
            peeks.append(rates["sql"])
            writes.append(write_floor(target.url(database=f"bench_dest_{i}")))
            print(
                f"run {i + 1}: pg_recvlogical {floors[-1]:,.0f} changes/s, worker streaming"
                f" {workers[-1]:,.0f} changes/s ({workers[-1] / floors[-1]:.2f}x), worker peek path"
                f" {peeks[-1]:,.0f} changes/s ({peeks[-1] / floors[-1]:.2f}x),"
                f" peak RSS {max(rss[-2:]):.0f} MB, worker CPU {cpus[-1]:.1f} us/change;"
                f" COPY into changes alone {writes[-1]:,.0f} rows/s; load average {os.getloadavg()[0]:.1f}"
            )
        floor, rate, write = statistics.median(floors), statistics.median(workers), statistics.median(writes)
        peek = statistics.median(peeks)
        print(
            f"median: pg_recvlogical {floor:,.0f} changes/s, worker streaming {rate:,.0f} changes/s "
            f"({rate / floor:.2f}x, goal >= 0.5x), worker peek path {peek:,.0f} changes/s "
            f"({peek / floor:.2f}x), peak RSS {max(rss):.0f} MB, worker CPU (streaming, user + system)"
            f" {statistics.median(cpus):.1f} us/change"
        )
        print(
            f"destination bound: COPY of the captured rows into an empty changes table alone "
            f"{write:,.0f} rows/s ({write / floor:.2f}x pg_recvlogical; worker {rate / write:.2f}x of it)"
        )
        seconds, peak, _ = worker(source, same, "same")
        print(
            f"changes in the source database (own writes decoded and skipped): "
            f"{args.changes / seconds:,.0f} changes/s ({args.changes / seconds / floor:.2f}x),"
            f" peak RSS {peak:.0f} MB"
        )

        big = target.url(database="bench_big")
        run(source, destination=big, slot="big", once=True, snapshot=False)
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("SELECT pg_logical_emit_message(true, 'bemi', '{\"job\": \"bulk\"}')")
            conn.execute(
                "INSERT INTO items SELECT g, 1, 1.5, 'bulk', true, now()"
                " FROM generate_series(%s::int, %s::int) g",
                (10**8, 10**8 + args.changes - 1),
            )
        seconds, peak, _ = worker(source, big, "big")
        print(
            f"one transaction of {args.changes:,} rows: worker {args.changes / seconds:,.0f} changes/s, "
            f"peak RSS {peak:.0f} MB (goal <= 300 MB)"
        )

        samples = latency(target.url(database="bench_latency"), source, args.rate, args.seconds)
        print(
            f"latency at {args.rate:,} changes/s for {args.seconds:.0f} s ({len(samples):,} rows): "
            f"p50 {percentile(samples, 0.5) * 1000:.0f} ms, p99 {percentile(samples, 0.99) * 1000:.0f} ms"
            f" (goal p99 <= 100 ms)"
        )
    print(f"benchmark process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
