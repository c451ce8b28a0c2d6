"""``bemi_tt.duckdb()``: a DuckDB connection with a ``changes`` view and the time-travel operations in SQL.

    con = bemi_tt.duckdb()
    con.sql("SELECT * FROM as_of('todo', TIMESTAMPTZ '2026-11-27 10:00:00+00')")   -- primary_key, row (JSON)
    con.sql("SELECT * FROM as_of_todo(TIMESTAMPTZ '2026-11-27 10:00:00+00')")     -- typed columns
    con.sql("SELECT * FROM history('todo', '1')")

The macros run the same SQL as :func:`bemi_tt.as_of` (``timetravel.latest_sql``), so SQL users get the same
rows; the typed ``as_of_<table>`` macros type columns by the same mapping as the DataFrame path, as DuckDB
holds them (timestamp infinity and BC years included; domains by their base type; json, arrays, bytea and
numerics beyond 15 digits stay JSON there: exact values need the Python path).
"""

from __future__ import annotations

import re
from typing import Any

import duckdb as _duckdb

from bemi_tt.arguments import SourceLike, TimeLike
from bemi_tt.rule import DUCKDB, Query, Rule, _string
from bemi_tt.sources import get_source
from bemi_tt.state import (
    Layout,
    Relation,
    _covers,
    _matches,
    _pick,
    _readings,
    holds_of,
    key_eras,
    layout_at,
    lives_of,
    relation_in,
    rename_eras,
    schema_rows,
    table_label,
)
from bemi_tt.timestamps import to_utc
from capture.errors import ConfigurationError

__all__ = ["duckdb", "register_as_of"]

#: the relation ``tbl`` names at ``ts``: the one holding the name then, else the one holding it now
_RELATION = (
    'SELECT h.rel FROM bemi_tt_names h WHERE (h."table" = tbl OR h."schema" || \'.\' || h."table" = tbl)\n'
    "ORDER BY (h.held_from IS NULL OR h.held_from <= CAST(ts AS TIMESTAMPTZ))\n"
    "    AND (h.held_to IS NULL OR CAST(ts AS TIMESTAMPTZ) < h.held_to) DESC,\n"
    "  h.held_to IS NULL DESC, h.held_from DESC NULLS LAST LIMIT 1"
)
#: the changes of relation ``rel``: under each name it had, in that name's stretch of commit order
_SEGMENT = (
    'c."schema" = s."schema" AND c."table" = s."table"'
    " AND (s.from_cp IS NULL OR (c.commit_position, c.ordinal) >= (s.from_cp, s.from_o))"
    " AND (s.to_cp IS NULL OR (c.commit_position, c.ordinal) < (s.to_cp, s.to_o))"
)


def _key_of(image: str) -> str:
    """The primary key (``__keys``) an image holds, written like ``changes.primary_key``."""
    return (
        f"CASE WHEN len(__keys) = 1 THEN json_extract_string({image}, '/' || __keys[1]) "
        f"WHEN len(__keys) > 1 THEN CAST(to_json(list_transform(__keys, lambda x: json_extract({image}, "
        "'/' || x))) AS VARCHAR) END"
    )


#: the old key of a key UPDATE as the worker wrote it (rows re-keyed by :data:`_REKEYED` read it from images)
_OLD_KEY = "before_primary_key"
#: changes before the relation's last primary key change, keyed by the key valid now (read from their
#: images; exact unless two rows shared a value of the new key before it was one)
_REKEYED = (
    "SELECT c0.* REPLACE (CASE WHEN k.cp IS NOT NULL AND (c0.commit_position, c0.ordinal) < (k.cp, k.o)"
    " AND c0.operation <> 'TRUNCATE'\n"
    f"    THEN CASE WHEN c0.operation = 'DELETE' THEN {_key_of('c0.before')} ELSE {_key_of('c0.after')} END\n"
    "    ELSE c0.primary_key END AS primary_key,\n"
    "  CASE WHEN k.cp IS NOT NULL AND (c0.commit_position, c0.ordinal) < (k.cp, k.o)\n"
    f"    THEN CASE WHEN c0.operation = 'UPDATE' AND {DUCKDB.not_empty('c0.before')}"
    f" THEN {_key_of('c0.before')} END\n"
    "    ELSE c0.before_primary_key END AS before_primary_key)\n"
    "FROM c0 LEFT JOIN bemi_tt_key_changes k ON k.rel = (SELECT rel FROM relation)"
)
#: the fills a row last changed before its columns were added takes, as a JSON object (NULL: none)
_FILLS = (
    "(SELECT json_group_object(f.name, json(f.fill)) FROM bemi_tt_fills f"
    " WHERE f.rel = (SELECT rel FROM relation)"
    " AND f.committed_at <= CAST(ts AS TIMESTAMPTZ) AND (present.cp, present.o) < (f.cp, f.o))"
)


