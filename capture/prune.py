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
horizon (``_bemi_tt/horizon.json``) so ``verify`` passes there too. An export directory is pruned with the
same ``fold`` by ``capture.prune_export``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from psycopg import sql

from capture.errors import ConfigurationError
from capture.exclude import readable
from capture.export.dataset import Horizon, read_horizon
from capture.export.layout import HORIZON_FILE, DataFile

__all__ = ["BASELINE_MARKER", "BaselineRow", "Fold", "Horizon", "Pruned", "baseline_rows", "check_before",
           "export_horizon", "fold", "folded_versions", "group_versions", "pg_horizon", "prune_changes",
           "read_horizon", "sync_export_horizon"]

BASELINE_MARKER = "_bemi_baseline"
_SETUP = (
    "CREATE SCHEMA IF NOT EXISTS bemi_tt",
    "CREATE TABLE IF NOT EXISTS bemi_tt.horizons (changes_table text PRIMARY KEY,"
    " before timestamptz NOT NULL, position bigint NOT NULL, head_position bigint, head_ordinal integer,"
    " head_hash text,"
    " baseline text NOT NULL, rows bigint NOT NULL, pruned_at timestamptz NOT NULL DEFAULT now(),"
    " pruned_by text NOT NULL DEFAULT current_user)",
)


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


@dataclass(frozen=True)
class BaselineRow:
    """One row of a baseline: a ``SNAPSHOT`` at ``(cut - 1, ordinal)`` stamped ``before``."""

    schema: str
    table: str
    database: str
    primary_key: str | None
    after: str
    ordinal: int
    row_digest: str
    chain_hash: str | None


@dataclass(frozen=True)
class Fold:
    """What folding the changes before a cut gives: the baseline rows, the horizon, how many were folded."""

    rows: list[BaselineRow]
    horizon: Horizon
    folded: int
    context: str


def fold(changes: Iterable[tuple[_Change, str | None]],
         versions: Mapping[tuple[str, str], list[dict[str, Any]]], *, cut: int, before: datetime,
         previous: Horizon | None) -> Fold:
    """Fold ``changes`` (every change before ``cut`` in commit order, each with its ``chain_hash``) into
    baseline rows and their horizon: the one rule shared by the database and the export directory prune."""
    from capture.chain import row_digest

    folded = 0
    head = previous.head if previous is not None else None

    def read() -> Iterator[_Change]:
        nonlocal folded, head
        for change, chain_hash in changes:
            folded += 1
            if chain_hash is not None:
                head = (int(change.commit_position), int(change.ordinal), str(chain_hash))
            yield change

    base = baseline_rows(read(), {k: v for k, v in versions.items() if v})
    context = json.dumps({BASELINE_MARKER: before.isoformat()}, separators=(",", ":"))
    rows = []
    for ordinal, (rel_schema, rel_table, database, key, after) in enumerate(base):
        digest = row_digest(
            table=rel_table, schema=rel_schema, database=database, operation="SNAPSHOT",
            primary_key=key, before="{}", after=after, context=context, context_verified=None,
            committed_at=before, transaction_id=None, position=cut - 1, commit_position=cut - 1,
            ordinal=ordinal)
        rows.append(BaselineRow(rel_schema, rel_table, database, key, after, ordinal, digest,
                                head[2] if head else None))
    horizon = Horizon(before, cut, head, _digest_rows(r.row_digest for r in rows), len(rows))
    return Fold(rows, horizon, folded, context)


