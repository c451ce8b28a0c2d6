"""Erasure: remove personal values from recorded history, keeping its shape and its proof.

``erase_changes`` (a PostgreSQL ``changes`` table) and ``erase_export`` (a Parquet or Delta export directory)
select changes by table, primary key and/or context (``{"user_id": 7}``: changes whose context holds
these members), and rewrite each selected change into its *erased form*:

- ``before`` and ``after``: every member keeps its name; every value but the primary key columns' becomes
  JSON ``null`` (so ``as_of``, ``history`` and ``diff`` show an erased value as NULL, in every dtype);
- ``context``: ``{"_bemi_erased": "<erasure id>"}`` — the documented marker, visible in every source and in
  the context columns of ``diff``/``history``/``audit`` — or, with ``what`` leaving the context out, the
  context plus that member;
- operation, times, positions, ``primary_key``, ``row_digest`` and ``chain_hash`` stay as they were.

The erasure itself is recorded: on PostgreSQL in ``bemi_tt.erasures`` (id, when, by whom, the selector,
what, rows) and ``bemi_tt.erased`` (per change: the erasure and the SHA-256 of the original ``before``,
``after`` and ``context``), in the same transaction as the rewrite (schema ``bemi_tt``, which the capture
worker never records, so the selector does not enter ``changes``). In an export, in
``DIR/_bemi_tt/erasures.json``, under the export lock: for Parquet written before the files are rewritten,
for Delta swapped in with them (:func:`apply_rewrites`).

The chain (capture/chain.py): a row digest covers each JSON column only through that column's own hash,
so ``verify`` checks an erased row with the original column hashes recorded here and still proves the
rest of the row (operation, key, times, positions) and the whole chain; it reports the erased rows
(``Verified.erased``) instead of calling them altered. It cannot prove that the erased values were the
original ones (they are gone), and whoever can write the record could "erase" any row: an erasure is
visible, never silent. Re-running an erasure is a no-op; a row erased twice keeps its first recorded hashes.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import sql

from capture.chain import value_digest
from capture.errors import ConfigurationError
from capture.export.layout import DataFile

__all__ = [
    "ERASED_MARKER",
    "Erasure",
    "apply_rewrites",
    "delta_files",
    "erase_changes",
    "erase_export",
    "erased_context",
    "erased_image",
    "export_erased_digests",
    "key_text",
    "pending_erasures",
    "pg_erased_digests",
    "sync_export_erasures",
]

#: The context member every erased change carries: the erasure's id.
ERASED_MARKER = "_bemi_erased"
JSON_COLUMNS = ("before", "after", "context")
ERASURES_FILE = "erasures.json"

_SETUP = (
    "CREATE SCHEMA IF NOT EXISTS bemi_tt",
    "CREATE TABLE IF NOT EXISTS bemi_tt.erasures (id text PRIMARY KEY, erased_at timestamptz NOT NULL"
    " DEFAULT now(), erased_by text NOT NULL DEFAULT current_user, changes_table text NOT NULL,"
    " selector jsonb NOT NULL, what text[] NOT NULL, reason text, rows bigint NOT NULL)",
    "CREATE TABLE IF NOT EXISTS bemi_tt.erased (changes_table text NOT NULL, commit_position bigint NOT NULL,"
    " ordinal integer NOT NULL, erasure text NOT NULL REFERENCES bemi_tt.erasures (id),"
    " before_digest text NOT NULL, after_digest text NOT NULL, context_digest text NOT NULL,"
    " PRIMARY KEY (changes_table, commit_position, ordinal))",
)


@dataclass(frozen=True)
class Erasure:
    """What an erasure did: its id (the ``_bemi_erased`` marker), the changes rewritten, and where."""

    id: str
    rows: int
    source: str

    def __str__(self) -> str:
        return f"erased {self.rows} changes in {self.source} (erasure {self.id})"


# -- the erased form ------------------------------------------------------------------------------------


def _members(text: str) -> Iterator[tuple[str, str]]:
    """(name, raw value text) of each member of a JSON object text, in order."""
    from capture.exclude import _DECODER, _WS, scanstring

    pos = _WS.match(text, 0).end()  # type: ignore[union-attr]
    if text[pos:pos + 1] != "{":
        raise ValueError(f"not a JSON object: {text[:40]!r}")
    pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
    if text[pos:pos + 1] == "}":
        return
    while True:
        key, pos = scanstring(text, pos + 1)
        pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
        pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]  # past ':'
        _, end = _DECODER.raw_decode(text, pos)
        yield key, text[pos:end]
        pos = _WS.match(text, end).end()  # type: ignore[union-attr]
        if text[pos:pos + 1] != ",":
            return
        pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]


def erased_image(text: str, keys: frozenset[str] | set[str]) -> str:
    """``before``/``after`` with every value but the ``keys`` columns' replaced by ``null`` (names kept)."""
    if text == "{}":
        return text
    return "{" + ",".join(
        json.dumps(name) + ":" + (raw if name in keys else "null") for name, raw in _members(text)
    ) + "}"


