"""The change feed: ``changes(...)`` (raw, in commit order) and ``audit(...)`` (who changed what, from
where: context keys as columns, filters on them).

Both carry ``context_verified`` (nullable boolean, see :mod:`capture.signing`): True when the context's
signature verified with a key the capture worker holds, so the "who" was set by a process holding the
key (the application); False when the worker has keys but the context was unsigned or forged (a
hand-made marker, a direct ``pg_logical_emit_message``, a write without context); NULL (``<NA>``) when
the worker had no key, and for SNAPSHOT rows. It does not prove that the context belongs to that very
statement (a signed marker can be replayed), nor anything against someone holding the key or superuser
on the database.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pandas as pd
import pyarrow as pa

from bemi_tt.arguments import SourceLike, TimeLike, check_context_filters
from bemi_tt.dtypes import parse_json
from bemi_tt.sources import Scope, Source, TableName, get_source, json_text
from bemi_tt.staleness import answer
from bemi_tt.state import _duck, resolve_table
from bemi_tt.timestamps import to_utc
from capture.errors import ConfigurationError

__all__ = ["audit", "changes"]


def _context_columns(frame: pd.DataFrame, contexts: Sequence[Any]) -> pd.DataFrame:
    """Add one column per context key (``context.<key>`` when the name is taken); ``contexts``: per row,
    the context's JSON text (None: none) or the dict already parsed."""
    memo: dict[str, Any] = {}
    parsed = [
        c if isinstance(c, dict) else memo[c] if c in memo else memo.setdefault(c, parse_json(c)) if c else {}
        for c in contexts
    ]
    names: dict[str, None] = {}
    for ctx in parsed:
        for k in ctx if isinstance(ctx, dict) else ():
            names.setdefault(k, None)
    columns = {}
    for k in names:
        label = k if k not in frame.columns else f"context.{k}"
        columns[label] = pd.Series(
            [ctx.get(k) if isinstance(ctx, dict) else None for ctx in parsed], index=frame.index, dtype=object
        )
    return pd.concat([frame, pd.DataFrame(columns, index=frame.index)], axis=1) if columns else frame


#: Rows per batch handed from DuckDB to pandas: memory beyond the answer stays one batch's worth.
BATCH_ROWS = 65_536
_PANDAS_TYPES = {pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype(), pa.bool_(): pd.BooleanDtype()}


def _audit_frames(
    src: Source, table: str | None, since: Any, until: Any, operation: Any, filters: dict[str, Any]
) -> Iterator[pd.DataFrame]:
    """The matching changes in commit order, as DataFrames of at most :data:`BATCH_ROWS` rows (JSON
    columns as text): a source that streams (PostgreSQL) is read as the batches are consumed, so no
    stage holds every change at once."""
    name = resolve_table(src, table) if table is not None else None
    start = to_utc(since, "since") if since is not None else None
    end = to_utc(until, "until") if until is not None else None
    if start is not None and end is not None and end < start:
        raise ConfigurationError(f"until {end.isoformat()} is before since {start.isoformat()}: swap them")
    where = ["TRUE"]
    params: list[Any] = []
    if start is not None:
        where.append("committed_at >= ?")
        params.append(start.to_pydatetime())
    if end is not None:
        where.append("committed_at <= ?")
        params.append(end.to_pydatetime())
    if operation is not None:
        ops = [operation] if isinstance(operation, str) else list(operation)
        bad = [o for o in ops if o not in ("CREATE", "UPDATE", "DELETE", "TRUNCATE", "SNAPSHOT")]
        if bad:
            raise ConfigurationError(
                f"operation {bad!r} is unknown: use CREATE, UPDATE, DELETE, TRUNCATE or SNAPSHOT"
            )
        where.append("operation IN (" + ", ".join("?" for _ in ops) + ")")
        params += ops
    for k, value in filters.items():
        path = "/" + k.replace("~", "~0").replace("/", "~1")
        if value is None:
            where.append(
                "json_extract(context, ?) IS NULL OR CAST(json_extract(context, ?) AS VARCHAR) = 'null'"
            )
            params += [path, path]
        elif isinstance(value, str):
            where.append("json_extract_string(context, ?) = ?")
            params += [path, value]
        else:
            where.append("CAST(json_extract(context, ?) AS VARCHAR) = CAST(CAST(? AS JSON) AS VARCHAR)")
            params += [path, json_text(value)]
    con = _duck()
    # the source keeps only rows whose context member reads as the filter's text (a superset: the exact
    # comparison below decides), so a filtered audit does not read every change
    prefilter = tuple(
        (k, v if isinstance(v, str) else json_text(v))
        for k, v in filters.items()
        if isinstance(v, (str, int)) and not isinstance(v, bool)
    )
    ordered = src.stream(con, "a", Scope(table=name, since=start, until_time=end, context_text=prefilter))
    relation = con.sql(
        f"""
        SELECT committed_at, "schema", "table", operation, primary_key, CAST(before AS VARCHAR) AS before,
               CAST(after AS VARCHAR) AS after, CAST(context AS VARCHAR) AS context,
               CAST(context_verified AS BOOLEAN) AS context_verified, transaction_id, commit_position, ordinal
        FROM a WHERE {" AND ".join(f"({w})" for w in where)}
        {"" if ordered else "ORDER BY commit_position, ordinal"}""",
        params=params,
    )
    reader = relation.to_arrow_reader(BATCH_ROWS)
    empty = True
    for batch in reader:
        if batch.num_rows:
            empty = False
            yield batch.to_pandas(types_mapper=_PANDAS_TYPES.get)
    if empty:
        yield reader.schema.empty_table().to_pandas(types_mapper=_PANDAS_TYPES.get)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