def group_versions(rows: Iterable[Sequence[Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Each live relation's schema versions (by name of the newest), oldest first, from rows of
    ``(schema, table, commit_position, ordinal, columns, relation_oid, event, replica_identity)`` (JSON
    parsed) in ``(commit_position, ordinal, step)`` order."""
    by_relation: dict[Any, list[dict[str, Any]]] = {}
    for rel_schema, rel_table, position, ordinal, columns, oid, event, identity in rows:
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


def folded_versions(versions: Mapping[tuple[str, str], list[dict[str, Any]]], cut: int,
                    before: datetime) -> list[dict[str, Any]]:
    """The schema versions that replace those before the cut: one per live relation at ``(cut - 1, 0)``,
    stamped ``before``, with the newest columns (no fills: the baseline rows hold them) and the event
    ``pruned``."""
    out = []
    for (rel_schema, rel_table), history in sorted(versions.items()):
        last = history[-1]
        columns = [{k: v for k, v in c.items() if k != "fill"} for c in last["columns"]]
        kept = [e for e in last["event"] if e.get("kind") == "exclude"
                or (e.get("kind") == "untracked" and e.get("what") == "table")]
        out.append({
            "schema": rel_schema, "table": rel_table, "commit_position": cut - 1, "ordinal": 0,
            "committed_at": before, "columns": columns, "relation_oid": last["oid"], "step": 0,
            "event": [{"kind": "pruned", "before": before.isoformat(), "position": cut}, *kept],
            "context": {}, "replica_identity": last["replica_identity"],
        })
    return out


def check_before(before: Any) -> None:
    """A prune's time must be an aware instant that has passed: a later one would stamp the baseline
    after the present, and ``as_of`` now would raise."""
    if not isinstance(before, datetime) or before.tzinfo is None:
        raise ConfigurationError(
            f"before must be a datetime with a time zone, got {before!r}: prune deletes history, so it "
            "does not guess the zone; pass e.g. 2026-01-01T00:00:00+00:00")
    now = datetime.now(timezone.utc)
    if before > now:
        raise ConfigurationError(
            f"before={before.isoformat()} is in the future (now is {now.isoformat(timespec='seconds')}): "
            "prune keeps history from a time that has passed; pass an earlier time")


# -- PostgreSQL -----------------------------------------------------------------------------------------


def prune_changes(dsn: Any, *, before: datetime, schema: str = "public") -> Pruned:
    """Fold the changes committed at or before ``before`` into a baseline (see the module docstring)."""
    from capture.dsn import connect_changes
    from capture.protocol import DIGESTS_TABLE
    from capture.schema import CHANGES_TABLE, SCHEMAS_TABLE

    check_before(before)
    changes = sql.Identifier(schema, CHANGES_TABLE)
    schemas = sql.Identifier(schema, SCHEMAS_TABLE)
    record = f"{schema}.{CHANGES_TABLE}"
    conn = connect_changes(dsn)
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

            def read() -> Iterator[tuple[_Change, str | None]]:
                with conn.cursor(name="bemi_tt_prune") as cur:
                    cur.itersize = 10_000
                    cur.execute(sql.SQL(
                        'SELECT "schema", "table", database, operation, primary_key, before::text,'
                        " after::text, commit_position, ordinal, chain_hash FROM {}"
                        " WHERE commit_position < %s ORDER BY commit_position, ordinal").format(changes),
                        (cut,))
                    for r in cur:
                        yield _Change(*r[:9]), r[9]

            result = fold(read(), versions, cut=cut, before=before, previous=previous)
            horizon, head = result.horizon, result.horizon.head
            inserts = [(r.primary_key, r.table, r.after, result.context, before, r.schema, r.database,
                        cut - 1, cut - 1, r.ordinal, r.row_digest, r.chain_hash) for r in result.rows]
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
        return Pruned(horizon, result.folded, record)
    finally:
        if conn is not dsn:
            conn.close()


def _pg_versions(conn: Any, schemas: sql.Composable, cut: int) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Each relation's versions before the cut (by name of the newest), oldest first."""
    rows = conn.execute(sql.SQL(
        'SELECT "schema", "table", commit_position, ordinal, columns, relation_oid, event,'
        ' replica_identity FROM {} WHERE commit_position < %s'
        " ORDER BY commit_position, ordinal, step").format(schemas),
        (cut,)).fetchall()
    return group_versions(rows)


def _replace_versions(conn: Any, schemas: sql.Composable, versions: Mapping[tuple[str, str],
                      list[dict[str, Any]]], cut: int, before: datetime) -> None:
    """The versions before the cut become one per live relation at ``(cut - 1, 0)``, stamped ``before``."""
    conn.execute(sql.SQL("DELETE FROM {} WHERE commit_position < %s").format(schemas), (cut,))
    for v in folded_versions(versions, cut, before):
        conn.execute(sql.SQL(
            'INSERT INTO {} ("schema", "table", commit_position, ordinal, committed_at, columns,'
            " relation_oid, step, event, context, replica_identity) VALUES (%s, %s, %s, %s, %s, %s::jsonb,"
            " %s, %s, %s::jsonb, %s::jsonb, %s)").format(schemas),
            (v["schema"], v["table"], v["commit_position"], v["ordinal"], v["committed_at"],
             json.dumps(v["columns"]), v["relation_oid"], v["step"], json.dumps(v["event"]),
             json.dumps(v["context"]), v["replica_identity"]))


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

    return read_horizon(*resolve_directory(directory))


def sync_export_horizon(conn: Any, filesystem: Any, root: str, schema: str, *,
                        files: Callable[[], list[DataFile]] | None = None,
                        rewrite: Callable[[dict[str, Any], list[tuple[DataFile, Any]]], int] | None = None
                        ) -> bool:
    """After an export run: an export that starts at PostgreSQL's baseline gets the horizon record (so
    ``verify`` resumes the chain there); an export holding older history keeps it, unpruned and exact. A
    directory pruned itself gets the erasures recorded in PostgreSQL into its baseline rows
    (:func:`erase_export_baseline`). ``files``: the export's data files (default: the Parquet listing);
    ``rewrite``: how the erasure record and rewritten files land (default: in place; a Delta export passes
    ``capture.erase.apply_rewrites`` with its listing)."""
    from capture.export.dataset import read_dataset_state, write_atomic
    from capture.export.layout import META_DIR

    horizon = pg_horizon(conn, schema)
    own = read_horizon(filesystem, root)
    if own is not None and own != horizon:
        erase_export_baseline(conn, filesystem, root, schema, own, files=files, rewrite=rewrite)
    if horizon is None:
        return False
    listed = read_dataset_state(filesystem, root).files if files is None else files()
    first = min((f.first for f in listed), default=None)
    if first is None or first < (horizon.position - 1, 0):
        return False
    if own is not None and own.position >= horizon.position:
        return False  # the directory was pruned itself, at or after the database's horizon: keep its record
    write_atomic(filesystem, f"{root}/{META_DIR}/{HORIZON_FILE}",
                 json.dumps(horizon.to_json(), sort_keys=True).encode("utf-8"))
    return True


def erase_export_baseline(conn: Any, filesystem: Any, root: str, schema: str, own: Horizon, *,
                          files: Callable[[], list[DataFile]] | None = None,
                          rewrite: Callable[[dict[str, Any], list[tuple[DataFile, Any]]], int] | None = None
                          ) -> int:
    """Erase, in a directory pruned by itself, the baseline rows whose values came from a change PostgreSQL
    has erased since; the number of rows erased.

    Its baseline rows have keys of their own (``(C - 1, i)`` of the directory's cut), so the erasures that
    reach the export by key (capture/erase.py ``sync_export_erasures``) miss them. A keyed baseline row holds
    the image of its key's last change before the cut: when PostgreSQL records that change as erased, the
    row takes the erased form (the erasure's id, its ``what``), and ``erasures.json`` its original hashes
    (so ``verify`` still checks it). Keyless rows are matched by content and cannot be traced: erase them
    with ``erase(DIR, ...)``.
    """
    import pyarrow.parquet as pq

    from capture.erase import (
        ERASED_MARKER,
        ERASURES_FILE,
        _digests,
        _erase_row,
        _export_keys,
        _read_record,
        _texts,
        _with_texts,
    )
    from capture.export.dataset import read_dataset_state, write_atomic
    from capture.export.layout import META_DIR
    from capture.export.write import parquet_bytes
    from capture.schema import CHANGES_TABLE

    if not readable(conn, "erased") or not readable(conn, "erasures"):
        return 0
    changes = sql.Identifier(schema, CHANGES_TABLE)
    found = conn.execute(sql.SQL(
        'SELECT DISTINCT ON (c."schema", c."table", c.primary_key) c."schema", c."table", c.primary_key,'
        " e.erasure, r.what FROM bemi_tt.erased e"
        " JOIN {c} c ON c.commit_position = e.commit_position AND c.ordinal = e.ordinal"
        " JOIN bemi_tt.erasures r ON r.id = e.erasure"
        " WHERE e.changes_table = %s AND c.commit_position < %s AND c.primary_key IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM {c} l WHERE l.\"schema\" = c.\"schema\" AND l.\"table\" = c.\"table\""
        " AND l.primary_key = c.primary_key AND l.commit_position < %s"
        " AND (l.commit_position, l.ordinal) > (c.commit_position, c.ordinal))"
        ' ORDER BY c."schema", c."table", c.primary_key, e.erasure').format(c=changes),
        (f"{schema}.{CHANGES_TABLE}", own.position, own.position)).fetchall()
    wanted = {(str(r[0]), str(r[1]), str(r[2])): (str(r[3]), tuple(r[4])) for r in found}
    if not wanted:
        return 0
    record = _read_record(filesystem, root)
    keys = _export_keys(filesystem, root)
    rewrites = []
    for data_file in (read_dataset_state(filesystem, root).files if files is None else files()):
        if data_file.first[0] >= own.position:
            continue  # no baseline row in it
        data = pq.read_table(data_file.path, filesystem=filesystem)
        positions = data.column("commit_position").to_pylist()
        ordinals = data.column("ordinal").to_pylist()
        names = list(zip(data.column("schema").to_pylist(), data.column("table").to_pylist(),
                         data.column("primary_key").to_pylist(), strict=True))
        texts = {c: _texts(data.column(c)) for c in ("before", "after", "context")}
        hits = 0
        for i, name in enumerate(names):
            if (positions[i] >= own.position or name not in wanted
                    or f'"{ERASED_MARKER}"' in texts["context"][i]):
                continue  # not a baseline row, not erased in PostgreSQL, or erased already
            label = f"{positions[i]}/{ordinals[i]}"
            erasure, what = wanted[name]
            record["rows"].setdefault(label, [*_digests(texts["before"][i], texts["after"][i],
                                                        texts["context"][i]), erasure])
            new = _erase_row(texts["before"][i], texts["after"][i], texts["context"][i],
                             keys.get((str(name[0]), str(name[1])), frozenset()), erasure, what)
            texts["before"][i], texts["after"][i], texts["context"][i] = new
            hits += 1
        if hits:
            rewrites.append((data_file, _with_texts(data, texts), hits))
    if not rewrites:
        return 0
    if rewrite is not None:
        rewrite(record, [(f, data) for f, data, _ in rewrites])
        return sum(hits for _, _, hits in rewrites)
    # the record first: a crash in between leaves rows recorded but not yet erased, which the next run erases
    write_atomic(filesystem, f"{root}/{META_DIR}/{ERASURES_FILE}",
                 json.dumps(record, sort_keys=True).encode("utf-8"))
    for data_file, data, _ in rewrites:
        write_atomic(filesystem, data_file.path, parquet_bytes(data))
    return sum(hits for _, _, hits in rewrites)
