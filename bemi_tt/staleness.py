"""How fresh an answer is: what each result says about its source, and how far capture lags the database.

Every analysis answer carries two entries in ``DataFrame.attrs``:

* ``attrs["source"]``: which source answered, redacted (never a password): ``postgresql
  user@host:port/dbname``, ``parquet /path/to/export``, ``memory (N changes)``.
* ``attrs["complete_through"]``: the commit time of the last change the source holds (in commit order),
  read before the answer was computed, so the answer holds every change up to it; None for an empty source.
  PostgreSQL: one index lookup on ``(commit_position, ordinal)``; Parquet: the export's watermark (the
  name of its files) and the commit time of that change (one row group read); a Delta export and memory:
  the last change in commit order as DuckDB reads it (three columns).

:func:`freshness` tells how far capture lags. For a PostgreSQL source whose database also holds the
worker's replication slot (named in ``changes_positions``): the WAL the slot has not confirmed
(``pg_current_wal_lsn() - confirmed_flush_lsn``, bytes) and whether it holds *commits the worker would
capture*. Unconfirmed WAL alone means little: the worker's own writes to ``changes``, vacuum and other
databases of the cluster write WAL too. So the pending WAL is decoded through a temporary copy of the slot
(``pg_copy_logical_replication_slot(..., temporary => true, plugin => 'test_decoding')``: the worker's slot
is neither read nor moved, and the copy disappears with the session), at most :data:`DECODE_WINDOW` bytes
of it; transactions that touch only the worker's own tables (``changes``, ``changes_schemas``,
``changes_positions``, schema ``bemi_tt``) or that the worker has already written (their commit at or below
``changes_positions.end_position``, read after decoding) do not count. The worker is *behind* when a
committed transaction remains; ``lag_seconds`` is then the age of the oldest one. Without the privilege to
copy the slot (REPLICATION), without a slot in that database, or for a source that cannot see the database
(a Parquet export, memory), ``behind`` is None: unknown, never guessed. For a Parquet export,
``lag_seconds`` is the age of its watermark's commit (the export cannot know whether the database has
committed since).

``as_of``, ``diff``, ``blame`` and ``history`` warn with :class:`StaleWarning` when their answer reaches past
``complete_through`` (``'now'``, or any later time) and the worker is known to be behind with a commit at or
before that time: the answer silently misses it otherwise. A source without a slot never warns.
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec

import duckdb
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from psycopg import sql

from bemi_tt.sources import InMemorySource, ParquetSource, PostgresSource, Scope, Source, get_source
from bemi_tt.timestamps import to_utc
from capture.dsn import describe, redact
from capture.errors import SourceError, StaleWarning
from capture.schema import CHANGES_TABLE, SCHEMAS_TABLE
from capture.sink import POSITIONS_TABLE

__all__ = [
    "DECODE_WINDOW",
    "Freshness",
    "Reach",
    "answer",
    "describe_source",
    "freshness",
    "reach",
    "stamped",
]

P = ParamSpec("P")

#: How much unconfirmed WAL :func:`freshness` decodes at most (bounds its cost on a large backlog).
DECODE_WINDOW = 16 << 20
#: How many pending commits are fetched one by one (the rest are only counted).
_PENDING_LISTED = 1000

_SECRET_QUERY = re.compile(r"((?:secret|password|token|session|access)[a-z_]*=)[^&\s]*", re.IGNORECASE)


@dataclass(frozen=True)
class Reach:
    """How far a source's changes reach: the last change in commit order and its commit time."""

    source: str
    complete_through: pd.Timestamp | None
    position: int | None


@dataclass(frozen=True)
class Freshness:
    """How far a source's changes reach and how far capture lags the database (see the module doc)."""

    source: str  #: redacted description of the source
    complete_through: pd.Timestamp | None  #: commit time of the last change the source holds
    checked_at: pd.Timestamp  #: when this was measured (UTC)
    behind: bool | None  #: True: commits the source lacks exist; False: caught up; None: unknown
    lag_seconds: float | None  #: age of the oldest commit not captured yet (Parquet: of the watermark)
    lag_bytes: int | None  #: WAL the worker's slot has not confirmed (PostgreSQL with its slot)
    pending_transactions: int | None  #: committed transactions with tracked changes not captured yet
    oldest_pending_at: pd.Timestamp | None  #: commit time of the oldest of them
    slot: str | None  #: the worker's replication slot that was looked at
    note: str  #: one sentence saying what was measured, or why something is unknown

    def __str__(self) -> str:
        return self.note


