"""Acting on recorded history: ``erase`` personal values, ``prune`` history before a time.

Thin over ``capture.erase`` and ``capture.prune``: a PostgreSQL URL, libpq string or psycopg connection
acts on the ``changes`` table (one transaction); a directory (local or ``s3://``) erases in a Parquet
export; a local Parquet or Delta export directory is pruned by ``capture.prune_export``. See
docs/retention-and-erasure.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Any

from capture.erase import JSON_COLUMNS, Erasure, erase_changes, erase_export
from capture.errors import ConfigurationError
from capture.prune import Pruned, prune_changes

__all__ = ["Erasure", "Pruned", "erase", "prune"]


def _is_directory(target: Any) -> bool:
    return isinstance(target, os.PathLike) or (
        isinstance(target, str) and (target.startswith(("s3://", "file://")) or os.path.isdir(target))
    )


def erase(
    target: Any,
    *,
    table: str | None = None,
    key: object = None,
    context: Mapping[str, Any] | None = None,
    what: Sequence[str] = JSON_COLUMNS,
    by: str | None = None,
    reason: str | None = None,
    schema: str = "public",
) -> Erasure:
    """Erase the values of the selected changes in ``target`` (a database holding ``changes``, or an export
    directory), keeping operations, times, keys and the hash chain; the erasure is recorded.

    ``table``/``key``: the changes of one row; ``context``: the changes whose context holds these members
    (``{"user_id": 7}``); both: both must hold. ``what``: which of ``before``, ``after``, ``context`` lose
    their values (default: all three). Afterwards ``as_of``/``history``/``diff`` show the erased values as
    NULL and the change's context as ``{"_bemi_erased": "<erasure id>"}``. Erasing in PostgreSQL also
    reaches an export at its next ``export_parquet`` run.
    """
    if _is_directory(target):
        return erase_export(os.fspath(target), table=table, key=key, context=context, what=what, by=by,
                            reason=reason)
    from capture.worker import resolve_dsn

    dsn = resolve_dsn(target) if isinstance(target, str) or target is None else target
    return erase_changes(dsn, table=table, key=key, context=context, what=what, schema=schema, by=by,
                         reason=reason)


def _looks_like_path(target: Any) -> bool:
    """A string meant as a directory (that may not exist), not a database URL or libpq string."""
    return isinstance(target, str) and "://" not in target and "=" not in target and (
        os.sep in target or target.startswith((".", "~")) or os.path.exists(target))


def _prune_time(value: Any) -> datetime:
    """``before`` as an aware UTC datetime; a time without a zone is refused (prune deletes history: a
    guessed zone could fold hours too many)."""
    import numpy as np
    import pandas as pd

    from bemi_tt.timestamps import to_utc

    when = to_utc(value, "before")  # not a time at all: its own error, naming the value
    naive = isinstance(value, np.datetime64) or (isinstance(value, date) and not isinstance(value, datetime))
    if isinstance(value, datetime):
        naive = value.tzinfo is None
    elif isinstance(value, str) and value.strip().lower() not in ("now", "today"):
        naive = pd.Timestamp(value.strip()).tzinfo is None
    if naive:
        raise ConfigurationError(
            f"before={value!r} has no time zone: prune deletes history, so it does not guess one; write it "
            "like '2026-01-01T00:00:00+00:00' (or ...Z for UTC)"
        )
    result: datetime = when.to_pydatetime()
    return result


def prune(target: Any, *, before: Any, schema: str = "public", wait: float = 0.0) -> Pruned:
    """Fold the history of ``target`` committed at or before ``before`` into a baseline: ``as_of`` at every
    instant from ``before`` on is unchanged, ``as_of``/``diff`` before it raise, naming ``before`` as where
    history starts, and ``verify`` resumes the chain at the recorded horizon.

    ``target``: a database holding ``changes`` (URL, libpq string or psycopg connection; one transaction)
    or a local Parquet or Delta export directory (swapped in atomically under the export lock, which it waits
    ``wait`` seconds for). ``before``: a time with a zone that has passed (datetime, ISO 8601 text, pandas
    Timestamp, 'now'). See docs/retention-and-erasure.md.
    """
    when = _prune_time(before)
    if _is_directory(target) or _looks_like_path(target):
        from capture.prune_export import prune_export

        return prune_export(os.path.expanduser(os.fspath(target)), before=when, wait=wait)
    from capture.worker import resolve_dsn

    dsn = resolve_dsn(target) if isinstance(target, str) or target is None else target
    return prune_changes(dsn, before=when, schema=schema)
