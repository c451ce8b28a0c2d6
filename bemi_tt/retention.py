"""Acting on recorded history: ``erase`` personal values, ``prune`` history before a time.

Thin over ``capture.erase`` and ``capture.prune``: a PostgreSQL URL, libpq string or psycopg connection
acts on the ``changes`` table (one transaction); a directory (local or ``s3://``) erases in a Parquet
export. See docs/retention-and-erasure.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
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


def prune(target: Any, *, before: Any, schema: str = "public") -> Pruned:
    """Fold the history of ``target`` (a database holding ``changes``) committed at or before ``before``
    into a baseline: ``as_of`` at every instant from ``before`` on is unchanged, ``as_of``/``diff`` before it
    raise, naming ``before`` as where history starts, and ``verify`` resumes the chain at the recorded
    horizon. One transaction. ``before``: datetime (naive means UTC), ISO 8601 text or pandas Timestamp.
    An export directory is not pruned (its history stays exact, only longer): see
    docs/retention-and-erasure.md.
    """
    from bemi_tt.timestamps import to_utc

    when = to_utc(before, "before").to_pydatetime()
    if _is_directory(target):
        raise ConfigurationError(
            f"prune works on the database holding changes, not on an export directory ({target!r}): an "
            "export keeps its longer, still exact history; export into a new directory after pruning to "
            "start it at the baseline"
        )
    from capture.worker import resolve_dsn

    dsn = resolve_dsn(target) if isinstance(target, str) or target is None else target
    return prune_changes(dsn, before=when, schema=schema)
