"""Retention: fold the history before a time into a baseline, so every later ``as_of`` stays exact.

``prune_changes(dsn, before=TS)`` works in one PostgreSQL transaction holding ``changes`` in EXCLUSIVE mode
(the capture worker waits; readers do not):

- the cut ``C`` is the first commit position stamped after ``TS`` (every change before it was committed at
  or before ``TS``; with none, every change is folded). For each table ``as_of(t, ts)`` at any
  ``ts >= TS`` includes every change before its own first commit stamped after ``ts``, which is at or
  after ``C``: replacing the changes before ``C`` by the rows they leave present is exact;
- the changes before ``C`` are replayed with the engine's presence rule (bemi_tt/rule.py: CREATE, UPDATE
  and SNAPSHOT make a key present, DELETE and a key UPDATE's old key remove it, TRUNCATE removes the
  table's rows; keyless tables by content) and replaced by ``SNAPSHOT`` rows at ``commit_position = C - 1``
  (never a commit: commits are 8-byte aligned), ``committed_at = TS``, context
  ``{"_bemi_baseline": "<TS>"}``, with each added column's ``fill`` written into the rows that take it;
- each live relation's schema versions before ``C`` become one version at ``(C - 1, 0)``, stamped ``TS``,
  with the newest columns and an event ``{"kind": "pruned", "before": TS, "position": C}``; so ``as_of``
  (and ``diff``) before ``TS`` raises, naming ``TS`` as where the history now starts;
- the horizon is recorded in ``bemi_tt.horizons``: ``before``, ``C``, the chain head of the last folded row,
  the SHA-256 over the baseline rows' digests and their count.

The chain (capture/chain.py): baseline rows carry a ``row_digest`` and, as ``chain_hash``, the folded prefix's
head (they are not links of the chain: they say where it resumes, and the worker continues from it when
everything was folded); ``verify`` checks each one's digest and their combined hash against the horizon
record, then resumes the chain at ``C`` from the recorded head, so every kept row is proven exactly as before
(an anchor at or after ``C`` also proves the head). What it can no longer check: anything before ``TS``
(gone), and anchors before ``C`` (reported as skipped). The baseline is as trustworthy as the horizon record:
anyone who can write both could rewrite the baseline, as anyone who can write ``changes`` could always
recompute the chain.

Exports: a Parquet export keeps its own (longer, still exact) history; the next export run into it writes
nothing below its watermark, and an export made after the prune starts with the baseline and gets the
horizon (``_bemi_tt/horizon.json``) so ``verify`` passes there too. Pruning an export directory itself is
not built.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from psycopg import sql

from capture.errors import ConfigurationError
from capture.exclude import readable

__all__ = ["BASELINE_MARKER", "Horizon", "Pruned", "baseline_rows", "export_horizon", "pg_horizon",
           "prune_changes", "sync_export_horizon"]

BASELINE_MARKER = "_bemi_baseline"
HORIZON_FILE = "horizon.json"
_SETUP = (
    "CREATE SCHEMA IF NOT EXISTS bemi_tt",
    "CREATE TABLE IF NOT EXISTS bemi_tt.horizons (changes_table text PRIMARY KEY,"
    " before timestamptz NOT NULL, position bigint NOT NULL, head_position bigint, head_ordinal integer,"
    " head_hash text,"
    " baseline text NOT NULL, rows bigint NOT NULL, pruned_at timestamptz NOT NULL DEFAULT now(),"
    " pruned_by text NOT NULL DEFAULT current_user)",
)


@dataclass(frozen=True)
class Horizon:
    """Where history now starts: ``before`` (TS), the cut position, the folded prefix's chain head
    (``head``: (commit_position, ordinal, chain_hash) of the last folded row; None: no hashed row), and the
    baseline: the SHA-256 over its rows' digests in order and their count."""

    before: datetime
    position: int
    head: tuple[int, int, str] | None
    baseline: str
    rows: int

    def to_json(self) -> dict[str, Any]:
        return {"before": self.before.isoformat(), "position": self.position,
                "head": list(self.head) if self.head else None, "baseline": self.baseline, "rows": self.rows}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Horizon:
        head = data.get("head")
        return cls(datetime.fromisoformat(str(data["before"])), int(data["position"]),
                   (int(head[0]), int(head[1]), str(head[2])) if head else None, str(data["baseline"]),
                   int(data["rows"]))


