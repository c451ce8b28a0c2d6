"""Undo plans: ``revert`` (undo chosen changes) and ``restore`` (bring a table back to a time).

Both return an :class:`UndoPlan` and change nothing until :meth:`UndoPlan.apply`:

* ``plan.sql``: the statements, in the order they run, every value a typed PostgreSQL literal
  (``'12.50'::numeric(10,2)``, composed with :mod:`psycopg.sql`, never pasted text), every identifier
  quoted. Each statement is guarded: it only touches a row still holding the values the undone change
  wrote (``to_jsonb(col) IS NOT DISTINCT FROM to_jsonb(<literal>)``, so every type compares, ``json``
  and geometric ones too), so run by hand it can only skip a row, never overwrite a later change.
* ``plan.preview``: what the plan changes, shaped like :func:`bemi_tt.diff` (old = the value now,
  new = the value after the plan; ``operation``/``committed_at``/context keys of the change undone).
* ``plan.apply(engine)``: one transaction, under a context marking it as this revert or restore (so the
  undo is captured and audited like any write); a guard that matches no row is a conflict (a row changed
  after the selected changes, or not yet captured when the plan was read): nothing is written and
  :class:`ConflictError` names the rows; ``force=True`` drops the guards and writes anyway.

How a change is undone: a CREATE by a DELETE of the row, a DELETE by an INSERT of its ``before`` image
(needs REPLICA IDENTITY FULL, which install sets), an UPDATE by an UPDATE of only the columns it changed
back to ``before`` (its key too, for a key update). Tables without a primary key are matched by their
full row (the first row equal to the image, by ``ctid``). SNAPSHOT rows are the baseline and are never
undone; a TRUNCATE cannot be undone change by change (use :func:`restore`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pandas as pd
import pyarrow as pa
import sqlalchemy as sa
from psycopg import sql

from bemi_tt.arguments import KeyLike, SourceLike, TimeLike, check_key
from bemi_tt.dtypes import frame_from_json, parse_json, spec_type
from bemi_tt.feed import _context_columns, audit
from bemi_tt.rule import DUCKDB, MOVED, Rule
from bemi_tt.sources import Scope, Source, TableName, get_source, json_text
from bemi_tt.state import _check_start, _duck, _keyless_rows, _versions, key_text, layout_at, resolve_table
from bemi_tt.state import table_label as _table_label
from bemi_tt.timestamps import to_utc
from capture.errors import ConfigurationError, ConflictError

__all__ = ["ConflictError", "UndoPlan", "restore", "revert"]

#: Context keys the undo's own writes carry (``audit(bemi_tt_action="revert")`` finds them).
ACTION_KEY, SELECTION_KEY = "bemi_tt_action", "bemi_tt_selection"

_JSON_TYPES = {"json", "jsonb"}
# format_type text: words, numbers, quoted identifiers and . ( ) [ ] , and spaces; nothing that can end a
# cast (no quote but an identifier's, no operator, no comment, no semicolon)
_TYPE_TEXT = re.compile(r'(?:\s+|[A-Za-z_][A-Za-z0-9_$]*|[0-9]+|"(?:[^"]|"")+"|[.()\[\],])+')


# -- one statement of a plan --------------------------------------------------------------------------
@dataclass
class _Table:
    """A table as the plan writes it: its name, its latest column specs (``changes_schemas``), its key."""

    name: TableName
    specs: dict[str, dict[str, Any]]
    keys: list[str]

    @property
    def label(self) -> str:
        return _table_label(self.name)

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(*self.name)


@dataclass
class _Step:
    """One undo statement: ``insert`` a row, ``delete`` the row at ``where``, or ``update`` the row at
    ``where`` setting ``values``; ``expect`` holds what the row must hold now (the guard)."""

    table: _Table
    kind: str
    values: dict[str, Any]  # insert: the row; update: the columns to set
    where: dict[str, Any]  # the key now (keyed tables)
    expect: dict[str, Any]  # guard: column -> value the row holds now
    origin: dict[str, Any] = field(default_factory=dict)  # the change undone (preview, messages)

    def __post_init__(self) -> None:  # columns in the table's order (jsonb images do not keep it)
        rank = {c: i for i, c in enumerate(self.table.specs)}
        for name in ("values", "where", "expect"):
            columns = getattr(self, name)
            setattr(
                self,
                name,
                {c: columns[c] for c in sorted(columns, key=lambda c: (rank.get(c, len(rank)), c))},
            )

    def row_label(self) -> str:
        t = self.table
        if not t.keys:
            return f"{t.label} row {json_text(self.expect or self.values)}"
        key = self.where or {k: self.values.get(k) for k in t.keys}
        return f"{t.label} " + ", ".join(f"{k}={json_text(key.get(k))}" for k in t.keys)

    def statement(self, force: bool, live: set[str] | None = None) -> sql.Composed:
        t = self.table

        def keep(columns: Mapping[str, Any]) -> dict[str, Any]:
            return {c: v for c, v in columns.items() if live is None or c in live}

        values, expect = keep(self.values), keep(self.expect)
        if self.kind == "insert":
            names = list(values)
            head = sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({})").format(
                t.ident,
                sql.SQL(", ").join(sql.Identifier(c) for c in names),
                sql.SQL(", ").join(_value(t, c, values[c]) for c in names),
            )
            if not t.keys:
                return sql.Composed([head])
            if not force:
                return head + sql.SQL(" ON CONFLICT DO NOTHING")
            others = [c for c in names if c not in t.keys]
            action = (
                sql.SQL("DO UPDATE SET {}").format(
                    sql.SQL(", ").join(
                        sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c))
                        for c in others
                    )
                )
                if others
                else sql.SQL("DO NOTHING")
            )
            return (
                head
                + sql.SQL(" ON CONFLICT ({}) ").format(sql.SQL(", ").join(sql.Identifier(k) for k in t.keys))
                + action
            )
        guards = [_guard(t, c, v) for c, v in expect.items() if c not in t.keys]
        if t.keys:
            parts: list[sql.Composable] = [
                sql.SQL("{} = {}").format(sql.Identifier(k), _value(t, k, self.where[k])) for k in t.keys
            ]
            if not force:
                parts += guards
            where = sql.SQL(" AND ").join(parts)
        else:  # no key: the first row equal to the image (the guard locates it, even when forced)
            where = sql.SQL("ctid = (SELECT ctid FROM {} WHERE {} LIMIT 1)").format(
                t.ident, sql.SQL(" AND ").join(guards) if guards else sql.SQL("TRUE")
            )
        if self.kind == "delete":
            return sql.SQL("DELETE FROM {} WHERE {}").format(t.ident, where)
        return sql.SQL("UPDATE {} SET {} WHERE {}").format(
            t.ident,
            sql.SQL(", ").join(
                sql.SQL("{} = {}").format(sql.Identifier(c), _value(t, c, v)) for c, v in values.items()
            ),
            where,
        )


def _type_sql(table: _Table, column: str) -> sql.Composable | None:
    spec = table.specs.get(column)
    text = str(spec.get("type") or "") if spec else ""
    if not text:
        return None
    if not _TYPE_TEXT.fullmatch(text):
        raise ConfigurationError(
            f"column {column} of {table.label} has type {text!r} in changes_schemas, which is not a type "
            "name: the column record is damaged; check changes_schemas"
        )
    return sql.SQL(text)  # checked above: only names, quoted identifiers, numbers and ( ) [ ] . ,


def _is_json(table: _Table, column: str) -> bool:
    spec = table.specs.get(column) or {}
    return str(spec.get("type")) in _JSON_TYPES or str(spec.get("base_type")) in _JSON_TYPES


def _value(table: _Table, column: str, value: Any) -> sql.Composable:
    """``value`` (as the worker recorded it: typed JSON) as a PostgreSQL literal of the column's type."""
    typ = _type_sql(table, column)
    if value is None:
        literal: sql.Composable = sql.SQL("NULL")
    elif _is_json(table, column):
        literal = sql.Literal(json_text(value))
    elif isinstance(value, (list, dict)):
        # arrays and composites: PostgreSQL reads them back from their JSON with the live column's type
        return sql.SQL("(jsonb_populate_record(NULL::{}, {}::jsonb)).{}").format(
            table.ident, sql.Literal(json_text({column: value})), sql.Identifier(column)
        )
    elif isinstance(value, bool):
        literal = sql.Literal("true" if value else "false")
    elif isinstance(value, (int, Decimal)):
        literal = sql.Literal(str(value))  # the digits as recorded: numeric stays exact
    else:
        literal = sql.Literal(str(value))
    return literal if typ is None else sql.SQL("{}::{}").format(literal, typ)


