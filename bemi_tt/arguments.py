"""The types the public analysis functions take, defined once: a time, a source, a key.

``TimeLike``: a ``datetime`` (naive means UTC), a ``date``, an ISO 8601 string, a ``pandas.Timestamp`` or a
``numpy.datetime64``. ``SourceLike``: a ``postgresql://`` URL or libpq conninfo, a SQLAlchemy engine, a
Parquet or Delta export directory (path or ``s3://`` URI), or a :class:`bemi_tt.sources.Source`.
``KeyLike``: the primary key of one row: a scalar, a tuple in key-column order for a composite key, or a
dict of key columns.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import numpy as np
import pandas as pd
from sqlalchemy.engine import Connection, Engine

from bemi_tt.sources import Source

__all__ = ["KeyLike", "SourceLike", "TimeLike"]

TimeLike = datetime | date | str | pd.Timestamp | np.datetime64
SourceLike = str | os.PathLike[str] | Source | Engine | Connection
KeyScalar = int | str | Decimal | UUID | date | datetime | bool
KeyLike = KeyScalar | tuple[Any, ...] | Mapping[str, Any]
