"""Changes held in memory: the test double shipped with the library (:class:`InMemorySource`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute

from bemi_tt.sources.base import (
    _ARROW_TYPES,
    SCHEMAS_ARROW,
    Scope,
    TableName,
    _ArrowBacked,
    _filter_schemas,
    _scope_view,
    json_text,
    moved_keys,
)
from bemi_tt.timestamps import to_utc
from capture.errors import ConfigurationError
from capture.schema import CHANGES_COLUMNS, MOVED_KEY_COLUMN, changes_arrow_schema

__all__ = ["InMemorySource"]


def _changes_table(rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> tuple[pa.Table, list[bool]]:
    """The rows as Arrow, and for each whether it came without ``before_primary_key`` (to be computed)."""
    if isinstance(rows, pd.DataFrame):
        rows = rows.to_dict("records")
    records = list(rows)
    unmoved = [not isinstance(row, Mapping) or "before_primary_key" not in row for row in records]
    out: dict[str, list[Any]] = {name: [] for name, _, _ in CHANGES_COLUMNS}
    for i, row in enumerate(records):
        if not isinstance(row, Mapping):
            raise ConfigurationError(f"change #{i} is {type(row).__name__}, not a dict of changes columns")
        unknown = set(row) - set(out)
        if unknown:
            raise ConfigurationError(
                f"change #{i} has unknown columns {sorted(unknown)!r}; the columns of "
                f"changes are {list(out)!r}"
            )
        for required in ("table", "operation", "committed_at", "commit_position"):
            if row.get(required) is None:
                raise ConfigurationError(
                    f"change #{i} has no {required!r}: every change needs table, "
                    "operation, committed_at and commit_position"
                )
        if row["operation"] not in ("CREATE", "UPDATE", "DELETE", "TRUNCATE", "SNAPSHOT"):
            raise ConfigurationError(
                f"change #{i} has operation {row['operation']!r}; use CREATE, UPDATE, "
                "DELETE, TRUNCATE or SNAPSHOT"
            )
        for name in out:
            value = row.get(name)
            if name == "id" and value is None:
                value = i + 1
            elif name in ("before", "after", "context"):
                value = "{}" if value is None else value if isinstance(value, str) else json_text(value)
            elif name == "committed_at":
                value = to_utc(value, f"change #{i} committed_at").to_pydatetime()
            elif name == "schema" and value is None:
                value = "public"
            elif name == "database" and value is None:
                value = "memory"
            elif name == "position" and value is None:
                value = row["commit_position"]
            elif name == "ordinal" and value is None:
                value = 0
            out[name].append(value)
    table = pa.table({name: pa.array(values, type=_ARROW_TYPES[name]) for name, values in out.items()})
    return table, unmoved


def _schemas_table(rows: Iterable[Mapping[str, Any]] | pd.DataFrame | None) -> pa.Table:
    if rows is None:
        return SCHEMAS_ARROW.empty_table()
    if isinstance(rows, pd.DataFrame):
        rows = rows.to_dict("records")
    out: dict[str, list[Any]] = {f.name: [] for f in SCHEMAS_ARROW}
    for i, row in enumerate(rows):
        if "table" not in row or "columns" not in row or "commit_position" not in row:
            raise ConfigurationError(
                f"schema row #{i} needs table, commit_position and columns, got {sorted(row)!r}"
            )
        out["schema"].append(row.get("schema") or "public")
        out["table"].append(row["table"])
        out["commit_position"].append(row["commit_position"])
        out["ordinal"].append(row.get("ordinal") or 0)
        out["committed_at"].append(
            to_utc(row.get("committed_at", "1970-01-01"), "committed_at").to_pydatetime()
        )
        columns = row["columns"]
        out["columns"].append(columns if isinstance(columns, str) else json.dumps(list(columns)))
        out["relation_oid"].append(row.get("relation_oid"))
        out["step"].append(row.get("step") or 0)
        event = row.get("event")
        out["event"].append("[]" if event is None else event if isinstance(event, str) else json.dumps(event))
    return pa.table(out, schema=SCHEMAS_ARROW)


def _arrow_schemas(table: pa.Table) -> pa.Table:
    """``changes_schemas`` rows as Arrow with :data:`SCHEMAS_ARROW` (columns a first release lacks: NULL)."""
    return pa.table(
        {
            f.name: table[f.name].cast(f.type)
            if f.name in table.column_names
            else pa.nulls(table.num_rows, f.type)
            for f in SCHEMAS_ARROW
        }
    )


class InMemorySource(_ArrowBacked):
    """Changes held in memory: a test double shipped with the library, built from dicts or a DataFrame.

    ``changes``: rows with the columns of ``changes`` (``table``, ``operation``, ``committed_at`` and
    ``commit_position`` required; ``before``/``after``/``context`` as dicts or JSON text; a row without
    ``before_primary_key`` gets it from ``before`` by the key in ``schemas``, as the worker writes it).
    ``schemas``: rows of ``changes_schemas`` (``table``, ``commit_position``, ``columns`` as a list of dicts).
    """

    def __init__(
        self,
        changes: Iterable[Mapping[str, Any]] | pd.DataFrame | pa.Table = (),
        schemas: Iterable[Mapping[str, Any]] | pd.DataFrame | pa.Table | None = None,
    ) -> None:
        self._schemas = (
            _arrow_schemas(schemas) if isinstance(schemas, pa.Table) else _schemas_table(schemas)
        )
        if isinstance(changes, pa.Table):
            unmoved = [MOVED_KEY_COLUMN not in changes.column_names] * changes.num_rows
            if MOVED_KEY_COLUMN not in changes.column_names:
                changes = changes.append_column(MOVED_KEY_COLUMN, pa.nulls(changes.num_rows, pa.string()))
            arrow = changes_arrow_schema()
            self.changes = changes.select([f.name for f in arrow]).cast(arrow)
        else:
            self.changes, unmoved = _changes_table(changes)
        if any(unmoved):  # rows given without the old key of a key UPDATE: computed as the worker writes it
            computed = moved_keys(self.changes, self._schemas).to_pylist()
            given = self.changes[MOVED_KEY_COLUMN].to_pylist()
            moved = [c if u else g for c, g, u in zip(computed, given, unmoved, strict=True)]
            index = self.changes.column_names.index(MOVED_KEY_COLUMN)
            self.changes = self.changes.set_column(
                index, MOVED_KEY_COLUMN, pa.array(moved, _ARROW_TYPES[MOVED_KEY_COLUMN])
            )

    def load(self, con: duckdb.DuckDBPyConnection, name: str, scope: Scope) -> None:
        con.register(f"{name}__arrow", self.changes)
        _scope_view(con, name, f'"{name}__arrow"', scope)

    def schemas(self, table: TableName | None = None) -> pa.Table:
        return _filter_schemas(self._schemas, table)

    def tables(self, name: str | None = None) -> list[TableName]:
        pairs = set(zip(self.changes["schema"].to_pylist(), self.changes["table"].to_pylist(), strict=False))
        pairs |= set(
            zip(self._schemas["schema"].to_pylist(), self._schemas["table"].to_pylist(), strict=False)
        )
        return sorted(p for p in pairs if name is None or p[1] == name)

    def describe(self) -> str:
        return f"InMemorySource: {self.changes.num_rows} changes"
