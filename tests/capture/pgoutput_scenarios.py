"""Workloads that make a real server emit every pgoutput message kind; used by the golden recorder
(``tests/data/pgoutput/record.py``) and by the live decoding tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg

SLOT = "pgoutput_golden"
PUBLICATION = "pgoutput_golden"
TOAST_BODY = "".join(f"{i:05d}" for i in range(3000))  # 15 kB: stored out of line with STORAGE EXTERNAL

SETUP = [
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
    "CREATE TYPE money_pair AS (amount numeric, currency text)",
    "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2), tags text[], data jsonb,"
    " created timestamptz, note text)",
    "CREATE TABLE accounts (id int, owner text, balance numeric)",
    "ALTER TABLE accounts REPLICA IDENTITY FULL",
    "CREATE TABLE by_index (code text NOT NULL, a int NOT NULL, b int)",
    "CREATE UNIQUE INDEX by_index_code ON by_index (code, a)",
    "ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_code",
    "CREATE TABLE no_identity (v text)",
    "ALTER TABLE no_identity REPLICA IDENTITY NOTHING",
    "CREATE TABLE parent (id serial PRIMARY KEY)",
    "CREATE TABLE child (id serial PRIMARY KEY, parent_id int REFERENCES parent)",
    "CREATE TABLE other (id serial PRIMARY KEY)",
    "CREATE TABLE feelings (id int PRIMARY KEY, feeling mood, pair money_pair)",
    "CREATE TABLE docs (id int PRIMARY KEY, body text, n int)",
    "ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL",
    "CREATE TABLE bin (id int PRIMARY KEY, b bytea, f float8)",
]


@dataclass(frozen=True)
class Scenario:
    """``transactions``: lists of statements, each list run in one transaction (None: autocommit)."""

    name: str
    description: str
    transactions: list[list[str]]
    options: dict[str, str] = field(default_factory=dict)
    origin: str | None = None
    autocommit: bool = False


SCENARIOS = [
    Scenario(
        "insert",
        "two inserts in one transaction, with text, numeric, array, jsonb, timestamptz and NULL values",
        [
            [
                "INSERT INTO items VALUES (1, 'widget', 12.50, '{a,\"b c\",NULL}', '{\"k\": [1, 2]}',"
                " '2026-11-27 10:00:00.123456+00', NULL)",
                "INSERT INTO items VALUES (2, 'gadget ü', 0.10, '{}', 'null', '-infinity', 'x')",
            ]
        ],
    ),
    Scenario(
        "update_no_old",
        "update of a non-key column under REPLICA IDENTITY DEFAULT: no old tuple",
        [["UPDATE items SET price = 13.75 WHERE id = 1"]],
    ),
    Scenario(
        "update_key",
        "update of the primary key: key-only old tuple ('K')",
        [["UPDATE items SET id = 10 WHERE id = 1"]],
    ),
    Scenario(
        "update_full",
        "update under REPLICA IDENTITY FULL: full old tuple ('O')",
        [
            ["INSERT INTO accounts VALUES (1, 'ann', 100.00)"],
            ["UPDATE accounts SET balance = 90.5 WHERE id = 1"],
        ],
    ),
    Scenario(
        "update_index",
        "REPLICA IDENTITY USING INDEX: relation identity 'i', key-only old tuple on key change",
        [["INSERT INTO by_index VALUES ('x', 1, 1)"], ["UPDATE by_index SET a = 2, b = 5 WHERE code = 'x'"]],
    ),
    Scenario(
        "delete_key",
        "delete under REPLICA IDENTITY DEFAULT: key-only old tuple ('K')",
        [["DELETE FROM items WHERE id = 2"]],
    ),
    Scenario(
        "delete_full",
        "delete under REPLICA IDENTITY FULL: full old tuple ('O')",
        [["DELETE FROM accounts WHERE id = 1"]],
    ),
    Scenario(
        "insert_no_identity",
        "insert into a REPLICA IDENTITY NOTHING table: relation identity 'n'",
        [["INSERT INTO no_identity VALUES ('v')"]],
    ),
    Scenario(
        "truncate_cascade",
        "TRUNCATE of several relations with RESTART IDENTITY and CASCADE (child is added by cascade)",
        [
            ["INSERT INTO parent DEFAULT VALUES", "INSERT INTO child (parent_id) VALUES (1)"],
            ["TRUNCATE parent, other RESTART IDENTITY CASCADE"],
        ],
    ),
    Scenario(
        "truncate_plain",
        "TRUNCATE of one relation without options",
        [["TRUNCATE items"]],
    ),
    Scenario(
        "message_transactional",
        "transactional logical message (prefix 'bemi') before an insert in the same transaction",
        [
            [
                'SELECT pg_logical_emit_message(true, \'bemi\', \'{"user": "ann", "n": 1}\')',
                "INSERT INTO items VALUES (3, 'with context', 1, NULL, NULL, NULL, NULL)",
            ]
        ],
    ),
    Scenario(
        "message_nontransactional",
        "non-transactional logical messages outside any transaction, one with non-UTF-8 bytes",
        [
            ["SELECT pg_logical_emit_message(false, 'bemi', 'plain')"],
            ["SELECT pg_logical_emit_message(false, 'raw', '\\xff00fe'::bytea)"],
            # the slot decodes up to the WAL flush position and these messages are not flushed by
            # themselves: a catalog write commits (and flushes) without producing any pgoutput row
            ["COMMENT ON TABLE other IS 'flush'"],
        ],
        autocommit=True,
    ),
    Scenario(
        "type_enum_composite",
        "insert into a table with enum and composite columns: the server sends Type messages",
        [["INSERT INTO feelings VALUES (1, 'happy', ROW(12.5, 'EUR'))"]],
    ),
    Scenario(
        "origin",
        "a transaction from a replication origin: Origin message after Begin",
        [["INSERT INTO other DEFAULT VALUES"]],
        origin="upstream",
    ),
    Scenario(
        "toast_unchanged",
        "update of a row whose TOASTed column did not change: 'u' in the new tuple",
        [["INSERT INTO docs VALUES (1, %(body)s, 1)"], ["UPDATE docs SET n = 2 WHERE id = 1"]],
    ),
    Scenario(
        "binary",
        "values in binary format ('b') when the 'binary' option is on",
        [["INSERT INTO bin VALUES (1, '\\x0001ff', 2.5)"]],
        options={"binary": "true"},
    ),
]


def setup(conn: psycopg.Connection) -> None:
    """Create the workload's tables, the publication and the slot (autocommit connection)."""
    for statement in SETUP:
        conn.execute(statement)
    conn.execute(f"CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES")
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (SLOT,))
    conn.execute(
        "SELECT pg_replication_origin_create('upstream') "
        "WHERE NOT EXISTS (SELECT FROM pg_replication_origin WHERE roname = 'upstream')"
    )


