"""The rows of a table at a point of its history, as DuckDB finds them: the engine under ``as_of``.

A table's column sets come from ``changes_schemas`` (or are inferred from the rows when a source has
none); each key's last change up to a cut is one ``arg_max`` over ``(commit_position, ordinal)``; key
UPDATEs (the old key, read from ``before``) and TRUNCATEs remove the keys they made disappear. Order is
always commit order, never time: ``state_at(t)`` is the state after the longest prefix of the table's
commits whose ``committed_at <= t``.

A table name means the relation (OID) that had it at ``t`` (:func:`relation_at`, the reading rule of
``changes_schemas``): its changes under every name it had (renames; a drop ends it, a new OID of the same
name is another relation), images renamed to the names valid at ``t`` by attnum, the rows present at a
primary key change re-keyed by the new key, and a refusal (:class:`SourceError`) inside a tracking gap.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from bemi_tt.dtypes import (
    ColumnType,
    column_type,
    frame_from_json,
    infer_type,
    parse_json,
    spec_type,
    typed_rows,
    typed_series,
)
from bemi_tt.rule import DUCKDB, MOVED, PRESENT, Era, Rule, within
from bemi_tt.sources import Scope, Source, TableName, json_text
from bemi_tt.sources.base import Segment
from capture.errors import ConfigurationError, SourceError

_shared: duckdb.DuckDBPyConnection | None = None
_shared_lock = threading.Lock()


def _duck() -> duckdb.DuckDBPyConnection:
    """A fresh connection to one in-process DuckDB database (opening a database per call costs ~50 ms);
    temporary views and registered Arrow tables are private to each connection."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = duckdb.connect()
        return _shared.cursor()


# -- tables and their columns -----------------------------------------------------------------------
def _quoted_parts(name: str) -> list[str] | None:
    """``public."my.table"`` → ``["public", "my.table"]``: a dotted list of identifiers, double-quoted ones
    with ``""`` for a quote, unquoted ones as written; None when ``name`` is not of that form."""
    parts: list[str] = []
    i = 0
    while True:
        if name.startswith('"', i):
            part, i = "", i + 1
            while True:
                close = name.find('"', i)
                if close < 0:
                    return None
                part += name[i:close]
                if name.startswith('"', close + 1):
                    part, i = part + '"', close + 2
                    continue
                i = close + 1
                break
        else:
            stop = name.find(".", i)
            part = name[i:] if stop < 0 else name[i:stop]
            if not part or '"' in part:
                return None
            i += len(part)
        parts.append(part)
        if i == len(name):
            return parts if len(parts) <= 2 else None
        if name[i] != ".":
            return None
        i += 1


def _identifier(text: str) -> str:
    return (
        text
        if text and '"' not in text and "." not in text and text.strip() == text
        else ('"' + text.replace('"', '""') + '"')
    )


def _readings(name: str) -> list[tuple[str | None, str]]:
    """Every (schema or None for any, table) that ``name`` can mean: the whole text as a table name, the
    text split at one of its dots, and the quoted-identifier reading (``public."my.table"``)."""
    readings: list[tuple[str | None, str]] = [(None, name)]
    readings += [(name[:i], name[i + 1 :]) for i, ch in enumerate(name) if ch == "."]
    quoted = _quoted_parts(name) if '"' in name else None
    if quoted is not None:
        readings.append((None, quoted[0]) if len(quoted) == 1 else (quoted[0], quoted[1]))
    return readings


def _matches(readings: list[tuple[str | None, str]], tables: list[TableName]) -> list[TableName]:
    found: list[TableName] = []
    for schema, bare in readings:
        for candidate in tables:
            if candidate[1] == bare and (schema is None or candidate[0] == schema) and candidate not in found:
                found.append(candidate)
    return found


def _pick(name: str, found: list[TableName]) -> TableName | None:
    """The one table ``found`` for ``name``; a bare name in several schemas means public's, as in
    PostgreSQL's default search path; None when ambiguous."""
    if len(found) == 1:
        return found[0]
    public = [c for c in found if c[0] == "public" and c[1] == name]
    if public and all(c[1] == name for c in found):
        return public[0]
    return None


def table_label(table: TableName, known: list[TableName] | None = None) -> str:
    """How errors name a table: ``todo`` (schema public), ``app.todo``, quoted where a name holds a dot or a
    quote (``public."my.table"``), fully quoted (``"my"."table"``) where a shorter label would also name
    another of the ``known`` tables; :func:`resolve_table` reads each label back to that one table."""
    schema, name = table
    if _identifier(schema) == schema and _identifier(name) == name:
        label = name if schema == "public" else f"{schema}.{name}"
    else:
        label = f"{_identifier(schema)}.{_identifier(name)}"
    if known is not None and _pick(label, _matches(_readings(label), known)) != table:
        label = '"' + schema.replace('"', '""') + '"."' + name.replace('"', '""') + '"'
    return label