# -- describing a source without its secrets ---------------------------------------------------------
def _redact(text: str) -> str:
    """``text`` without passwords (capture.dsn's rules) nor object-store secrets in a URI's query."""
    return _SECRET_QUERY.sub(r"\1***", redact(text))


def describe_source(source: Source) -> str:
    """Which source this is, for ``attrs["source"]`` and messages: never a password."""
    if isinstance(source, PostgresSource):
        schema = "" if source.schema == "public" else f" (schema {source.schema})"
        return f"postgresql {describe(source.dsn)}{schema}"
    if isinstance(source, ParquetSource):  # and its kinds (DeltaSource: "delta")
        kind = "parquet" if type(source) is ParquetSource else type(source).__name__.removesuffix("Source")
        return f"{kind.lower()} {_redact(source.directory)}"
    if isinstance(source, InMemorySource):
        return f"memory ({source.changes.num_rows} changes)"
    return _redact(source.describe())


# -- how far a source reaches --------------------------------------------------------------------------
def _utc(value: Any) -> pd.Timestamp | None:
    return None if value is None else pd.Timestamp(value).tz_convert("UTC").as_unit("us")


def _reach_postgres(source: PostgresSource) -> tuple[pd.Timestamp | None, int | None]:
    with source._connect() as conn:
        try:
            row = conn.execute(
                sql.SQL(
                    "SELECT committed_at, commit_position FROM {} "
                    "ORDER BY commit_position DESC, ordinal DESC LIMIT 1"
                ).format(sql.Identifier(source.schema, CHANGES_TABLE))
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            raise SourceError(
                f"database has no {source.schema}.{CHANGES_TABLE} table: run the capture worker "
                "(`bemi-tt capture`) on it first"
            ) from None
    return (None, None) if row is None else (_utc(row[0]), int(row[1]))


def _watermark_time(filesystem: Any, path: str, watermark: tuple[int, int], whole: bool) -> Any:
    """The commit time of the change at ``watermark`` in ``path``, or None when the file lacks it. Files
    are sorted by key, so their last row group holds it: only that one is read unless ``whole``."""
    columns = ["commit_position", "ordinal", "committed_at"]
    with filesystem.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        rows = (
            parquet.read(columns=columns)
            if whole
            else parquet.read_row_group(parquet.num_row_groups - 1, columns=columns)
        )
    match = pc.and_(pc.equal(rows["commit_position"], watermark[0]), pc.equal(rows["ordinal"], watermark[1]))
    found = rows.filter(match)
    return found["committed_at"][0].as_py() if found.num_rows else None


def _reach_parquet(source: ParquetSource) -> tuple[pd.Timestamp | None, int | None]:
    from capture.export.dataset import read_dataset_state, resolve_directory

    filesystem, root = resolve_directory(source.directory)
    for attempt in range(5):  # a concurrent compaction may delete a listed file: list again
        state = read_dataset_state(filesystem, root)
        if state.watermark is None:
            return None, None
        try:  # the parts of the last unit (or the compacted file) end at the watermark; one holds it
            ending = [f.path for f in state.files if f.last == state.watermark]
            for whole in (False, True):
                for path in ending:
                    when = _watermark_time(filesystem, path, state.watermark, whole)
                    if when is not None:
                        return _utc(when), state.watermark[0]
        except FileNotFoundError:
            if attempt == 4:
                raise
            continue
        except (OSError, pa.ArrowInvalid) as exc:  # a damaged file: name it, as reading the export does
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SourceError(
                f"cannot read file {path!r} of the Parquet export {source.directory!r}: {first}; restore the "
                "file from a backup or re-export into an empty directory with `bemi-tt export`"
            ) from None
        raise SourceError(  # pragma: no cover - a complete unit always holds the change its name ends at
            f"export directory {source.directory!r}: no file holds the change at its watermark "
            f"{state.watermark}; re-export into an empty directory"
        )
    return None, None  # pragma: no cover - the loop returns or raises


def _reach_duckdb(source: Source) -> tuple[pd.Timestamp | None, int | None]:
    from bemi_tt.state import _duck

    con = _duck()
    source.load(con, "reach", Scope(columns=("committed_at", "commit_position", "ordinal")))
    try:
        row = con.execute(
            'SELECT committed_at, commit_position FROM "reach" ORDER BY commit_position DESC, ordinal DESC '
            "LIMIT 1"
        ).fetchone()
    except duckdb.Error as exc:  # pragma: no cover - a custom source whose view lacks the columns
        raise SourceError(f"cannot read how far {source.describe()} reaches: {exc}") from None
    return (None, None) if row is None else (_utc(row[0]), int(row[1]))


def reach(source: Source) -> Reach:
    """How far ``source`` reaches now (cheap: one index lookup, or the export's watermark file; other
    sources: DuckDB's top row of three columns)."""
    if isinstance(source, PostgresSource):
        through, position = _reach_postgres(source)
    elif type(source) is ParquetSource:  # a Delta export lists its files from its log: the generic path
        through, position = _reach_parquet(source)
    else:
        through, position = _reach_duckdb(source)
    return Reach(describe_source(source), through, position)


# -- how far capture lags (PostgreSQL with the worker's slot) -----------------------------------------------
@dataclass(frozen=True)
class _Lag:
    slot: str | None
    lag_bytes: int | None
    behind: bool | None
    pending: int | None
    oldest: pd.Timestamp | None
    note: str


def _slot(conn: psycopg.Connection[Any], schema: str) -> tuple[str, int, int] | None:
    """The worker's slot in this database (from ``changes_positions``): name, confirmed and current LSN."""
    positions = sql.Identifier(schema, POSITIONS_TABLE)
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (positions.as_string(conn),)).fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute(
        sql.SQL(
            "SELECT s.slot_name, (s.confirmed_flush_lsn - '0/0'::pg_lsn)::bigint, "
            "(pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint "
            "FROM {} p JOIN pg_replication_slots s ON s.slot_name = p.slot "
            "WHERE s.database = current_database() AND s.slot_type = 'logical' "
            "AND s.confirmed_flush_lsn IS NOT NULL ORDER BY p.end_position DESC LIMIT 1"
        ).format(positions)
    ).fetchone()
    return None if row is None else (str(row[0]), int(row[1]), int(row[2]))


