"""The analysis benchmark: every operation on both sources against its floor, measured in the same run.

    python bench/as_of_speed.py                  # 250k keys x 4 versions = 1M changes (the judged size)
    python bench/as_of_speed.py --keys 5000      # a quick end-to-end check (20k changes)
    python bench/as_of_speed.py --only as_of,diff --sources parquet

History: ``--keys`` keys x ``--versions`` versions, written version by version (so the table is complete
after the first quarter); 5% of the changes after a key's first are deletes and the key is created again
next time; 100 changes per transaction, one commit time per transaction, spread over 30 days; every
transaction carries a context, ``{"user_id", "endpoint", "request_id", "SQL"}`` from one of 30 users or
``{"job", "SQL"}`` for one in ten (a background job), so ``audit(user_id=7)`` selects about 3%. At the
middle of history about 0.95 x keys rows are live (~238k at the default size). The history goes into a
``changes`` table on an embedded PostgreSQL server with COPY (indexed as the worker creates it), and to
Parquet with the real exporter.

Operations (public API only, so the benchmark survives rewrites of the engine), on each source:
``as_of`` at the middle of history, ``as_of(key=)``, ``history(key)``, ``blame(key)``, ``diff`` of one step
(the middle to the next commit: one transaction), ``audit(user_id=)`` and ``changes()``.

Floors, per source, the best hand-written read of the same answer, ending in a pandas DataFrame:
Parquet: DuckDB over the export's change files (``arg_max`` per key for ``as_of``, typed by
``json_transform``; a ``primary_key`` filter for key lookups; a context filter; a plain scan).
PostgreSQL: SQL on ``changes``: ``DISTINCT ON`` for ``as_of``, the ``("table", primary_key, ...)``
index for key lookups (``LIMIT 1`` backwards for ``as_of(key=)``, all versions for ``history``/``blame``),
COPY parsed by pyarrow for the large reads. ``diff``'s floor is ``as_of`` on the same source.

Goals: ``as_of`` <= 1.5x its floor; key lookups <= 5x their floor and <= 0.25 s; ``diff`` of one step
<= 2x ``as_of``; peak memory <= 3x the result's size, plus the fixed cost of opening a query (DuckDB and
a PostgreSQL connection running a one-row query, measured in the same run). ``audit`` and ``changes``
have no time goal: their ratio is reported.

Each operation and each floor runs in a fresh subprocess: ``--runs`` timed calls (the median is
reported), the first of which is also measured for peak memory: the growth of the process's peak RSS
over its RSS just before the call (the high-water mark is reset through ``/proc/self/clear_refs``), less
the file-backed pages that became resident meanwhile (library code paged in on first use, ~25 MB for
DuckDB's first query), so no measurement inherits another's high-water mark or counts code as data.
Memory of the PostgreSQL server is not counted.

An operation that raises, crashes or runs past ``--timeout`` is a row with its error. Results are
printed as one table and written as JSON to ``bench/out/``.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg import sql

TABLE = "bench"
USERS = 30
AUDITED_USER = 7
SPAN = timedelta(days=30)
START = datetime(2026, 1, 1, tzinfo=timezone.utc)
OUT = Path(__file__).resolve().parent / "out"

COLUMNS = (
    '[{"name":"id","type":"integer","type_oid":23,"key":true},'
    '{"name":"name","type":"text","type_oid":25,"key":false},'
    '{"name":"qty","type":"integer","type_oid":23,"key":false},'
    '{"name":"price","type":"numeric(10,2)","type_oid":1700,"key":false},'
    '{"name":"updated_at","type":"timestamp with time zone","type_oid":1184,"key":false}]'
)
#: The table's row type, for the floors' typed reads (DuckDB ``json_transform``).
ROW_TYPE = (
    '{"id":"INTEGER","name":"VARCHAR","qty":"INTEGER","price":"DECIMAL(10,2)","updated_at":"TIMESTAMPTZ"}'
)

GENERATE = """
WITH raw AS (
    SELECT i, i % $keys AS k, i // $keys AS v, i // 100 AS txn, hash(i) % 100 AS dice
    FROM range($keys * $versions) t(i)
), timed AS (
    SELECT *, TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_microseconds(txn * $step) AS stamp FROM raw
), ops AS (
    -- a key is deleted when its dice says so (5% of versions after the first), and re-created next
    SELECT i, k, v, txn, stamp, CASE WHEN v = 0 THEN 'CREATE'
                                  WHEN dice < 5 THEN 'DELETE'
                                  WHEN lag(dice) OVER (PARTITION BY k ORDER BY v) < 5 AND v > 1 THEN 'CREATE'
                                  ELSE 'UPDATE' END AS operation
    FROM timed
), rows AS (
    SELECT i, k, v, txn, stamp, operation, CASE WHEN operation = 'DELETE' THEN '{}' ELSE
           '{"id": ' || k || ', "qty": ' || (i % 1000) || ', "name": "item ' || k || ' version ' || v ||
           '", "price": ' || (i % 100000) // 100 || '.' || lpad(CAST(i % 100 AS VARCHAR), 2, '0') ||
           ', "updated_at": "' || strftime(stamp, '%Y-%m-%dT%H:%M:%S.%f') || '+00:00"}' END AS after
    FROM ops
)
-- before: the old row, as REPLICA IDENTITY FULL (what bemi_tt.install sets) records it
SELECT CAST(k AS VARCHAR) AS primary_key, 'bench' AS "table", operation,
       CASE WHEN operation = 'CREATE' THEN '{}'
            ELSE lag(after) OVER (PARTITION BY k ORDER BY v) END AS before,
       after,
       -- one context per transaction, as a request or a job sets it; the hook adds the statement
       CASE WHEN txn % 10 = 9
            THEN '{"job": "nightly_reprice", ' ||
                 '"SQL": "UPDATE bench SET price=%(price)s WHERE bench.id = %(id_1)s"}'
            ELSE '{"user_id": ' || (1 + hash(txn) % $users) || ', "endpoint": "/items/' || k ||
                 '", "request_id": ' || txn ||
                 ', "SQL": "UPDATE bench SET name=%(name)s, qty=%(qty)s, price=%(price)s, ' ||
                 'updated_at=%(updated_at)s WHERE bench.id = %(id_1)s"}' END AS context,
       stamp AS committed_at, 'public' AS "schema", 'bench' AS "database", txn AS transaction_id,
       i * 16 AS "position", txn * 1600 + 1600 AS commit_position, CAST(i % 100 AS INTEGER) AS ordinal