def _renamed(image: str) -> str:
    """``image`` of change ``c`` with members renamed since (by attnum) also under their current names."""
    return (
        f"coalesce(json_merge_patch(c.{image}, (SELECT json_group_object(n.new, json_extract(c.{image},"
        " n.pointer)) FROM bemi_tt_renames n WHERE n.rel = s.rel\n"
        "    AND (n.from_cp IS NULL OR (c.commit_position, c.ordinal) >= (n.from_cp, n.from_o))\n"
        f"    AND (n.to_cp IS NULL OR (c.commit_position, c.ordinal) < (n.to_cp, n.to_o)))), c.{image})"
    )


def _macros() -> list[str]:
    # the rule's pieces over the changes of the relation ``tbl`` names at ``ts``, up to the prefix cut there
    present = Rule(DUCKDB, (), _OLD_KEY).present("scoped", "CAST(after AS VARCHAR)")
    query = (
        Query()
        .with_("relation", _RELATION)
        .with_(
            "c0",
            f"SELECT c.* REPLACE ({_renamed('before')} AS before, {_renamed('after')} AS after),\n"
            "    (SELECT k.keys FROM bemi_tt_keys k WHERE k.rel = s.rel) AS __keys\n"
            f"FROM changes c JOIN bemi_tt_segments s ON s.rel = (SELECT rel FROM relation) AND {_SEGMENT}",
        )
        .with_("keyed", _REKEYED)
        .with_("cut", Rule(DUCKDB).cut("keyed", "CAST(ts AS TIMESTAMPTZ)"))
        .with_(
            "scoped",
            "SELECT keyed.* FROM keyed, cut\nWHERE cut.p IS NULL OR keyed.commit_position < cut.p",
        )
    )
    for name, body in present.ctes:
        query = query.with_(name, body)
    query = query.with_("present", present.select).then(
        f"SELECT k AS primary_key, CAST(coalesce(json_merge_patch(payload, {_FILLS}), payload) AS JSON)"
        ' AS "row", cp AS commit_position, o AS ordinal\nFROM present ORDER BY k'
    )
    now = "CAST('infinity' AS TIMESTAMPTZ)"
    every = (
        f"SELECT c.* FROM changes c JOIN bemi_tt_segments s ON s.rel = (SELECT h.rel FROM bemi_tt_names h"
        ' WHERE (h."table" = tbl OR h."schema" || \'.\' || h."table" = tbl)'
        f" ORDER BY h.held_to IS NULL DESC, coalesce(h.held_to, {now}) DESC LIMIT 1) AND {_SEGMENT}"
    )
    return [
        f"CREATE OR REPLACE MACRO as_of(tbl, ts) AS TABLE {query.sql()}",
        f"""CREATE OR REPLACE MACRO history(tbl, key) AS TABLE
            SELECT * FROM ({every}) WHERE primary_key = CAST(key AS VARCHAR)
            ORDER BY commit_position, ordinal""",
        f"""CREATE OR REPLACE MACRO table_changes(tbl) AS TABLE
            SELECT * FROM ({every}) ORDER BY commit_position, ordinal""",
    ]


def _typed_columns(layout: Layout, ts: str = "ts") -> list[str]:
    """The typed select list over ``as_of``'s ``row`` of the columns of ``layout`` (``ts``: the SQL of the
    time asked), shared by the ``as_of_<table>`` macros and the as-of views."""
    selects = []
    for col in layout.columns:
        pointer = "'/" + col.name.replace("~", "~0").replace("/", "~1").replace("'", "''") + "'"
        quoted = '"' + col.name.replace('"', '""') + '"'
        duck = col.kind.macro
        text = f'json_extract_string("row", {pointer})'
        # JSON null is SQL NULL; typed where DuckDB holds the type, JSON otherwise
        expr = (
            duck.format(v=text)
            if duck
            else f'CASE WHEN {text} IS NOT NULL THEN json_extract("row", {pointer}) END'
        )
        if col.since_at is not None:  # no value before the column existed
            since = f"TIMESTAMPTZ '{col.since_at.isoformat()}'"
            expr = f"CASE WHEN CAST({ts} AS TIMESTAMPTZ) >= {since} THEN {expr} END"
        selects.append(f"{expr} AS {quoted}")
    return selects