def _guard(table: _Table, column: str, value: Any) -> sql.Composable:
    """The column still holds ``value``: compared as jsonb, so every type compares and formats agree."""
    literal = _value(table, column, value)
    if _type_sql(table, column) is None and not isinstance(value, (list, dict)):
        return sql.SQL("{} IS NOT DISTINCT FROM {}").format(sql.Identifier(column), literal)
    return sql.SQL("to_jsonb({}) IS NOT DISTINCT FROM to_jsonb({})").format(sql.Identifier(column), literal)


# -- the plan ------------------------------------------------------------------------------------------
class UndoPlan:
    """Statements undoing a selection of history; see the module docstring."""

    def __init__(
        self, action: str, selection: dict[str, Any], steps: list[_Step], preview: pd.DataFrame, undone: int
    ) -> None:
        self.action = action
        self.selection = selection
        self.steps = steps
        self.preview = preview
        #: how many recorded changes the plan undoes (restore: rows it writes)
        self.undone = undone

    def statements(self, *, force: bool = False) -> list[str]:
        """The statements as text (``force``: without the guards)."""
        return [s.statement(force).as_string(None) for s in self.steps]

    @property
    def sql(self) -> str:
        """The guarded statements, one per line, each ending with ``;`` (empty when nothing is to undo)."""
        return "".join(s + ";\n" for s in self.statements())

    @property
    def context(self) -> dict[str, Any]:
        """The context the plan's writes carry."""
        return {ACTION_KEY: self.action, SELECTION_KEY: self.selection}

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        selection = json.dumps(self.selection, default=str)
        return f"<UndoPlan {self.action} {selection}: {len(self.steps)} statements>"

    def apply(self, engine: sa.Engine | sa.Connection | str, force: bool = False) -> int:
        """Run the plan in one transaction on ``engine`` (the tracked database) under :attr:`context`;
        returns the number of rows written. A statement whose guard matches no row is a conflict: nothing
        is written and :class:`ConflictError` names every such row, unless ``force=True``."""
        from bemi_tt.context import context

        if not isinstance(force, bool):
            raise ConfigurationError(f"force must be True or False, got {force!r}")
        own = isinstance(engine, str)
        eng: Any = _engine(engine) if isinstance(engine, str) else engine
        if not isinstance(eng, (sa.Engine, sa.Connection)):
            raise ConfigurationError(
                f"apply() takes a SQLAlchemy engine or connection of the tracked database, or its URL; "
                f"got {type(engine).__name__}"
            )
        try:
            with context(self.context):
                if isinstance(eng, sa.Connection):
                    with eng.begin_nested() if eng.in_transaction() else eng.begin():
                        return self._run(eng, force)
                with eng.begin() as conn:
                    return self._run(conn, force)
        finally:
            if own and isinstance(eng, sa.Engine):
                eng.dispose()

    def _run(self, conn: sa.Connection, force: bool) -> int:
        live = _live_columns(conn, {s.table.name for s in self.steps})
        written = 0
        conflicts: list[_Step] = []
        for step in self.steps:
            if step.kind != "delete" and not set(step.values) & live[step.table.name]:
                continue  # every column it would write is gone (dropped) or generated: nothing to do
            text = step.statement(force, live[step.table.name]).as_string(None)
            count = conn.exec_driver_sql(text.replace("%", "%%")).rowcount
            written += max(count, 0)
            if count != 1 and not force:
                conflicts.append(step)
        if conflicts:
            rows = list(dict.fromkeys(s.row_label() for s in conflicts))
            shown = "; ".join(rows[:20]) + (f"; and {len(rows) - 20} more" if len(rows) > 20 else "")
            raise ConflictError(
                f"{self.action} not applied, nothing was written: {len(rows)} row(s) changed after the "
                f"selected changes (or were not yet captured when the plan was made): {shown}; "
                "look at them with history(), or pass force=True (--force) to overwrite them",
                rows,
            )
        return written


