"""Key UPDATEs: the worker writes each one's old key (``changes.before_primary_key``), an older table gets
the column by a backfill that gives the same values, and key lookups follow moves exactly on every source
(on PostgreSQL from the column's index, reading no other key's changes)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pyarrow as pa
import pytest
from timetravel_history import TODO_COLUMNS, History
from timetravel_sources import Make, write_changes

from bemi_tt import as_of, blame, diff, history
from bemi_tt.sources import InMemorySource, PostgresSource, Scope, as_source
from capture.export import export_parquet
from capture.schema import CHANGES_COLUMNS, changes_ddl, moved_keys_backfill
from capture.worker import run


def _moved(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            'SELECT id, "table", operation, primary_key, before_primary_key FROM changes ORDER BY id'
        ).fetchall()


def _workload(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t_int (id int PRIMARY KEY, v text)")
        conn.execute("CREATE TABLE t_full (id int PRIMARY KEY, v text)")
        conn.execute("ALTER TABLE t_full REPLICA IDENTITY FULL")
        conn.execute("CREATE TABLE t_ts (at timestamptz PRIMARY KEY, v text)")
        conn.execute("ALTER TABLE t_ts REPLICA IDENTITY FULL")
        conn.execute("CREATE TABLE t_stamp (at timestamp PRIMARY KEY, v text)")
        conn.execute("CREATE TABLE t_comp (a int, b text, v numeric(6,2), PRIMARY KEY (a, b))")
        conn.execute("ALTER TABLE t_comp REPLICA IDENTITY FULL")
        conn.execute("CREATE TABLE t_text (k text PRIMARY KEY, v int)")
    run(dsn, once=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in ("t_int", "t_full"):
            conn.execute(f"INSERT INTO {table} SELECT g, 'r' || g FROM generate_series(1, 5) g")
            conn.execute(f"UPDATE {table} SET v = 'kept' WHERE id = 2")  # no move
            conn.execute(f"UPDATE {table} SET id = 10 WHERE id = 1")  # a chain: 1 -> 10 -> 100
            conn.execute(f"UPDATE {table} SET id = 100 WHERE id = 10")
            conn.execute(f"UPDATE {table} SET id = id + 10 WHERE id IN (3, 4)")  # two moves in one statement
            conn.execute(f"UPDATE {table} SET id = 1 WHERE id = 100")  # back to a key it had
        conn.execute("SET TimeZone = 'Asia/Kolkata'")
        conn.execute(
            "INSERT INTO t_ts VALUES ('2026-01-01 10:00+00', 'a'), ('2026-01-02 10:00:00.5+05:30', 'b')"
        )
        conn.execute("UPDATE t_ts SET at = at + interval '1 day'")
        conn.execute("UPDATE t_ts SET v = 'same key'")
        conn.execute("INSERT INTO t_stamp VALUES ('2026-01-01 10:00', 'a')")
        conn.execute("UPDATE t_stamp SET at = '2026-03-01 00:00:00.25'")
        conn.execute("INSERT INTO t_comp VALUES (1, 'x', 1.5), (2, 'he said \"hi\", ok', 2)")
        conn.execute("UPDATE t_comp SET b = 'y' WHERE a = 1")
        conn.execute("UPDATE t_comp SET a = 3 WHERE a = 2")
        conn.execute("UPDATE t_comp SET v = 9 WHERE a = 3")
        conn.execute("INSERT INTO t_text VALUES ('a\"b,c', 1), ('plain', 2)")
        conn.execute("UPDATE t_text SET k = 'moved' WHERE k = 'a\"b,c'")
    run(dsn, once=True)


def test_the_worker_writes_the_old_key_of_each_key_update_like_primary_key(dsn: str) -> None:
    _workload(dsn)
    got = [(t, op, pk, old) for _, t, op, pk, old in _moved(dsn) if old is not None]
    assert sorted(r for r in got if r[0] == "t_int") == sorted(
        ("t_int", "UPDATE", new, old) for old, new in (("1", "10"), ("10", "100"), ("3", "13"), ("4", "14"),
                                                       ("100", "1"))
    )
    assert sorted(r[2:] for r in got if r[0] == "t_full") == sorted(r[2:] for r in got if r[0] == "t_int")
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT primary_key, before_primary_key FROM changes WHERE \"table\" = 't_ts'"
            " AND operation = 'UPDATE' ORDER BY id"
        ).fetchall()
        keys = {r[0] for r in conn.execute("SELECT primary_key FROM changes WHERE \"table\" = 't_ts'")}
    moved = [old for _, old in rows if old is not None]
    assert len(moved) == 2 and all(old in keys for old in moved)  # the very text primary_key had
    assert [old for _, old in rows[2:]] == [None, None]  # a FULL image of an UPDATE that kept its key
    stamp = [(pk, old) for t, _, pk, old in got if t == "t_stamp"]
    assert stamp == [("2026-03-01 00:00:00.25", "2026-01-01 10:00:00")]
    comp = [(pk, old) for t, _, pk, old in got if t == "t_comp"]
    assert [json.loads(old) for _, old in comp] == [[1, "x"], [2, 'he said "hi", ok']]
    compact = [json.dumps(json.loads(old), separators=(",", ":"), ensure_ascii=False) for _, old in comp]
    assert [old for _, old in comp] == compact  # like primary_key
    assert [(pk, old) for t, _, pk, old in got if t == "t_text"] == [("moved", 'a"b,c')]
    with psycopg.connect(dsn) as conn:  # nothing but key UPDATEs carries it
        assert conn.execute(
            "SELECT count(*) FROM changes WHERE before_primary_key IS NOT NULL"
            " AND (operation <> 'UPDATE' OR before_primary_key = primary_key)"
        ).fetchone() == (0,)


def test_an_older_changes_table_gets_the_column_by_a_backfill_equal_to_what_the_worker_writes(
    dsn: str,
) -> None:
    _workload(dsn)
    written = _moved(dsn)
    assert sum(1 for *_, old in written if old is not None) == 16
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP INDEX changes_table_moved_idx")
        conn.execute("ALTER TABLE changes DROP COLUMN before_primary_key")  # as an older release left it
        conn.execute(changes_ddl())  # what the worker runs at start-up
    assert _moved(dsn) == written
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(changes_ddl())  # idempotent: the column exists, nothing is recomputed
        conn.execute(moved_keys_backfill())  # and the backfill itself only fills what is missing
        assert conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'changes_table_moved_idx'"
        ).fetchone()
    assert _moved(dsn) == written
    run(dsn, once=True)  # the worker starts on the upgraded table and goes on writing it
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE t_int SET id = 50 WHERE id = 1")
    run(dsn, once=True)
    assert _moved(dsn)[-1][3:] == ("50", "1")


def test_an_interrupted_upgrade_leaves_the_older_table_as_it_was(dsn: str) -> None:
    _workload(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP INDEX changes_table_moved_idx")
        conn.execute("ALTER TABLE changes DROP COLUMN before_primary_key")
        with pytest.raises(psycopg.errors.QueryCanceled), conn.transaction():
            conn.execute(changes_ddl())
            conn.execute("SET LOCAL statement_timeout = 1")
            conn.execute("SELECT pg_sleep(1)")  # the crash, before the upgrade's commit
        assert conn.execute(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'changes'"
            " AND column_name = 'before_primary_key'"
        ).fetchone() == (0,)
        conn.execute(changes_ddl())  # the next start does it all
    with psycopg.connect(dsn) as conn:
        moved = conn.execute("SELECT count(*) FROM changes WHERE before_primary_key IS NOT NULL").fetchone()
    assert moved == (16,)


def _chain() -> tuple[History, dict[str, Any]]:
    """todo 1 -> 2 -> 3 (renumbered twice), then a new row takes key 1 again; 4 is edited, 5 deleted."""
    def row(key: int, task: str) -> dict[str, Any]:
        return {"id": key, "task": task, "done": False, "price": Decimal("1.50"), "due": None}

    h = History()
    t: dict[str, Any] = {}
    h.columns("todo", TODO_COLUMNS)
    for key in (1, 4, 5):
        h.create("todo", str(key), row(key, f"r{key}"), {"user_id": key})
    t["created"] = h.clock
    h.update("todo", "2", row(1, "r1"), row(2, "r1"), {"user_id": 20})
    t["first move"] = h.clock
    h.update("todo", "4", row(4, "r4"), row(4, "edited"), {"user_id": 40})
    h.update("todo", "3", row(2, "r1"), row(3, "moved twice"), {"user_id": 30})
    t["second move"] = h.clock
    h.create("todo", "1", row(1, "new one"), {"user_id": 10})
    h.delete("todo", "5", row(5, "r5"))
    t["end"] = h.clock
    return h, t


@pytest.mark.parametrize("key", [1, 2, 3, 4, 5])
def test_a_key_lookup_after_a_chain_of_renumberings_is_exact_on_every_source(make: Make, key: int) -> None:
    h, t = _chain()
    source = make(h)
    oracle = InMemorySource(h.changes, h.schemas)  # the whole table, read without any push-down
    for ts in (*t.values(), h.between(t["first move"])):
        whole = as_of("todo", ts, source=oracle)
        one = as_of("todo", ts, key=key, source=source)
        expected = whole.loc[[key]] if key in whole.index else whole.iloc[0:0]
        pd.testing.assert_frame_equal(one, expected, check_index_type=False)
    pd.testing.assert_frame_equal(history("todo", key, source=source), history("todo", key, source=oracle))
    if key in as_of("todo", t["end"], source=oracle).index:
        pd.testing.assert_frame_equal(
            blame("todo", key=key, source=source), blame("todo", key=key, source=oracle)
        )
        pd.testing.assert_frame_equal(
            blame("todo", key=key, source=source), blame("todo", source=oracle).loc[[key]]
        )
    for start, end in ((t["created"], t["end"]), (t["first move"], t["second move"])):
        pd.testing.assert_frame_equal(
            diff("todo", start, end, source=source), diff("todo", start, end, source=oracle)
        )


def test_a_key_lookup_on_postgresql_reads_no_change_of_another_key(dsn: str) -> None:
    """The lookup's plan reads the key's changes, the TRUNCATEs and the moves away from it by index: no
    row of another key is read and filtered out (before, every UPDATE's ``before`` image was)."""
    _workload(dsn)
    source = PostgresSource(dsn)
    scope = Scope(
        table=("public", "t_int"),
        columns=("primary_key", "operation", "before", "after", "commit_position", "ordinal"),
        keys=("1",),
        key_columns=("id",),
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE changes")
        conn.execute("SET enable_seqscan = off")
        conn.execute("SET enable_bitmapscan = off")
        plan = conn.execute(
            psycopg.sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) {}").format(source.query(scope))
        ).fetchone()[0]  # type: ignore[index]

    def nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
        return [node, *(n for child in node.get("Plans", []) for n in nodes(child))]

    scans = [n for n in nodes(plan[0]["Plan"]) if "Scan" in n["Node Type"]]
    assert scans and all(n["Node Type"] != "Seq Scan" for n in scans)
    assert sum(n.get("Rows Removed by Filter", 0) for n in scans) == 0, [
        (n.get("Index Name"), n.get("Index Cond"), n.get("Filter"), n.get("Rows Removed by Filter"))
        for n in scans
    ]
    assert any("before_primary_key" in str(n.get("Index Cond", "")) for n in scans)


def _export_of_an_earlier_release(
    dsn: str, directory: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export whose files (and, for Delta, table) lack ``before_primary_key``, as earlier ones had."""
    import capture.export.delta
    import capture.export.layout
    import capture.export.read

    with monkeypatch.context() as patch:
        older = [c for c in CHANGES_COLUMNS if c[0] != "before_primary_key"]
        patch.setattr(capture.export.read, "CHANGES_COLUMNS", tuple(older))
        schema = pa.schema([(c, t) for c, _, t in older])
        patch.setattr(capture.export.delta, "changes_arrow_schema", lambda: schema)
        patch.setattr(capture.export.layout, "changes_arrow_schema", lambda: schema)
        export_parquet(dsn, str(directory), progress=False, format=fmt)


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_an_export_of_an_earlier_release_reads_and_goes_on_with_the_column(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    h, t = _chain()
    write_changes(dsn, h.changes[:4], h.schemas)
    _export_of_an_earlier_release(dsn, tmp_path / "x", fmt, monkeypatch)
    early = InMemorySource(h.changes[:4], h.schemas)  # only files without the column: read all the same
    pd.testing.assert_frame_equal(
        as_of("todo", t["first move"], source=as_source(tmp_path / "x")),
        as_of("todo", t["first move"], source=early),
    )
    write_changes(dsn, h.changes[4:], [], create=False)
    export_parquet(dsn, str(tmp_path / "x"), progress=False, format=fmt)  # this release's export
    source = as_source(tmp_path / "x")
    oracle = InMemorySource(h.changes, h.schemas)
    for ts in t.values():
        pd.testing.assert_frame_equal(as_of("todo", ts, source=source), as_of("todo", ts, source=oracle))
    pd.testing.assert_frame_equal(history("todo", 3, source=source), history("todo", 3, source=oracle))
    if fmt == "delta":
        from capture.export.delta import read_delta

        moved = read_delta(str(tmp_path / "x"))["before_primary_key"].to_pylist()
        assert moved == [None] * 5 + ["2", None, None]  # the earlier release's rows have none


# -- key UPDATEs of every key type, captured by the real worker, on every source ------------------------
#: (column type(s), old key, new key, other row's key) as SQL literals; composite keys as tuples
KEY_TYPES: dict[str, tuple[str, str, str, str | None]] = {
    "int": ("int", "1", "2", "3"),
    "bigint": ("bigint", "10000000000", "10000000001", "7"),
    "text": ("text", "'a b'", "'c'", "'z'"),
    "uuid": ("uuid", "'00000000-0000-0000-0000-000000000001'", "'00000000-0000-0000-0000-000000000002'",
             "'00000000-0000-0000-0000-000000000003'"),
    "numeric": ("numeric", "1.50", "2.25", "3"),
    "date": ("date", "'2024-01-01'", "'2024-02-29'", "'2024-03-01'"),
    "timestamp": ("timestamp", "'2024-01-01 10:00:00.5'", "'2024-01-02 00:00'", "'2024-01-03 00:00'"),
    "timestamptz": (
        "timestamptz", "'2024-01-01 10:00+05:30'", "'2024-01-01 00:00+00'", "'2024-01-05 00:00+00'"
    ),
    "boolean": ("boolean", "true", "false", None),
    "composite-timestamptz": ("int, timestamptz", "(1, '2024-01-01 10:00+00')", "(1, '2024-01-03 10:00+00')",
                              "(1, '2024-01-04 10:00+00')"),
    "composite-boolean": ("boolean, text", "(true, 'x')", "(false, 'x')", "(true, 'y')"),
}
SOURCES = ("memory", "memory-computed", "postgres", "parquet", "parquet-earlier", "delta")


def _key_table(dsn: str, kind: str, identity: str) -> tuple[list[Any], list[list[str]]]:
    """Table ``k`` keyed by ``kind``: a row is inserted, edited, moved to a new key, then another row is
    edited. Returns the time after each step and the table's ``v`` values then (read from the table)."""
    types, old, new, other = KEY_TYPES[kind]
    names = [f"k{i}" for i in range(len(types.split(",")))]
    cols = ", ".join(f"{n} {t.strip()}" for n, t in zip(names, types.split(","), strict=True))
    key = ", ".join(names)
    where = f"({key}) = ({{}})" if len(names) > 1 else f"{key} = {{}}"
    setting = ", ".join(
        f"{n} = {v.strip()}" for n, v in zip(names, new.strip("()").split(", ") if len(names) > 1 else [new],
                                              strict=True)
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE k ({cols}, v text, PRIMARY KEY ({key}))")
        conn.execute(f"ALTER TABLE k REPLICA IDENTITY {identity}")
    run(dsn, once=True)
    steps = [f"INSERT INTO k VALUES ({old.strip('()')}, 'one')"]
    if other is not None:
        steps.append(f"INSERT INTO k VALUES ({other.strip('()')}, 'other')")
    steps += [
        f"UPDATE k SET v = 'two' WHERE {where.format(old.strip('()'))}",  # under the old key
        f"UPDATE k SET {setting} WHERE {where.format(old.strip('()'))}",  # the key moves
    ]
    if other is not None:
        steps.append(f"UPDATE k SET v = 'other 2' WHERE {where.format(other.strip('()'))}")
    times, values = [], []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'Asia/Kolkata'")  # the worker's text, not the session's, is the key
        for step in steps:
            conn.execute(step)
            times.append(conn.execute("SELECT clock_timestamp()").fetchone()[0])  # type: ignore[index]
            values.append(sorted(r[0] for r in conn.execute("SELECT v FROM k")))
    run(dsn, once=True)
    return times, values


def _memory(dsn: str, *, with_column: bool) -> InMemorySource:
    """The worker's ``changes`` as an in-memory source (``with_column=False``: rows without
    ``before_primary_key``, which the source computes)."""
    names = [c for c, _, _ in CHANGES_COLUMNS if c != "id" and (with_column or c != "before_primary_key")]
    select = ", ".join(f'"{c}"::text' if c in ("before", "after", "context") else f'"{c}"' for c in names)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"SELECT {select} FROM changes ORDER BY commit_position, ordinal").fetchall()
        schemas = conn.execute(
            'SELECT "schema", "table", commit_position, ordinal, committed_at, columns::text AS columns, '
            "relation_oid, step, event::text AS event FROM changes_schemas"
        ).fetchall()
    return InMemorySource(
        [dict(zip(names, r, strict=True)) for r in rows],
        [dict(zip(("schema", "table", "commit_position", "ordinal", "committed_at", "columns",
                   "relation_oid", "step", "event"), r, strict=True)) for r in schemas],
    )


def _key_source(kind: str, dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from timetravel_sources import export_source

    if kind == "memory":
        return _memory(dsn, with_column=True)
    if kind == "memory-computed":
        return _memory(dsn, with_column=False)
    if kind == "postgres":
        return PostgresSource(dsn)
    if kind == "parquet-earlier":
        _export_of_an_earlier_release(dsn, tmp_path / "earlier", "parquet", monkeypatch)
        return as_source(tmp_path / "earlier")
    return export_source(dsn, tmp_path / kind, format=kind)


@pytest.mark.parametrize("identity", ["DEFAULT", "FULL"])
@pytest.mark.parametrize("kind", sorted(KEY_TYPES))
def test_an_update_of_the_key_is_exact_for_every_key_type_on_every_source(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, identity: str
) -> None:
    """The old key of a key UPDATE is the worker's ``before_primary_key``, never the ``before`` image's
    JSON text (``"2024-01-01T00:00:00+00:00"``, ``true``, which ``primary_key`` spells otherwise): the
    moved row shows once, its history and blame follow it to its old key, diff removes the old key."""
    times, values = _key_table(dsn, kind, identity)
    move = 3 if KEY_TYPES[kind][3] is not None else 2  # the step that moved the key
    with psycopg.connect(dsn) as conn:
        changes = conn.execute(
            "SELECT primary_key, before_primary_key, committed_at FROM changes WHERE \"table\" = 'k'"
            " ORDER BY commit_position, ordinal"
        ).fetchall()
    old_key = changes[move][1]
    assert old_key is not None and old_key == changes[0][0]  # the worker wrote the old key's very text
    edit = changes[move - 1][2]  # when v became 'two' (under the old key)
    for name in SOURCES:
        source = _key_source(name, dsn, tmp_path, monkeypatch)
        for ts, expected in zip(times, values, strict=True):
            got = as_of("k", ts, source=source)
            assert sorted(got["v"]) == expected, (name, ts)
        after = as_of("k", times[move], source=source)
        assert (after["v"] == "two").sum() == 1, name
        assert as_of("k", times[move], key=_key_value(after, "two"), source=source)["v"].tolist() == ["two"]
        lived = history("k", _key_value(after, "two"), source=source)
        assert lived["operation"].tolist() == ["CREATE", "UPDATE", "UPDATE"], name
        assert lived["v"].tolist() == ["one", "two", "two"], name
        blamed = blame("k", key=_key_value(after, "two"), source=source)
        origin = blamed.xs("v", level="column")
        assert origin["committed_at"].tolist() == [pd.Timestamp(edit)], name  # set before the move
        moved = diff("k", times[move - 1], times[move], source=source)
        keys = moved.index.droplevel("column")
        assert len(set(keys)) == 2, (name, moved)  # the old key removed, the new one added: nothing else
        assert sorted(set(moved["change"])) == ["added", "removed"], (name, moved)


def _key_value(frame: pd.DataFrame, v: str) -> Any:
    """The key (a tuple for a composite key) of the row of ``frame`` whose ``v`` is ``v``."""
    return frame.index[frame["v"] == v][0]


def test_a_key_lookup_cuts_history_where_the_whole_table_does_with_late_commit_times(make: Make) -> None:
    """The prefix of commit order ``as_of(ts)`` sees ends at the table's first commit stamped after ``ts``,
    whichever key it touched: a lookup of one key must not cut at that key's own first such commit."""
    h = History()
    h.columns("todo", TODO_COLUMNS)
    row = {"id": 1, "task": "first", "done": False, "price": Decimal("1.50"), "due": None}
    h.create("todo", "1", row)
    h.create("todo", "2", {**row, "id": 2, "task": "late clock"})
    h.update("todo", "1", row, {**row, "task": "after the cut"})
    late, edit = h.changes[-2], h.changes[-1]
    late["committed_at"], edit["committed_at"] = edit["committed_at"], late["committed_at"]  # stamped later
    ts = h.between(edit["committed_at"])
    source, oracle = make(h), InMemorySource(h.changes, h.schemas)
    whole = as_of("todo", ts, source=oracle)
    assert whole["task"].tolist() == ["first"]  # the commit of key 2 ends the prefix before the edit
    pd.testing.assert_frame_equal(as_of("todo", ts, key=1, source=source), whole.loc[[1]])
    pd.testing.assert_frame_equal(as_of("todo", ts, source=source), whole)


@pytest.mark.parametrize("kind", ["timestamptz", "boolean", "int"])
def test_restore_before_an_update_of_the_key_moves_the_row_back_for_every_key_type(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """``restore`` to a time before a key UPDATE sees the row under its new key only (the worker's old key,
    not the ``before`` image's JSON text), so its plan brings back exactly the old key's row."""
    from bemi_tt import restore

    times, _ = _key_table(dsn, kind, "FULL")
    move = 3 if KEY_TYPES[kind][3] is not None else 2
    for name in ("postgres", "parquet"):
        plan = restore("k", times[move - 1], source=_key_source(name, dsn, tmp_path, monkeypatch))
        changes = plan.preview.groupby(level=0)["change"].agg(lambda c: sorted(set(c))).tolist()
        # the new key's row out, the old key's row back (and the other row's later edit undone)
        expected = [["added"], ["removed"]] + ([["changed"]] if KEY_TYPES[kind][3] is not None else [])
        assert sorted(changes) == sorted(expected), (name, plan.preview)
