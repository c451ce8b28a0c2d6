"""A Delta Lake export (``bemi-tt export --format delta``) as a source of changes.

The table's current snapshot gives the data files (``deltalake``: the transaction log, no JVM); DuckDB
reads them exactly as it reads a Parquet export's files, so every analysis function gives the same
answers. Delta keeps the partition values ``relation``/``date`` in the log, not in the files: the files
hold exactly the ``changes`` columns. ``changes_schemas`` is the ``_bemi_tt/schemas.pq`` sidecar, as for
Parquet.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from bemi_tt.sources import ParquetSource, TableName

__all__ = ["DeltaSource", "is_delta_directory"]


def is_delta_directory(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` (local or ``s3://``) holds a Delta table: it has a ``_delta_log/`` directory."""
    from capture.export.dataset import is_delta_table, resolve_directory

    return is_delta_table(*resolve_directory(os.fspath(directory)))


class DeltaSource(ParquetSource):
    """A Delta table written by the Delta export, local or in an object store (``s3://bucket/prefix``)."""

    def _files(self, table: TableName | None) -> tuple[pafs.FileSystem, list[str]]:
        from capture.export.dataset import resolve_directory
        from capture.export.delta import open_delta_table

        filesystem, _ = resolve_directory(self.directory)
        delta = open_delta_table(self.directory)
        if table is None:
            uris = delta.file_uris()
        else:  # "a.b" + "c" and "a" + "b.c" share a relation value: the scope view filters the rest
            uris = delta.file_uris(file_pruning_predicate=[("relation", "=", f"{table[0]}.{table[1]}")])
        if isinstance(filesystem, pafs.LocalFileSystem):
            return filesystem, sorted(uris)
        return filesystem, sorted(uri.split("://", 1)[-1] for uri in uris)  # pyarrow paths: bucket/key

    def tables(self, name: str | None = None) -> list[TableName]:
        import pyarrow.parquet as pq

        from capture.export.dataset import resolve_directory
        from capture.export.delta import open_delta_table

        delta = open_delta_table(self.directory)
        pairs: set[TableName] = set()
        ambiguous: list[str] = []
        for partition in delta.partitions():
            qualified = str(partition["relation"])
            if qualified.count(".") == 1:
                schema, _, table = qualified.partition(".")
                pairs.add((schema, table))
            else:  # "a.b.c" is ("a.b", "c") or ("a", "b.c"): the files' rows say which
                ambiguous.append(qualified)
        if ambiguous:
            filesystem, _ = resolve_directory(self.directory)
            for uri in delta.file_uris(file_pruning_predicate=[("relation", "in", sorted(set(ambiguous)))]):
                path = uri if isinstance(filesystem, pafs.LocalFileSystem) else uri.split("://", 1)[-1]
                names = pq.read_table(path, columns=["schema", "table"], filesystem=filesystem)
                pairs |= set(zip(names["schema"].to_pylist(), names["table"].to_pylist(), strict=True))
        schemas = self.schemas()
        pairs |= set(zip(schemas["schema"].to_pylist(), schemas["table"].to_pylist(), strict=False))
        return sorted(p for p in pairs if name is None or p[1] == name)

    def describe(self) -> str:
        return f"DeltaSource: {self.directory}"