def _engine(dsn: str) -> sa.Engine:
    """An engine for a ``postgresql://`` URL or libpq conninfo (psycopg parses both; the hook applies)."""
    import psycopg

    from capture.dsn import check_dsn

    conninfo = check_dsn(dsn)
    return sa.create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(conninfo), poolclass=sa.NullPool
    )


def _live_columns(conn: sa.Connection, tables: Iterable[TableName]) -> dict[TableName, set[str]]:
    """The columns each table has now that a statement may write (generated columns cannot be)."""
    out: dict[TableName, set[str]] = {}
    for schema, name in tables:
        rows = conn.exec_driver_sql(
            "SELECT a.attname FROM pg_catalog.pg_attribute a "
            "JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %(s)s "
            "AND c.relname = %(t)s AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''",
            {"s": schema, "t": name},
        ).fetchall()
        if not rows:
            raise ConfigurationError(
                f"table {_table_label((schema, name))} does not exist in this database: apply the plan to "
                "the tracked database it was made from"
            )
        out[(schema, name)] = {str(r[0]) for r in rows}
    return out


# -- tables, as the source records them ----------------------------------------------------------------
def _table(source: Source, name: TableName, cache: dict[TableName, _Table]) -> _Table:
    if name in cache:
        return cache[name]
    versions = _versions(source, name)
    if not versions:
        raise ConfigurationError(
            f"the source has no column record (changes_schemas) for {_table_label(name)}, so its columns "
            "and key are unknown: undo needs a source written by the capture worker"
        )
    latest = versions[-1][2]
    if not latest:
        raise ConfigurationError(f"table {_table_label(name)} was dropped: there is nothing to write back to")
    specs = {str(c["name"]): c for c in latest}
    table = _Table(name, specs, [str(c["name"]) for c in latest if c.get("key")])
    cache[name] = table
    return table


