"""The export of ``changes`` to a Parquet dataset or a Delta table.

Modules, leaf first: ``layout`` (names, keys, file schemas, partition paths), ``dataset`` (listing,
watermark, identity record, atomic writes), ``lock``, ``read`` (COPY → Arrow), ``write`` (the steps
both formats share), ``run`` (``export_parquet``: the Parquet run, dispatching ``format="delta"``),
``delta`` (the Delta run, needs ``deltalake``). Each imports only modules before it, except that
``run`` imports ``delta`` and ``capture.compact`` when asked to.
"""

from __future__ import annotations

from capture.export.dataset import list_dataset_files
from capture.export.layout import export_arrow_schema, schemas_arrow_schema
from capture.export.run import export_parquet
from capture.export.write import ExportStats

__all__ = [
    "ExportStats",
    "export_arrow_schema",
    "export_parquet",
    "list_dataset_files",
    "schemas_arrow_schema",
]