FROM rows ORDER BY i
"""


# -- data -----------------------------------------------------------------------------------------------
def generate(keys: int, versions: int) -> pa.Table:
    """The synthetic history as an Arrow table in commit order."""
    transactions = max(1, -(-keys * versions // 100))
    step = SPAN // timedelta(microseconds=1) // transactions
    sql_text = (
        GENERATE.replace("$keys", str(keys))
        .replace("$versions", str(versions))
        .replace("$step", str(step))
        .replace("$users", str(USERS))
    )
    relation = duckdb.connect().sql(sql_text)
    assert relation is not None
    return relation.to_arrow_table()


def load_postgres(dsn: str, table: pa.Table) -> None:
    """COPY the history into ``changes`` (DDL from capture.schema) and record the table's columns."""
    from capture.schema import changes_ddl, schemas_ddl

    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer, pacsv.WriteOptions(include_header=False))
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in table.column_names)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(changes_ddl())
        conn.execute(schemas_ddl())
        conn.execute("TRUNCATE changes, changes_schemas")
        copy_sql = sql.SQL("COPY changes ({}) FROM STDIN (FORMAT csv)").format(columns)
        with conn.cursor() as cur, cur.copy(copy_sql) as copy:
            view = buffer.getbuffer()
            for start in range(0, len(view), 1 << 20):
                copy.write(view[start : start + (1 << 20)])
        conn.execute(
            "INSERT INTO changes_schemas VALUES ('public', %s, 1600, 0, %s, %s::jsonb)",
            (TABLE, START, COLUMNS),
        )
        conn.execute("VACUUM ANALYZE changes")