def _pending(
    conn: psycopg.Connection[Any], schema: str, slot: str, upto: int
) -> tuple[int, list[tuple[int, Any]]]:
    """Committed transactions after the slot's confirmed position, up to ``upto``, that change a table the
    worker captures (or its schema, ``bemi_ddl``): their count and the first ones (end LSN, commit time)."""
    own = [
        sql.SQL("quote_ident({}) || '.' || quote_ident({})").format(sql.Literal(schema), sql.Literal(t))
        for t in (CHANGES_TABLE, SCHEMAS_TABLE, POSITIONS_TABLE)
    ]
    not_own = sql.SQL(" AND ").join(
        sql.SQL("NOT starts_with(data, 'table ' || {} || ':')").format(name) for name in own
    )
    copy = conn.execute(
        "SELECT slot_name FROM pg_copy_logical_replication_slot(%s, 'bemi_tt_fresh_' || pg_backend_pid(), "
        "true, 'test_decoding')",
        (slot,),
    ).fetchone()
    assert copy is not None
    # no 'skip-empty-xacts': PostgreSQL 15's test_decoding then prints a transactional message (bemi_ddl)
    # without the BEGIN/COMMIT lines that carry its transaction's commit time
    try:
        row = conn.execute(
            sql.SQL(
                """WITH d AS (
                    SELECT lsn, xid, data FROM pg_logical_slot_peek_changes(%s, ('0/0'::pg_lsn + %s::numeric),
                        NULL, 'include-timestamp', '1')
                ), tracked AS (
                    SELECT DISTINCT xid FROM d
                    WHERE (starts_with(data, 'table ') AND NOT starts_with(data, 'table bemi_tt.')
                           AND {not_own})
                       OR starts_with(data, 'message: transactional: 1 prefix: bemi_ddl,')
                ), commits AS (
                    SELECT (d.lsn - '0/0'::pg_lsn)::bigint AS at,
                           substring(d.data FROM '\\(at (.+)\\)$')::timestamptz AS committed_at
                    FROM d JOIN tracked USING (xid) WHERE starts_with(d.data, 'COMMIT')
                )
                SELECT count(*), (SELECT array_agg(ARRAY[at::text, committed_at::text] ORDER BY at)
                                  FROM (SELECT * FROM commits ORDER BY at LIMIT %s) f)
                FROM commits"""
            ).format(not_own=not_own),
            (copy[0], upto, _PENDING_LISTED),
        ).fetchone()
    finally:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (copy[0],))
    assert row is not None
    listed = [(int(at), pd.Timestamp(when)) for at, when in (row[1] or [])]
    return int(row[0]), listed