def resolve_table(source: Source, table: str) -> TableName:
    """A table name → ``(schema, table)``, exactly: ``todo`` (any schema, public first), ``schema.todo``,
    a name holding dots as it is (``my.table``) or quoted (``public."my.table"``); unknown or ambiguous
    names are a :class:`ConfigurationError` listing the names that work."""
    if isinstance(table, str) and "\x00" in table:
        raise ConfigurationError(
            f"table {table!r} holds a NUL character, which no PostgreSQL name can: pass the table's name, "
            "such as 'todo' or 'public.todo'"
        )
    if not isinstance(table, str) or not table.strip():
        raise ConfigurationError(f"table must be a table name such as 'todo' or 'public.todo', got {table!r}")
    name = table.strip() if table.strip() != table and not source.tables(table) else table
    readings = _readings(name)
    # ask the source only about the table names the text can mean (an index lookup each on PostgreSQL)
    tables = sorted({t for bare in dict.fromkeys(b for _, b in readings) for t in source.tables(bare)})
    found = _matches(readings, tables)
    picked = _pick(name, found)
    if picked is not None:
        return picked
    if found:
        every = source.tables()
        raise ConfigurationError(
            f"table {table!r} is ambiguous: it names {', '.join(table_label(c, every) for c in found)}; "
            "pass one of these"
        )
    every = source.tables()
    known = ", ".join(table_label(t, every) for t in every) or "none"
    raise ConfigurationError(f"unknown table {table!r}: the source has changes for: {known}")


@dataclass(frozen=True)
class Column:
    """A column as ``changes_schemas`` describes it at some point of history."""

    name: str
    kind: ColumnType
    key: bool
    since: tuple[int, int] | None  # rows last changed before this took ``fill`` (column added later)
    fill: str | None  # JSON text
    since_at: pd.Timestamp | None = None  # when the ALTER that added it (the fill's event) committed


@dataclass(frozen=True)
class Layout:
    """The columns of a table at a point of history (or inferred from the rows when no schema exists)."""

    columns: tuple[Column, ...]
    inferred: bool = False

    @property
    def keys(self) -> list[str]:
        return [c.name for c in self.columns if c.key]

    @property
    def values(self) -> list[Column]:
        return [c for c in self.columns if not c.key]


#: A column set of a table: ((commit_position, ordinal), committed_at, columns).
Version = tuple[tuple[int, int], pd.Timestamp, list[dict[str, Any]]]


def _versions(source: Source, table: TableName, ts: pd.Timestamp | None = None) -> list[Version]:
    """The column sets of the relation ``table`` names at ``ts`` (None: now), in commit order."""
    return list(relation_at(source, table, ts).versions)


def versions_of(raw: pa.Table) -> list[Version]:
    """The column sets of rows of ``changes_schemas`` (one relation's), in commit order (several at one
    position by ``step``)."""
    steps = raw["step"].to_pylist() if "step" in raw.column_names else [0] * raw.num_rows
    out = []
    for cp, o, _step, at, cols in sorted(
        zip(
            raw["commit_position"].to_pylist(),
            raw["ordinal"].to_pylist(),
            steps,
            raw["committed_at"].to_pylist(),
            raw["columns"].to_pylist(),
            strict=False,
        ),
        key=lambda v: (v[0], v[1], v[2] or 0),
    ):
        out.append(((int(cp), int(o)), pd.Timestamp(at), json.loads(cols)))
    return out


