"""The presence rule, defined once, as named SQL pieces composed for a dialect (DuckDB or PostgreSQL).

A row is present after CREATE, UPDATE or SNAPSHOT; it is gone after a DELETE, after an UPDATE that
moved its key (its old key: ``before_primary_key``), and after a TRUNCATE of its table. Order is always
commit order ``(commit_position, ordinal)``, never time; a cut at time ``t`` keeps the longest prefix of a
table's commits stamped at or before ``t``.

Every answer is composed from these pieces: :meth:`Rule.present` (``as_of``, the macros, the PostgreSQL
winners), :meth:`Rule.events` (``blame``/``diff`` origins), :meth:`Rule.gone` (what removed a row),
:meth:`Rule.moves` (following a row across key updates), :meth:`Rule.cut` (the prefix at a time); the
schema record adds :meth:`Rule.shaped` (images naming columns as a later version does: renames followed by
attnum) and :meth:`Rule.rebased` (the rows present at a primary key change, keyed by the new key). A
:class:`Query` holds named common table expressions and a final SELECT, so a caller adds pieces or replaces
the SELECT by name, never by cutting SQL text. The two :class:`Dialect` s differ only in JSON access,
positions and "the last value by position"; a further dialect (Spark) implements the same methods.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

__all__ = ["DUCKDB", "MOVED", "POSTGRES", "PRESENT", "SPARK", "Dialect", "Era", "Query", "Rule", "within"]

#: Operations after which a row exists.
PRESENT = ("CREATE", "UPDATE", "SNAPSHOT")
#: The column of ``changes`` holding a key UPDATE's old key, written like ``primary_key`` by the worker.
MOVED = "before_primary_key"


def _string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class Dialect:
    """How one SQL engine spells the few things the rule needs beyond plain SQL."""

    name = "abstract"

    def literal(self, value: str) -> str:
        """A string literal."""
        return _string(value)

    def field_text(self, obj: str, name: str) -> str:
        """The text of member ``name`` of the JSON object ``obj`` (NULL when absent or JSON null)."""
        raise NotImplementedError

    def field_json(self, obj: str, name: str) -> str:
        """Member ``name`` of ``obj`` as JSON."""
        raise NotImplementedError

    def key_array(self, obj: str, names: Sequence[str]) -> str:
        """The members ``names`` of ``obj`` as compact JSON array text, as ``changes.primary_key`` writes a
        composite key (``[1,"a"]``)."""
        raise NotImplementedError

    def not_empty(self, obj: str) -> str:
        """``obj`` is not the empty object ``{}``."""
        raise NotImplementedError

    def position(self, cp: str = "commit_position", o: str = "ordinal") -> str:
        """A comparable value of a position (``max`` of it is the last change)."""
        raise NotImplementedError

    def position_part(self, value: str, part: int) -> str:
        """Part 1 (``commit_position``) or 2 (``ordinal``) of a :meth:`position` value."""
        raise NotImplementedError

    def last_by_position(self, value: str) -> str:
        """The aggregate: ``value`` of the group's last change in commit order (NULLs kept)."""
        raise NotImplementedError

    def renamed(self, obj: str, pairs: Sequence[tuple[str, str]]) -> str:
        """The JSON object ``obj`` as text with members ``(old, new)`` of ``pairs`` under their new names
        (the others left out); ``{}`` stays ``{}``."""
        raise NotImplementedError


class DuckDBDialect(Dialect):
    name = "duckdb"

    @staticmethod
    def _pointer(name: str) -> str:
        return _string("/" + name.replace("~", "~0").replace("/", "~1"))

    def field_text(self, obj: str, name: str) -> str:
        return f"json_extract_string({obj}, {self._pointer(name)})"

    def field_json(self, obj: str, name: str) -> str:
        return f"json_extract({obj}, {self._pointer(name)})"

    def key_array(self, obj: str, names: Sequence[str]) -> str:
        parts = ", ".join(self.field_json(obj, n) for n in names)
        return f"CAST(to_json([{parts}]) AS VARCHAR)"

    def not_empty(self, obj: str) -> str:
        return f"CAST({obj} AS VARCHAR) <> '{{}}'"

    def position(self, cp: str = "commit_position", o: str = "ordinal") -> str:
        return f"({cp}, {o})"

    def position_part(self, value: str, part: int) -> str:
        return f"{value}[{part}]"

    def last_by_position(self, value: str) -> str:
        return f"arg_max_null({value}, (commit_position, ordinal))"

    def renamed(self, obj: str, pairs: Sequence[tuple[str, str]]) -> str:
        members = ", ".join(f"{_string(new)}, {self.field_json(obj, old)}" for old, new in pairs)
        return f"CASE WHEN {self.not_empty(obj)} THEN CAST(json_object({members}) AS VARCHAR) ELSE '{{}}' END"


