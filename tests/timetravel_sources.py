"""Build one change history as every kind of source: in memory, PostgreSQL ``changes``, Parquet export,
Delta export."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from bemi_tt.sources import InMemorySource, ParquetSource, PostgresSource, Source
from capture.schema import CHANGES_COLUMNS, changes_ddl, moved_keys_backfill, schemas_ddl

if TYPE_CHECKING:
    from timetravel_history import History

KINDS = ("memory", "postgres", "parquet", "delta")
#: Builds a source of one kind from a History (the ``make`` fixture in conftest.py).
Make = Callable[["History"], Source]


def write_changes(
    dsn: str,
    changes: Sequence[Mapping[str, Any]],
    schemas: Sequence[Mapping[str, Any]] | None = None,
    *,
    create: bool = True,
) -> None:
    """Create ``changes``/``changes_schemas`` in ``dsn`` and insert the rows (normalised as in memory);
    ``create=False``: add rows to the tables already there."""
    memory = InMemorySource(changes, schemas)
    names = [name for name, _, _ in CHANGES_COLUMNS if name != "id"]
    rows = memory.changes.select(names).to_pylist()
    schema_rows = memory.schemas().to_pylist()
    with psycopg.connect(dsn, autocommit=True) as conn:
        if create:
            conn.execute(changes_ddl())
            conn.execute(schemas_ddl())
        with conn.cursor() as cur:
            if rows:
                cur.executemany(
                    sql.SQL("INSERT INTO changes ({}) VALUES ({})").format(
                        sql.SQL(", ").join(sql.Identifier(n) for n in names),
                        sql.SQL(", ").join(
                            sql.SQL("%s::jsonb" if n in ("before", "after", "context") else "%s")
                            for n in names
                        ),
                    ),
                    [[r[n] for n in names] for r in rows],
                )
            if schema_rows:
                cur.executemany(
                    'INSERT INTO changes_schemas ("schema", "table", commit_position, ordinal, committed_at, '
                    "columns) VALUES (%s, %s, %s, %s, %s, %s::jsonb)",
                    [
                        [
                            r["schema"],
                            r["table"],
                            r["commit_position"],
                            r["ordinal"],
                            r["committed_at"],
                            r["columns"] if isinstance(r["columns"], str) else json.dumps(r["columns"]),
                        ]
                        for r in schema_rows
                    ],
                )
            # the old key of each key UPDATE, as the worker writes it (rows here are written by hand)
            cur.execute(moved_keys_backfill())


def build_source(
    kind: str,
    changes: Sequence[Mapping[str, Any]],
    schemas: Sequence[Mapping[str, Any]] | None = None,
    *,
    dsn: str | None = None,
    tmp_path: Path | None = None,
) -> Source:
    """The history as a source of ``kind``; postgres, parquet and delta need the test's database (``dsn``)."""
    if kind == "memory":
        return InMemorySource(changes, schemas)
    assert dsn is not None
    write_changes(dsn, changes, schemas)
    if kind == "postgres":
        return PostgresSource(dsn)
    assert kind in ("parquet", "delta") and tmp_path is not None
    return export_source(dsn, tmp_path / "export", format=kind)


def export_source(dsn: str, directory: Path, *, format: str = "parquet") -> ParquetSource:
    """Export ``changes`` of ``dsn`` with the real exporter (Parquet or Delta) and open the directory
    the way ``bemi_tt.connect(DIR)`` does."""
    from bemi_tt.sources import as_source
    from capture.export import export_parquet

    export_parquet(dsn, str(directory), progress=False, format=format)
    source = as_source(directory)
    assert type(source).__name__ == ("DeltaSource" if format == "delta" else "ParquetSource")
    assert isinstance(source, ParquetSource)
    return source
