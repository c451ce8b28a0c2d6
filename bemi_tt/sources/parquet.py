"""A Parquet export directory, local or in an object store, as a source (:class:`ParquetSource`)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import duckdb
import pyarrow as pa
import pyarrow.compute
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from bemi_tt.sources.base import (
    SCHEMAS_ARROW,
    Scope,
    TableName,
    _ArrowBacked,
    _filter_schemas,
    _scope_view,
    moved_keys,
)
from capture.errors import ConfigurationError, SourceError
from capture.schema import CHANGES_COLUMNS, MOVED_KEY_COLUMN, changes_arrow_schema

__all__ = ["ParquetSource"]


# -- Parquet ----------------------------------------------------------------------------------------------
def _list_dataset_files(directory: str) -> tuple[pafs.FileSystem, list[str]]:
    from capture.export import list_dataset_files

    return list_dataset_files(directory)


def _partition_of(path: str) -> str:
    for segment in path.split("/"):
        if segment.startswith(("relation=", "table=")):
            return segment.split("=", 1)[1]
    return ""


#: DuckDB types of the columns an earlier release's files may lack.
_DUCK_TYPES = {pa.bool_(): "BOOLEAN", pa.int64(): "BIGINT", pa.int32(): "INTEGER"}


def _relation_of(path: str) -> str:
    """``schema.table`` of a file's partition."""
    from urllib.parse import unquote

    return unquote(_partition_of(path))


