"""The arguments of the analysis functions: their types, defined once, and the checks that make a question
that cannot match say so instead of answering empty.

``TimeLike`` (from ``bemi_tt.timestamps``): a ``datetime`` (naive means UTC), a ``date``, an ISO 8601 string,
a ``pandas.Timestamp`` or a ``numpy.datetime64``. ``SourceLike``: a ``postgresql://`` URL or libpq conninfo, a
SQLAlchemy engine, a Parquet or Delta export directory (path or ``s3://`` URI), or a
:class:`bemi_tt.sources.Source`. ``KeyLike``: the primary key of one row: a scalar, a tuple in key-column
order for a composite key, or a dict of key columns.

* :func:`check_key` fits a user's key to the table's primary key (from ``changes_schemas``): a scalar for a
  composite key, a tuple of the wrong length, ``'abc'`` for an integer key, or any key for a table without
  a primary key is a ``ConfigurationError`` naming the expected shape, e.g. ``(order_id, line)``. Keys that
  fit come back normalised (``'7'`` → ``7`` for an integer column, ``7`` → ``'7'`` for a text one), so the
  engine's ``primary_key`` text is the one the worker wrote.
* :func:`check_context_filters` runs only when an ``audit(**filters)`` answer is empty (a non-empty answer
  proves every key exists): a key that no change of the source carries is a ``ConfigurationError`` naming
  it and listing the known keys. An error rather than a warning: such a filter can never match, so an
  empty frame would only hide the typo, and scripts should stop on it. A key that exists elsewhere in the
  source (another table, another time) is a real empty answer, not an error.

Cost at a million changes: the key check reads ``changes_schemas`` only. The context check (empty answers
only) asks PostgreSQL ``EXISTS (... WHERE context ? key)`` per filter key (stops at the first hit; a real
typo scans the table once) and lists the known keys from the latest :data:`KEY_SAMPLE` changes through the
``(commit_position, ordinal)`` index; DuckDB sources collect the distinct keys in one columnar pass.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import pandas as pd
from psycopg import sql
from sqlalchemy.engine import Connection, Engine

from bemi_tt.dtypes import spec_type
from bemi_tt.sources import PostgresSource, Scope, Source, TableName
from bemi_tt.timestamps import TimeLike
from capture.errors import ConfigurationError
from capture.schema import CHANGES_TABLE

__all__ = [
    "KEY_SAMPLE",
    "KeyLike",
    "SourceLike",
    "TimeLike",
    "check_context_filters",
    "check_key",
    "key_columns",
]

SourceLike = str | os.PathLike[str] | Source | Engine | Connection
KeyScalar = int | str | Decimal | UUID | date | datetime | bool
KeyLike = KeyScalar | tuple[Any, ...] | Mapping[str, Any]

#: How many of the latest changes the list of known context keys (for the error message) is taken from.
KEY_SAMPLE = 100_000

_INTEGER_RANGES = {"Int16": 15, "Int32": 31, "Int64": 63}
_INTEGER_TEXT = re.compile(r"\s*[+-]?[0-9]+\s*")


def _label(table: TableName) -> str:
    return table[1] if table[0] == "public" else f"{table[0]}.{table[1]}"


def key_columns(
    source: Source, table: TableName, ts: pd.Timestamp | None = None
) -> list[dict[str, Any]] | None:
    """The primary key columns (``changes_schemas`` specs) of ``table`` at ``ts`` (None: the latest), or
    None when the source has no column sets for it (then keys are taken as given)."""
    raw = source.schemas(table)
    if raw.num_rows == 0:
        return None
    versions = sorted(
        zip(
            raw["commit_position"].to_pylist(),
            raw["ordinal"].to_pylist(),
            raw["committed_at"].to_pylist(),
            raw["columns"].to_pylist(),
            strict=True,
        ),
        key=lambda v: (v[0], v[1]),
    )
    valid = [v for v in versions if ts is None or pd.Timestamp(v[2]) <= ts] or versions[:1]
    return [c for c in json.loads(valid[-1][3]) if c.get("key")]


def _shape(names: Sequence[str]) -> str:
    return "(" + ", ".join(names) + ")"


def _example(columns: Sequence[dict[str, Any]]) -> str:
    samples = []
    for i, column in enumerate(columns):
        kind = _kind(column)
        samples.append(
            str(7 if i == 0 else i) if kind in _INTEGER_RANGES else "'a'" if kind == "string" else "..."
        )
    return "(" + ", ".join(samples) + ")"


def _kind(column: Mapping[str, Any]) -> str:
    """``Int16``/``Int32``/``Int64``, ``string`` or ``other`` (types whose key text is not checked)."""
    dtype = spec_type(column).dtype
    name = str(dtype)
    if name in _INTEGER_RANGES:
        return name
    return "string" if isinstance(dtype, pd.StringDtype) else "other"


def _integer(value: Any) -> int | None:
    """``value`` as an integer when it is one (``7``, ``'7'``, ``7.0``, ``Decimal(7)``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    exact = (
        (isinstance(value, str) and _INTEGER_TEXT.fullmatch(value) is not None)
        or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
        or (isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value())
    )
    return int(value) if exact else None


def _value(value: Any, column: Mapping[str, Any], key: Any, table: TableName) -> Any:
    """One key component fitted to its column: integers checked and made ``int``, text made ``str``."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    kind = _kind(column)
    where = f"the primary key of {_label(table)}, {column['name']} ({column['type']})"
    if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
        raise ConfigurationError(f"key {key!r} holds {value!r}, which no primary key can: pass {where}")
    if kind in _INTEGER_RANGES:
        number = _integer(value)
        bits = _INTEGER_RANGES[kind]
        if number is None:
            raise ConfigurationError(
                f"key {key!r} does not fit {where}: {value!r} is not an integer; pass an integer such as 7"
            )
        if not -(1 << bits) <= number < (1 << bits):
            raise ConfigurationError(
                f"key {key!r} does not fit {where}: {number} is out of its range; pass a {column['type']}"
            )
        return number
    if kind == "string":
        if isinstance(value, (str, UUID)) or (isinstance(value, int) and not isinstance(value, bool)):
            return str(value)
        raise ConfigurationError(
            f"key {key!r} does not fit {where}: pass a string, not {type(value).__name__} {value!r}"
        )
    return value


def check_key(source: Source, table: TableName, key: Any, *, ts: pd.Timestamp | None = None) -> Any:
    """``key`` fitted to ``table``'s primary key at ``ts``: a scalar for a one-column key, a tuple for a
    composite one; ``ConfigurationError`` naming the expected shape when it cannot fit."""
    columns = key_columns(source, table, ts)
    if columns is None:
        return key  # no column sets (a hand-made source): the key is taken as written
    names = [str(c["name"]) for c in columns]
    if not columns:
        raise ConfigurationError(
            f"table {_label(table)} has no primary key, so key {key!r} cannot pick one of its rows: "
            f"read the whole table (as_of('{_label(table)}', ts)) and filter it"
        )
    if isinstance(key, Mapping):
        missing = [n for n in names if n not in key]
        extra = [k for k in key if k not in names]
        if missing or extra:
            raise ConfigurationError(
                f"key {dict(key)!r} does not fit the primary key of {_label(table)}, {_shape(names)}: "
                + (f"it lacks {missing!r}" if missing else f"{extra!r} are not key columns")
                + f"; pass a dict with exactly {names!r}"
            )
        parts: list[Any] = [key[n] for n in names]
    elif len(names) > 1 and isinstance(key, str) and key.lstrip().startswith("["):
        try:  # the command line passes a composite key as a JSON array
            decoded = json.loads(key)
        except ValueError:
            decoded = None
        if not isinstance(decoded, list):
            raise ConfigurationError(
                f"key {key!r} is not a JSON array: the primary key of {_label(table)} is {_shape(names)}; "
                f"pass a JSON array such as [7, 1]"
            )
        parts = decoded
    elif isinstance(key, (tuple, list)):
        parts = list(key)
    else:
        parts = [key]
    if len(parts) != len(names):
        if len(names) == 1:
            hint = "pass one value such as 7"
        else:
            hint = (
                f"pass {len(names)} values, a tuple such as {_example(columns)} or a dict "
                "{" + ", ".join(f"'{n}': ..." for n in names) + "}"
            )
        count = "one value" if len(parts) == 1 else f"{len(parts)} values"
        raise ConfigurationError(
            f"key {key!r} is {count}, but the primary key of {_label(table)} is {_shape(names)}: {hint}"
        )
    fitted = [_value(v, c, key, table) for v, c in zip(parts, columns, strict=True)]
    return fitted[0] if len(fitted) == 1 else tuple(fitted)


def _missing_keys_postgres(source: PostgresSource, keys: list[str]) -> tuple[list[str], list[str], bool]:
    changes = sql.Identifier(source.schema, CHANGES_TABLE)
    with source._connect() as conn:
        missing = [
            str(r[0])
            for r in conn.execute(
                sql.SQL(
                    "SELECT k FROM unnest(%s::text[]) WITH ORDINALITY AS u(k, i) "
                    "WHERE NOT EXISTS (SELECT 1 FROM {} c WHERE c.context ? u.k) ORDER BY i"
                ).format(changes),
                (keys,),
            ).fetchall()
        ]
        if not missing:
            return [], [], False
        rows = conn.execute(
            sql.SQL(
                "SELECT k, (SELECT count(*) FROM (SELECT 1 FROM {c} LIMIT %s) n) FROM (SELECT DISTINCT "
                "jsonb_object_keys(context) AS k FROM (SELECT context FROM {c} "
                "ORDER BY commit_position DESC, ordinal DESC LIMIT %s) s) d ORDER BY k"
            ).format(c=changes),
            (KEY_SAMPLE + 1, KEY_SAMPLE),
        ).fetchall()
    sampled = bool(rows) and int(rows[0][1]) > KEY_SAMPLE
    return missing, [str(r[0]) for r in rows], sampled


def _missing_keys_duckdb(source: Source, keys: list[str]) -> tuple[list[str], list[str], bool]:
    from bemi_tt.state import _duck

    con = _duck()
    source.load(con, "ctx_keys", Scope(columns=("context",)))
    known = sorted(
        str(r[0])
        for r in con.sql(
            'SELECT DISTINCT unnest(json_keys(CAST(context AS VARCHAR))) FROM "ctx_keys"'
        ).fetchall()
        if r[0] is not None
    )
    present = set(known)
    return [k for k in keys if k not in present], known, False


def check_context_filters(source: Source, filters: Mapping[str, Any]) -> None:
    """Raise ``ConfigurationError`` when a context filter names a key that no change of ``source`` has
    (call it when the filtered answer is empty). A source whose changes carry no context keys at all
    cannot tell a typo from a real key: then nothing is raised."""
    keys = [str(k) for k in filters]
    if not keys:
        return
    if isinstance(source, PostgresSource):
        missing, known, sampled = _missing_keys_postgres(source, keys)
    else:
        missing, known, sampled = _missing_keys_duckdb(source, keys)
    if not missing or not known:
        return
    name = missing[0]
    close = difflib.get_close_matches(name, known, n=1)
    where = f" (in the latest {KEY_SAMPLE:,} changes)" if sampled else ""
    raise ConfigurationError(
        f"context key {name!r} is in no change of this source, so the filter {name}={filters[name]!r} can "
        f"never match: the known context keys{where} are {', '.join(repr(k) for k in known)}"
        + (f"; did you mean {close[0]!r}?" if close else "; pass one of them")
    )
