"""Spark ``as_of`` on a Parquet export against a floor measured in the same run (needs the [spark] extra).

    python bench/spark_speed.py                    # 250k keys x 4 versions = 1M changes, local[2]
    python bench/spark_speed.py --keys 25000       # 100k changes: a quick check

The history is the one of ``bench/as_of_speed.py`` (updates, 5% deletes with re-creation, contexts),
loaded into an embedded PostgreSQL and exported with the real exporter. One SparkSession (``--master``,
default ``local[2]``) then runs, interleaved, ``--runs`` times each (medians printed):

- ``floor``: the plainest Spark answer over the same files: each key's last ``after`` up to the middle of
  history by ``max_by`` over ``(commit_position, ordinal)`` (no prefix cut, no key moves, no TRUNCATE),
  deletes dropped, typed with ``from_json``; what a hand-written Spark job would do;
- ``bemi_tt.spark.as_of`` at the middle of history (the engine's rule: prefix cut, key moves, TRUNCATEs,
  fills, typed from the schema record);
- ``bemi_tt.as_of`` (DuckDB, one process) on the same export, for comparison.

Spark answers are written to Spark's ``noop`` sink (every row and column computed, nothing collected);
DuckDB's is a pandas DataFrame. Ratios: Spark ``as_of`` / floor, Spark ``as_of`` / DuckDB ``as_of``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from as_of_speed import TABLE, generate, load_postgres, pick_params

FLOOR = """
SELECT r.id, r.name, r.qty, r.price, CAST(r.updated_at AS TIMESTAMP) AS updated_at FROM (
    SELECT from_json(max_by(after, named_struct('cp', commit_position, 'o', ordinal)),
                     'id INT, name STRING, qty INT, price DECIMAL(10,2), updated_at STRING') AS r,
           max_by(operation, named_struct('cp', commit_position, 'o', ordinal)) AS op
    FROM bench_files WHERE committed_at <= TIMESTAMP '{ts}' GROUP BY primary_key
) l WHERE op <> 'DELETE'
"""


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=250_000, help="distinct keys (default 250000)")
    parser.add_argument("--versions", type=int, default=4, help="versions per key (default 4)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each (median)")
    parser.add_argument("--master", default="local[2]", help="Spark master (default local[2])")
    args = parser.parse_args()

    from pyspark.sql import SparkSession

    import bemi_tt
    from bemi_tt import EmbeddedPostgres
    from bemi_tt import spark as bt
    from capture.export import export_parquet, list_dataset_files

    with tempfile.TemporaryDirectory() as tmp, EmbeddedPostgres() as pg:
        history = generate(args.keys, args.versions)
        load_postgres(pg.dsn, history)
        directory = str(Path(tmp) / "export")
        export_parquet(pg.dsn, directory, progress=False)
        _, files = list_dataset_files(directory)
        middle = pick_params(history, args.keys)["middle"]

        started = time.perf_counter()
        spark = (
            SparkSession.builder.master(args.master)
            .appName("bemi_tt spark_speed")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.session.timeZone", "UTC")
            .getOrCreate()
        )
        spark.sparkContext.setLogLevel("ERROR")
        start_seconds = time.perf_counter() - started
        spark.read.schema(bt._spark_schema()).parquet(*files).createOrReplaceTempView("bench_files")

        def floor() -> None:
            spark.sql(FLOOR.format(ts=middle)).write.format("noop").mode("overwrite").save()

        def spark_as_of() -> None:
            bt.as_of(spark, directory, TABLE, middle).write.format("noop").mode("overwrite").save()

        def duckdb_as_of() -> None:
            bemi_tt.as_of(TABLE, middle, source=directory)

        rows = spark.sql(FLOOR.format(ts=middle)).count()  # the same answer, three ways
        assert rows == bt.as_of(spark, directory, TABLE, middle).count()
        assert rows == len(bemi_tt.as_of(TABLE, middle, source=directory))
        floor(), spark_as_of()  # warm: the JVM's first run of each plan compiles its code
        times: dict[str, list[float]] = {"floor": [], "spark as_of": [], "duckdb as_of": []}
        for _ in range(args.runs):
            times["floor"].append(_timed(floor))
            times["spark as_of"].append(_timed(spark_as_of))
            times["duckdb as_of"].append(_timed(duckdb_as_of))
        spark.stop()

    median = {name: statistics.median(values) for name, values in times.items()}
    load = os.getloadavg()
    print(
        f"{history.num_rows:,} changes ({args.keys:,} keys x {args.versions} versions), {rows:,} rows at the "
        f"middle of history, {len(files)} Parquet files; Spark {args.master} (started in "
        f"{start_seconds:.0f} s); median of {args.runs} runs; load average {load[0]:.1f} on "
        f"{os.cpu_count()} cores"
    )
    for name, value in median.items():
        spread = ", ".join(f"{v:.2f}" for v in times[name])
        print(f"  {name:<14} {value:8.2f} s   ({spread})")
    print(f"  spark as_of / floor        {median['spark as_of'] / median['floor']:.2f}x")
    print(f"  spark as_of / duckdb as_of {median['spark as_of'] / median['duckdb as_of']:.2f}x")


if __name__ == "__main__":
    main()