def pick_params(history: pa.Table, keys: int) -> dict[str, Any]:
    """The middle of history, the next commit after it, a key that lives through all of history, a user."""
    middle = history["committed_at"][history.num_rows // 2].as_py()
    con = duckdb.connect()
    con.register("history", history)
    later = con.execute(
        "SELECT min(committed_at) FROM history WHERE committed_at > $m", {"m": middle}
    ).fetchone()
    next_commit = later[0] if later and later[0] is not None else middle
    key = con.execute(
        """SELECT CAST(primary_key AS INTEGER) FROM history GROUP BY primary_key
           HAVING count(*) FILTER (WHERE operation = 'DELETE') = 0
           ORDER BY abs(CAST(primary_key AS INTEGER) - $half), primary_key LIMIT 1""",
        {"half": keys // 2},
    ).fetchone()
    return {
        "table": TABLE,
        "middle": middle.isoformat(),
        "next": next_commit.isoformat(),
        "key": int(key[0]) if key else 0,
        "user_id": AUDITED_USER,
    }


# -- measuring (in the subprocess) ----------------------------------------------------------------------
def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _reset_peak() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _deep_size(value: Any, depth: int = 0) -> int:
    size = sys.getsizeof(value)
    if depth < 4 and isinstance(value, dict):
        size += sum(_deep_size(k, depth + 1) + _deep_size(v, depth + 1) for k, v in value.items())
    elif depth < 4 and isinstance(value, (list, tuple)):
        size += sum(_deep_size(v, depth + 1) for v in value)
    return size


def result_size(result: Any) -> int:
    """Bytes held by a result: pandas' deep memory usage, with dicts and lists in object columns counted
    through (a sample of up to 10k values per column, scaled)."""
    import pandas as pd

    if not isinstance(result, pd.DataFrame):
        return _deep_size(result)
    total = int(result.index.memory_usage(deep=True))
    for name in result.columns:
        column = result[name]
        if column.dtype != object or len(column) == 0:
            total += int(column.memory_usage(deep=True, index=False))
            continue
        step = max(1, len(column) // 10_000)
        sample = column.iloc[::step]
        total += int(sum(_deep_size(v) for v in sample) * len(column) / len(sample)) + 8 * len(column)
    return total


def operation_call(spec: dict[str, Any]) -> Callable[[], Any]:
    """The public-API call to time; the source is connected (and the modules imported) beforehand."""
    import pandas as pd

    import bemi_tt

    p = spec["params"]
    where = spec["dsn"] if spec["source"] == "postgres" else spec["directory"]
    src = bemi_tt.connect(where) or where
    table, key, user = p["table"], p["key"], p["user_id"]
    middle, next_commit = pd.Timestamp(p["middle"]), pd.Timestamp(p["next"])
    calls: dict[str, Callable[[], Any]] = {
        "as_of": lambda: bemi_tt.as_of(table, middle, source=src),
        "as_of(key=)": lambda: bemi_tt.as_of(table, middle, key=key, source=src),
        "history(key)": lambda: bemi_tt.history(table, key, source=src),
        "blame(key)": lambda: bemi_tt.blame(table, key, source=src),
        "diff one step": lambda: bemi_tt.diff(table, middle, next_commit, source=src),
        "audit(user_id=)": lambda: bemi_tt.audit(user_id=user, source=src),
        "changes()": lambda: bemi_tt.changes(source=src),
    }
    return calls[spec["operation"]]


def _pg_copy_frame(dsn: str, query: sql.Composable, types: dict[str, pa.DataType] | None = None) -> Any:
    """COPY a query's rows out as CSV and parse them with pyarrow into pandas (the fastest way out)."""
    buffer = io.BytesIO()
    statement = sql.SQL("COPY ({}) TO STDOUT (FORMAT csv, HEADER)").format(query)
    with psycopg.connect(dsn) as conn, conn.cursor() as cur, cur.copy(statement) as copy:
        for chunk in copy:
            buffer.write(chunk)
    buffer.seek(0)
    options = pacsv.ConvertOptions(column_types=types or {})
    return pacsv.read_csv(buffer, convert_options=options).to_pandas()


def floor_call(spec: dict[str, Any]) -> Callable[[], Any]:
    """The hand-written floor of an operation on a source (see the module docstring)."""
    import pandas as pd

    p = spec["params"]
    table, key, user = p["table"], str(p["key"]), p["user_id"]
    middle = datetime.fromisoformat(p["middle"])
    op = spec["operation"]
    if spec["source"] == "parquet":
        con = duckdb.connect()
        files = "read_parquet($files, hive_partitioning = false)"
        args: dict[str, Any] = {"files": spec["files"], "table": table}
        queries = {
            "as_of": f"""
                SELECT unnest(json_transform(last.row.after, '{ROW_TYPE}')) FROM (
                    SELECT arg_max({{'op': operation, 'after': after}}, (commit_position, ordinal)) AS row
                    FROM {files} WHERE "table" = $table AND committed_at <= $ts GROUP BY primary_key
                ) last WHERE last.row.op <> 'DELETE'""",
            "as_of(key=)": f"""
                SELECT unnest(json_transform(last.row.after, '{ROW_TYPE}')) FROM (
                    SELECT arg_max({{'op': operation, 'after': after}}, (commit_position, ordinal)) AS row
                    FROM {files} WHERE "table" = $table AND primary_key = $key AND committed_at <= $ts
                ) last WHERE last.row.op <> 'DELETE'""",
            "history(key)": f"""SELECT * FROM {files} WHERE "table" = $table AND primary_key = $key
                                ORDER BY commit_position, ordinal""",
            "audit(user_id=)": f"""SELECT * FROM {files}
                                   WHERE CAST(json_extract(context, '$.user_id') AS VARCHAR) = $user
                                   ORDER BY commit_position, ordinal""",
            "changes()": f"SELECT * FROM {files} ORDER BY commit_position, ordinal",
        }
        queries["blame(key)"] = queries["history(key)"]
        query = queries[op]
        names = set(re.findall(r"\$(\w+)", query))
        args |= {"ts": middle, "key": key, "user": str(user)}
        bound = {k: v for k, v in args.items() if k in names}
        return lambda: con.execute(query, bound).df()
    dsn = spec["dsn"]
    latest = sql.SQL(
        """SELECT DISTINCT ON (primary_key) operation, after FROM changes
           WHERE "table" = {table} AND committed_at <= {ts}
           ORDER BY primary_key DESC, commit_position DESC, ordinal DESC"""
    ).format(table=sql.Literal(table), ts=sql.Literal(middle))
    typed = sql.SQL(
        """SELECT (after->>'id')::int AS id, after->>'name' AS name, (after->>'qty')::int AS qty,
                  (after->>'price')::numeric(10,2) AS price,
                  (extract(epoch FROM (after->>'updated_at')::timestamptz) * 1000000)::bigint AS updated_at
           FROM ({latest}) last WHERE operation <> 'DELETE'"""
    ).format(latest=latest)
    types = {"id": pa.int32(), "qty": pa.int32(), "price": pa.decimal128(10, 2), "updated_at": pa.int64()}
    every = sql.SQL(
        'SELECT * FROM changes WHERE "table" = %s AND primary_key = %s ORDER BY commit_position, ordinal'
    )

    def pg_as_of() -> Any:
        frame = _pg_copy_frame(dsn, typed, types)
        frame["updated_at"] = pd.to_datetime(frame["updated_at"], unit="us", utc=True)
        return frame.set_index("id")

    def pg_key() -> Any:
        with psycopg.connect(dsn) as conn:
            rows = conn.execute(
                """SELECT operation, after::text FROM changes
                   WHERE "table" = %s AND primary_key = %s AND committed_at <= %s
                   ORDER BY commit_position DESC, ordinal DESC LIMIT 1""",
                (table, key, middle),
            ).fetchall()
        live = [json.loads(after) for operation, after in rows if operation != "DELETE"]
        return pd.DataFrame(live)

    def pg_versions() -> Any:
        with psycopg.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute(every, (table, key))
            return pd.DataFrame(cur.fetchall(), columns=[d.name for d in cur.description or ()])

    calls: dict[str, Callable[[], Any]] = {
        "as_of": pg_as_of,
        "as_of(key=)": pg_key,
        "history(key)": pg_versions,
        "blame(key)": pg_versions,
        "audit(user_id=)": lambda: _pg_copy_frame(
            dsn,
            sql.SQL(
                "SELECT * FROM changes WHERE context->'user_id' = {u}::jsonb "
                "ORDER BY commit_position, ordinal"
            ).format(u=sql.Literal(json.dumps(user))),
        ),
        "changes()": lambda: _pg_copy_frame(
            dsn, sql.SQL("SELECT * FROM changes ORDER BY commit_position, ordinal")
        ),
    }
    return calls[op]


def fixed_call(spec: dict[str, Any]) -> Callable[[], Any]:
    """The fixed cost of a query: a DuckDB connection reading one row of the export, plus a PostgreSQL
    connection running a one-row query."""

    def call() -> Any:
        con = duckdb.connect()
        frame = con.execute(
            "SELECT * FROM read_parquet($files, hive_partitioning = false) LIMIT 1", {"files": spec["files"]}
        ).df()
        with psycopg.connect(spec["dsn"]) as conn:
            conn.execute("SELECT * FROM changes LIMIT 1").fetchall()
        con.close()
        return frame

    return call


def _preload() -> None:
    """Import what any measurement may use (pandas, bemi_tt's lazily loaded analysis modules), so that
    operations and floors start from the same baseline and no import is counted as a result's memory."""
    import pandas  # noqa: F401  (DuckDB's .df() would import it inside the first call)

    import bemi_tt

    for name in ("as_of", "audit", "blame", "changes", "connect", "diff", "history"):
        getattr(bemi_tt, name)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Time ``--runs`` calls and measure the first one's peak RSS growth; errors become a result."""
    try:
        _preload()
        build = {"op": operation_call, "floor": floor_call, "fixed": fixed_call}[spec["kind"]]
        call = build(spec)
        gc.collect()
        baseline_kb, file_kb = _status_kb("VmRSS"), _status_kb("RssFile")
        exact = _reset_peak()
        started = time.perf_counter()
        result = call()
        times = [time.perf_counter() - started]
        # file-backed pages that became resident are the libraries' code paged in on first use, not data
        peak_kb = _status_kb("VmHWM") - baseline_kb - max(0, _status_kb("RssFile") - file_kb)
        rows, size = len(result), result_size(result)
        del result
        for _ in range(spec["runs"] - 1):
            gc.collect()
            started = time.perf_counter()
            result = call()
            times.append(time.perf_counter() - started)
            del result
    except Exception as exc:  # a failing operation is a row of the report, not a crash
        first = (str(exc).strip().splitlines() or [""])[0]
        return {"error": f"{type(exc).__name__}: {first}"[:300], "traceback": traceback.format_exc()}
    return {
        "seconds": statistics.median(times),
        "times": times,
        "peak_bytes": max(0, peak_kb) * 1024,
        "peak_exact": exact,
        "result_bytes": size,
        "rows": rows,
    }


def subprocess_main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    Path(out_path).write_text(json.dumps(measure(spec)))


# -- running (in the parent) ----------------------------------------------------------------------------
def run_isolated(spec: dict[str, Any], workdir: Path, timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; a crash or a timeout is reported as an error."""
    tag = f"{spec['kind']}-{spec['source']}-{re.sub(r'[^a-z_]+', '_', spec['operation'])}"
    spec_path, out_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.out.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", str(spec_path), str(out_path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (--timeout)"}
    if out_path.exists():
        return dict(json.loads(out_path.read_text()))
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"subprocess exited {done.returncode}: {tail}"[:300], "stderr": done.stderr[-4000:]}


OPERATIONS = (
    "as_of",
    "as_of(key=)",
    "history(key)",
    "blame(key)",
    "diff one step",
    "audit(user_id=)",
    "changes()",
)
KEY_LOOKUPS = ("as_of(key=)", "history(key)", "blame(key)")


def goal_of(operation: str) -> str:
    if operation == "as_of":
        return "<=1.5x floor"
    if operation in KEY_LOOKUPS:
        return "<=5x floor, <=0.25s"
    if operation == "diff one step":
        return "<=2x as_of"
    return "-"


def judge(row: dict[str, Any], as_of_seconds: float | None, fixed_bytes: int) -> None:
    """Fill in the row's floor, ratio and whether its goals were met."""
    op, seconds = row["operation"], row.get("seconds")
    floor = as_of_seconds if op == "diff one step" else row.get("floor_seconds")
    row["floor"] = floor
    row["goal"] = goal_of(op)
    if seconds is None:
        row["met"] = "error"
        return
    row["ratio"] = seconds / floor if floor else None
    misses = []
    ratio = row["ratio"]
    limit = {"as_of": 1.5, "diff one step": 2.0} | dict.fromkeys(KEY_LOOKUPS, 5.0)
    if op in limit and (ratio is None or ratio > limit[op] or (op in KEY_LOOKUPS and seconds > 0.25)):
        misses.append("time")
    row["memory_goal_bytes"] = 3 * row["result_bytes"] + fixed_bytes
    if row["peak_bytes"] > row["memory_goal_bytes"]:
        misses.append("mem")
    if row.get("check"):
        misses.append("check")
    row["met"] = "yes" if not misses else "no (" + ", ".join(misses) + ")"


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _megabytes(row: dict[str, Any], key: str) -> str:
    return _fmt(row[key] / 1e6 if key in row else None, "{:.1f}" if row.get(key, 0) >= 1e6 else "{:.3f}")


def _note(row: dict[str, Any]) -> str:
    notes = [row.get("error"), row.get("floor_error") and f"floor: {row['floor_error']}", row.get("check")]
    return "; ".join(n for n in notes if n)


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per operation and source; errors and failed checks in the last column."""
    header = (
        "operation",
        "source",
        "median s",
        "floor s",
        "ratio",
        "goal",
        "met?",
        "peak MB",
        "result MB",
        "floor MB",
        "note",
    )
    lines = [header]
    for r in rows:
        lines.append(
            (
                r["operation"],
                r["source"],
                _fmt(r.get("seconds"), "{:.3f}"),
                _fmt(r.get("floor"), "{:.3f}"),
                _fmt(r.get("ratio"), "{:.2f}x"),
                r["goal"],
                r["met"],
                _megabytes(r, "peak_bytes"),
                _megabytes(r, "result_bytes"),
                _megabytes(r, "floor_peak_bytes"),
                _note(r),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    left = {0, 1, 5, 6, 10}
    for n, line in enumerate(lines):
        cells = (
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        print("  ".join(cells).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def checks(rows: list[dict[str, Any]]) -> None:
    """Row counts that must agree: an operation with its floor, and the two sources with each other."""
    comparable = ("as_of", "as_of(key=)", "history(key)", "audit(user_id=)", "changes()")
    by_op: dict[str, dict[str, int]] = {}
    for r in rows:
        if "rows" not in r:
            continue
        by_op.setdefault(r["operation"], {})[r["source"]] = r["rows"]
        if r["operation"] in comparable and "floor_rows" in r and r["rows"] != r["floor_rows"]:
            r["check"] = f"{r['rows']:,} rows but the floor has {r['floor_rows']:,}"
    for r in rows:
        counts = by_op.get(r["operation"], {})
        if len(set(counts.values())) > 1 and not r.get("check"):
            disagree = ", ".join(f"{s} {n:,} rows" for s, n in sorted(counts.items()))
            r["check"] = f"sources disagree: {disagree}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=250_000, help="distinct keys (default 250000)")
    parser.add_argument("--versions", type=int, default=4, help="versions per key (default 4)")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--sources", default="parquet,postgres", help="comma-separated: parquet, postgres")
    parser.add_argument("--only", default="", help="comma-separated operation name prefixes to run")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement subprocess")
    parser.add_argument("--out", type=Path, default=OUT, help="directory for the JSON report")
    parser.add_argument("--measure", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        subprocess_main(*args.measure)
        return
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    if bad := [s for s in sources if s not in ("parquet", "postgres")]:
        parser.error(f"--sources {bad!r}: use parquet and/or postgres")
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    operations = [op for op in OPERATIONS if not wanted or any(op.startswith(w) for w in wanted)]
    if "diff one step" in operations and "as_of" not in operations:
        operations.insert(0, "as_of")  # diff is judged against as_of

    from bemi_tt import EmbeddedPostgres
    from capture.export import export_parquet, list_dataset_files

    with tempfile.TemporaryDirectory() as tmp, EmbeddedPostgres() as pg:
        work = Path(tmp)
        started = time.perf_counter()
        history = generate(args.keys, args.versions)
        load_postgres(pg.dsn, history)
        directory = work / "export"
        export_parquet(pg.dsn, str(directory), progress=False)
        _, files = list_dataset_files(str(directory))
        params = pick_params(history, args.keys)
        with psycopg.connect(pg.dsn) as conn:
            server = conn.execute("SHOW server_version").fetchone()
            live = conn.execute(
                sql.SQL(
                    """SELECT count(*) FROM (SELECT DISTINCT ON (primary_key) operation FROM changes
                       WHERE committed_at <= {ts} ORDER BY primary_key, commit_position DESC, ordinal DESC) l
                       WHERE operation <> 'DELETE'"""
                ).format(ts=sql.Literal(datetime.fromisoformat(params["middle"])))
            ).fetchone()
        setup_seconds = time.perf_counter() - started
        base = {"dsn": pg.dsn, "directory": str(directory), "files": files, "params": params}
        base["runs"] = args.runs
        print(
            f"{history.num_rows:,} changes ({args.keys:,} keys x {args.versions} versions), "
            f"{live[0] if live else 0:,} rows live at the middle of history, {len(files)} Parquet files; "
            f"PostgreSQL {server[0] if server else '?'}; set up in {setup_seconds:.0f} s; "
            f"median of {args.runs} runs; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
        fixed_spec = {**base, "kind": "fixed", "source": "both", "operation": "fixed"}
        fixed = run_isolated(fixed_spec, work, args.timeout)
        fixed_bytes = int(fixed.get("peak_bytes", 0))
        print(
            f"fixed cost of a query (memory allowance): {fixed_bytes / 1e6:.1f} MB"
            + (f" ({fixed['error']})" if "error" in fixed else "")
        )
        rows: list[dict[str, Any]] = []
        for op in operations:
            for source in sources:
                spec = {**base, "operation": op, "source": source}
                row: dict[str, Any] = {"operation": op, "source": source}
                if op != "diff one step":
                    floor = run_isolated({**spec, "kind": "floor"}, work, args.timeout)
                    row |= {f"floor_{k}": v for k, v in floor.items()}
                row |= run_isolated({**spec, "kind": "op"}, work, args.timeout)
                print(
                    f"  measured {op} on {source}: "
                    + (row["error"] if "error" in row else f"{row['seconds']:.3f} s"),
                    flush=True,
                )
                rows.append(row)
        checks(rows)
        as_of_seconds = {r["source"]: r.get("seconds") for r in rows if r["operation"] == "as_of"}
        parquet_floor = {r["operation"]: r.get("floor_seconds") for r in rows if r["source"] == "parquet"}
        for r in rows:
            judge(r, as_of_seconds.get(r["source"]), fixed_bytes)
            if r["source"] == "postgres" and r.get("seconds") and parquet_floor.get(r["operation"]):
                # for the JSON only: the PostgreSQL source held to the Parquet floor as well
                r["ratio_to_parquet_floor"] = r["seconds"] / parquet_floor[r["operation"]]
        print(f"\npeak memory goal: <= 3x the result's size + {fixed_bytes / 1e6:.1f} MB fixed cost\n")
        print_table(rows)
        args.out.mkdir(parents=True, exist_ok=True)
        report = {
            "when": datetime.now(timezone.utc).isoformat(),
            "changes": history.num_rows,
            "keys": args.keys,
            "versions": args.versions,
            "live_rows_at_middle": live[0] if live else None,
            "parquet_files": len(files),
            "runs": args.runs,
            "params": params,
            "postgres": server[0] if server else None,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "setup_seconds": setup_seconds,
            "fixed_bytes": fixed_bytes,
            "rows": [{k: v for k, v in r.items() if k not in ("traceback", "floor_traceback")} for r in rows],
            "tracebacks": {
                f"{r['operation']} on {r['source']}": r[k]
                for r in rows
                for k in ("traceback", "floor_traceback")
                if k in r
            },
        }
        path = args.out / f"as_of_speed-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
        path.write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