def read_slot(conn: psycopg.Connection, options: dict[str, str] | None = None) -> list[bytes]:
    """Consume everything decoded so far from the slot, as pgoutput (protocol 1) messages."""
    args = ["proto_version", "1", "publication_names", PUBLICATION, "messages", "true"]
    for key, value in (options or {}).items():
        args += [key, value]
    placeholders = ", ".join(["%s"] * len(args))
    rows = conn.execute(
        f"SELECT data FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL, {placeholders})",
        [SLOT, *args],
    ).fetchall()
    return [bytes(row[0]) for row in rows]


def run(conn: psycopg.Connection, scenario: Scenario) -> list[bytes]:
    """Run a scenario on an autocommit connection; return the pgoutput messages it produced."""
    read_slot(conn, scenario.options)  # start clean
    if scenario.origin:
        conn.execute("SELECT pg_replication_origin_session_setup(%s)", (scenario.origin,))
    try:
        for statements in scenario.transactions:
            if scenario.autocommit:
                for statement in statements:
                    conn.execute(statement)
                continue
            with conn.transaction():
                if scenario.origin:
                    conn.execute("SELECT pg_replication_origin_xact_setup('0/ABCDEF', '2026-01-01 00:00+00')")
                for statement in statements:
                    if "%(body)s" in statement:
                        conn.execute(statement, {"body": TOAST_BODY})
                    else:
                        conn.execute(statement)
    finally:
        if scenario.origin:
            conn.execute("SELECT pg_replication_origin_session_reset()")
    return read_slot(conn, scenario.options)


def run_all(dsn: str) -> Iterator[tuple[Scenario, list[bytes]]]:
    """Set up a fresh database at ``dsn`` and yield each scenario with its messages."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        setup(conn)
        try:
            for scenario in SCENARIOS:
                yield scenario, run(conn, scenario)
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))