def _text(value: Any) -> str:
    """A recorded value's JSON text: how two values compare (``1.50`` and ``1.5`` differ, as in the row)."""
    return json_text(value)


# -- revert ----------------------------------------------------------------------------------------------
_FEED_COLUMNS = (
    "committed_at",
    "schema",
    "table",
    "operation",
    "primary_key",
    "changed",
    "before",
    "after",
    "context_verified",
    "transaction_id",
    "commit_position",
    "ordinal",
)


def revert(
    table: str | None = None,
    *,
    since: TimeLike | None = None,
    until: TimeLike | None = None,
    transaction_id: int | None = None,
    source: SourceLike | None = None,
    **context_filters: Any,
) -> UndoPlan:
    """A plan undoing the selected changes, newest first: those of ``table`` (None: every table) committed
    in ``[since, until]``, of one ``transaction_id`` and whose context matches every filter
    (``revert(user_id=187234)``; filters as :func:`bemi_tt.audit` takes them). Nothing changes until
    ``.apply(engine)``; see the module docstring."""
    if transaction_id is not None and (
        isinstance(transaction_id, bool) or not isinstance(transaction_id, int) or transaction_id < 0
    ):
        raise ConfigurationError(
            f"transaction_id must be a transaction id (a non-negative integer, changes.transaction_id), "
            f"got {transaction_id!r}"
        )
    if since is None and until is None and transaction_id is None and not context_filters:
        raise ConfigurationError(
            "revert() needs a selection: pass since=/until=, transaction_id= or a context filter such as "
            "user_id=187234 (to bring a whole table back to a time, use restore(table, ts))"
        )
    src = get_source(source)
    feed = audit(table, since=since, until=until, source=src, **context_filters)
    if transaction_id is not None:
        feed = feed[feed["transaction_id"] == transaction_id]
    selection: dict[str, Any] = {"table": table}
    if since is not None:
        selection["since"] = to_utc(since, "since").isoformat()
    if until is not None:
        selection["until"] = to_utc(until, "until").isoformat()
    if transaction_id is not None:
        selection["transaction_id"] = transaction_id
    if context_filters:
        selection["context"] = dict(context_filters)
    context_names = [c for c in feed.columns if c not in _FEED_COLUMNS]
    tables: dict[TableName, _Table] = {}
    steps: list[_Step] = []
    undone = 0
    rows = feed.sort_values(["commit_position", "ordinal"], ascending=False).to_dict("records")
    for row in rows:
        if row["operation"] == "SNAPSHOT":
            continue  # the baseline tracking began with: not a change anyone made
        name = (str(row["schema"]), str(row["table"]))
        if row["operation"] == "TRUNCATE":
            raise ConfigurationError(
                f"the selection holds the TRUNCATE of {_table_label(name)} committed at "
                f"{row['committed_at'].isoformat()} (transaction {row['transaction_id']}), which cannot be "
                "undone change by change: narrow the selection, or use restore(table, ts) to bring the "
                "table back"
            )
        t = _table(src, name, tables)
        origin = {
            "operation": str(row["operation"]),
            "committed_at": row["committed_at"],
            "position": (int(row["commit_position"]), int(row["ordinal"])),
            "context": {c: row[c] for c in context_names},
        }
        step = _undo_step(t, row, origin)
        undone += 1
        if step is not None:
            steps.append(step)
    preview = _preview(steps, tables, single=table is not None, context_names=context_names)
    return UndoPlan("revert", selection, steps, preview, undone)