def _same_column(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """One column in two versions: by attnum (stable across renames) where both know it, else by name."""
    if a.get("attnum") is not None and b.get("attnum") is not None:
        return bool(a["attnum"] == b["attnum"])
    return bool(a["name"] == b["name"])


def layout_at(versions: list[Version], ts: pd.Timestamp | None) -> Layout | None:
    """The column set valid at ``ts`` (None: the latest), or None when the source has no column sets.
    A column renamed since it was added keeps its origin (``since``, ``fill``): columns are followed by
    attnum."""
    valid = [v for v in versions if ts is None or v[1] <= ts]
    if not valid:
        return None
    current = valid[-1][2]
    columns = []
    for spec in current:
        name = spec["name"]
        since: tuple[int, int] | None = None
        since_at: pd.Timestamp | None = None
        fill: str | None = None
        for i in range(len(valid) - 1, -1, -1):
            found = next((c for c in valid[i][2] if _same_column(c, spec)), None)
            if found is None:
                break
            if i == 0:
                since, since_at, fill = None, None, None
            else:
                since, since_at = valid[i][0], valid[i][1]
                fill = json.dumps(found["fill"]) if "fill" in found else None
        if since is not None and all(any(_same_column(c, spec) for c in v[2]) for v in valid):
            since = since_at = None
        columns.append(Column(name, spec_type(spec), bool(spec.get("key")), since, fill, since_at))
    return Layout(tuple(columns))


# -- relations: one table's identity across renames, drops and recreations -------------------------------
@dataclass(frozen=True)
class SchemaRow:
    """One row of ``changes_schemas``: a relation's version from ``position`` on."""

    schema: str
    table: str
    position: tuple[int, int]
    step: int
    committed_at: pd.Timestamp
    columns: list[dict[str, Any]]
    oid: int | None
    events: list[dict[str, Any]]

    @property
    def name(self) -> TableName:
        return (self.schema, self.table)

    @property
    def version(self) -> Version:
        return (self.position, self.committed_at, self.columns)

    def has(self, kind: str) -> bool:
        return any(e.get("kind") == kind for e in self.events)


def schema_rows(raw: pa.Table) -> list[SchemaRow]:
    """Rows of ``changes_schemas`` in stream order ``(commit_position, ordinal, step)``."""
    rows = []
    for row in raw.to_pylist():
        event, oid = row.get("event"), row.get("relation_oid")
        rows.append(
            SchemaRow(
                str(row["schema"]),
                str(row["table"]),
                (int(row["commit_position"]), int(row["ordinal"])),
                int(row.get("step") or 0),
                pd.Timestamp(row["committed_at"]),
                json.loads(row["columns"]),
                None if oid is None else int(oid),
                json.loads(event) if event else [],
            )
        )
    rows.sort(key=lambda r: (r.position, r.step))
    return rows


@dataclass(frozen=True)
class Hold:
    """A relation holding a name from ``start`` (None: since before its first version) to ``end``
    (None: still), and the commit times of those versions."""

    oid: int
    name: TableName
    start: tuple[int, int] | None
    end: tuple[int, int] | None
    start_at: pd.Timestamp | None
    end_at: pd.Timestamp | None
    #: why it ended: "rename" (to ``renamed``), "drop", "taken" (another relation took the name)
    ended: str | None = None
    renamed: TableName | None = None
    #: which life of the OID (a table attached as a partition ends; detached again, it starts anew)
    life: int = 0

    @property
    def rel(self) -> tuple[int, int]:
        return (self.oid, self.life)


def lives_of(rows: Sequence[SchemaRow]) -> dict[tuple[int, int], list[SchemaRow]]:
    """Each relation's versions by ``(OID, life)``: a ``drop_table`` ends a life (a later version of the
    OID, a partition detached again, starts the next one)."""
    out: dict[tuple[int, int], list[SchemaRow]] = {}
    ended: dict[int, int] = {}
    for r in rows:
        if r.oid is None:
            continue
        life = ended.get(r.oid, 0)
        out.setdefault((r.oid, life), []).append(r)
        if r.has("drop_table"):
            ended[r.oid] = life + 1
    return out


def holds_of(rows: Sequence[SchemaRow]) -> list[Hold]:
    """Who held which name when, from the record: a rename ends one name's hold and starts another, a
    ``drop_table`` ends the relation, and a new relation under a held name ends the old hold there (a drop
    the record missed: a new OID is a new relation)."""
    by_oid = lives_of(rows)
    holds: list[Hold] = []
    for (oid, life), versions in by_oid.items():
        opened: SchemaRow | None = None
        first = life == 0  # a later life (a table detached again) starts at its first version
        for r in versions:
            if opened is not None and (r.name != opened.name or r.has("drop_table")):
                dropped = r.has("drop_table")
                holds.append(
                    Hold(
                        oid,
                        opened.name,
                        None if first else opened.position,
                        r.position,
                        None if first else opened.committed_at,
                        r.committed_at,
                        "drop" if dropped and r.name == opened.name else "rename",
                        None if dropped and r.name == opened.name else r.name,
                        life,
                    )
                )
                first = False
                opened = None
            if r.has("drop_table"):
                break
            if opened is None:
                opened = r
        if opened is not None:
            holds.append(
                Hold(
                    oid,
                    opened.name,
                    None if first else opened.position,
                    None,
                    None if first else opened.committed_at,
                    None,
                    life=life,
                )
            )
    # a name taken by another relation ends the earlier hold where the new one starts
    out: list[Hold] = []
    for name in {h.name for h in holds}:
        named = sorted(
            (h for h in holds if h.name == name),
            key=lambda h: (h.start or _first_position(by_oid[h.rel]), h.rel),
        )
        for i, h in enumerate(named):
            if i > 0 and h.start is None:  # not the name's first holder: it starts at its first version
                h = replace(h, start=_first_position(by_oid[h.rel]), start_at=by_oid[h.rel][0].committed_at)
            nxt = named[i + 1] if i + 1 < len(named) else None
            if nxt is not None:
                at = nxt.start or _first_position(by_oid[nxt.rel])
                if h.end is None or at < h.end:
                    h = replace(
                        h,
                        end=at,
                        end_at=by_oid[nxt.rel][0].committed_at if nxt.start is None else nxt.start_at,
                        ended="taken",
                        renamed=None,
                    )
            out.append(h)
    return sorted(out, key=lambda h: (h.name, h.start or (-1, -1)))


def _first_position(rows: Sequence[SchemaRow]) -> tuple[int, int]:
    return rows[0].position


@dataclass(frozen=True)
class Gap:
    """A stretch of a relation's history the record says is not exact: from ``row`` (``untracked``, an
    uncaptured ``rewrite``) until an exact baseline (``tracked`` with ``empty``, a SNAPSHOT)."""

    row: SchemaRow
    event: dict[str, Any]
    restarted: SchemaRow | None = None  # tracking restarted here, without a baseline

    def describe(self, label: str) -> str:
        what = self.event.get("what") or self.event.get("kind")
        when = self.row.committed_at.isoformat()
        reason = self.event.get("reason")
        command = self.event.get("command") or self.event["kind"]
        text = (
            f"{label} has a tracking gap: {what} tracking stopped at {when} (position "
            f"{self.row.position[0]}/{self.row.position[1]}, {command}"
            + (f": {reason}" if reason not in (None, "") else "")
            + ")"
        )
        if self.restarted is None:
            return text + " and has not restarted"
        return text + (
            f" and restarted at {self.restarted.committed_at.isoformat()} without a baseline of the rows"
        )


def _gap_after(rows: Sequence[SchemaRow]) -> Gap | None:
    """The gap the relation is in after ``rows`` (its record up to a point), or None: exact there."""
    gap: Gap | None = None
    for r in rows:
        for e in r.events:
            kind = e.get("kind")
            # rows stay exact without context; an uncaptured rewrite is a gap in the values
            lost = (kind == "untracked" and e.get("what") != "context") or (
                kind == "rewrite" and e.get("captured") is False
            )
            if lost:
                gap = gap or Gap(r, e)
            elif kind == "tracked" and gap is not None:
                gap = None if e.get("empty") is True else replace(gap, restarted=r)
            elif kind in ("create_table", "new_relation") and (
                kind == "create_table" or e.get("command") == "SNAPSHOT"
            ):
                gap = None  # an empty start or a SNAPSHOT: an exact baseline
    return gap


@dataclass(frozen=True)
class Relation:
    """The relation a table name denotes at a time: its column sets and where its changes are.

    ``segments`` None: every change recorded under ``name`` (a relation that never changed name and never
    shared it; also a record without relation identities); else the changes under each name it had."""

    name: TableName
    oid: int | None
    versions: tuple[Version, ...]
    segments: tuple[Segment, ...] | None = None
    record: tuple[SchemaRow, ...] = ()

    @property
    def simple(self) -> bool:
        return self.segments is None

    def scope(self, scope: Scope) -> Scope:
        """``scope`` reading this relation's changes."""
        if self.segments is None:
            return replace(scope, table=self.name)
        return replace(scope, table=self.name, segments=self.segments)

    def gap_at(self, ts: pd.Timestamp | None) -> Gap | None:
        return _gap_after([r for r in self.record if ts is None or r.committed_at <= ts])


def _label(name: TableName) -> str:
    return f"{name[0]}.{name[1]}"


def relation_at(source: Source, table: TableName, ts: pd.Timestamp | None) -> Relation:
    """The relation ``table`` names at ``ts`` (None: now), following the record's reading rule.

    The relation that had the name at ``ts``; else the one that has it now, followed back across its
    renames; else a :class:`ConfigurationError` saying which name the relation had at ``ts``, or that no
    table had that name then."""
    return relation_in(schema_rows(source.schemas()), table, ts)


def relation_in(rows: Sequence[SchemaRow], table: TableName, ts: pd.Timestamp | None) -> Relation:
    """:func:`relation_at` over schema record rows already read."""
    if not any(r.oid is not None and r.name == table for r in rows):  # no identities: by name only
        named = [r for r in rows if r.name == table]
        return Relation(table, None, tuple(r.version for r in named), None, tuple(named))
    holds = holds_of(rows)
    lives = lives_of(rows)
    mine = [h for h in holds if h.name == table]
    held = [h for h in mine if h.end is None] if ts is None else [h for h in mine if _covers(h, ts)]
    hold = held[-1] if held else None
    if hold is None:
        now = [h for h in mine if h.end is None]
        if now and ts is not None:
            first = lives[now[-1].rel][0].committed_at
            earlier = [h for h in mine if h.end_at is not None and h.end_at <= ts]
            if first > ts and earlier:  # the current table came later; the earlier one was gone at ts
                raise ConfigurationError(_no_table(table, ts, earlier[-1], holds))
            hold = now[-1]
        elif ts is None:
            last = mine[-1]
            raise ConfigurationError(
                f"table {_label(table)} no longer exists ({_ending(last)}): pass a time when it did, "
                "e.g. as_of(table, ts)" + _now_named(last, holds)
            )
        else:
            raise ConfigurationError(_no_table(table, ts, mine[-1], holds))
    oid = hold.oid
    own = tuple(
        sorted(
            [r for r in rows if r.oid is None and r.name == table] + lives[hold.rel],
            key=lambda r: (r.position, r.step),
        )
    )
    parts = [h for h in holds if h.rel == hold.rel]
    segments: tuple[Segment, ...] | None = tuple((*h.name, h.start, h.end) for h in parts)
    if len(parts) == 1 and parts[0].start is None and parts[0].end is None:
        segments = None
    name = parts[-1].name if ts is None else hold.name
    versions = tuple(r.version for r in own if not r.has("drop_table"))
    return Relation(name, oid, versions, segments, own)


def _ending(hold: Hold) -> str:
    at = hold.end_at.isoformat() if hold.end_at is not None else "?"
    if hold.ended == "rename" and hold.renamed is not None:
        return f"renamed to {_label(hold.renamed)} at {at}"
    if hold.ended == "drop":
        return f"dropped at {at}"
    return f"replaced by a new table of that name at {at}"


def _now_named(hold: Hold, holds: Sequence[Hold]) -> str:
    current = [h for h in holds if h.rel == hold.rel and h.end is None]
    return f"; that relation is now {_label(current[-1].name)}" if current else ""


def _holding(holds: Sequence[Hold], rel: tuple[int, int], ts: pd.Timestamp) -> Hold | None:
    """The name relation ``rel`` had at ``ts``."""
    then = [h for h in holds if h.rel == rel and _covers(h, ts)]
    return then[-1] if then else None


def _covers(hold: Hold, ts: pd.Timestamp) -> bool:
    return (hold.start_at is None or hold.start_at <= ts) and (hold.end_at is None or ts < hold.end_at)


def _no_table(table: TableName, ts: pd.Timestamp, near: Hold, holds: Sequence[Hold]) -> str:
    """The error for a name no relation had at ``ts``: which name the relation that had it had then."""
    head = f"no table was named {_label(table)} at {ts.isoformat()}"
    then = _holding(holds, near.rel, ts)
    if then is not None:
        other = _label(then.name)
        return f"{head}: the relation of that name was named {other} then; pass '{other}'"
    if near.end_at is not None and near.end_at <= ts:
        return f"{head}: it was {_ending(near)}" + _now_named(near, holds)
    start = near.start_at.isoformat() if near.start_at is not None else "?"
    return f"{head}: that name was first given at {start}"


def _infer_layout(keys: Sequence[str], afters: Sequence[str]) -> Layout:
    names: dict[str, str] = {}
    rows = [parse_json(a) for a in afters]
    for row in rows:
        for name, value in row.items():
            if name not in names or (
                names[name] == "text" and value is not None and not isinstance(value, str)
            ):
                names[name] = "text" if value is None else infer_type(value)
    key = next(
        (
            n
            for n in names
            if rows
            and all(
                r.get(n) is not None and (str(r[n]) if not isinstance(r[n], bool) else "") == k
                for r, k in zip(rows, keys, strict=False)
            )
        ),
        None,
    )
    # jsonb does not keep key order: sort the names so that every source gives the same columns
    return Layout(
        tuple(Column(n, column_type(names[n]), n == key, None, None) for n in sorted(names)), inferred=True
    )


# -- one relation's changes, as its columns are named at a time --------------------------------------
def _valid(relation: Relation, ts: pd.Timestamp | None) -> list[Version]:
    return [v for v in relation.versions if ts is None or v[1] <= ts]


def rename_eras(relation: Relation, ts: pd.Timestamp | None) -> list[Era]:
    """The stretches of ``relation``'s history (up to ``ts``) whose images name columns otherwise than the
    version valid at ``ts`` (renamed since; followed by attnum), with the names to map; [] when none."""
    valid = _valid(relation, ts)
    if len(valid) < 2:
        return []
    target = valid[-1][2]
    now = {c["name"] for c in target}
    eras: list[Era] = []
    for i, (position, _, columns) in enumerate(valid):
        pairs: list[tuple[str, str]] = []
        for col in columns:
            match = next((t for t in target if _same_column(t, col)), None)
            if match is not None:
                pairs.append((col["name"], match["name"]))
            elif col["name"] not in now:  # dropped since: kept under its name (an old key may need it)
                pairs.append((col["name"], col["name"]))
        hidden = any(  # a dropped column whose name a later column took: left out of the images
            c["name"] in now and not any(_same_column(t, c) for t in target) for c in columns
        )
        if all(a == b for a, b in pairs) and not hidden:
            continue
        start = None if i == 0 else position
        end = valid[i + 1][0] if i + 1 < len(valid) else None
        eras.append((start, end, tuple(pairs)))
    return eras


def renamed_columns(relation: Relation, start: pd.Timestamp, end: pd.Timestamp) -> dict[str, str]:
    """The columns of the version valid at ``start`` renamed by ``end`` (by attnum): old name → new."""
    then, now = _valid(relation, start), _valid(relation, end)
    if not then or not now:
        return {}
    out = {}
    for col in then[-1][2]:
        match = next((c for c in now[-1][2] if _same_column(c, col)), None)
        if match is not None and match["name"] != col["name"]:
            out[str(col["name"])] = str(match["name"])
    return out


def key_eras(relation: Relation, ts: pd.Timestamp | None) -> list[tuple[tuple[int, int] | None, list[str]]]:
    """Where ``relation``'s primary key (by attnum) changed up to ``ts``: ``(start, key names now)`` per
    stretch with one key, in commit order (one element: the key never changed)."""
    valid = _valid(relation, ts)
    if not valid:
        return []
    target = valid[-1][2]
    out: list[tuple[tuple[int, int] | None, list[str]]] = []
    previous: list[Any] | None = None
    for i, (position, _, columns) in enumerate(valid):
        keys = [c for c in columns if c.get("key")]
        ident = [c.get("attnum", c["name"]) for c in keys]
        if ident == previous:
            continue
        previous = ident
        names = [next((t["name"] for t in target if _same_column(t, c)), c["name"]) for c in keys]
        out.append((None if i == 0 else position, names))
    return out


def load_relation(
    source: Source,
    con: duckdb.DuckDBPyConnection,
    name: str,
    scope: Scope,
    relation: Relation,
    ts: pd.Timestamp | None = None,
) -> None:
    """Load into view ``name`` ``relation``'s changes in ``scope`` (under every name it had), their images
    naming the columns as the version valid at ``ts`` does."""
    scope = relation.scope(scope)
    eras = rename_eras(relation, ts)
    if not eras:
        source.load(con, name, scope)
        return
    source.load(con, f"{name}__named", scope)
    columns = con.sql(f'SELECT * FROM "{name}__named" LIMIT 0').columns
    quoted = ['"' + c.replace('"', '""') + '"' if c not in ("before", "after") else c for c in columns]
    con.execute(
        f'CREATE OR REPLACE TEMP VIEW "{name}" AS ' + Rule(DUCKDB).shaped(f'"{name}__named"', quoted, eras)
    )


def _present_across_keys(
    con: duckdb.DuckDBPyConnection,
    name: str,
    eras: Sequence[tuple[tuple[int, int] | None, list[str]]],
    layout: Layout | None,
) -> str:
    """The rows present after all of view ``name``'s changes when the primary key changed: each stretch
    applies to the rows present at its start re-keyed by its key (they keep their positions)."""
    rel = f'"{name}"'
    previous: str | None = None
    for i, (start, keys) in enumerate(eras):
        end = eras[i + 1][0] if i + 1 < len(eras) else None
        rule = Rule(DUCKDB, tuple(keys), moved=MOVED)
        part = (
            "SELECT primary_key, operation, CAST(before AS VARCHAR) AS before,"
            f" CAST(after AS VARCHAR) AS after, commit_position, ordinal, {MOVED}"
            f" FROM {rel} WHERE {within(start, end)}"
        )
        if previous is not None:
            part = f"{rule.rebased(previous)}\nUNION ALL\n{part}"
        view = f"{name}__key{i}"
        con.execute(f'CREATE OR REPLACE TEMP VIEW "{view}" AS {part}')
        if keys:
            rows = con.sql(rule.present(f'"{view}"').sql()).to_arrow_table()
        else:
            rows = _keyless_rows(con, f'"{view}"', layout)
        con.register(f"{view}__present", rows)
        previous = f'"{view}__present"'
    assert previous is not None
    return f"SELECT k, cp, o, payload FROM {previous}"


def earlier_keys(
    con: duckdb.DuckDBPyConnection,
    name: str,
    eras: Sequence[tuple[tuple[int, int] | None, list[str]]],
    layout: Layout,
    keys: set[str],
) -> set[str]:
    """The keys the rows now keyed ``keys`` had before each primary key change (view ``name`` holds the
    relation's changes): the row present at a change under its old key is the one its new key names."""
    if len(eras) < 2:
        return set()
    _present_across_keys(con, name, eras, layout)
    found, wanted = set(), set(keys)
    for i in range(len(eras) - 2, -1, -1):  # from the last change back
        new_key = Rule(DUCKDB, tuple(eras[i + 1][1])).key_of("payload")
        listed = ", ".join(_sql_text(k) for k in sorted(wanted)) or "NULL"
        rows = con.sql(
            f'SELECT k FROM "{name}__key{i}__present" WHERE {new_key} IN ({listed})'
        ).fetchall()
        wanted = {str(r[0]) for r in rows}
        found |= wanted
    return found


# -- the SQL that finds current versions: composed from the rule ------------------------------------
def _pointer(name: str) -> str:
    return "'/" + name.replace("~", "~0").replace("/", "~1").replace("'", "''") + "'"


def latest_sql(rel: str, old_key: str, payload: str = "after", _updates: str = "") -> str:
    """SELECT k, cp, o, payload of every key present after all of ``rel``'s changes, where ``old_key`` is a
    column or expression holding each UPDATE's old key (the PostgreSQL source's callback)."""
    return Rule(DUCKDB, (), old_key).present(rel, payload).sql()


@dataclass
class State:
    """A table's rows at a cut: the typed frame (indexed by key, sorted) and, aligned with its rows, each
    row's ``primary_key`` text and the position of the change that produced it."""

    layout: Layout
    frame: pd.DataFrame
    key_texts: np.ndarray[Any, Any]
    cps: np.ndarray[Any, Any]
    ordinals: np.ndarray[Any, Any]

    @property
    def keys(self) -> list[str]:
        return [str(k) for k in self.key_texts]

    @property
    def positions(self) -> list[tuple[int, int]]:
        return list(zip(self.cps.tolist(), self.ordinals.tolist(), strict=True))


def _first(rows: list[Any]) -> Any:
    return rows[0] if rows else None


def _values(series: pd.Series) -> list[Any]:
    """A column's values as :func:`typed_series` takes them: None for NULL (NaN is NULL only in float64)."""
    if isinstance(series.dtype, np.dtype) and series.dtype.kind == "f":
        return [None if v != v else v for v in series.tolist()]
    return [None if v is None or v is pd.NA or v is pd.NaT else v for v in series.tolist()]


def _typed(layout: Layout, rows: pa.Table, frame: pd.DataFrame) -> State:
    """Apply column fills (rows last changed before a column was added), index by the key and sort."""
    keys = rows["k"].to_numpy(zero_copy_only=False)
    cps = rows["cp"].to_numpy(zero_copy_only=False).astype(np.int64)
    ordinals = rows["o"].to_numpy(zero_copy_only=False).astype(np.int64)
    for column in layout.columns:
        if column.since is None:
            continue
        stale = (cps < column.since[0]) | ((cps == column.since[0]) & (ordinals < column.since[1]))
        if stale.any():
            fill = (
                None
                if column.fill is None
                else frame_from_json(['{"v":' + column.fill + "}"], [("v", column.kind)])["v"].iloc[0]
            )
            values = [fill if old else v for v, old in zip(_values(frame[column.name]), stale, strict=True)]
            frame[column.name] = typed_series(values, column.kind).set_axis(frame.index)
    key_names = layout.keys
    if key_names:
        frame = frame.set_index(key_names if len(key_names) > 1 else key_names[0])
    elif not layout.inferred:  # no primary key: rows in commit order of their last change
        order = np.lexsort((ordinals, cps))
        frame, keys, cps, ordinals = frame.iloc[order], keys[order], cps[order], ordinals[order]
        frame.index = pd.RangeIndex(len(frame))
        return State(layout, frame, keys, cps, ordinals)
    else:
        frame.index = pd.Index(pd.array(keys, dtype=pd.StringDtype()), name="primary_key")
    if not frame.index.is_monotonic_increasing:
        order = frame.index.argsort()
        frame, keys, cps, ordinals = frame.iloc[order], keys[order], cps[order], ordinals[order]
    return State(layout, frame, keys, cps, ordinals)


def check_gap(relation: Relation, ts: pd.Timestamp | None, table: TableName) -> None:
    """Refuse an answer at ``ts`` inside a tracking gap of ``relation`` (never a silently wrong table)."""
    gap = relation.gap_at(ts)
    if gap is not None:
        at = "now" if ts is None else ts.isoformat()
        raise SourceError(
            f"{gap.describe(_label(relation.name))}, so its rows at {at} are not known exactly: pass a "
            "time before the gap, or re-baseline the table with a snapshot (`bemi-tt capture --snapshot`)"
            + ("" if relation.name == table else f" (asked as {_label(table)})")
        )


def state_at(
    source: Source,
    table: TableName,
    ts: pd.Timestamp | None,
    *,
    key: str | None = None,
    only: Sequence[str] | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
    name: str = "c",
    relation: Relation | None = None,
) -> State:
    """Load ``table``'s changes up to ``ts`` (None: all) and compute the typed rows present then; ``key``
    or ``only`` (``primary_key`` texts) keep those rows, and only what decides them is read.

    ``table`` is the relation it names at ``ts`` (:func:`relation_at`): its changes under every name it
    had, the columns followed by attnum, the rows re-keyed where the primary key changed; inside a
    tracking gap this raises :class:`SourceError`."""
    con = con or _duck()
    relation = relation or relation_at(source, table, ts)
    check_gap(relation, ts, table)
    versions = list(relation.versions)
    layout = layout_at(versions, ts)
    keys = layout.keys if layout else []
    eras = key_eras(relation, ts)
    # ``before`` only where rows are matched by content (no primary key; rows re-keyed at a key change):
    # key moves come from the worker's old key, and the images are the largest columns to read
    images = ("before", "after") if (layout is not None and not keys) or len(eras) > 1 else ("after",)
    scope = relation.scope(
        Scope(until=ts, columns=("primary_key", "operation", *images, "commit_position", "ordinal", MOVED))
    )
    wanted = [key] if key is not None else list(only) if only is not None else None
    if not relation.simple or len(eras) > 1 or rename_eras(relation, ts):
        # renamed, recreated, re-keyed: the relation's changes under the names of ``ts``, in DuckDB
        load_relation(source, con, name, scope, relation, ts)
        if len(eras) > 1:
            query = _present_across_keys(con, name, eras, layout)
        elif layout is not None and not keys:
            con.register(f"{name}_keyless", _keyless_rows(con, f'"{name}"', layout))
            query = f'SELECT * FROM "{name}_keyless"'
        else:
            query = Rule(DUCKDB, tuple(keys), moved=MOVED).present(f'"{name}"').sql()
        if wanted is not None:
            listed = ", ".join(_sql_text(k) for k in wanted) or "NULL"
            query = f"SELECT * FROM ({query}) WHERE k IN ({listed})"
        key = None
    elif wanted is not None and keys:  # a key lookup: DuckDB pushes the key filter into its scan and
        # aggregate; a source that can reads only the keys' changes, TRUNCATEs and moves away
        keyed = replace(scope, keys=tuple(wanted), key_columns=tuple(keys))
        source.load(con, name, keyed if "keys" in source.pushdown else scope)
        if len(wanted) <= 1000:  # literals: DuckDB pushes them into the scan and the aggregate
            keep = f"latest.k IN ({', '.join(_sql_text(k) for k in wanted) or 'NULL'})"
        else:
            con.register(f"{name}_wanted", pa.table({"k": pa.array(wanted, pa.string())}))
            keep = f'latest.k IN (SELECT k FROM "{name}_wanted")'
        query = Rule(DUCKDB, tuple(keys), moved=MOVED).present(f'"{name}"', keep=keep).sql()
        key = None
    elif layout is not None and not keys:  # a table without a primary key: rows are matched by content
        source.load(con, name, scope)
        con.register(f"{name}_keyless", _keyless_rows(con, f'"{name}"', layout))
        query = f'SELECT * FROM "{name}_keyless"'
    elif "present" in source.pushdown:  # the source finds the present rows itself (PostgreSQL)
        source.present(con, f"{name}_latest", scope, keys)
        query = f'SELECT * FROM "{name}_latest"'
    else:
        source.load(con, name, scope)
        query = Rule(DUCKDB, tuple(keys), moved=MOVED).present(f'"{name}"').sql()
    if key is not None:
        query = f"SELECT * FROM ({query}) WHERE k = {_sql_text(key)}"
    if layout is not None:  # typed column by column in DuckDB (Arrow or Python only where needed)
        rows, frame = typed_rows(con, query, [(c.name, c.kind) for c in layout.columns])
        if ts is not None and rows.num_rows == 0:
            _check_start(source, relation.name, ts, versions)
        return _typed(layout, rows, frame)
    rows = con.sql(query).to_arrow_table()
    if ts is not None and rows.num_rows == 0:
        _check_start(source, relation.name, ts, versions)
    afters = [str(a) for a in rows["payload"].to_pylist()]
    layout = _infer_layout([str(k) for k in rows["k"].to_pylist()], afters)
    frame = frame_from_json(afters, [(c.name, c.kind) for c in layout.columns])
    assert layout is not None
    return _typed(layout, rows, frame)


#: Up to this many keys, a lookup reads only what decides them; more read the whole table.
KEY_LOOKUP_LIMIT = 10_000


def load_lineage(
    source: Source,
    con: duckdb.DuckDBPyConnection,
    name: str,
    scope: Scope,
    keys: Sequence[str],
    layout: Layout,
    relation: Relation | None = None,
) -> set[str]:
    """Load into view ``name`` the changes in ``scope`` that decide ``keys`` and every key they were moved
    from or to (followed until no key UPDATE adds one); returns those keys. Too many keys, a table without
    a known key, or a source without the ``"keys"`` push-down load the whole ``scope`` (an empty set);
    so does a ``relation`` renamed, recreated or re-keyed (:func:`load_relation`)."""
    if relation is not None and (
        not relation.simple or rename_eras(relation, scope.until) or len(key_eras(relation, scope.until)) > 1
    ):
        load_relation(source, con, name, scope, relation, scope.until)
        return set()
    if not layout.keys or len(keys) > KEY_LOOKUP_LIMIT or "keys" not in source.pushdown:
        source.load(con, name, scope)
        return set()
    rule = Rule(DUCKDB, tuple(layout.keys), moved=MOVED)
    names, rel = set(keys), '"' + name.replace('"', '""') + '"'
    for _ in range(100):
        source.load(con, name, replace(scope, keys=tuple(sorted(names)), key_columns=rule.keys))
        moved = con.sql(f"SELECT k, to_k FROM ({rule.moves(rel)})").fetchall()
        grown = names | {k for pair in moved if pair[0] in names or pair[1] in names for k in pair}
        if grown == names:
            return names
        if len(grown) > KEY_LOOKUP_LIMIT:
            break
        names = grown
    source.load(con, name, scope)
    return set()


def _keyless_rows(con: duckdb.DuckDBPyConnection, rel: str, layout: Layout | None = None) -> pa.Table:
    """Rows of a table without a primary key, replayed in commit order: an UPDATE or DELETE (whose
    ``before`` is the whole old row, REPLICA IDENTITY FULL) replaces or removes one row equal to it.

    Rows are matched by content, not by text (images renamed by the engine or rebased after a key change
    spell a row otherwise than jsonb does), an image written before a column was added (``layout``) with
    that column's fill, as the row had it from then on."""
    changes = con.sql(
        f"SELECT operation, CAST(before AS VARCHAR), CAST(after AS VARCHAR), commit_position, ordinal "
        f"FROM {rel} ORDER BY commit_position, ordinal"
    ).fetchall()
    added = [
        (c.since, c.name, None if c.fill is None else _parsed(c.fill))
        for c in (layout.columns if layout is not None else ())
        if c.since is not None
    ]
    live: dict[str, list[tuple[tuple[int, int], str]]] = {}
    for operation, before, after, cp, o in changes:
        if operation == "TRUNCATE":
            live.clear()
            continue
        fills = [(name, fill) for since, name, fill in added if (cp, o) < since]
        if operation in ("UPDATE", "DELETE"):
            old = _content(before, fills)
            stack = live.get(old)
            if stack:
                stack.pop()
                if not stack:
                    del live[old]
        if operation in PRESENT:
            live.setdefault(_content(after, fills), []).append(((cp, o), after))
    rows = sorted(entry for entries in live.values() for entry in entries)
    return pa.table(
        {
            "k": pa.array([f"{cp}:{o}" for (cp, o), _ in rows], pa.string()),
            "cp": pa.array([cp for (cp, _), _ in rows], pa.int64()),
            "o": pa.array([o for (_, o), _ in rows], pa.int32()),
            "payload": pa.array([after for _, after in rows], pa.string()),
        }
    )


def _number(text: str) -> list[str]:
    return ["#", text]  # a number as written: no float rounding decides whether two rows are equal


def _parsed(text: str) -> Any:
    return json.loads(text, parse_float=_number, parse_int=_number)


def _content(text: str, fills: Sequence[tuple[str, Any]] = ()) -> str:
    """A JSON image's content as canonical text (members sorted, ``fills`` where absent), so equal rows
    compare equal."""
    if text == "{}":
        return text
    value = _parsed(text)
    for name, fill in fills:
        value.setdefault(name, fill)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _check_start(source: Source, table: TableName, ts: pd.Timestamp, versions: list[Version]) -> None:
    first = source.first_commit(table)
    starts = [first] if first is not None else []
    starts += [v[1] for v in versions]
    if starts and ts < min(starts):
        raise ConfigurationError(
            f"ts {ts.isoformat()} is before the history of {table[0]}.{table[1]} starts "
            f"({min(starts).isoformat()}): pass a later time"
        )


def key_text(layout: Layout, key: Any) -> str:
    """A user's key (a scalar, a tuple for composite keys, or a dict of key columns) as ``primary_key``."""
    names = layout.keys
    if isinstance(key, dict):
        missing = [n for n in names if n not in key]
        if missing:
            raise ConfigurationError(f"key {key!r} lacks key columns {missing!r}")
        key = tuple(key[n] for n in names) if len(names) > 1 else key[names[0]]
    if isinstance(key, (tuple, list)):
        if len(names) > 1 and len(key) != len(names):
            raise ConfigurationError(f"key {key!r} has {len(key)} values; the key of this table is {names!r}")
        if len(key) == 1:
            key = key[0]
        else:  # compact JSON of the typed values, times in UTC as the worker writes them
            return json_text([_utc(v) for v in key])
    if isinstance(key, str):
        return key
    if key is None or (isinstance(key, float) and key != key) or key is pd.NaT:
        raise ConfigurationError(f"key {key!r} is not a key value: pass the primary key of one row")
    if isinstance(key, np.datetime64):
        key = pd.Timestamp(key)
    elif hasattr(key, "item") and not isinstance(key, (int, float, datetime)):
        key = key.item()
    # one key column's value as its PostgreSQL text, which ``primary_key`` holds
    if isinstance(key, bool):
        return "t" if key else "f"
    if isinstance(key, datetime):
        stamp = pd.Timestamp(key)
        if stamp.tzinfo is not None:  # the worker's server prints timestamptz in UTC
            stamp = stamp.tz_convert("UTC")
        text: str = stamp.strftime("%Y-%m-%d %H:%M:%S")
        if stamp.microsecond or stamp.nanosecond:
            text += f".{stamp.microsecond:06d}".rstrip("0")
        return text + ("+00" if stamp.tzinfo is not None else "")
    return str(key)


def _utc(value: Any) -> Any:
    """A time with a zone as UTC (the worker writes a composite key's timestamptz in UTC); others as given."""
    if isinstance(value, np.datetime64):
        value = pd.Timestamp(value)
    if isinstance(value, datetime) and value.tzinfo is not None:
        return pd.Timestamp(value).tz_convert("UTC")
    return value


def _columns_arg(columns: Any, layout: Layout) -> list[str] | None:
    if columns is None:
        return None
    if isinstance(columns, str):
        columns = [columns]
    wanted = list(columns)
    known = [c.name for c in layout.values]
    bad = [c for c in wanted if c not in known]
    if bad:
        raise ConfigurationError(f"unknown columns {bad!r}: the table has {known!r}")
    return wanted


# -- public API ------------------------------------------------------------------------------------------