def _typed_macro(schema: str, table: str, layout: Layout) -> str | None:
    name = f"as_of_{table}"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return None  # table names that are not plain identifiers: use as_of('schema.table', ts)
    qualified = f"{schema}.{table}".replace("'", "''")
    return (
        f"CREATE OR REPLACE MACRO {name}(ts) AS TABLE SELECT {', '.join(_typed_columns(layout))} "
        f"FROM as_of('{qualified}', ts)"
    )


def duckdb(
    source: SourceLike | None = None, *, as_of: TimeLike | None = None
) -> _duckdb.DuckDBPyConnection:
    """A new DuckDB connection over ``source`` (default: the one set by ``bemi_tt.connect``) with views
    ``changes`` and ``changes_schemas`` and the macros ``as_of``, ``as_of_<table>``, ``history``,
    ``table_changes``. A table name is followed through the schema record as in the Python API: to the
    relation it named at ``ts`` (renames, drops and recreations), its columns by attnum.

    ``as_of=ts``: also a view per tracked table showing it as it was at ``ts`` (:func:`register_as_of`),
    named ``schema.table`` and, for the table a bare name means (public first), ``table``: any SQL, any
    join, runs against one consistent point of history."""
    src = get_source(source)
    con = _duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")  # as the Python API answers; DuckDB would take the machine's zone
    # read as queries scan it: PostgreSQL streams ``changes`` per query instead of copying it up front
    src.lazy(con, "changes")
    schemas = src.schemas()
    con.register("changes_schemas", schemas)
    rows = schema_rows(schemas)
    holds = holds_of(rows)
    # relations: one per OID, and per name for a record without identities (the first release)
    names: list[tuple[str, str, str, Any, Any]] = []
    segments: list[tuple[str, str, str, Any, Any, Any, Any]] = []
    relations: dict[str, Relation] = {}
    lives = lives_of(rows)
    for hold in holds:
        rel = f"{hold.oid}:{hold.life}"
        names.append((rel, *hold.name, hold.start_at, hold.end_at))
        start, end = hold.start, hold.end
        segments.append((rel, *hold.name, *(start or (None, None)), *(end or (None, None))))
    for (oid, life), own in lives.items():
        relations[f"{oid}:{life}"] = Relation(
            own[-1].name, oid, tuple(r.version for r in own if not r.has("drop_table")), (), tuple(own)
        )
    legacy = {r.name for r in rows if r.oid is None} - {h.name for h in holds}
    legacy |= set(src.tables())  # asked of the source: scanning the lazy ``changes`` view reads it all
    legacy -= {h.name for h in holds}
    for name in sorted(legacy):
        rel = f"name:{name[0]}.{name[1]}"
        names.append((rel, *name, None, None))
        segments.append((rel, *name, None, None, None, None))
        named = tuple(r for r in rows if r.name == name)
        relations[rel] = Relation(name, None, tuple(r.version for r in named), None, named)
    _table(
        con,
        "bemi_tt_names",
        'rel VARCHAR, "schema" VARCHAR, "table" VARCHAR, held_from TIMESTAMPTZ, held_to TIMESTAMPTZ',
        names,
    )
    _table(
        con,
        "bemi_tt_segments",
        'rel VARCHAR, "schema" VARCHAR, "table" VARCHAR, from_cp BIGINT,'
        " from_o INTEGER, to_cp BIGINT, to_o INTEGER",
        segments,
    )
    keys: list[tuple[str, list[str]]] = []
    key_changes: list[tuple[str, int, int]] = []
    fills: list[tuple[str, str, int, int, Any, str]] = []
    renames: list[tuple[str, Any, Any, Any, Any, str, str]] = []
    layouts: dict[tuple[str, str], Layout] = {}
    for rel, relation in relations.items():
        layout = layout_at(list(relation.versions), None)
        if layout is None:
            continue
        keys.append((rel, layout.keys))
        eras = key_eras(relation, None)
        if len(eras) > 1 and eras[-1][0] is not None:
            key_changes.append((rel, *eras[-1][0]))
        if relation.oid is None or any(f"{h.oid}:{h.life}" == rel and h.end is None for h in holds):
            layouts[relation.name] = layout  # a table that exists now gets its typed macro
        for col in layout.columns:
            if col.since is not None and col.fill is not None:
                fills.append((rel, col.name, col.since[0], col.since[1], col.since_at, col.fill))
        for start, end, pairs in rename_eras(relation, None):
            for old, new in pairs:
                if old != new:
                    renames.append(
                        (rel, *(start or (None, None)), *(end or (None, None)), _pointer(old), new)
                    )
    _table(con, "bemi_tt_keys", "rel VARCHAR, keys VARCHAR[]", keys)
    _table(con, "bemi_tt_key_changes", "rel VARCHAR, cp BIGINT, o INTEGER", key_changes)
    _table(
        con,
        "bemi_tt_fills",
        "rel VARCHAR, name VARCHAR, cp BIGINT, o INTEGER, committed_at TIMESTAMPTZ, fill VARCHAR",
        fills,
    )
    _table(
        con,
        "bemi_tt_renames",
        "rel VARCHAR, from_cp BIGINT, from_o INTEGER, to_cp BIGINT, to_o INTEGER,"
        " pointer VARCHAR, new VARCHAR",
        renames,
    )
    for statement in _macros():
        con.execute(statement)
    for (schema, table), layout in layouts.items():
        typed = _typed_macro(schema, table, layout)
        if typed is not None:
            con.execute(typed)
    if as_of is not None:
        when = to_utc(as_of, "as_of")
        # the names tables had at ``ts`` (a table renamed later keeps its name of then)
        held = {h.name for h in holds if _covers(h, when)} | legacy
        tables = sorted(held)
        for schema, table in tables:
            relation = relations.get(f"name:{schema}.{table}") or relation_in(rows, (schema, table), when)
            if layout_at(list(relation.versions), when) is None:
                continue  # created after ``ts``: no such table then
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(schema)}")
            register_as_of(con, table_label((schema, table), tables), when, name=(schema, table))
            bare = _pick(table, _matches([(None, table)], tables))
            if bare == (schema, table) and table not in _RESERVED:
                register_as_of(con, table_label((schema, table), tables), when)
    return con