class ParquetSource(_ArrowBacked):
    """A Parquet export directory, local or in an object store (``s3://bucket/prefix``)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        if "://" not in self.directory and not os.path.isdir(self.directory):
            raise ConfigurationError(
                f"export directory {self.directory!r} does not exist: run "
                "`bemi-tt export` first or pass the directory it wrote"
            )

    @property
    def pushdown(self) -> frozenset[str]:
        """A key lookup reads only what decides the keys: plain comparisons DuckDB pushes into the Parquet
        scans (row groups and rows the filters rule out are not decoded; see ``_scope_view``)."""
        return frozenset({"keys"})

    def _files(self, table: TableName | None) -> tuple[pafs.FileSystem, list[str]]:
        filesystem, paths = _list_dataset_files(self.directory)
        if table is not None:
            wanted = f"{table[0]}.{table[1]}"
            paths = [p for p in paths if _relation_of(p) == wanted]
        return filesystem, paths

    def load(self, con: duckdb.DuckDBPyConnection, name: str, scope: Scope) -> None:
        if scope.segments is not None:  # one relation under every name it had: each name's partition
            filesystem, paths = self._files(None)
            wanted = {f"{s}.{t}" for s, t, _, _ in scope.segments}
            paths = [p for p in paths if _relation_of(p) in wanted]
        else:
            filesystem, paths = self._files(scope.table)
        if not paths:
            con.register(f"{name}__arrow", changes_arrow_schema().empty_table())
            base = f'"{name}__arrow"'
        elif isinstance(filesystem, pafs.LocalFileSystem):
            try:  # DuckDB reads every file's footer here: a damaged file fails
                listed = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
                columns = con.execute(
                    f"SELECT file_name, name FROM parquet_schema([{listed}])"
                ).fetchall()
                current = {f for f, c in columns if c == MOVED_KEY_COLUMN}
                parts = []
                for group in (
                    [p for p in paths if p in current], [p for p in paths if p not in current]
                ):
                    if group:
                        files = ", ".join("'" + p.replace("'", "''") + "'" for p in group)
                        scan = f"read_parquet([{files}], hive_partitioning = false, union_by_name = true)"
                        parts.append((group, scan))
                selects = []
                for group, files in parts:
                    members = set(group)
                    present = {c for f, c in columns if f in members}
                    cols = ", ".join(
                        f'CAST("{c}" AS VARCHAR) AS "{c}"' if c in ("before", "after", "context")
                        else f'"{c}"' if c in present
                        else f'CAST(NULL AS {_DUCK_TYPES.get(t, "VARCHAR")}) AS "{c}"'  # an earlier release's
                        for c, _, t in CHANGES_COLUMNS
                    )
                    selects.append(f"SELECT {cols} FROM {files}")
                if len(parts) > 1 or (parts and parts[0][0][0] not in current):
                    selects[-1] = self._earlier(con, name, selects[-1])
                con.execute(f'CREATE OR REPLACE TEMP VIEW "{name}__files" AS ' + " UNION ALL ".join(selects))
            except duckdb.Error as exc:
                raise self._damaged(exc, paths) from None
            base = f'"{name}__files"'
        else:  # object store: DuckDB scans the pyarrow dataset (projection and filters pushed down)
            dataset = pads.dataset(paths, filesystem=filesystem, format="parquet")
            plain = pa.schema(
                [
                    pa.field(f.name, pa.string()) if isinstance(f.type, pa.ExtensionType) else f
                    for f in dataset.schema
                ]
            )
            if MOVED_KEY_COLUMN not in plain.names:
                plain = plain.append(pa.field(MOVED_KEY_COLUMN, pa.string()))
            dataset = pads.dataset(paths, filesystem=filesystem, format="parquet", schema=plain)
            con.register(f"{name}__arrow", dataset)
            base = f'"{name}__arrow"'
            earlier = [
                f.path for f in dataset.get_fragments()
                if MOVED_KEY_COLUMN not in f.physical_schema.names
            ]
            if earlier:
                cols = ", ".join(f'"{c}"' for c in plain.names)
                con.execute(
                    f'CREATE OR REPLACE TEMP VIEW "{name}__files" AS '
                    + self._earlier(con, name, f"SELECT {cols} FROM {base}")
                )
                base = f'"{name}__files"'
        _scope_view(con, name, base, scope)

    def _earlier(self, con: duckdb.DuckDBPyConnection, name: str, select: str) -> str:
        """``select`` (rows of files written before the export carried ``before_primary_key``) with the
        column computed as the worker writes it (:func:`moved_keys`): only UPDATEs with a ``before`` image
        are read for it, once."""
        con.execute(f'CREATE OR REPLACE TEMP VIEW "{name}__earlier" AS {select}')
        candidates = con.sql(
            'SELECT "schema", "table", operation, primary_key, before, commit_position, ordinal '
            f'FROM "{name}__earlier" WHERE operation = \'UPDATE\' AND before <> \'{{}}\''
        ).to_arrow_table()
        moved = pa.table(
            {
                "cp": candidates["commit_position"],
                "o": candidates["ordinal"],
                "bpk": moved_keys(candidates, self.schemas()),
            }
        )
        moved = moved.filter(pa.compute.is_valid(moved["bpk"]))
        con.register(f"{name}__moved_keys", moved)
        return (
            f'SELECT e.* REPLACE (m.bpk AS "{MOVED_KEY_COLUMN}") FROM "{name}__earlier" e '
            f'LEFT JOIN "{name}__moved_keys" m ON m.cp = e.commit_position AND m.o = e.ordinal'
        )

    def _damaged(self, exc: BaseException, paths: Sequence[str]) -> SourceError:
        """A ``SourceError`` naming the damaged file (DuckDB's message names it; else the first listed)."""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        named = re.search(r"[Ff]ile '([^']+)'", first)
        path = named.group(1) if named else None
        culprit = f"file {path!r}" if path else f"one of {len(paths)} files"
        return SourceError(
            f"cannot read {culprit} of the Parquet export {self.directory!r}: {first}; restore the file "
            "from a backup or re-export into an empty directory with `bemi-tt export`"
        )

    def schemas(self, table: TableName | None = None) -> pa.Table:
        import pyarrow.parquet as pq

        from capture.export.dataset import resolve_directory
        from capture.export.layout import LEGACY_SCHEMAS_FILE, META_DIR, SCHEMAS_FILE

        filesystem, root = resolve_directory(self.directory)
        for file_name in (SCHEMAS_FILE, LEGACY_SCHEMAS_FILE):  # the first release wrote the legacy name
            path = f"{root}/{META_DIR}/{file_name}"
            if filesystem.get_file_info(path).type == pafs.FileType.File:
                break
        else:
            return SCHEMAS_ARROW.empty_table()
        try:
            raw = pq.read_table(path, filesystem=filesystem)
        except (OSError, pa.ArrowInvalid) as exc:
            raise SourceError(f"cannot read {path!r}: {exc}; re-run `bemi-tt export`") from exc
        # JSON columns as text; columns the first release did not write are NULL
        raw = pa.table(
            {
                f.name: (
                    raw[f.name].cast(pa.string())
                    if isinstance(raw[f.name].type, pa.ExtensionType)
                    else raw[f.name]
                ).cast(f.type)
                if f.name in raw.column_names
                else pa.nulls(raw.num_rows, f.type)
                for f in SCHEMAS_ARROW
            }
        )
        return _filter_schemas(raw, table)

    def tables(self, name: str | None = None) -> list[TableName]:
        from urllib.parse import unquote

        import pyarrow.parquet as pq

        filesystem, paths = _list_dataset_files(self.directory)
        pairs: set[TableName] = set()
        ambiguous: list[str] = []
        for p in paths:
            qualified = unquote(_partition_of(p))
            if qualified.count(".") == 1:
                schema, _, table = qualified.partition(".")
                pairs.add((schema, table))
            else:  # "a.b.c" is ("a.b", "c") or ("a", "b.c"): the file's rows say which
                ambiguous.append(p)
        for p in ambiguous:
            try:
                names = pq.read_table(p, columns=["schema", "table"], filesystem=filesystem)
            except (OSError, pa.ArrowInvalid) as exc:
                raise SourceError(
                    f"cannot read file {p!r} of the Parquet export {self.directory!r}: {exc}; restore the "
                    "file from a backup or re-export into an empty directory with `bemi-tt export`"
                ) from None
            pairs |= set(zip(names["schema"].to_pylist(), names["table"].to_pylist(), strict=True))
        schemas = self.schemas()
        pairs |= set(zip(schemas["schema"].to_pylist(), schemas["table"].to_pylist(), strict=False))
        return sorted(p for p in pairs if name is None or p[1] == name)

    def describe(self) -> str:
        return f"ParquetSource: {self.directory}"