def _describe(t: _Table, row: Mapping[str, Any]) -> str:
    return (
        f"the {row['operation']} of {t.label} key {row['primary_key']} committed at "
        f"{row['committed_at'].isoformat()} (transaction {row['transaction_id']})"
    )


def _undo_step(t: _Table, row: Mapping[str, Any], origin: dict[str, Any]) -> _Step | None:
    before: dict[str, Any] = dict(row["before"] or {})
    after: dict[str, Any] = dict(row["after"] or {})
    now = set(t.specs)  # columns dropped since are not written back
    op = row["operation"]
    if op == "CREATE":
        image = {c: v for c, v in after.items() if c in now}
        return _Step(t, "delete", {}, {k: image.get(k) for k in t.keys}, image, origin)
    if op == "DELETE":
        image = {c: v for c, v in before.items() if c in now}
        if set(before) <= set(t.keys) and set(now) - set(t.keys):
            raise ConfigurationError(
                f"{_describe(t, row)} recorded only the key (REPLICA IDENTITY DEFAULT), so the deleted "
                "values are unknown: it cannot be undone; bemi-tt install sets REPLICA IDENTITY FULL for "
                "later changes"
            )
        return _Step(t, "insert", image, {}, {}, origin)
    if op == "UPDATE":
        if not before:
            raise ConfigurationError(
                f"{_describe(t, row)} recorded no old values (REPLICA IDENTITY DEFAULT, or a table rewrite "
                "by ALTER TABLE), so it cannot be undone: narrow the selection, or use restore(table, ts)"
            )
        changed = [c for c in after if c in now and c in before and _text(before[c]) != _text(after[c])]
        if not changed:
            return None  # an UPDATE that changed nothing: nothing to undo
        # the changed columns are the guard; without a key, the whole row locates it
        expect = {c: after[c] for c in changed} if t.keys else {c: v for c, v in after.items() if c in now}
        return _Step(
            t, "update", {c: before[c] for c in changed}, {k: after.get(k) for k in t.keys}, expect, origin
        )
    raise ConfigurationError(f"{_describe(t, row)} is an operation revert does not know: {op!r}")