#: names the connection already uses: a tracked table of that name is only ``schema.table``
_RESERVED = ("changes", "changes_schemas", "bemi_tt_keys", "bemi_tt_fills")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def register_as_of(
    con: _duckdb.DuckDBPyConnection,
    table: str,
    ts: TimeLike,
    name: str | tuple[str, str] | None = None,
) -> str:
    """Create (or replace) in ``con`` (a :func:`duckdb` connection) a view of ``table`` as it was at ``ts``:
    the rows of :func:`bemi_tt.as_of` (the same rule, through the ``as_of`` macro), key columns included,
    typed like ``as_of_<table>``, with the columns the table had at ``ts``. ``name``: the view's name
    (default: the table's; a ``(schema, name)`` pair for a view in a schema). Returns the view's SQL name.
    """
    when = to_utc(ts)
    rows = schema_rows(con.sql("SELECT * FROM changes_schemas").to_arrow_table())
    tables = sorted({r.name for r in rows})
    if not isinstance(table, str):
        raise ConfigurationError(f"table must be a table name such as 'todo' or 'public.todo', got {table!r}")
    found = _pick(table, _matches(_readings(table), tables))
    if found is None:
        known = ", ".join(table_label(t, tables) for t in tables) or "none"
        raise ConfigurationError(f"unknown or ambiguous table {table!r}: the schema record has: {known}")
    # the relation the name meant at ``ts`` (renames, drops and recreations), as the ``as_of`` macro reads it
    layout = layout_at(list(relation_in(rows, found, when).versions), when)
    if layout is None:
        raise ConfigurationError(
            f"table {table!r} did not exist at {when.isoformat()} (its schema record starts later): "
            "pass a later time"
        )
    at = f"TIMESTAMPTZ '{when.isoformat()}'"
    qualified = _string(f"{found[0]}.{found[1]}")
    view = (
        _quote(found[1])
        if name is None
        else _quote(name)
        if isinstance(name, str)
        else f"{_quote(name[0])}.{_quote(name[1])}"
    )
    con.execute(
        f"CREATE OR REPLACE VIEW {view} AS SELECT {', '.join(_typed_columns(layout, at))} "
        f"FROM as_of({qualified}, {at})"
    )
    return view


def _pointer(name: str) -> str:
    return "/" + name.replace("~", "~0").replace("/", "~1")


def _table(con: _duckdb.DuckDBPyConnection, name: str, columns: str, rows: list[Any]) -> None:
    con.execute(f"CREATE TEMP TABLE {name} ({columns})")
    if rows:
        marks = ", ".join("?" for _ in rows[0])
        con.executemany(f"INSERT INTO {name} VALUES ({marks})", rows)