@dataclass(frozen=True)
class Pruned:
    """What a prune did; ``str()`` is the line the CLI prints."""

    horizon: Horizon | None
    folded: int
    source: str

    def __str__(self) -> str:
        if self.horizon is None:
            return f"nothing to prune in {self.source}"
        return (f"pruned {self.source}: {self.folded} changes before {self.horizon.before.isoformat()} "
                f"folded into {self.horizon.rows} baseline rows; history now starts there")


# -- the replay -----------------------------------------------------------------------------------------


def _members(text: str) -> Iterator[tuple[str, str]]:
    from capture.erase import _members as members

    return members(text)


def _old_key(before: str, keys: Sequence[str]) -> str | None:
    """The key a ``before`` image holds, as ``primary_key`` writes it (the rule's ``old_key_of``)."""
    if not keys or before == "{}":
        return None
    raw = dict(_members(before))
    if any(k not in raw for k in keys):
        return None
    if len(keys) == 1:
        value = json.loads(raw[keys[0]]) if raw[keys[0]].startswith('"') else raw[keys[0]]
        return None if value == "null" else str(value)
    return "[" + ",".join(raw[k] for k in keys) + "]"


@dataclass
class _Change:
    schema: str
    table: str
    database: str
    operation: str
    primary_key: str | None
    before: str
    after: str
    commit_position: int
    ordinal: int


def baseline_rows(
    changes: Iterable[_Change], versions: Mapping[tuple[str, str], list[dict[str, Any]]]
) -> list[tuple[str, str, str, str | None, str]]:
    """The rows present after ``changes`` (in commit order): ``(schema, table, database, key, after)`` in
    (schema, table, key) order; ``versions``: each table's schema versions (``position``, ``columns``), for
    its key columns and the fills older rows take."""
    keyed: dict[tuple[str, str], dict[str | None, tuple[str, tuple[int, int]]]] = {}
    keyless: dict[tuple[str, str], list[tuple[str, tuple[int, int]]]] = {}
    databases: dict[tuple[str, str], str] = {}
    key_columns = {name: _keys(v) for name, v in versions.items()}
    for c in changes:
        name = (c.schema, c.table)
        databases[name] = c.database
        rows = keyed.setdefault(name, {})
        loose = keyless.setdefault(name, [])
        at = (c.commit_position, c.ordinal)
        if c.operation == "TRUNCATE":
            rows.clear()
            loose.clear()
            continue
        if c.primary_key is None:  # a table without a key: rows are matched by content
            if c.operation in ("DELETE", "UPDATE") and c.before != "{}":
                old = json.loads(c.before)
                for i, (payload, _) in enumerate(loose):
                    if json.loads(payload) == old:
                        del loose[i]
                        break
            if c.operation != "DELETE":
                loose.append((c.after, at))
            continue
        if c.operation == "DELETE":
            rows.pop(c.primary_key, None)
            continue
        if c.operation == "UPDATE":
            old_key = _old_key(c.before, key_columns.get(name, ()))
            if old_key is not None and old_key != c.primary_key:
                rows.pop(old_key, None)
        rows[c.primary_key] = (c.after, at)
    out: list[tuple[str, str, str, str | None, str]] = []
    for name in sorted(set(keyed) | set(keyless)):
        fills = _fills(versions.get(name, []))
        entries: list[tuple[str | None, tuple[str, tuple[int, int]]]] = sorted(
            keyed.get(name, {}).items(), key=lambda kv: str(kv[0]))
        entries += [(None, entry) for entry in keyless.get(name, [])]
        for key, (payload, at) in entries:
            out.append((name[0], name[1], databases[name], key, _with_fills(payload, at, fills)))
    return out