# -- restore ---------------------------------------------------------------------------------------------
def _keys_arg(keys: Any) -> list[Any]:
    if keys is None:
        return []
    if isinstance(keys, (list, set, frozenset)) or (
        isinstance(keys, Iterable) and not isinstance(keys, (str, bytes, tuple, Mapping))
    ):
        return list(keys)
    return [keys]  # one key: a scalar, a tuple (composite key) or a dict


def _present(
    source: Source, name: TableName, ts: pd.Timestamp | None, keys: list[str], con: Any, view: str
) -> dict[str, tuple[dict[str, Any], tuple[int, int]]]:
    """``primary_key`` text (keyless: ``cp:o``) → (row as recorded, with fills; position of its change) of
    the rows present at ``ts`` (None: after every change)."""
    versions = _versions(source, name)
    layout = layout_at(versions, ts)
    if layout is None:
        if ts is not None:
            _check_start(source, name, ts, versions)  # before the history starts: say so
        return {}
    source.load(
        con,
        view,
        Scope(
            table=name,
            until=ts,
            columns=("primary_key", "operation", "before", "after", "commit_position", "ordinal", MOVED),
        ),
    )
    rel = '"' + view + '"'
    if layout.keys:  # key moves from the worker's old key (a time or boolean key's JSON text differs)
        rows = con.sql(Rule(DUCKDB, tuple(layout.keys), moved=MOVED).present(rel).sql()).fetchall()
        found = [(str(k), int(cp), int(o), str(p)) for k, cp, o, p in rows]
    else:
        table = _keyless_rows(con, rel)
        found = list(
            zip(
                table["k"].to_pylist(),
                table["cp"].to_pylist(),
                table["o"].to_pylist(),
                table["payload"].to_pylist(),
                strict=True,
            )
        )
    if ts is not None and not found:
        _check_start(source, name, ts, versions)
    names = {c.name for c in layout.columns}
    out: dict[str, tuple[dict[str, Any], tuple[int, int]]] = {}
    for k, cp, o, payload in found:
        if keys and k not in keys:
            continue
        row = {c: v for c, v in parse_json(payload).items() if c in names}
        for column in layout.columns:  # a row last changed before its column was added has the fill
            if column.since is not None and (cp, o) < column.since:
                row[column.name] = None if column.fill is None else parse_json(column.fill)
        out[k] = (row, (cp, o))
    return out


def restore(
    table: str,
    ts: TimeLike,
    source: SourceLike | None = None,
    keys: Sequence[KeyLike] | KeyLike | None = None,
) -> UndoPlan:
    """A plan bringing ``table`` (or only the rows with these primary ``keys``) back to ``as_of(table, ts)``:
    rows added since are deleted, rows removed since are inserted, changed rows get their old values back
    (only the columns that differ). The columns written are those the table had at ``ts`` and still has."""
    src = get_source(source)
    name = resolve_table(src, table)
    when = to_utc(ts, "ts")
    cache: dict[TableName, _Table] = {}
    t = _table(src, name, cache)
    versions = _versions(src, name)
    wanted = [check_key(src, name, k) for k in _keys_arg(keys)]
    current_layout = layout_at(versions, None)
    assert current_layout is not None  # _table found versions
    texts = [key_text(current_layout, k) for k in wanted]
    con = _duck()
    target = _present(src, name, when, texts, con, "restore_then")
    current = _present(src, name, None, texts, con, "restore_now")
    then_layout = layout_at(versions, when)
    columns = [c for c in (then_layout.columns if then_layout else ()) if c.name in t.specs]
    names = [c.name for c in columns]
    steps: list[_Step] = []
    if t.keys:
        for k in sorted(set(current) - set(target)):
            row = current[k][0]
            steps.append(
                _Step(t, "delete", {}, {c: row.get(c) for c in t.keys}, row, {"position": current[k][1]})
            )
        for k in sorted(set(current) & set(target)):
            old, new = current[k][0], target[k][0]
            diff = [c for c in names if c not in t.keys and _text(old.get(c)) != _text(new.get(c))]
            if diff:
                steps.append(
                    _Step(
                        t,
                        "update",
                        {c: new.get(c) for c in diff},
                        {c: old.get(c) for c in t.keys},
                        {c: old.get(c) for c in diff},
                        {"position": target[k][1]},
                    )
                )
        for k in sorted(set(target) - set(current)):
            steps.append(
                _Step(
                    t,
                    "insert",
                    {c: v for c, v in target[k][0].items() if c in t.specs},
                    {},
                    {},
                    {"position": target[k][1]},
                )
            )
    else:  # rows are their content: delete the copies too many, insert the copies missing

        def counted(rows: Mapping[str, tuple[dict[str, Any], tuple[int, int]]]) -> Counter[str]:
            return Counter(_text({c: r.get(c) for c in names}) for r, _ in rows.values())

        now_rows, then_rows = counted(current), counted(target)
        by_text = {
            _text({c: r.get(c) for c in names}): (r, p) for r, p in [*current.values(), *target.values()]
        }
        for text, n in sorted((now_rows - then_rows).items()):
            row, position = by_text[text]
            steps += [
                _Step(t, "delete", {}, {}, {c: row.get(c) for c in names}, {"position": position})
                for _ in range(n)
            ]
        for text, n in sorted((then_rows - now_rows).items()):
            row, position = by_text[text]
            steps += [
                _Step(t, "insert", {c: row.get(c) for c in names}, {}, {}, {"position": position})
                for _ in range(n)
            ]
    _origins(src, name, steps, con)
    context_names = sorted({k for s in steps for k in s.origin.get("context", {})})
    preview = _preview(steps, cache, single=True, context_names=context_names)
    selection: dict[str, Any] = {"table": table, "ts": when.isoformat()}
    if wanted:
        selection["keys"] = [list(k) if isinstance(k, tuple) else k for k in wanted]
    return UndoPlan("restore", selection, steps, preview, len(steps))