class PostgresDialect(Dialect):
    name = "postgres"

    def field_text(self, obj: str, name: str) -> str:
        return f"({obj} ->> {_string(name)})"

    def field_json(self, obj: str, name: str) -> str:
        return f"({obj} -> {_string(name)})"

    def key_array(self, obj: str, names: Sequence[str]) -> str:
        # jsonb text puts a space after commas; primary_key is compact JSON: rebuild it from the members
        parts = " || ',' || ".join(f"({obj} -> {_string(n)})::text" for n in names)
        return f"('[' || {parts} || ']')"

    def not_empty(self, obj: str) -> str:
        return f"{obj} <> '{{}}'::jsonb"

    def position(self, cp: str = "commit_position", o: str = "ordinal") -> str:
        return f"ARRAY[{cp}, {o}::bigint]"

    def position_part(self, value: str, part: int) -> str:
        return f"({value})[{part}]"

    def last_by_position(self, value: str) -> str:
        return f"(array_agg({value} ORDER BY commit_position DESC, ordinal DESC))[1]"

    def renamed(self, obj: str, pairs: Sequence[tuple[str, str]]) -> str:
        members = ", ".join(f"{_string(new)}, {self.field_json(obj, old)}" for old, new in pairs)
        return f"CASE WHEN {self.not_empty(obj)} THEN jsonb_build_object({members})::text ELSE '{{}}' END"


def within(start: tuple[int, int] | None, end: tuple[int, int] | None) -> str:
    """The condition that a change's ``(commit_position, ordinal)`` lies in ``[start, end)`` (None: open)."""
    parts = []
    if start is not None:
        cp, o = int(start[0]), int(start[1])
        parts.append(f"(commit_position > {cp} OR (commit_position = {cp} AND ordinal >= {o}))")
    if end is not None:
        cp, o = int(end[0]), int(end[1])
        parts.append(f"(commit_position < {cp} OR (commit_position = {cp} AND ordinal < {o}))")
    return " AND ".join(parts) or "TRUE"


#: A stretch of commit order in one column naming: ``(start, end, ((name then, name now), ...))``.
Era = tuple[tuple[int, int] | None, tuple[int, int] | None, tuple[tuple[str, str], ...]]

class SparkDialect(Dialect):
    """Spark SQL (4.0+): JSON as text, read with ``get_json_object`` (numbers as Spark's JSON parser prints
    them: a key ``1.50`` reads as ``1.5``), positions as structs ordered field by field."""

    name = "spark"

    def literal(self, value: str) -> str:
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"  # backslash escapes

    def _path(self, name: str) -> str | None:
        return None if "'" in name or "]" in name else self.literal(f"$['{name}']")

    def field_text(self, obj: str, name: str) -> str:
        path = self._path(name)
        if path is None:  # a name JSONPath cannot spell: a map lookup reads any name
            return f"from_json({obj}, 'map<string,string>')[{self.literal(name)}]"
        return f"get_json_object({obj}, {path})"

    def field_json(self, obj: str, name: str) -> str:
        return f"variant_get(parse_json({obj}), {self.literal(f'$[{json.dumps(name)}]')}, 'variant')"

    def key_array(self, obj: str, names: Sequence[str]) -> str:
        return f"to_json(array({', '.join(self.field_json(obj, n) for n in names)}))"

    def not_empty(self, obj: str) -> str:
        return f"{obj} <> '{{}}'"

    def position(self, cp: str = "commit_position", o: str = "ordinal") -> str:
        return f"named_struct('cp', {cp}, 'o', {o})"

    def position_part(self, value: str, part: int) -> str:
        return f"{value}.{'cp' if part == 1 else 'o'}"

    def last_by_position(self, value: str) -> str:
        return f"max_by({value}, named_struct('cp', commit_position, 'o', ordinal))"


DUCKDB = DuckDBDialect()
POSTGRES = PostgresDialect()
SPARK = SparkDialect()


@dataclass(frozen=True)
class Query:
    """Named common table expressions and a final SELECT: pieces are added or replaced by name."""

    ctes: tuple[tuple[str, str], ...] = ()
    select: str = ""

    def with_(self, name: str, body: str) -> Query:
        """This query with CTE ``name`` (replacing one of that name, in place)."""
        if any(n == name for n, _ in self.ctes):
            return replace(self, ctes=tuple((n, body if n == name else b) for n, b in self.ctes))
        return replace(self, ctes=(*self.ctes, (name, body)))

    def then(self, select: str) -> Query:
        """This query's CTEs with another final SELECT."""
        return replace(self, select=select)

    def sql(self) -> str:
        if not self.ctes:
            return self.select
        ctes = ",\n".join(f"{name} AS (\n{_indent(body)}\n)" for name, body in self.ctes)
        return f"WITH {ctes}\n{self.select}"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.strip("\n").splitlines())