def _keys(versions: list[dict[str, Any]]) -> tuple[str, ...]:
    if not versions:
        return ()
    return tuple(str(c["name"]) for c in versions[-1]["columns"] if c.get("key"))


def _fills(versions: list[dict[str, Any]]) -> list[tuple[str, tuple[int, int], str]]:
    """(column, since, fill JSON) for the newest columns added later than the first version with a fill
    (bemi_tt/state.py ``layout_at``: rows last changed before ``since`` take ``fill``)."""
    if not versions:
        return []
    out = []
    current = versions[-1]["columns"]
    for spec in current:
        name = spec["name"]
        since: tuple[int, int] | None = None
        fill: Any = None
        has_fill = False
        for i in range(len(versions) - 1, -1, -1):
            found = next((c for c in versions[i]["columns"] if c["name"] == name), None)
            if found is None:
                break
            if i == 0:
                since, has_fill = None, False
            else:
                since = versions[i]["position"]
                has_fill = "fill" in found
                fill = found.get("fill")
        if since is not None and has_fill and not all(
                any(c["name"] == name for c in v["columns"]) for v in versions):
            out.append((str(name), since, json.dumps(fill, separators=(",", ":"))))
    return out


def _with_fills(payload: str, at: tuple[int, int], fills: list[tuple[str, tuple[int, int], str]]) -> str:
    """``payload`` with the fill of every column added after ``at`` (what ``as_of`` shows for it)."""
    stale = {n: f for n, since, f in fills if at < since}
    if not stale:
        return payload
    members = [(n, stale.pop(n) if n in stale else raw) for n, raw in _members(payload)]
    members += list(stale.items())
    return "{" + ",".join(json.dumps(n) + ":" + raw for n, raw in members) + "}"


def _digest_rows(rows: Iterable[str]) -> str:
    h = hashlib.sha256()
    for digest in rows:
        h.update(bytes.fromhex(digest))
    return h.hexdigest()


# -- PostgreSQL -----------------------------------------------------------------------------------------


