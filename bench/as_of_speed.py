"""How fast ``as_of`` is, against the floor of reading the data at all, on both sources, in one run.

    python bench/as_of_speed.py                 # 100k keys x 10 versions = 1M changes, then 2M and 4M
    python bench/as_of_speed.py --keys 10000    # a quick run (100k changes)
    python bench/as_of_speed.py --no-growth     # only the first history length

A synthetic history (``--keys`` keys, 10 versions each, 5% of the changes after the first are deletes,
100 changes per transaction) is written to a ``changes`` table on an embedded PostgreSQL server (indexed
as the worker creates it) and exported to Parquet with the real exporter. Each timing is the median of
``--runs`` runs, at the middle of history:

* floor: DuckDB reading just the columns an as-of needs from the same Parquet files
  (``SELECT count(*), sum(length(after)), max(commit_position) ...``);
* ``as_of`` on the Parquet source, returning the typed DataFrame;
* a hand-written ``DISTINCT ON`` query on PostgreSQL (rows fetched as text, untyped);
* ``as_of`` on the PostgreSQL source, returning the typed DataFrame;
* the same with ``PostgresSource(mirror=True)``: its first call (reads the table's changes into memory)
  and later calls (read only what is new, then run in memory).

Ratios are against the floor measured in the same run. Growth: the same keys with 20 and 40 versions.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv

from bemi_tt.embedded import EmbeddedPostgres
from bemi_tt.sources import ParquetSource, PostgresSource
from bemi_tt.timetravel import as_of
from capture.export import export_parquet, list_dataset_files
from capture.schema import changes_ddl, schemas_ddl

TABLE = "bench"
COLUMNS = (
    '[{"name":"id","type":"integer","type_oid":23,"key":true},'
    '{"name":"name","type":"text","type_oid":25,"key":false},'
    '{"name":"qty","type":"integer","type_oid":23,"key":false},'
    '{"name":"price","type":"numeric(10,2)","type_oid":1700,"key":false},'
    '{"name":"updated_at","type":"timestamp with time zone","type_oid":1184,"key":false}]'
)

GENERATE = """
WITH raw AS (
    SELECT i, i % $keys AS k, i // $keys AS v, hash(i) % 100 AS dice FROM range($keys * $versions) t(i)
), ops AS (
    -- a key is deleted when its dice says so (5% of versions after the first), and re-created next
    SELECT i, k, v, CASE WHEN v = 0 THEN 'CREATE'
                         WHEN dice < 5 THEN 'DELETE'
                         WHEN lag(dice) OVER (PARTITION BY k ORDER BY v) < 5 AND v > 1 THEN 'CREATE'
                         ELSE 'UPDATE' END AS operation
    FROM raw
), rows AS (
    SELECT i, k, v, operation, CASE WHEN operation = 'DELETE' THEN '{}' ELSE
           '{"id": ' || k || ', "qty": ' || (i % 1000) || ', "name": "item ' || k || ' version ' || v ||
           '", "price": ' || (i % 100000) // 100 || '.' || lpad(CAST(i % 100 AS VARCHAR), 2, '0') ||
           ', "updated_at": "' || strftime(TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_microseconds(i * 1000),
                                           '%Y-%m-%dT%H:%M:%S.%f') || '+00:00"}' END AS after
    FROM ops
)
-- before: the old row, as REPLICA IDENTITY FULL (what bemi_tt.install sets) records it
SELECT CAST(k AS VARCHAR) AS primary_key, 'bench' AS "table", operation,
       CASE WHEN operation = 'CREATE' THEN '{}'
            ELSE lag(after) OVER (PARTITION BY k ORDER BY v) END AS before,
       after, '{"user_id": ' || (i % 97) || '}' AS context,
       TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_microseconds(i * 1000) AS committed_at,
       'public' AS "schema", 'bench' AS "database", i // 100 AS transaction_id,
       i * 16 AS "position", (i // 100) * 1600 + 1600 AS commit_position, CAST(i % 100 AS INTEGER) AS ordinal
FROM rows ORDER BY i
"""


def generate(keys: int, versions: int) -> pa.Table:
    sql = GENERATE.replace("$keys", str(keys)).replace("$versions", str(versions))
    return duckdb.sql(sql).to_arrow_table()


def load_postgres(dsn: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer, pacsv.WriteOptions(include_header=False))
    columns = ", ".join(f'"{c}"' for c in table.column_names)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(changes_ddl())
        conn.execute(schemas_ddl())
        conn.execute("TRUNCATE changes, changes_schemas")
        with conn.cursor() as cur, cur.copy(f"COPY changes ({columns}) FROM STDIN (FORMAT csv)") as copy:
            view = buffer.getbuffer()
            for start in range(0, len(view), 1 << 20):
                copy.write(view[start : start + (1 << 20)])
        conn.execute(
            "INSERT INTO changes_schemas VALUES ('public', %s, 1600, 0, '2026-01-01', %s::jsonb)",
            (TABLE, COLUMNS),
        )
        conn.execute("VACUUM ANALYZE changes")


def median_time(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    times = []
    result = None
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


NAMES = ("floor", "as_of parquet", "DISTINCT ON", "as_of postgres", "mirror first call", "mirror warm")

DISTINCT_ON = f"""
SELECT primary_key, after::text FROM (
    SELECT DISTINCT ON (primary_key) primary_key, operation, after FROM changes
    WHERE "schema" = 'public' AND "table" = '{TABLE}' AND committed_at <= %s
    ORDER BY primary_key, commit_position DESC, ordinal DESC
) latest WHERE operation <> 'DELETE'"""


def run(dsn: str, workdir: Path, keys: int, versions: int, runs: int) -> dict[str, float]:
    table = generate(keys, versions)
    load_postgres(dsn, table)
    directory = workdir / f"export-{versions}"
    export_parquet(dsn, str(directory), progress=False)
    middle = table["committed_at"][table.num_rows // 2].as_py()
    _, files = list_dataset_files(str(directory))
    listed = ", ".join(f"'{f}'" for f in files)
    floor_sql = (
        f"SELECT count(*), sum(length(CAST(after AS VARCHAR))), max(commit_position) "
        f"FROM read_parquet([{listed}])"
    )
    con = duckdb.connect()
    parquet, postgres = ParquetSource(directory), PostgresSource(dsn)

    def distinct_on() -> int:
        with psycopg.connect(dsn) as conn:
            return len(conn.execute(DISTINCT_ON, (middle,)).fetchall())

    results: dict[str, float] = {}
    results["floor"], _ = median_time(lambda: con.sql(floor_sql).fetchall(), runs)
    results["as_of parquet"], frame = median_time(lambda: as_of(TABLE, middle, source=parquet), runs)
    results["DISTINCT ON"], rows = median_time(distinct_on, runs)
    results["as_of postgres"], frame_pg = median_time(lambda: as_of(TABLE, middle, source=postgres), runs)
    mirrored = PostgresSource(dsn, mirror=True)
    results["mirror first call"], _ = median_time(lambda: as_of(TABLE, middle, source=mirrored), 1)
    results["mirror warm"], frame_mirror = median_time(lambda: as_of(TABLE, middle, source=mirrored), runs)
    assert len(frame) == len(frame_pg) == len(frame_mirror) == rows, (len(frame), len(frame_pg), rows)
    results["rows"] = float(len(frame))
    results["changes"] = float(table.num_rows)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000, help="distinct keys (default 100000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per timing; the median is printed")
    parser.add_argument("--no-growth", action="store_true", help="skip the 2x and 4x history lengths")
    args = parser.parse_args()
    lengths = [10] if args.no_growth else [10, 20, 40]
    with tempfile.TemporaryDirectory() as tmp, EmbeddedPostgres() as pg:
        dsn = pg.dsn
        floors = []
        for versions in lengths:
            r = run(dsn, Path(tmp), args.keys, versions, args.runs)
            floors.append(r)
            floor = r["floor"]
            print(
                f"\n{int(r['changes']):,} changes ({args.keys:,} keys x {versions} versions), "
                f"as_of at the middle "
                f"of history -> {int(r['rows']):,} rows; median of {args.runs} runs"
            )
            for name in NAMES:
                print(f"  {name:<18} {r[name] * 1000:9.1f} ms  {r[name] / floor:6.2f}x floor")
            print(f"  as_of postgres / DISTINCT ON: {r['as_of postgres'] / r['DISTINCT ON']:.2f}x; "
                  f"mirror warm / DISTINCT ON: {r['mirror warm'] / r['DISTINCT ON']:.2f}x")
        if len(floors) > 1:
            print("\ngrowth with history length (relative to the first length):")
            for name in NAMES:
                row = "  ".join(f"{r[name] / floors[0][name]:5.2f}x" for r in floors)
                print(f"  {name:<18} {row}")


if __name__ == "__main__":
    main()