def _lag(source: PostgresSource) -> _Lag:
    """The worker's lag as far as this role may see it; any database refusal makes it unknown, never an
    error (the answer it is measured for stands)."""
    try:
        return _measure_lag(source)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _Lag(None, None, None, None, None, f"cannot read the worker's position ({_redact(reason)})")


def _measure_lag(source: PostgresSource) -> _Lag:
    with source._connect() as conn:
        found = _slot(conn, source.schema)
        if found is None:
            return _Lag(None, None, None, None, None, "no replication slot of the worker in this database")
        slot, confirmed, current = found
        lag_bytes = max(current - confirmed, 0)
        if lag_bytes == 0:
            return _Lag(slot, 0, False, 0, None, f"slot {slot!r} has confirmed all WAL")
        upto = min(current, confirmed + DECODE_WINDOW)
        try:
            total, listed = _pending(conn, source.schema, slot, upto)
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return _Lag(
                slot,
                lag_bytes,
                None,
                None,
                None,
                f"cannot decode the {lag_bytes} bytes of WAL slot {slot!r} has not confirmed "
                f"({_redact(reason)}); a role with REPLICATION can tell whether they hold commits",
            )
        # read after decoding: a transaction the worker wrote meanwhile is not pending
        row = conn.execute(
            sql.SQL("SELECT end_position FROM {} WHERE slot = %s").format(
                sql.Identifier(source.schema, POSITIONS_TABLE)
            ),
            (slot,),
        ).fetchone()
    written = int(row[0]) if row else 0
    captured = sum(1 for at, _ in listed if at <= written)
    pending = max(total - captured, 0)
    oldest = next((when for at, when in listed if at > written), None)
    if pending:
        return _Lag(slot, lag_bytes, True, pending, _utc(oldest), f"{pending} committed transactions wait")
    if upto < current:
        return _Lag(
            slot,
            lag_bytes,
            None,
            None,
            None,
            f"the first {DECODE_WINDOW} of {lag_bytes} bytes of WAL slot {slot!r} has not confirmed hold "
            "no commit to capture; the rest was not decoded",
        )
    return _Lag(
        slot, lag_bytes, False, 0, None, f"the WAL slot {slot!r} has not confirmed holds no commit to capture"
    )