def prune_changes(dsn: Any, *, before: datetime, schema: str = "public") -> Pruned:
    """Fold the changes committed at or before ``before`` into a baseline (see the module docstring)."""
    from capture.chain import _connect, row_digest
    from capture.protocol import DIGESTS_TABLE
    from capture.schema import CHANGES_TABLE, SCHEMAS_TABLE

    if not isinstance(before, datetime) or before.tzinfo is None:
        raise ConfigurationError(f"before must be an aware datetime, got {before!r}")
    changes = sql.Identifier(schema, CHANGES_TABLE)
    schemas = sql.Identifier(schema, SCHEMAS_TABLE)
    record = f"{schema}.{CHANGES_TABLE}"
    conn = _connect(dsn)
    try:
        with conn.transaction():
            for statement in _SETUP:
                conn.execute(statement)
            conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(changes))
            previous = pg_horizon(conn, schema)
            row = conn.execute(sql.SQL(
                "SELECT (SELECT min(commit_position) FROM {c} WHERE committed_at > %s),"
                " (SELECT max(commit_position) FROM {c})").format(c=changes), (before,)).fetchone()
            assert row is not None
            if row[1] is None:
                return Pruned(None, 0, record)
            cut = int(row[0]) if row[0] is not None else int(row[1]) + 1
            if previous is not None and (cut <= previous.position or before <= previous.before):
                return Pruned(None, 0, record)  # already pruned at or after this point
            versions = _pg_versions(conn, schemas, cut)
            folded, head = 0, previous.head if previous is not None else None

            def read() -> Iterator[_Change]:
                nonlocal folded, head
                with conn.cursor(name="bemi_tt_prune") as cur:
                    cur.itersize = 10_000
                    cur.execute(sql.SQL(
                        'SELECT "schema", "table", database, operation, primary_key, before::text,'
                        " after::text, commit_position, ordinal, chain_hash FROM {}"
                        " WHERE commit_position < %s ORDER BY commit_position, ordinal").format(changes),
                        (cut,))
                    for r in cur:
                        folded += 1
                        if r[9] is not None:
                            head = (int(r[7]), int(r[8]), str(r[9]))
                        yield _Change(*r[:9])

            base = baseline_rows(read(), {k: v for k, v in versions.items() if v})
            stamp = before.isoformat()
            context = json.dumps({BASELINE_MARKER: stamp}, separators=(",", ":"))
            inserts, digests = [], []
            for ordinal, (rel_schema, rel_table, database, key, after) in enumerate(base):
                digest = row_digest(
                    table=rel_table, schema=rel_schema, database=database, operation="SNAPSHOT",
                    primary_key=key, before="{}", after=after, context=context, context_verified=None,
                    committed_at=before, transaction_id=None, position=cut - 1, commit_position=cut - 1,
                    ordinal=ordinal)
                digests.append(digest)
                inserts.append((key, rel_table, after, context, before, rel_schema, database, cut - 1,
                                cut - 1, ordinal, digest, head[2] if head else None))
            horizon = Horizon(before, cut, head, _digest_rows(digests), len(base))
            conn.execute(sql.SQL("DELETE FROM {} WHERE commit_position < %s").format(changes), (cut,))
            with conn.cursor() as cur:
                cur.executemany(sql.SQL(
                    'INSERT INTO {} (primary_key, "table", operation, before, after, context, committed_at,'
                    ' "schema", database, transaction_id, position, commit_position, ordinal,'
                    " context_verified, row_digest, chain_hash) VALUES (%s, %s, 'SNAPSHOT', '{{}}',"
                    " %s::jsonb, %s::jsonb, %s, %s, %s, NULL, %s, %s, %s, NULL, %s, %s)").format(changes),
                    inserts)
            _replace_versions(conn, schemas, versions, cut, before)
            digests_table = sql.Identifier(schema, DIGESTS_TABLE)
            if conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                            (digests_table.as_string(conn),)).fetchone() == (True,):
                conn.execute(sql.SQL("DELETE FROM {} WHERE commit_position < %s").format(digests_table),
                             (cut,))
            if readable(conn, "erased"):
                conn.execute("DELETE FROM bemi_tt.erased WHERE changes_table = %s AND commit_position < %s",
                             (record, cut))
            conn.execute(
                "INSERT INTO bemi_tt.horizons (changes_table, before, position, head_position, head_ordinal,"
                " head_hash, baseline, rows) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (changes_table) DO UPDATE SET before = EXCLUDED.before,"
                " position = EXCLUDED.position, head_position = EXCLUDED.head_position,"
                " head_ordinal = EXCLUDED.head_ordinal, head_hash = EXCLUDED.head_hash,"
                " baseline = EXCLUDED.baseline, rows = EXCLUDED.rows, pruned_at = now(),"
                " pruned_by = current_user",
                (record, before, cut, *(head or (None, None, None)), horizon.baseline, horizon.rows),
            )
        return Pruned(horizon, folded, record)
    finally:
        if conn is not dsn:
            conn.close()


def _pg_versions(conn: Any, schemas: sql.Composable, cut: int) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Each relation's versions before the cut (by name of the newest), oldest first."""
    rows = conn.execute(sql.SQL(
        'SELECT "schema", "table", commit_position, ordinal, step, columns, relation_oid, event,'
        ' replica_identity FROM {} WHERE commit_position < %s'
        " ORDER BY commit_position, ordinal, step").format(schemas),
        (cut,)).fetchall()
    by_relation: dict[Any, list[dict[str, Any]]] = {}
    for rel_schema, rel_table, position, ordinal, _, columns, oid, event, identity in rows:
        ident = oid if oid is not None else (rel_schema, rel_table)
        by_relation.setdefault(ident, []).append({
            "schema": rel_schema, "table": rel_table, "position": (int(position), int(ordinal)),
            "columns": columns, "oid": oid, "event": event or [], "replica_identity": identity,
        })
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for history in by_relation.values():
        last = history[-1]
        if any(e.get("kind") == "drop_table" for e in last["event"]):
            continue  # a dropped relation: every row of it is gone, and so is its record
        out[(str(last["schema"]), str(last["table"]))] = [v for v in history if v["columns"]] or history
    return out