@answer(warn=False)
def changes(
    table: str | None = None,
    since: TimeLike | None = None,
    until: TimeLike | None = None,
    *,
    operation: Any = None,
    source: SourceLike | None = None,
) -> pd.DataFrame:
    """The raw change feed in commit order, ``before``/``after``/``context`` as dicts (numbers exact)."""
    frames = []
    for frame in _audit_frames(get_source(source), table, since, until, operation, {}):
        for col in ("before", "after", "context"):  # parsed batch by batch: no second copy of the text
            frame[col] = pd.Series([parse_json(v) for v in frame[col]], index=frame.index, dtype=object)
        frames.append(frame)
    return _finish_feed(_concat(frames))


def _finish_feed(frame: pd.DataFrame) -> pd.DataFrame:
    frame["committed_at"] = pd.to_datetime(frame["committed_at"], utc=True).astype("datetime64[us, UTC]")
    for col in ("schema", "table", "operation", "primary_key"):
        frame[col] = frame[col].astype(pd.StringDtype())
    for col, dtype in (
        ("context_verified", pd.BooleanDtype()),
        ("transaction_id", pd.Int64Dtype()),
        ("commit_position", pd.Int64Dtype()),
        ("ordinal", pd.Int32Dtype()),
    ):
        frame[col] = frame[col].astype(dtype)
    return frame.reset_index(drop=True)


def _column_order(src: Source) -> dict[TableName, dict[str, int]]:
    """Per table, the position of each column in its latest column set (jsonb does not keep key order)."""
    raw = src.schemas()
    latest: dict[TableName, tuple[tuple[int, int], str]] = {}
    for sch, tab, cp, o, cols in zip(
        raw["schema"].to_pylist(),
        raw["table"].to_pylist(),
        raw["commit_position"].to_pylist(),
        raw["ordinal"].to_pylist(),
        raw["columns"].to_pylist(),
        strict=True,
    ):
        if (sch, tab) not in latest or latest[(sch, tab)][0] < (cp, o):
            latest[(sch, tab)] = ((cp, o), cols)
    return {t: {c["name"]: i for i, c in enumerate(json.loads(cols))} for t, (_, cols) in latest.items()}


@answer(warn=False)
def audit(
    table: str | None = None,
    since: TimeLike | None = None,
    until: TimeLike | None = None,
    *,
    operation: Any = None,
    source: SourceLike | None = None,
    **context_filters: Any,
) -> pd.DataFrame:
    """Who changed what, from where: changes in commit order with ``changed`` columns and the context keys
    as columns. ``audit(user_id=187234)`` keeps the changes made with that context value (a string filter
    also matches a number with the same text, as the CLI's ``--where user_id=187234`` does).
    ``context_verified`` says whether the context was signed by the application (module docstring)."""
    src = get_source(source)
    order = _column_order(src)
    frames = []
    contexts: list[Any] = []
    memo: dict[str, Any] = {}
    for frame in _audit_frames(src, table, since, until, operation, context_filters):
        befores = [parse_json(v) for v in frame["before"]]
        afters = [parse_json(v) for v in frame["after"]]
        changed = []
        for sch, tab, op, b, a in zip(
            frame["schema"], frame["table"], frame["operation"], befores, afters, strict=True
        ):
            if op == "UPDATE" and b:
                names = [k for k in a if b.get(k, a[k]) != a[k] or k not in b]
            elif op in ("CREATE", "SNAPSHOT", "UPDATE"):
                names = list(a)
            elif op == "DELETE":
                names = list(b)
            else:
                names = []
            rank: dict[str, int] = order.get((sch, tab), {})
            changed.append(sorted(names, key=lambda n: (rank.get(n, len(rank)), n)))
        # contexts parsed once per distinct text (a transaction's rows share one)
        contexts += [memo[c] if c in memo else memo.setdefault(c, parse_json(c)) if c else {}
                     for c in frame["context"]]
        frame["before"] = pd.Series(befores, index=frame.index, dtype=object)
        frame["after"] = pd.Series(afters, index=frame.index, dtype=object)
        frame.insert(5, "changed", pd.Series(changed, index=frame.index, dtype=object))
        frames.append(frame.drop(columns=["context"]))
    frame = _finish_feed(_concat(frames))
    if frame.empty and context_filters:  # a non-empty answer proves every filter's key exists
        check_context_filters(src, context_filters)
    return _context_columns(frame, contexts)
