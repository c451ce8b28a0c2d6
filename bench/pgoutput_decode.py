"""Benchmark: pure-Python pgoutput decoding and value typing against the floor of fetching the same bytes.

Builds a backlog of realistic row changes in an embedded PostgreSQL (a 9-column table: bigint, int,
text, numeric, timestamptz, text[], jsonb, nullable text, bool; inserts then updates, 1 to 1,000 rows per
transaction, a context message per transaction), then, in the same run, times:

(a) floor: fetching every pgoutput message with ``pg_logical_slot_peek_binary_changes`` through a
    server-side cursor (what the worker cannot go faster than);
(b) ``capture.pgoutput.decode`` of every message already in memory (one core);
(c) decode plus ``ValueEncoder.row_json`` of every row change (the decoder's whole share of the worker).

Prints medians of ``--runs`` runs, in changes (row messages) per second, and the ratios to the floor.

    python bench/pgoutput_decode.py                    # 200k changes
    python bench/pgoutput_decode.py --changes 50000 --runs 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import psycopg

from bemi_tt.embedded import EmbeddedPostgres
from capture.pgoutput import Insert, Relation, Update, decode
from capture.values import ValueEncoder

SETUP = [
    "CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int, status text, amount numeric(12,2),"
    " created_at timestamptz, tags text[], payload jsonb, note text, paid bool)",
    "CREATE PUBLICATION bench FOR ALL TABLES",
    "SELECT pg_create_logical_replication_slot('bench', 'pgoutput')",
]
INSERT = """
INSERT INTO orders
SELECT i, i %% 997, (ARRAY['new', 'paid', 'shipped'])[1 + i %% 3], (i %% 100000)::numeric / 100,
       timestamptz '2026-01-01' + i * interval '1 second', ARRAY['tag' || i %% 7, 'vip'],
       jsonb_build_object('sku', 'SKU-' || i, 'qty', i %% 5, 'price', (i %% 1000)::numeric / 10),
       CASE WHEN i %% 4 = 0 THEN NULL ELSE 'delivery note for order ' || i END, i %% 2 = 0
FROM generate_series(%s::int8, %s::int8) i
"""
UPDATE = (
    "UPDATE orders SET status = 'paid', amount = amount + 1, paid = true"
    " WHERE id BETWEEN %s::int8 AND %s::int8"
)
PEEK = (
    "SELECT data FROM pg_logical_slot_peek_binary_changes('bench', NULL, NULL, 'proto_version', '1',"
    " 'publication_names', 'bench', 'messages', 'true')"
)


def build_backlog(dsn: str, changes: int, seed: int = 7) -> None:
    """Half inserts, half updates, in transactions of 1 to 1,000 rows, each with a context message."""
    rng = random.Random(seed)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in SETUP:
            conn.execute(statement)
        for kind, sql_text in (("insert", INSERT), ("update", UPDATE)):
            first = 0
            while first < changes // 2:
                last = min(changes // 2, first + rng.randint(1, 1000)) - 1
                with conn.transaction():
                    conn.execute(
                        "SELECT pg_logical_emit_message(true, 'bemi', %s)",
                        (f'{{"user_id": 42, "endpoint": "/api/orders", "op": "{kind}"}}',),
                    )
                    conn.execute(sql_text, (first, last))
                first = last + 1


def fetch(dsn: str) -> tuple[float, list[bytes]]:
    """(seconds, messages) for one peek of the whole backlog through a server-side cursor."""
    with psycopg.connect(dsn) as conn:
        start = time.perf_counter()
        with conn.cursor(name="peek") as cursor:
            cursor.itersize = 10000
            cursor.execute(PEEK)
            payloads = [bytes(row[0]) for row in cursor]
        elapsed = time.perf_counter() - start
        conn.rollback()
    return elapsed, payloads


def decode_all(payloads: list[bytes]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) to decode every message."""
    start, cpu = time.perf_counter(), time.process_time()
    for data in payloads:
        decode(data)
    return time.perf_counter() - start, time.process_time() - cpu


def decode_and_type(payloads: list[bytes]) -> tuple[float, float]:
    """Decode, keep an encoder per Relation, and render each row change's JSON (new and old rows)."""
    start, cpu = time.perf_counter(), time.process_time()
    encoders: dict[int, ValueEncoder] = {}
    for data in payloads:
        message = decode(data)
        if type(message) is Insert or type(message) is Update:
            encoders[message.relation_oid].row_json(message.new)  # type: ignore[arg-type]
        elif type(message) is Relation:
            encoders[message.oid] = ValueEncoder(
                [c.type_oid for c in message.columns], names=[c.name for c in message.columns]
            )
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200_000, help="row changes in the backlog")
    parser.add_argument("--runs", type=int, default=5, help="runs of each measurement (median reported)")
    args = parser.parse_args()
    with EmbeddedPostgres() as pg:
        print(f"building a backlog of {args.changes:,} row changes ...", flush=True)
        build_backlog(pg.dsn, args.changes)
        fetches = [fetch(pg.dsn) for _ in range(max(1, args.runs // 2))]
    payloads = fetches[0][1]
    rows = sum(1 for p in payloads if p[0] in b"IUD")
    size = sum(len(p) for p in payloads)
    print(f"{len(payloads):,} messages, {rows:,} row changes, {size / 1e6:.1f} MB of pgoutput")
    floor = statistics.median(rows / seconds for seconds, _ in fetches)
    decoded = [decode_all(payloads) for _ in range(args.runs)]
    typed = [decode_and_type(payloads) for _ in range(args.runs)]
    print(f"{'':46} {'wall':>10}             {'ratio':>5}        {'CPU (one core)':>14}")
    print(f"{'(a) floor: peek through a server-side cursor':46} {floor:>10,.0f} changes/s  {1:5.2f}x floor")
    for label, timings in (("(b) decode", decoded), ("(c) decode + row JSON", typed)):
        wall = statistics.median(rows / w for w, _ in timings)
        cpu = statistics.median(rows / c for _, c in timings)
        print(f"{label:46} {wall:>10,.0f} changes/s  {wall / floor:5.2f}x floor  {cpu:>10,.0f} changes/s")


if __name__ == "__main__":
    main()