@dataclass(frozen=True)
class Rule:
    """The presence rule for a table with key columns ``keys`` (none known: key moves cannot be seen).

    ``moved``: the column holding each key UPDATE's old key as the worker writes it (:data:`MOVED`,
    ``changes.before_primary_key``, NULL on every other row): exact for every key type, and no ``before``
    image is read. Without it the old key is read from ``before``, whose JSON text differs from
    ``primary_key``'s for some types (timestamps, booleans): only for relations that lack the column.
    ``old_key``: an expression already holding each UPDATE's old key text (a source that computed it).
    """

    dialect: Dialect = DUCKDB
    keys: tuple[str, ...] = ()
    old_key: str | None = None
    moved: str | None = None

    # -- pieces ---------------------------------------------------------------------------------------------
    def key_of(self, image: str) -> str:
        """The key the JSON image ``image`` holds, built from its members like ``changes.primary_key``
        (exact where a key column's JSON text is its PostgreSQL text: integers, text, uuid, numeric)."""
        if not self.keys:
            return "NULL"
        if len(self.keys) == 1:
            return self.dialect.field_text(image, self.keys[0])
        return self.dialect.key_array(image, self.keys)

    def old_key_of(self, column: str = "before") -> str:
        """The old key of an UPDATE, written like ``changes.primary_key`` (``column``: the image to read it
        from where the relation carries no :attr:`moved` column)."""
        if self.old_key is not None:
            return self.old_key
        if self.moved is not None and column == "before":
            return self.moved if self.keys else "NULL"
        return self.key_of(column)

    def key_updates(self) -> str:
        """The condition on ``changes`` of UPDATEs that may have moved their key."""
        if self.old_key is not None:
            return f"operation = 'UPDATE' AND {self.old_key} IS NOT NULL"
        if self.moved is not None:
            return f"operation = 'UPDATE' AND {self.moved} IS NOT NULL"
        where = f"operation = 'UPDATE' AND {self.dialect.not_empty('before')}"
        if len(self.keys) == 1 and isinstance(self.dialect, DuckDBDialect):
            # jsonb text puts short names first: ``{"id": <primary_key>,`` at the start proves the key kept,
            # so most UPDATEs are ruled out without parsing ``before``
            name = json.dumps(self.keys[0], ensure_ascii=False).replace("'", "''")
            where += (
                f" AND NOT starts_with(CAST(before AS VARCHAR), '{{{name}: ' || primary_key || ',')"
                f" AND NOT starts_with(CAST(before AS VARCHAR), '{{{name}: ' || CAST(to_json(primary_key) AS"
                " VARCHAR) || ',')"
            )
        return where

    def moves(self, rel: str) -> str:
        """Key UPDATEs of ``rel``: ``k`` the key that disappeared, ``to_k`` the one it became, position."""
        return (
            f"SELECT ok AS k, pk AS to_k, cp, o FROM (\n"
            f"    SELECT {self.old_key_of()} AS ok, primary_key AS pk, commit_position AS cp, ordinal AS o\n"
            f"    FROM {rel} WHERE {self.key_updates()}\n"
            f") m WHERE ok IS NOT NULL AND ok IS DISTINCT FROM pk"
        )

    def removals(self, rel: str) -> str:
        """Changes that made a key disappear (DELETE, the old key of a key UPDATE): ``k``, ``cp``, ``o``."""
        return (
            f"SELECT primary_key AS k, commit_position AS cp, ordinal AS o FROM {rel}"
            f" WHERE operation = 'DELETE' AND primary_key IS NOT NULL\n"
            f"UNION ALL\nSELECT k, cp, o FROM moves"
        )

    def truncates(self, rel: str) -> str:
        """The position ``t`` of ``rel``'s last TRUNCATE (NULL: none): every row before it is gone."""
        return f"SELECT max({self.dialect.position()}) AS t FROM {rel} WHERE operation = 'TRUNCATE'"

    def last_changes(self, rel: str, payload: str) -> str:
        """Each key's last change: ``k``, its position ``at`` and ``payload`` (NULL when a DELETE)."""
        d = self.dialect
        value = f"CASE WHEN operation = 'DELETE' THEN NULL ELSE {payload} END"
        return (
            f"SELECT primary_key AS k, max({d.position()}) AS at, {d.last_by_position(value)} AS payload\n"
            f"FROM {rel} WHERE primary_key IS NOT NULL GROUP BY primary_key"
        )

    def cut(self, rel: str, ts: str) -> str:
        """The first position of ``rel`` committed after ``ts``: the prefix rule keeps what lies before it."""
        return f"SELECT min(commit_position) AS p FROM {rel} WHERE committed_at > {ts}"

    def shaped(self, rel: str, columns: Sequence[str], eras: Sequence[Era]) -> str:
        """``rel``'s changes (``columns``) with the images of each era's changes (``before``, ``after``)
        under the names the columns have now: a rename is followed by attribute number, so a row last
        written before it shows its value under the new name."""
        d = self.dialect

        def image(col: str) -> str:
            whens = " ".join(
                f"WHEN {within(start, end)} THEN {d.renamed(col, pairs)}" for start, end, pairs in eras
            )
            return f"CASE {whens} ELSE CAST({col} AS VARCHAR) END AS {col}"

        picked = ", ".join(image(c) if c in ("before", "after") else c for c in columns)
        return f"SELECT {picked} FROM {rel}"

    def rebased(self, rel: str) -> str:
        """Rows present (``k, cp, o, payload``, ``rel``) as SNAPSHOT changes keyed by this rule's key: the
        baseline the changes after a primary key change apply to (each row keeps its position)."""
        return (
            f"SELECT {self.key_of('payload')} AS primary_key, 'SNAPSHOT' AS operation, '{{}}' AS before,"
            f" payload AS after, cp AS commit_position, o AS ordinal"
            + (f", CAST(NULL AS VARCHAR) AS {self.moved}" if self.moved is not None else "")
            + f" FROM {rel}"
        )

    # -- composed answers ---------------------------------------------------------------------------------
    def present(self, rel: str, payload: str = "after", *, keep: str | None = None) -> Query:
        """``k, cp, o, payload`` of every key present after all of ``rel``'s changes: one aggregate for each
        key's last change, two small side aggregates (key moves, TRUNCATE) removing what they made gone.
        ``keep``: a condition on ``latest.k`` (only some keys)."""
        d = self.dialect
        kept = f"\n  AND ({keep})" if keep is not None else ""
        return (
            Query()
            .with_("latest", self.last_changes(rel, payload))
            .with_("moves", self.moves(rel))
            .with_("moved", f"SELECT k, max({d.position('cp', 'o')}) AS at FROM moves GROUP BY k")
            .with_("truncates", self.truncates(rel))
            .then(
                f"SELECT latest.k AS k, {d.position_part('latest.at', 1)} AS cp, "
                f"{d.position_part('latest.at', 2)} AS o, latest.payload AS payload\n"
                "FROM latest LEFT JOIN moved ON moved.k = latest.k CROSS JOIN truncates\n"
                "WHERE latest.payload IS NOT NULL AND (moved.at IS NULL OR latest.at > moved.at)\n"
                f"  AND (truncates.t IS NULL OR latest.at > truncates.t){kept}"
            )
        )

    def events(self, rel: str, payload: str = "after") -> Query:
        """One event per key and change: present (``op`` of the change, ``payload``) or gone (``op``
        DELETE: a DELETE or the old key of a key UPDATE); with ``truncates``."""
        return (
            Query()
            .with_("moves", self.moves(rel))
            .with_(
                "events",
                f"SELECT primary_key AS k, commit_position AS cp, ordinal AS o, operation AS op, "
                f"{payload} AS payload\n"
                f"FROM {rel} WHERE operation <> 'TRUNCATE' AND primary_key IS NOT NULL\n"
                "UNION ALL\nSELECT k, cp, o, 'DELETE', NULL FROM moves",
            )
            .with_("truncates", self.truncates(rel))
        )

    def gone(self, rel: str, *, since: str | None = None) -> Query:
        """Per key, its last removal (``k``, ``cp``, ``o``) after ``since`` (a position; None: any)."""
        d = self.dialect
        after = f" WHERE {d.position('cp', 'o')} > {since}" if since is not None else ""
        return (
            Query()
            .with_("moves", self.moves(rel))
            .with_("removals", self.removals(rel))
            .with_("gone", f"SELECT k, max({d.position('cp', 'o')}) AS at FROM removals{after} GROUP BY k")
            .then(
                f"SELECT k, {d.position_part('gone.at', 1)} AS cp, "
                f"{d.position_part('gone.at', 2)} AS o FROM gone"
            )
        )
