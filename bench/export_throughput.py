"""Benchmark: Parquet and Delta export throughput against the floor of reading the rows out of PostgreSQL.

Fills ``changes`` with N realistic rows (20 tables, 10 UTC dates, JSON before/after/context), then, in
the same run, times (a) the floor: one ``COPY changes TO STDOUT (FORMAT binary)`` into memory, (b) a
full ``export_parquet`` into an empty local directory and (c) the same export with ``format="delta"``
(skipped with ``--no-delta`` or without ``deltalake``). Prints medians of ``--runs`` interleaved runs, the
ratio export rate / floor rate (goal >= 0.5) and the Delta/Parquet ratio (Delta rate / Parquet rate).

    python bench/export_throughput.py                 # 1M changes, embedded PostgreSQL
    python bench/export_throughput.py --changes 100000 --runs 3
    python bench/export_throughput.py --dsn postgresql://... (uses and drops table bench_export_changes)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time

import psycopg
from psycopg import sql

from capture.export import export_parquet
from capture.schema import changes_ddl

TABLE = "bench_export_changes"  # never the real changes table of a --dsn database

FILL = """
INSERT INTO {table} (primary_key, "table", operation, before, after, context, committed_at, "schema",
                     "database", transaction_id, "position", commit_position, ordinal)
SELECT (i % 50000)::text,
       'table_' || (i % 20),
       (ARRAY['CREATE', 'UPDATE', 'UPDATE', 'DELETE'])[1 + i % 4],
       CASE WHEN i % 4 = 0 THEN '{{}}'::jsonb ELSE jsonb_build_object(
           'id', i % 50000, 'title', 'task number ' || i, 'done', i % 3 = 0,
           'price', (i % 10000)::numeric / 100, 'tags', jsonb_build_array('a', i % 7, 'b'),
           'meta', jsonb_build_object('rev', i % 11, 'note', NULL)) END,
       CASE WHEN i % 4 = 3 THEN '{{}}'::jsonb ELSE jsonb_build_object(
           'id', i % 50000, 'title', 'task number ' || (i + 1), 'done', i % 3 = 1,
           'price', (i % 10000 + 1)::numeric / 100, 'tags', jsonb_build_array('a', i % 7, 'c'),
           'meta', jsonb_build_object('rev', i % 11 + 1, 'note', 'edited')) END,
       jsonb_build_object('user_id', i % 97, 'endpoint', '/api/todo/' || (i % 50000),
                          'SQL', 'UPDATE todo SET title=%(title)s WHERE todo.id = %(id_1)s'),
       timestamptz '2026-01-01 00:00:00+00' + (i::double precision * 864000 / {n}) * interval '1 second',
       'public', 'app', i / 4, 1000 + i * 100, 1000 + (i / 4) * 400 + 350, i % 4
FROM generate_series(0, {last}) AS i
"""


def fill(dsn: str, n: int) -> int:
    """Create ``changes`` with ``n`` rows; returns the table's size in bytes."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE)))
        conn.execute(changes_ddl(table=TABLE))
        conn.execute(
            sql.SQL(FILL).format(table=sql.Identifier(TABLE), n=sql.Literal(n), last=sql.Literal(n - 1))
        )
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(TABLE)))
        row = conn.execute("SELECT pg_total_relation_size(%s)", (TABLE,)).fetchone()
    return int(row[0]) if row else 0


def floor_once(dsn: str) -> tuple[float, int]:
    """Seconds and bytes to read every row with one binary COPY into memory."""
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        started = time.perf_counter()
        with cur.copy(sql.SQL("COPY {} TO STDOUT (FORMAT binary)").format(sql.Identifier(TABLE))) as copy:
            data = b"".join(copy)
        return time.perf_counter() - started, len(data)


def export_once(dsn: str, format: str = "parquet") -> tuple[float, int, int]:
    """Seconds, files and bytes of a full export (Parquet or Delta) into an empty directory."""
    directory = tempfile.mkdtemp(prefix="bemi_tt_bench_")
    try:
        started = time.perf_counter()
        stats = export_parquet(dsn, directory, progress=False, table=TABLE, format=format)
        return time.perf_counter() - started, stats.files, stats.bytes
    finally:
        shutil.rmtree(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=1_000_000, help="rows in changes (default 1M)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement; medians are printed")
    parser.add_argument("--dsn", help="an existing database (default: a throwaway embedded PostgreSQL)")
    parser.add_argument("--no-delta", action="store_true", help="skip the Delta export")
    args = parser.parse_args(argv)
    delta = not args.no_delta
    if delta:
        try:
            import deltalake  # noqa: F401
        except ImportError:
            print("deltalake is not installed (pip install 'bemi-tt[delta]'): skipping the Delta export")
            delta = False
    if args.changes < 1 or args.runs < 1:
        parser.error("--changes and --runs must be positive")

    server = None
    dsn = args.dsn
    if dsn is None:
        from bemi_tt.embedded import EmbeddedPostgres

        server = EmbeddedPostgres().start()
        dsn = server.dsn
    try:
        started = time.perf_counter()
        size = fill(dsn, args.changes)
        print(f"filled {args.changes} changes ({size / 1e6:.0f} MB) in {time.perf_counter() - started:.1f} s")
        floors, exports, deltas = [], [], []
        copy_bytes = files = written = delta_files = delta_written = 0
        for _ in range(args.runs):  # interleaved so all see the same machine load
            seconds, copy_bytes = floor_once(dsn)
            floors.append(seconds)
            seconds, files, written = export_once(dsn)
            exports.append(seconds)
            if delta:
                seconds, delta_files, delta_written = export_once(dsn, "delta")
                deltas.append(seconds)
        floor, export = statistics.median(floors), statistics.median(exports)
        print(
            f"floor  COPY binary to memory: {args.changes / floor:>10,.0f} changes/s "
            f"({floor:.2f} s, {copy_bytes / 1e6:.0f} MB; runs {', '.join(f'{s:.2f}' for s in floors)})"
        )
        print(
            f"export to Parquet (zstd):     {args.changes / export:>10,.0f} changes/s "
            f"({export:.2f} s, {files} files, {written / 1e6:.0f} MB; "
            f"runs {', '.join(f'{s:.2f}' for s in exports)})"
        )
        print(f"ratio export/floor: {floor / export:.2f}x (goal >= 0.5x)")
        if deltas:
            median = statistics.median(deltas)
            print(
                f"export to Delta (zstd):       {args.changes / median:>10,.0f} changes/s "
                f"({median:.2f} s, {delta_files} files, {delta_written / 1e6:.0f} MB; "
                f"runs {', '.join(f'{s:.2f}' for s in deltas)})"
            )
            print(f"ratio Delta/Parquet: {export / median:.2f}x, Delta/floor: {floor / median:.2f}x")
    finally:
        if server is not None:
            server.stop()
        else:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