def _replace_versions(conn: Any, schemas: sql.Composable, versions: Mapping[tuple[str, str],
                      list[dict[str, Any]]], cut: int, before: datetime) -> None:
    """The versions before the cut become one per live relation at ``(cut - 1, 0)``, stamped ``before``."""
    conn.execute(sql.SQL("DELETE FROM {} WHERE commit_position < %s").format(schemas), (cut,))
    for (rel_schema, rel_table), history in sorted(versions.items()):
        last = history[-1]
        columns = [{k: v for k, v in c.items() if k != "fill"} for c in last["columns"]]
        kept = [e for e in last["event"] if e.get("kind") == "exclude"
                or (e.get("kind") == "untracked" and e.get("what") == "table")]
        event = [{"kind": "pruned", "before": before.isoformat(), "position": cut}, *kept]
        conn.execute(sql.SQL(
            'INSERT INTO {} ("schema", "table", commit_position, ordinal, committed_at, columns,'
            " relation_oid, step, event, context, replica_identity) VALUES (%s, %s, %s, 0, %s, %s::jsonb,"
            " %s, 0, %s::jsonb, '{{}}', %s)").format(schemas),
            (rel_schema, rel_table, cut - 1, before, json.dumps(columns), last["oid"], json.dumps(event),
             last["replica_identity"]))


def pg_horizon(conn: Any, schema: str) -> Horizon | None:
    """The horizon recorded for ``schema.changes`` (None: never pruned)."""
    from capture.schema import CHANGES_TABLE

    if not readable(conn, "horizons"):
        return None
    row = conn.execute(
        "SELECT before, position, head_position, head_ordinal, head_hash, baseline, rows"
        " FROM bemi_tt.horizons WHERE changes_table = %s", (f"{schema}.{CHANGES_TABLE}",)).fetchone()
    if row is None:
        return None
    head = (int(row[2]), int(row[3]), str(row[4])) if row[4] is not None else None
    return Horizon(row[0].astimezone(timezone.utc), int(row[1]), head, str(row[5]), int(row[6]))


# -- Parquet export -------------------------------------------------------------------------------------


def export_horizon(directory: str) -> Horizon | None:
    """The horizon an export holds (``_bemi_tt/horizon.json``; None: its history was never pruned)."""
    from capture.export.dataset import resolve_directory
    from capture.export.layout import META_DIR

    filesystem, root = resolve_directory(directory)
    try:
        with filesystem.open_input_stream(f"{root}/{META_DIR}/{HORIZON_FILE}") as stream:
            return Horizon.from_json(json.loads(stream.read().decode("utf-8")))
    except FileNotFoundError:
        return None


def sync_export_horizon(conn: Any, filesystem: Any, root: str, schema: str) -> bool:
    """After an export run: an export that starts at PostgreSQL's baseline gets the horizon record (so
    ``verify`` resumes the chain there); an export holding older history keeps it, unpruned and exact."""
    from capture.export.dataset import read_dataset_state, write_atomic
    from capture.export.layout import META_DIR

    horizon = pg_horizon(conn, schema)
    if horizon is None:
        return False
    state = read_dataset_state(filesystem, root)
    first = min((f.first for f in state.files), default=None)
    if first is None or first < (horizon.position - 1, 0):
        return False
    write_atomic(filesystem, f"{root}/{META_DIR}/{HORIZON_FILE}",
                 json.dumps(horizon.to_json(), sort_keys=True).encode("utf-8"))
    return True
