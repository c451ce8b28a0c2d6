"""End to end: seeded random interleaved transactions from several connections vs a trigger reference.

Inserts, updates (of the key, and leaving TOASTed values unchanged), deletes, TRUNCATE, COPY, upserts,
a partitioned table with rows moving between partitions, a composite key, REPLICA IDENTITY FULL and
DEFAULT, contexts set and unset, rolled-back transactions — while the worker runs in a thread.
``changes`` must hold exactly the reference's changes: same transactions, order, keys, values, contexts.
"""

from __future__ import annotations

import random
import string
import threading
from typing import Any

import psycopg
import pytest
from worker_helpers import AUDIT_SETUP, Table, audit, captured_changes, expected_changes, set_context

from capture.worker import run

TABLES = {
    t.name: t
    for t in (
        Table("items", ("id",)),
        Table("pairs", ("a", "b"), full=True),
        Table("events", ("id", "region")),
        Table("docs", ("id",), full=True),
    )
}

SCHEMA = """
CREATE TYPE mood AS ENUM ('ok', 'meh');
CREATE TABLE items (id int PRIMARY KEY, qty int, price numeric(14,4), note text, tags text[], meta jsonb,
                    at timestamptz, ok bool, mood mood);
CREATE TABLE pairs (a int, b text, v numeric, PRIMARY KEY (a, b));
ALTER TABLE pairs REPLICA IDENTITY FULL;
CREATE TABLE events (id int, region text, payload text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
CREATE TABLE docs (id int PRIMARY KEY, body text, rev int);
ALTER TABLE docs REPLICA IDENTITY FULL;
"""


def big_text(rng: random.Random) -> str:
    """Incompressible enough to be TOASTed out of line."""
    return "".join(rng.choices(string.ascii_letters + string.digits, k=rng.choice([10, 4000, 9000])))


class Client:
    """One connection with its own key space (ids congruent to ``index`` modulo ``count``)."""

    def __init__(self, dsn: str, index: int, count: int, rng: random.Random) -> None:
        self.conn = psycopg.connect(dsn)
        self.index, self.count, self.rng = index, count, rng
        self.live: dict[str, set[Any]] = {name: set() for name in TABLES}
        self.pending: dict[str, set[Any]] = {}
        self.next_id = index

    def new_id(self) -> int:
        self.next_id += self.count
        return self.next_id

    def begin(self) -> None:
        self.pending = {name: set(keys) for name, keys in self.live.items()}

    def finish(self, commit: bool) -> None:
        if commit:
            self.conn.commit()
            self.live = self.pending
        else:
            self.conn.rollback()

    def step(self) -> None:
        rng, ex, keys = self.rng, self.conn.execute, self.pending
        choice = rng.randrange(14)
        if choice == 0:
            set_context(
                self.conn, {"user_id": rng.randrange(100), "endpoint": rng.choice(["/a", "/b", "é/%s"])}
            )
        elif choice == 1:
            set_context(self.conn, None)
        elif choice == 2:  # multi-row insert
            ids = [self.new_id() for _ in range(rng.randint(1, 4))]
            for i in ids:
                ex(
                    "INSERT INTO items VALUES (%s, %s, %s, %s, %s, %s, now(), %s, %s)",
                    (
                        i,
                        rng.randrange(10),
                        f"{rng.randrange(10**6)}.{rng.randrange(10**4):04d}",
                        big_text(rng),
                        ["x", None, 'q"uote'],
                        psycopg.types.json.Jsonb({"n": rng.random(), "l": [1, None]}),
                        rng.random() < 0.5,
                        rng.choice(["ok", "meh"]),
                    ),
                )
            keys["items"].update(ids)
        elif choice == 3 and keys["items"]:  # update leaving the TOASTed note unchanged
            i = rng.choice(sorted(keys["items"]))
            ex("UPDATE items SET qty = qty + 1, price = price * 3 WHERE id = %s", (i,))
        elif choice == 4 and keys["items"]:  # key change (TOASTed note unchanged too)
            i = rng.choice(sorted(keys["items"]))
            j = self.new_id()
            ex("UPDATE items SET id = %s WHERE id = %s", (j, i))
            keys["items"].discard(i)
            keys["items"].add(j)
        elif choice == 5 and keys["items"]:
            i = rng.choice(sorted(keys["items"]))
            ex("DELETE FROM items WHERE id = %s", (i,))
            keys["items"].discard(i)
        elif choice == 6:  # upsert: update when present, insert otherwise
            i = rng.choice([*sorted(keys["items"])[:3], self.new_id()])
            ex(
                "INSERT INTO items (id, qty, note) VALUES (%s, 1, 'up') ON CONFLICT (id) DO UPDATE"
                " SET qty = items.qty + 10, note = EXCLUDED.note",
                (i,),
            )
            keys["items"].add(i)
        elif choice == 7:  # COPY
            ids = [self.new_id() for _ in range(rng.randint(1, 5))]
            with self.conn.cursor() as cur, cur.copy("COPY items (id, qty, price, note) FROM STDIN") as copy:
                for i in ids:
                    copy.write_row((i, rng.randrange(5), "0.5000", "tab\there\nnewline \\ back"))
            keys["items"].update(ids)
        elif choice == 8:
            a, b = self.new_id(), rng.choice(["x", "y z", "ü"])
            ex("INSERT INTO pairs VALUES (%s, %s, %s)", (a, b, rng.randrange(1000) / 8))
            keys["pairs"].add((a, b))
        elif choice == 9 and keys["pairs"]:
            a, b = rng.choice(sorted(keys["pairs"]))
            if rng.random() < 0.5:
                ex("UPDATE pairs SET v = v + 1 WHERE a = %s AND b = %s", (a, b))
            else:  # composite key change
                ex("UPDATE pairs SET b = b || '!' WHERE a = %s AND b = %s", (a, b))
                keys["pairs"].discard((a, b))
                keys["pairs"].add((a, b + "!"))
        elif choice == 10:
            i, region = self.new_id(), rng.choice(["eu", "us"])
            ex("INSERT INTO events VALUES (%s, %s, %s)", (i, region, big_text(rng)))
            keys["events"].add((i, region))
        elif choice == 11 and keys["events"]:  # move between partitions, or delete
            i, region = rng.choice(sorted(keys["events"]))
            keys["events"].discard((i, region))
            if rng.random() < 0.6:
                other = "us" if region == "eu" else "eu"
                ex("UPDATE events SET region = %s WHERE id = %s AND region = %s", (other, i, region))
                keys["events"].add((i, other))
            else:
                ex("DELETE FROM events WHERE id = %s AND region = %s", (i, region))
        elif choice == 12:
            i = self.new_id()
            ex("INSERT INTO docs VALUES (%s, %s, 0)", (i, big_text(rng)))
            keys["docs"].add(i)
        elif choice == 13 and keys["docs"]:  # FULL identity: unchanged TOAST comes from the old row
            i = rng.choice(sorted(keys["docs"]))
            ex("UPDATE docs SET rev = rev + 1 WHERE id = %s", (i,))