def _origins(source: Source, name: TableName, steps: list[_Step], con: Any) -> None:
    """Fill each restore step's origin (operation, time, context) from the change at its position."""
    positions = {s.origin["position"] for s in steps}
    if not positions:
        return
    con.register(
        "restore_positions", pa.table({"cp": [p[0] for p in positions], "o": [p[1] for p in positions]})
    )
    source.load(
        con,
        "restore_origins",
        Scope(table=name, columns=("operation", "committed_at", "context", "commit_position", "ordinal")),
    )
    rows = con.sql(
        "SELECT c.commit_position, c.ordinal, c.operation, c.committed_at, CAST(c.context AS VARCHAR) "
        'FROM "restore_origins" c JOIN "restore_positions" p ON c.commit_position = p.cp AND c.ordinal = p.o'
    ).fetchall()
    found = {(int(cp), int(o)): (op, at, ctx) for cp, o, op, at, ctx in rows}
    for step in steps:
        op, at, ctx = found.get(step.origin["position"], (None, None, None))
        context = parse_json(ctx) if ctx else {}
        step.origin.update(
            operation=op,
            committed_at=pd.Timestamp(at) if at is not None else None,
            context=context if isinstance(context, dict) else {},
        )


# -- preview ---------------------------------------------------------------------------------------------
def _preview(
    steps: list[_Step], tables: Mapping[TableName, _Table], *, single: bool, context_names: Sequence[str]
) -> pd.DataFrame:
    """Per row and column the plan changes: the value now (``old``), after the plan (``new``), and the change
    undone; several steps on one row (followed across key updates) net out like ``diff``."""
    rows: dict[int, dict[str, Any]] = {}
    at: dict[tuple[TableName, str], int] = {}
    for step in steps:
        t = step.table
        now_key = _text([step.where.get(k) for k in t.keys]) if step.kind != "insert" else None
        rid = at.pop((t.name, now_key), None) if now_key is not None else None
        if rid is None:
            rid = len(rows)
            rows[rid] = {"table": t, "exists_before": step.kind != "insert", "cells": {}, "key": None}
        entry = rows[rid]
        cells: dict[str, list[Any]] = entry["cells"]
        old_row = step.expect if step.kind != "insert" else {}
        if step.kind == "update":
            new_row = {**step.expect, **step.values}
            columns = list(step.values)
        elif step.kind == "delete":
            new_row, columns = {}, list(step.expect)
        else:
            new_row, columns = dict(step.values), list(step.values)
        for c in columns:
            if c not in cells:
                cells[c] = [old_row.get(c), None, step.origin]
            cells[c][1] = new_row.get(c)
            cells[c][2] = step.origin
        entry["exists_after"] = step.kind != "delete"
        entry["origin"] = step.origin
        if t.keys:
            key_now = {**step.where, **{k: step.values[k] for k in t.keys if k in step.values}}
            if step.kind == "insert":
                key_now = {k: step.values.get(k) for k in t.keys}
            entry["key"] = [key_now.get(k) for k in t.keys]
            if step.kind != "delete":
                at[(t.name, _text(entry["key"]))] = rid
        else:
            entry["key"] = [_text(step.expect or step.values)]
    records: list[dict[str, Any]] = []
    for entry in rows.values():
        before, after = entry["exists_before"], entry["exists_after"]
        if not before and not after:
            continue
        change = "changed" if before and after else "added" if after else "removed"
        t = entry["table"]
        for column, (old, new, origin) in entry["cells"].items():
            if change == "changed" and _text(old) == _text(new):
                continue
            if change != "changed" and column in t.keys:
                continue  # the key is the index, as in diff
            if change == "added":
                old = None
            if change == "removed":
                new = None
                origin = entry["origin"]
            records.append(
                {
                    "table": t,
                    "key": entry["key"],
                    "column": column,
                    "change": change,
                    "old": old,
                    "new": new,
                    "operation": origin.get("operation"),
                    "committed_at": origin.get("committed_at"),
                    "context": origin.get("context", {}),
                }
            )
    _type_values(records)
    first = next(iter(tables.values()), None)
    if single:
        names = (first.keys if first is not None else []) or ["primary_key"]
        index_rows = [(*r["key"], r["column"]) for r in records]
    else:
        names = ["table", "primary_key"]
        index_rows = [
            (r["table"].label, r["key"][0] if len(r["key"]) == 1 else _text(r["key"]), r["column"])
            for r in records
        ]
    index = (
        pd.MultiIndex.from_tuples(index_rows, names=[*names, "column"])
        if records
        else pd.MultiIndex.from_arrays([[] for _ in [*names, "column"]], names=[*names, "column"])
    )
    data = {
        c: pd.Series([r[c] for r in records], index=index, dtype=object)
        for c in ("change", "old", "new", "operation")
    }
    frame = pd.DataFrame(data, index=index)
    frame["change"] = frame["change"].astype(pd.StringDtype())
    frame["operation"] = frame["operation"].astype(pd.StringDtype())
    frame["committed_at"] = pd.Series(
        pd.to_datetime([r["committed_at"] for r in records], utc=True), index=index
    ).astype("datetime64[us, UTC]")
    for name in context_names:
        frame[name] = pd.Series([r["context"].get(name) for r in records], index=index, dtype=object)
    return frame if context_names else _context_columns(frame, [])


def _type_values(records: list[dict[str, Any]]) -> None:
    """``old``/``new`` typed as ``as_of`` and ``diff`` give them (one pass per table and column)."""
    groups: dict[tuple[TableName, str], list[tuple[int, str]]] = {}
    for i, r in enumerate(records):
        for side in ("old", "new"):
            groups.setdefault((r["table"].name, r["column"]), []).append((i, side))
    for (_, column), cells in groups.items():
        spec = records[cells[0][0]]["table"].specs.get(column)
        if spec is None:
            continue
        kind = spec_type(spec)
        texts = ['{"v":' + _text(records[i][side]) + "}" for i, side in cells]
        values = frame_from_json(texts, [("v", kind)])["v"].tolist()
        for (i, side), value in zip(cells, values, strict=True):
            missing = (
                value is None
                or value is pd.NA
                or value is pd.NaT
                or (isinstance(value, float) and value != value and records[i][side] is None)
            )
            records[i][side] = None if missing else value