def erased_context(text: str, erasure: str, *, values: bool) -> str:
    """The context marked with ``erasure``; ``values``: its other members removed too."""
    marker = json.dumps(ERASED_MARKER) + ":" + json.dumps(erasure)
    if values:
        return "{" + marker + "}"
    kept = [json.dumps(n) + ":" + raw for n, raw in _members(text) if n != ERASED_MARKER]
    return "{" + ",".join([*kept, marker]) + "}"


def key_text(key: object) -> str:
    """A key as ``changes.primary_key`` spells it: one column's text, a composite key's compact JSON."""
    if isinstance(key, (tuple, list)):
        if len(key) == 1:
            return key_text(key[0])
        return json.dumps(list(key), separators=(",", ":"), ensure_ascii=False)
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, (str, int)):
        return str(key)
    raise ConfigurationError(f"key must be a value or a tuple of values of the primary key, got {key!r}")


def _check_selector(
    table: str | None, key: object, context: Mapping[str, Any] | None, what: Sequence[str]
) -> tuple[str | None, str | None, str | None, dict[str, Any] | None, tuple[str, ...]]:
    if table is None and context is None:
        raise ConfigurationError(
            "erase needs a selector: table= (with key=) and/or context= (e.g. context={'user_id': 7})"
        )
    if key is not None and table is None:
        raise ConfigurationError("erase: key= needs table= (the key is that table's primary key)")
    if context is not None and (not isinstance(context, Mapping) or not context):
        raise ConfigurationError(f"erase: context= must be a non-empty dict such as {{'user_id': 7}}, "
                                 f"got {context!r}")
    chosen = tuple(what)
    if not chosen or any(w not in JSON_COLUMNS for w in chosen) or isinstance(what, str):
        raise ConfigurationError(f"erase: what= must name some of {list(JSON_COLUMNS)}, got {what!r}")
    schema_name: str | None = None
    table_name = table
    if table is not None:
        if not isinstance(table, str) or not table or table.count(".") > 1:
            raise ConfigurationError(f"erase: table= must be a table name like 'users', got {table!r}")
        if "." in table:
            schema_name, table_name = table.split(".")
    return (schema_name, table_name, None if key is None else key_text(key),
            None if context is None else dict(context), chosen)


def _matches_context(context_text: str, wanted: Mapping[str, Any]) -> bool:
    try:
        context = json.loads(context_text)
    except ValueError:
        return False
    return isinstance(context, dict) and all(k in context and context[k] == v for k, v in wanted.items())