def freshness(source: Any = None) -> Freshness:
    """How far ``source`` (default: the one set by :func:`bemi_tt.connect`) reaches and how far capture
    lags the database; see :mod:`bemi_tt.staleness` for what is measured and when it is unknown."""
    src = get_source(source)
    where = reach(src)
    now = pd.Timestamp.now(tz="UTC").as_unit("us")
    through = where.complete_through
    through_text = through.isoformat() if through is not None else "no change yet"
    if isinstance(src, PostgresSource):
        lag = _lag(src)
        seconds: float | None = None
        if lag.behind:
            seconds = max((now - lag.oldest).total_seconds(), 0.0) if lag.oldest is not None else None
            note = (
                f"capture is behind: {lag.pending} committed transactions are not in {where.source} yet, the "
                f"oldest from {lag.oldest.isoformat() if lag.oldest is not None else 'an unknown time'}; "
                f"complete through {through_text}"
            )
        elif lag.behind is False:
            seconds = 0.0
            note = f"capture is caught up ({lag.note}); complete through {through_text}"
        else:
            note = f"cannot tell whether capture is behind: {lag.note}; complete through {through_text}"
        return Freshness(
            source=where.source,
            complete_through=through,
            checked_at=now,
            behind=lag.behind,
            lag_seconds=seconds,
            lag_bytes=lag.lag_bytes,
            pending_transactions=lag.pending,
            oldest_pending_at=lag.oldest,
            slot=lag.slot,
            note=note,
        )
    seconds = None
    if isinstance(src, ParquetSource) and through is not None:
        seconds = max((now - through).total_seconds(), 0.0)
    note = (
        f"{where.source} is complete through {through_text}"
        + (f" ({seconds:.0f} s ago)" if seconds is not None else "")
        + "; it cannot see the database, so whether capture is behind is unknown"
    )
    return Freshness(
        source=where.source,
        complete_through=through,
        checked_at=now,
        behind=None,
        lag_seconds=seconds,
        lag_bytes=None,
        pending_transactions=None,
        oldest_pending_at=None,
        slot=None,
        note=note,
    )


# -- stamping answers -----------------------------------------------------------------------------------
def stamped(
    frame: pd.DataFrame,
    where: Reach,
    source: Source | None = None,
    *,
    asked: str | None = None,
    ts: pd.Timestamp | None = None,
) -> pd.DataFrame:
    """``frame`` with ``attrs["source"]`` and ``attrs["complete_through"]``; when ``asked`` names a question
    about the state at ``ts`` (None: now) past ``complete_through``, a :class:`StaleWarning` if the worker is
    known to be behind with a commit at or before ``ts``."""
    frame.attrs["source"] = where.source
    frame.attrs["complete_through"] = where.complete_through
    if asked is None or not isinstance(source, PostgresSource):
        return frame
    if ts is not None and where.complete_through is not None and ts <= where.complete_through:
        return frame  # every commit up to ts precedes the last captured one in commit order
    lag = _lag(source)
    if not lag.behind or (ts is not None and lag.oldest is not None and lag.oldest > ts):
        return frame
    through = where.complete_through.isoformat() if where.complete_through is not None else "no change"
    oldest = lag.oldest.isoformat() if lag.oldest is not None else "an unknown time"
    warnings.warn(
        f"{asked} misses changes: the capture worker is behind by {lag.pending} committed transactions "
        f"(the oldest committed at {oldest}); the answer is complete through {through}. Run or wait for "
        "`bemi-tt capture`; bemi_tt.freshness() shows the lag",
        StaleWarning,
        stacklevel=3,
    )
    return frame


def answer(
    *, now: str | None = None, warn: bool = True
) -> Callable[[Callable[P, pd.DataFrame]], Callable[P, pd.DataFrame]]:
    """Decorate an analysis function so that its answer carries :func:`stamped`'s attrs.

    ``now``: the argument holding the time the answer is about (``"ts"``, ``"t2"``), None for the present;
    ``warn=False`` for change feeds (their ``complete_through`` says how far they reach; no warning)."""

    def decorate(function: Callable[P, pd.DataFrame]) -> Callable[P, pd.DataFrame]:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> pd.DataFrame:
            bound = signature.bind(*args, **kwargs)
            src = get_source(bound.arguments.get("source"))
            where = reach(src)  # before the answer: it holds at least every change up to this one
            frame = function(*args, **kwargs)
            if not warn:
                return stamped(frame, where)
            table = bound.arguments.get("table")
            value = bound.arguments[now] if now is not None else None
            ts = to_utc(value, now) if now is not None else None
            asked = f"{function.__name__}({table!r}" + (f", {now}={value!r})" if now else ")")
            return stamped(frame, where, src, asked=asked, ts=ts)

        return wrapper

    return decorate