def workload(dsn: str, seed: int, rounds: int, clients: int = 3) -> None:
    rng = random.Random(seed)
    pool = [Client(dsn, i, clients, random.Random(seed * 100 + i)) for i in range(clients)]
    try:
        for _ in range(rounds):
            for client in pool:
                client.begin()
            for _ in range(rng.randint(1, 12)):
                rng.choice(pool).step()
            order = pool[:]
            rng.shuffle(order)
            for client in order:
                client.finish(commit=rng.random() < 0.9)
            if rng.random() < 0.08:  # TRUNCATE with nobody else in a transaction
                table = rng.choice(["items", "pairs", "docs", "events"])
                client = rng.choice(pool)
                set_context(client.conn, {"job": "truncate"})
                client.conn.execute(f"TRUNCATE {table}")
                client.conn.commit()
                for c in pool:
                    c.live[table] = set()
    finally:
        for client in pool:
            client.conn.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_changes_hold_exactly_the_reference_changes(dsn: str, seed: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(AUDIT_SETUP)
        conn.execute(SCHEMA)
        for table in TABLES.values():
            audit(conn, table)
    run(dsn, once=True, snapshot=False)  # creates the slot before the workload
    stop = threading.Event()
    errors: list[BaseException] = []

    def background() -> None:
        try:
            run(dsn, stop=stop, batch_changes=7)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=background)
    worker.start()
    try:
        workload(dsn, seed, rounds=40)
    finally:
        stop.set()
        worker.join(60)
    assert not errors
    run(dsn, once=True)
    with psycopg.connect(dsn) as conn:
        expected = expected_changes(conn, TABLES)
        captured = captured_changes(conn)
    assert sum(map(len, expected.values())) > 100
    assert captured.keys() == expected.keys()
    for xid, changes in expected.items():
        assert captured[xid] == changes, f"transaction {xid}"