def _selector_json(schema: str | None, table: str | None, key: str | None,
                   context: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if table is not None:
        out["table"] = table if schema is None else f"{schema}.{table}"
    if key is not None:
        out["key"] = key
    if context is not None:
        out["context"] = dict(context)
    return out


def _erase_row(
    before: str, after: str, context: str, keys: frozenset[str], erasure: str, what: Sequence[str]
) -> tuple[str, str, str]:
    return (
        erased_image(before, keys) if "before" in what else before,
        erased_image(after, keys) if "after" in what else after,
        erased_context(context, erasure, values="context" in what),
    )


def _digests(before: str, after: str, context: str) -> tuple[str, str, str]:
    return value_digest(before).hex(), value_digest(after).hex(), value_digest(context).hex()


# -- PostgreSQL -----------------------------------------------------------------------------------------


def erase_changes(
    dsn: Any,
    *,
    table: str | None = None,
    key: object = None,
    context: Mapping[str, Any] | None = None,
    what: Sequence[str] = JSON_COLUMNS,
    schema: str = "public",
    by: str | None = None,
    reason: str | None = None,
) -> Erasure:
    """Erase the selected changes in the ``changes`` table at ``dsn``, in one transaction.

    ``table``/``key``: the changes of one row (``key`` as the primary key's value, a tuple for a composite
    key; a row whose key changed is recorded under each key it had: erase each). ``context``: changes whose
    context holds these members. Both given: both must hold. ``what``: which of before/after/context lose
    their values. ``by``: who asks (default: the database role). The erasure is recorded in
    ``bemi_tt.erasures``/``bemi_tt.erased`` (see the module's docstring).
    """
    from capture.dsn import connect_changes
    from capture.schema import CHANGES_TABLE, SCHEMAS_TABLE

    schema_name, table_name, key_value, wanted, chosen = _check_selector(table, key, context, what)
    erasure = uuid.uuid4().hex
    changes = sql.Identifier(schema, CHANGES_TABLE)
    schemas = sql.Identifier(schema, SCHEMAS_TABLE)
    record_name = f"{schema}.{CHANGES_TABLE}"
    conn = connect_changes(dsn)
    try:
        with conn.transaction():
            for statement in _SETUP:
                conn.execute(statement)
            conditions: list[sql.Composable] = [sql.SQL("operation <> 'TRUNCATE'")]
            if table_name is not None:
                conditions.append(sql.SQL('"table" = {}').format(sql.Literal(table_name)))
            if schema_name is not None:
                conditions.append(sql.SQL('"schema" = {}').format(sql.Literal(schema_name)))
            if key_value is not None:
                conditions.append(sql.SQL("primary_key = {}").format(sql.Literal(key_value)))
            if wanted is not None:
                conditions.append(sql.SQL("context @> {}::jsonb").format(sql.Literal(json.dumps(wanted))))
            rows = conn.execute(
                sql.SQL('SELECT id, "schema", "table", commit_position, ordinal, before::text,'
                        " after::text, context::text FROM {} WHERE {}"
                        " ORDER BY commit_position, ordinal FOR UPDATE").format(
                    changes, sql.SQL(" AND ").join(conditions))
            ).fetchall()
            keys = _pg_keys(conn, schemas, {(str(r[1]), str(r[2])) for r in rows})
            done = {
                (int(a), int(b)) for a, b in conn.execute(
                    "SELECT commit_position, ordinal FROM bemi_tt.erased WHERE changes_table = %s",
                    (record_name,),
                ).fetchall()
            } if rows else set()
            conn.execute(
                "INSERT INTO bemi_tt.erasures (id, erased_by, changes_table, selector, what, reason, rows)"
                " VALUES (%s, coalesce(%s, current_user), %s, %s::jsonb, %s, %s, %s)",
                (erasure, by, record_name, json.dumps(_selector_json(schema_name, table_name, key_value,
                                                                      wanted)),
                 list(chosen), reason, len(rows)),
            )
            updates = []
            records = []
            for ident, rel_schema, rel_table, position, ordinal, before, after, ctx in rows:
                new = _erase_row(before, after, ctx, keys.get((rel_schema, rel_table), frozenset()),
                                 erasure, chosen)
                updates.append((*new, ident))
                if (int(position), int(ordinal)) not in done:  # the first erasure keeps the original hashes
                    records.append((record_name, position, ordinal, erasure, *_digests(before, after, ctx)))
            with conn.cursor() as cur:
                cur.executemany(
                    sql.SQL("UPDATE {} SET before = %s::jsonb, after = %s::jsonb, context = %s::jsonb"
                            " WHERE id = %s").format(changes), updates)
                cur.executemany(
                    "INSERT INTO bemi_tt.erased (changes_table, commit_position, ordinal, erasure,"
                    " before_digest, after_digest, context_digest) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    records)
        return Erasure(erasure, len(rows), record_name)
    finally:
        if conn is not dsn:
            conn.close()


def _pg_keys(conn: Any, schemas: sql.Composable, tables: Iterable[tuple[str, str]]) -> dict[
        tuple[str, str], frozenset[str]]:
    """The primary key columns of each table over its recorded versions (kept in the erased form)."""
    out: dict[tuple[str, str], frozenset[str]] = {}
    for rel_schema, rel_table in tables:
        try:
            with conn.transaction():
                names = conn.execute(
                    sql.SQL("SELECT DISTINCT c ->> 'name' FROM {}, jsonb_array_elements(columns) c"
                            " WHERE \"schema\" = %s AND \"table\" = %s AND (c ->> 'key')::boolean"
                            ).format(schemas),
                    (rel_schema, rel_table),
                ).fetchall()
        except Exception as exc:  # no schema record (a first-release table): key columns unknown
            import psycopg

            if not isinstance(exc, psycopg.errors.UndefinedTable):
                raise
            names = []
        out[(rel_schema, rel_table)] = frozenset(str(n[0]) for n in names)
    return out


def pg_erased_digests(conn: Any, schema: str) -> dict[tuple[int, int], tuple[str, str, str]]:
    """The recorded hashes of the erased changes of ``schema.changes`` (for ``verify``)."""
    from capture.exclude import readable
    from capture.schema import CHANGES_TABLE

    if not readable(conn, "erased"):
        return {}
    rows = conn.execute(
        "SELECT commit_position, ordinal, before_digest, after_digest, context_digest FROM bemi_tt.erased"
        " WHERE changes_table = %s", (f"{schema}.{CHANGES_TABLE}",),
    ).fetchall()
    return {(int(r[0]), int(r[1])): (str(r[2]), str(r[3]), str(r[4])) for r in rows}


# -- Parquet export -------------------------------------------------------------------------------------


def _read_record(filesystem: Any, root: str) -> dict[str, Any]:
    from capture.export.layout import META_DIR

    try:
        with filesystem.open_input_stream(f"{root}/{META_DIR}/{ERASURES_FILE}") as stream:
            record: dict[str, Any] = json.loads(stream.read().decode("utf-8"))
            return record
    except FileNotFoundError:
        return {"erasures": [], "rows": {}}


def export_erased_digests(directory: str) -> dict[tuple[int, int], tuple[str, str, str]]:
    """The recorded hashes of the erased changes of an export (for ``verify``)."""
    from capture.export.dataset import resolve_directory

    filesystem, root = resolve_directory(directory)
    rows = _read_record(filesystem, root)["rows"]
    out = {}
    for name, (before, after, ctx, _) in rows.items():
        position, _, ordinal = name.partition("/")
        out[(int(position), int(ordinal))] = (str(before), str(after), str(ctx))
    return out


def erase_export(
    directory: str,
    *,
    table: str | None = None,
    key: object = None,
    context: Mapping[str, Any] | None = None,
    what: Sequence[str] = JSON_COLUMNS,
    by: str | None = None,
    reason: str | None = None,
    lock: bool = True,
    wait: float = 0.0,
    lease_seconds: float = 60.0,
) -> Erasure:
    """Erase the selected changes in the Parquet or Delta export at ``directory`` (same selector as
    :func:`erase_changes`), under the export lock.

    Parquet: the record (``_bemi_tt/erasures.json``, with each change's original column hashes) is written
    first, then every file holding a selected change is rewritten in place (atomically, under its own
    name): a crash in between leaves changes recorded but not yet erased, which ``verify`` accepts and a
    rerun erases. Delta (local directories only): see :func:`apply_rewrites` — the rewritten files, their
    ONE Delta commit and the record are swapped in together, and no file of an older version survives.
    """
    from capture.export.dataset import is_delta_table, read_dataset_state, resolve_directory
    from capture.export.lock import open_lock

    schema_name, table_name, key_value, wanted, chosen = _check_selector(table, key, context, what)
    filesystem, root = resolve_directory(directory)
    delta = is_delta_table(filesystem, root)
    if delta:
        root = _local_delta_root(directory, filesystem, root)
    erasure = uuid.uuid4().hex
    with open_lock(os.fspath(directory), filesystem, root, enabled=lock, lease_seconds=lease_seconds) as held:
        held.acquire(wait)
        listing = delta_files(root) if delta else None
        files = listing.files if listing is not None else read_dataset_state(filesystem, root).files
        keys = _export_keys(filesystem, root)
        # pass 1: what is selected, and the original hashes of what was never erased before
        record = _read_record(filesystem, root)
        selected: list[tuple[DataFile, list[int]]] = []
        count = 0
        for data_file in files:
            if table_name is not None and not _partition_may_hold(
                data_file.partition, schema_name, table_name
            ):
                continue
            data = pq.read_table(data_file.path, filesystem=filesystem)
            hits = _select(data, schema_name, table_name, key_value, wanted)
            if not hits:
                continue
            selected.append((data_file, hits))
            count += len(hits)
            columns = {c: _texts(data.column(c)) for c in ("before", "after", "context")}
            positions = data.column("commit_position").to_pylist()
            ordinals = data.column("ordinal").to_pylist()
            for i in hits:
                name = f"{positions[i]}/{ordinals[i]}"
                if name not in record["rows"]:
                    record["rows"][name] = [*_digests(columns["before"][i], columns["after"][i],
                                                      columns["context"][i]), erasure]
        record["erasures"].append({
            "id": erasure, "erased_at": datetime.now(timezone.utc).isoformat(),
            "erased_by": by or _user(),
            "selector": _selector_json(schema_name, table_name, key_value, wanted),
            "what": list(chosen), "reason": reason, "rows": count,
        })

        def rewrites() -> Iterator[tuple[DataFile, pa.Table]]:
            """pass 2: each file holding a selected change, its selected changes in erased form"""
            for data_file, hits in selected:
                data = pq.read_table(data_file.path, filesystem=filesystem)
                tables = data.column("table").to_pylist()
                schemas = data.column("schema").to_pylist()
                texts = {c: _texts(data.column(c)) for c in ("before", "after", "context")}
                for i in hits:
                    new = _erase_row(texts["before"][i], texts["after"][i], texts["context"][i],
                                     keys.get((schemas[i], tables[i]), frozenset()), erasure, chosen)
                    texts["before"][i], texts["after"][i], texts["context"][i] = new
                yield data_file, _with_texts(data, texts)

        apply_rewrites(filesystem, root, record, rewrites(), listing=listing, renew=held.renew,
                       metadata={"bemi_tt.operation": "erase", "bemi_tt.erasure": erasure})
    return Erasure(erasure, count, f"the export {directory!r}")


def _local_delta_root(directory: str, filesystem: Any, root: str) -> str:
    """The real path of a local Delta export (the swap exchanges the directory itself, never a symlink to
    it); an object store is refused: it cannot swap a tree of files at once."""
    import pyarrow.fs as pafs

    if not isinstance(filesystem, pafs.LocalFileSystem):
        raise ConfigurationError(
            f"erase of the Delta export {os.fspath(directory)!r} works on local directories only: an object "
            "store cannot swap the table's files at once; erase in PostgreSQL (bemi-tt erase --dsn URL) and "
            "export into a new prefix, or erase a local copy and upload it to a new prefix"
        )
    return os.path.realpath(root)


def delta_files(root: str) -> Any:
    """The current version's data files of the local Delta export at ``root`` (capture/export/swap.py), after
    removing the sibling trees a killed prune or erase left."""
    from capture.export.swap import delta_listing, remove_leftovers

    remove_leftovers(root)
    return delta_listing(root)


def _with_texts(data: pa.Table, texts: Mapping[str, list[str]]) -> pa.Table:
    """``data`` with its JSON columns replaced by ``texts`` (their Parquet JSON tag, if any, kept)."""
    for column, values in texts.items():
        index = data.schema.get_field_index(column)
        field = data.schema.field(index)
        array = pa.array(values, pa.string())
        if isinstance(field.type, pa.BaseExtensionType):
            array = pa.ExtensionArray.from_storage(field.type, array)
        data = data.set_column(index, field, array)
    return data


def apply_rewrites(
    filesystem: Any,
    root: str,
    record: Mapping[str, Any],
    rewrites: Iterable[tuple[DataFile, pa.Table]],
    *,
    listing: Any = None,
    renew: Callable[[], None] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write the erasure ``record`` and the rewritten data files of an export; the number of files rewritten.

    A Parquet export (``listing`` None): the record first, then each file in place under its own name
    (atomically); a crash in between leaves rows recorded but not yet erased, which ``verify`` accepts and
    the rerun erases.

    A Delta export (``listing``: its current files, ``capture.export.swap.delta_listing``): the prune's
    machinery (``replace_tree``). The new tree is built beside the directory: every file hard-linked but the
    rewritten ones, written anew under new names (``part-<F>-<L>-e-<uuid>``), and the data files of older
    versions or never committed; ONE Delta commit on the staging table removes the old files and adds the new
    ones; the record is written there too; one ``renameat2(RENAME_EXCHANGE)`` swaps it in and the old tree is
    deleted. Chosen over a commit in place followed by deleting the replaced files because it is atomic: a
    kill leaves the old state (record and files) or the new one, never a committed erasure whose old files
    still hold the values, and the leftover sibling is removed by the next erase, prune or export run. The
    cost is the point: time travel to a version before the erasure fails on its missing files instead of
    showing the erased values.
    """
    from capture.export.dataset import write_atomic
    from capture.export.layout import META_DIR
    from capture.export.write import parquet_bytes

    content = json.dumps(record, sort_keys=True).encode("utf-8")
    count = 0
    if listing is None:
        write_atomic(filesystem, f"{root}/{META_DIR}/{ERASURES_FILE}", content)
        for data_file, data in rewrites:
            if renew is not None:
                renew()
            write_atomic(filesystem, data_file.path, parquet_bytes(data))
            count += 1
        return count
    from capture.export.swap import delta_file, replace_tree

    replaced: list[DataFile] = []
    added = []
    values: dict[str, dict[str, str | None]] = {}
    for data_file, data in rewrites:
        if renew is not None:
            renew()
        replaced.append(data_file)
        added.append(delta_file(data_file.partition, data_file.first, data_file.last, "e", data))
        values[data_file.partition] = listing.delta[data_file.path]
    if not replaced:  # nothing to rewrite: the record alone, in place
        write_atomic(filesystem, f"{root}/{META_DIR}/{ERASURES_FILE}", content)
        return 0
    replace_tree(root, listing, replaced, added, values, {ERASURES_FILE: content}, dict(metadata or {}),
                 doing="erasing in")
    return len(replaced)


def _partition_may_hold(partition: str, schema: str | None, table: str) -> bool:
    """Whether files of ``partition`` (``relation=<schema.table>/date=...``) can hold ``table``'s rows."""
    from urllib.parse import unquote

    first = partition.split("/")[0]
    if not first.startswith("relation="):
        return True
    relation = unquote(first[len("relation="):])
    return relation == f"{schema}.{table}" if schema is not None else relation.endswith(f".{table}")


def _texts(column: Any) -> list[str]:
    import pyarrow as pa

    if isinstance(column.type, pa.BaseExtensionType):
        column = column.cast(column.type.storage_type)
    return ["{}" if v is None else str(v) for v in column.to_pylist()]


def _select(data: Any, schema: str | None, table: str | None, key: str | None,
            context: Mapping[str, Any] | None) -> list[int]:
    tables = data.column("table").to_pylist()
    schemas = data.column("schema").to_pylist()
    keys = data.column("primary_key").to_pylist()
    operations = data.column("operation").to_pylist()
    contexts = _texts(data.column("context")) if context is not None else None
    out = []
    for i in range(data.num_rows):
        if operations[i] == "TRUNCATE" or (table is not None and tables[i] != table):
            continue
        if (schema is not None and schemas[i] != schema) or (key is not None and keys[i] != key):
            continue
        if contexts is not None and context is not None and not _matches_context(contexts[i], context):
            continue
        out.append(i)
    return out


def _export_keys(filesystem: Any, root: str) -> dict[tuple[str, str], frozenset[str]]:
    import pyarrow.parquet as pq

    from capture.export.layout import LEGACY_SCHEMAS_FILE, META_DIR, SCHEMAS_FILE

    out: dict[tuple[str, str], set[str]] = {}
    for name in (SCHEMAS_FILE, LEGACY_SCHEMAS_FILE):
        try:
            with filesystem.open_input_file(f"{root}/{META_DIR}/{name}") as handle:
                data = pq.read_table(handle)
        except FileNotFoundError:
            continue
        columns = _texts(data.column("columns"))
        for schema, table, text in zip(data.column("schema").to_pylist(), data.column("table").to_pylist(),
                                       columns, strict=True):
            for column in json.loads(text):
                if column.get("key"):
                    out.setdefault((str(schema), str(table)), set()).add(str(column["name"]))
        break
    return {k: frozenset(v) for k, v in out.items()}


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no login name (a container without passwd entry)
        return "unknown"


def sync_export_erasures(
    conn: Any, filesystem: Any, root: str, schema: str, changes_table: str, renew: Any = None,
    *, listing: Any = None,
) -> int:
    """Bring an export in line with the erasures recorded in PostgreSQL; the number of files rewritten.

    Called by each export run under its lock (capture/export/run.py, and capture/export/delta.py with the
    Delta export's ``listing``), after the new changes are written: when PostgreSQL records an erasure the
    export does not, the record (``_bemi_tt/erasures.json``) takes its rows' original hashes, and every file
    holding an erased change gets that change's current (erased) JSON columns from ``changes``, written as
    :func:`apply_rewrites` does. So erasing in PostgreSQL and exporting again leaves no erased value in the
    export, whenever the files were written.
    """
    from capture.export.dataset import read_dataset_state

    name = f"{schema}.{changes_table}"
    from capture.exclude import readable

    if not readable(conn, "erased") or not readable(conn, "erasures"):
        return 0
    erasures = conn.execute(
        "SELECT id, erased_at, erased_by, selector, what, reason, rows FROM bemi_tt.erasures"
        " WHERE changes_table = %s ORDER BY erased_at, id", (name,),
    ).fetchall()
    record = _read_record(filesystem, root)
    applied = {str(e["id"]) for e in record["erasures"]}
    if all(str(e[0]) in applied for e in erasures):
        return 0
    rows = conn.execute(
        sql.SQL(
            "SELECT e.commit_position, e.ordinal, e.before_digest, e.after_digest, e.context_digest,"
            ' e.erasure, c."schema", c."table", c.before::text, c.after::text, c.context::text'
            " FROM bemi_tt.erased e"
            " JOIN {} c ON c.commit_position = e.commit_position AND c.ordinal = e.ordinal"
            " WHERE e.changes_table = %s"
        ).format(sql.Identifier(schema, changes_table)), (name,),
    ).fetchall()
    content: dict[tuple[int, int], tuple[str, str, str]] = {}
    relations: dict[tuple[int, int], str] = {}
    for position, ordinal, bd, ad, cd, erasure, rel_schema, rel_table, before, after, ctx in rows:
        key = (int(position), int(ordinal))
        record["rows"].setdefault(f"{key[0]}/{key[1]}", [str(bd), str(ad), str(cd), str(erasure)])
        content[key] = (str(before), str(after), str(ctx))
        relations[key] = f"{rel_schema}.{rel_table}"
    for ident, at, by, selector, what, reason, count in erasures:
        if str(ident) not in applied:
            record["erasures"].append({
                "id": str(ident), "erased_at": at.isoformat(), "erased_by": str(by), "selector": selector,
                "what": list(what), "reason": reason, "rows": int(count),
            })
    keys = sorted(content)
    files = listing.files if listing is not None else read_dataset_state(filesystem, root).files

    def rewrites() -> Iterator[tuple[DataFile, pa.Table]]:
        for data_file in files:
            inside = [k for k in keys if data_file.first <= k <= data_file.last]
            if not inside or not any(_partition_may_hold(data_file.partition, *relations[k].split(".", 1))
                                     for k in inside):
                continue
            data = pq.read_table(data_file.path, filesystem=filesystem)
            positions = data.column("commit_position").to_pylist()
            ordinals = data.column("ordinal").to_pylist()
            texts = {c: _texts(data.column(c)) for c in JSON_COLUMNS}
            changed = False
            for i, key in enumerate(zip(positions, ordinals, strict=True)):
                wanted = content.get(key)
                now = (texts["before"][i], texts["after"][i], texts["context"][i])
                if wanted is not None and now != wanted:
                    texts["before"][i], texts["after"][i], texts["context"][i] = wanted
                    changed = True
            if changed:
                yield data_file, _with_texts(data, texts)

    return apply_rewrites(filesystem, root, record, rewrites(), listing=listing, renew=renew,
                          metadata={"bemi_tt.operation": "erase", "bemi_tt.erasures": "from PostgreSQL"})


def pending_erasures(conn: Any, filesystem: Any, root: str, schema: str, changes_table: str) -> bool:
    """Whether PostgreSQL records an erasure of ``schema.changes_table`` the export does not."""
    from capture.exclude import readable

    if not readable(conn, "erasures"):
        return False
    ids = conn.execute("SELECT id FROM bemi_tt.erasures WHERE changes_table = %s",
                       (f"{schema}.{changes_table}",)).fetchall()
    applied = {str(e["id"]) for e in _read_record(filesystem, root)["erasures"]}
    return any(str(i[0]) not in applied for i in ids)
