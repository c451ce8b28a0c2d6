"""Verification of the hash chain (capture/chain.py) over ``changes`` or an export.

:func:`verify_changes` and :func:`verify_export` recompute every row's digest and the chain, raise
:class:`~capture.errors.ChainError` naming the first row altered, inserted or deleted by hand, check erased
rows against their recorded hashes (capture/erase.py) and a pruned history's baseline against its horizon
(capture/prune.py), then resume the chain there. It reads those records, so it sits above erase and prune,
which hash with capture.chain.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from capture.chain import GENESIS, chain_next, context_digest, digest_with, header_prefix, row_digest
from capture.dsn import connect_changes
from capture.errors import ChainError, ConfigurationError

__all__ = [
    "Anchor",
    "ChainRow",
    "Verified",
    "chain_head",
    "verify",
    "verify_changes",
    "verify_export",
    "verify_rows",
]


@dataclass(frozen=True)
class Anchor:
    """A head hash at a point of history (printed by ``bemi-tt verify``, stored in ``changes_digests``)."""

    commit_position: int
    ordinal: int
    chain_hash: str

    def __str__(self) -> str:
        return f"{self.commit_position}/{self.ordinal}:{self.chain_hash}"

    @classmethod
    def parse(cls, text: str) -> Anchor:
        """``<commit_position>/<ordinal>:<chain hash>`` (what ``str()`` gives)."""
        match = re.fullmatch(r"\s*(\d+)/(\d+):([0-9a-f]{64})\s*", text)
        if match is None:
            raise ConfigurationError(
                f"anchor {text!r} is not <commit_position>/<ordinal>:<64 hex digits>, as bemi-tt verify "
                "prints it"
            )
        return cls(int(match.group(1)), int(match.group(2)), match.group(3))


class Verified(int):
    """The number of changes verified (an int), with what the chain says about the rest."""

    unhashed: int
    head: Anchor | None
    source: str
    #: of the verified changes, those whose values were erased (checked with their recorded hashes)
    erased: int
    #: the pruning horizon the chain resumed at (capture/prune.py), None when history was never pruned
    horizon: Any
    #: anchors before the horizon, which nothing can check any more
    skipped_anchors: int

    def __new__(
        cls, verified: int, *, unhashed: int, head: Anchor | None, source: str, erased: int = 0,
        horizon: Any = None, skipped_anchors: int = 0,
    ) -> Verified:
        self = super().__new__(cls, verified)
        self.unhashed = unhashed
        self.head = head
        self.source = source
        self.erased = erased
        self.horizon = horizon
        self.skipped_anchors = skipped_anchors
        return self

    def __str__(self) -> str:
        text = f"{int(self)} changes verified in {self.source}"
        if self.erased:
            text += f" ({self.erased} of them erased: values removed, original hashes recorded)"
        if self.horizon is not None:
            text += (
                f"; history before {self.horizon.before.isoformat()} was pruned: its {self.horizon.rows} "
                "baseline rows match the horizon record and the chain resumes from the pruned prefix's head"
            )
            if self.skipped_anchors:
                text += f" ({self.skipped_anchors} anchors before it cannot be checked)"
        if self.unhashed:
            text += (
                f"; the chain begins after {self.unhashed} earlier rows without hashes "
                "(written before hashing began), which are not covered"
            )
        if self.head is not None:
            text += f"; head {self.head}"
        return text

    def __repr__(self) -> str:
        return f"Verified({int(self)}, unhashed={self.unhashed}, head={self.head!r})"


@dataclass(frozen=True)
class ChainRow:
    """What verify needs of one ``changes`` row (JSON columns as text, ``committed_at`` in epoch µs)."""

    id: int | None
    table: str
    schema: str
    database: str
    operation: str
    primary_key: str | None
    before: str | None
    after: str | None
    context: str | None
    context_verified: bool | None
    committed_at: int
    transaction_id: int | None
    position: int
    commit_position: int
    ordinal: int
    row_digest: str | None
    chain_hash: str | None

    def name(self) -> str:
        ident = "" if self.id is None else f"id {self.id}, "
        return (
            f"row ({ident}commit_position {self.commit_position}, ordinal {self.ordinal}, "
            f"{self.operation} on {self.schema}.{self.table})"
        )


#: ``changes`` columns verify reads, in :class:`ChainRow` order.
CHAIN_COLUMNS = tuple(ChainRow.__dataclass_fields__)


def verify_rows(
    rows: Iterable[ChainRow], *, source: str, anchors: Sequence[Anchor] = (), head: Anchor | None = None,
    erased: Mapping[tuple[int, int], tuple[str, str, str]] | None = None,
    horizon: Any = None,
) -> Verified:
    """Check rows given in ``(commit_position, ordinal)`` order; ``anchors``: known hashes at points of
    history; ``head``: where the chain must end (the worker's record); ``erased``: the original
    (before, after, context) hashes of erased rows (capture/erase.py). Raises ``ChainError``."""
    wanted = {(a.commit_position, a.ordinal): a for a in anchors}
    previous = GENESIS
    last: ChainRow | None = None
    unhashed = verified = erased_rows = skipped = baseline_rows = 0
    baseline = hashlib.sha256()
    start: Anchor | None = None
    if horizon is not None:  # pruned (capture/prune.py): the chain resumes at the recorded head
        if horizon.head is not None:
            start = Anchor(*horizon.head)
            previous = start.chain_hash
            anchored = wanted.pop((start.commit_position, start.ordinal), None)
            if anchored is not None and anchored.chain_hash != start.chain_hash:
                raise ChainError(
                    f"the pruned prefix's head in {source} is {start.chain_hash}, not the anchored "
                    f"{anchored.chain_hash}: history up to that point was rewritten"
                )
        before = {k for k in wanted if k[0] < horizon.position}
        skipped = len(before)
        for k in before:
            del wanted[k]
    context_cache: dict[str, bytes] = {}
    for row in rows:
        if horizon is not None and row.commit_position < horizon.position:
            digest = row_digest(
                table=row.table, schema=row.schema, database=row.database, operation=row.operation,
                primary_key=row.primary_key, before=row.before, after=row.after,
                context=row.context if row.context is not None else "{}",
                context_verified=row.context_verified, committed_at=row.committed_at,
                transaction_id=row.transaction_id, position=row.position,
                commit_position=row.commit_position, ordinal=row.ordinal,
            )
            if (row.row_digest is not None and digest != row.row_digest and erased
                    and _erased_digest(row, erased) == row.row_digest):
                digest, erased_rows = row.row_digest, erased_rows + 1
            if row.row_digest is None or digest != row.row_digest or row.chain_hash != (
                    horizon.head[2] if horizon.head is not None else None):
                raise ChainError(
                    f"{row.name()} in {source} lies before the pruning horizon but is not an unaltered "
                    "baseline row: it was altered or inserted by hand"
                )
            baseline.update(bytes.fromhex(digest))
            baseline_rows += 1
            verified += 1
            continue
        if row.chain_hash is None or row.row_digest is None:
            if verified == baseline_rows and start is None:
                unhashed += 1
                last = row
                continue
            raise ChainError(
                f"{row.name()} in {source} has no chain hash but follows hashed rows: it was inserted "
                "by hand (or its hash was removed)"
            )
        ctx = row.context if row.context is not None else "{}"
        cdigest = context_cache.get(ctx)
        if cdigest is None:
            if len(context_cache) > 4096:
                context_cache.clear()
            cdigest = context_cache[ctx] = context_digest(ctx)
        digest = row_digest(
            table=row.table, schema=row.schema, database=row.database, operation=row.operation,
            primary_key=row.primary_key, before=row.before, after=row.after, context=ctx,
            context_verified=row.context_verified, committed_at=row.committed_at,
            transaction_id=row.transaction_id, position=row.position, commit_position=row.commit_position,
            ordinal=row.ordinal, context_digest=cdigest,
        )
        if digest != row.row_digest and erased and _erased_digest(row, erased) == row.row_digest:
            digest = row.row_digest  # erased: the rest of the row is proven by the recorded hashes
            erased_rows += 1
        if digest != row.row_digest:
            raise ChainError(
                f"{row.name()} in {source} was altered: its content no longer matches its row_digest"
            )
        expected = chain_next(previous, digest)
        if expected != row.chain_hash:
            after_text = ("the start of the chain" if last is None or verified == baseline_rows
                          else last.name())
            if chain_next(GENESIS, digest) == row.chain_hash:
                raise ChainError(
                    f"{row.name()} in {source} starts a new chain after {after_text}: rows before it were "
                    "replaced or it was inserted by hand"
                )
            raise ChainError(
                f"{row.name()} in {source} does not follow from the row before it ({after_text}): a row "
                "between them was deleted, or this one was inserted by hand"
            )
        previous = expected
        verified += 1
        last = row
        anchor = wanted.pop((row.commit_position, row.ordinal), None)
        if anchor is not None and anchor.chain_hash != expected:
            raise ChainError(
                f"the chain at {row.name()} in {source} is {expected}, not the anchored {anchor.chain_hash}: "
                "history up to that point was rewritten"
            )
    if horizon is not None and (baseline_rows != horizon.rows or baseline.hexdigest() != horizon.baseline):
        raise ChainError(
            f"the baseline in {source} ({baseline_rows} rows before the pruning horizon) does not match the "
            f"horizon record ({horizon.rows} rows): baseline rows were altered, inserted or deleted"
        )
    chained = verified - baseline_rows
    end = None if last is None or chained == 0 else Anchor(last.commit_position, last.ordinal, previous)
    if end is None and start is not None:
        end = start  # everything was folded: the chain ends where the pruned prefix did
    if wanted:
        missing = min(wanted)
        raise ChainError(
            f"anchored row (commit_position {missing[0]}, ordinal {missing[1]}) is not in {source}: "
            "it was deleted, or the anchor is from another history"
        )
    if head is not None and end != head:
        where = "no hashed row" if end is None else f"at {last.name() if last else ''}"
        raise ChainError(
            f"{source} ends {where}, but the worker recorded its head at commit_position "
            f"{head.commit_position}, ordinal {head.ordinal}: rows at the end were deleted or rewritten"
        )
    return Verified(verified, unhashed=unhashed, head=end, source=source, erased=erased_rows, horizon=horizon,
                    skipped_anchors=skipped)


def _erased_digest(row: ChainRow, erased: Mapping[tuple[int, int], tuple[str, str, str]]) -> str | None:
    """The digest of an erased row from its recorded column hashes; None unless it is in erased form."""
    hashes = erased.get((row.commit_position, row.ordinal))
    if hashes is None or row.context is None or '"_bemi_erased"' not in row.context:
        return None
    prefix = header_prefix(row.schema, row.table, row.database, row.context_verified, row.committed_at,
                           row.transaction_id, row.commit_position)
    before, after, ctx = (bytes.fromhex(h) for h in hashes)
    return digest_with(prefix, row.operation, row.primary_key, row.position, row.ordinal, None, None, ctx,
                       before, after).hex()


# -- PostgreSQL -----------------------------------------------------------------------------------------


def _pg_rows(conn: Any, name: Any) -> Iterator[ChainRow]:
    from psycopg import sql

    columns: list[Any] = []
    for column in CHAIN_COLUMNS:
        ident = sql.Identifier(column)
        if column in ("before", "after", "context"):
            columns.append(sql.SQL("{}::text").format(ident))
        elif column == "committed_at":
            columns.append(sql.SQL("(extract(epoch FROM {}) * 1000000)::bigint").format(ident))
        else:
            columns.append(ident)
    query = sql.SQL("SELECT {} FROM {} ORDER BY commit_position, ordinal").format(
        sql.SQL(", ").join(columns), name
    )
    with conn.cursor(name="bemi_tt_verify") as cur:
        cur.itersize = 10_000
        cur.execute(query)
        for record in cur:
            yield ChainRow(*record)


def _recorded(conn: Any, schema: str) -> tuple[Anchor | None, list[Anchor]]:
    """The head the worker recorded (the newest over its slots) and the stored digests."""
    from psycopg import sql

    from capture.protocol import DIGESTS_TABLE, POSITIONS_TABLE

    head = None
    row = conn.execute(
        sql.SQL(
            "SELECT chain_position, chain_ordinal, chain_hash FROM {} WHERE chain_hash IS NOT NULL "
            "ORDER BY chain_position DESC, chain_ordinal DESC LIMIT 1"
        ).format(sql.Identifier(schema, POSITIONS_TABLE))
    ).fetchone()
    if row is not None:
        head = Anchor(int(row[0]), int(row[1]), str(row[2]))
    digests = [
        Anchor(int(a), int(b), str(c))
        for a, b, c in conn.execute(
            sql.SQL("SELECT commit_position, ordinal, chain_hash FROM {}").format(
                sql.Identifier(schema, DIGESTS_TABLE)
            )
        )
    ]
    return head, digests


def verify_changes(
    dsn: Any, *, schema: str = "public", anchors: Iterable[Anchor | str] = ()
) -> Verified:
    """Recompute the chain of the ``changes`` table at ``dsn``; the number of changes verified.

    Also checks the head the worker recorded in ``changes_positions``, the digests in
    ``changes_digests`` and any ``anchors`` (``Anchor`` or ``"<commit_position>/<ordinal>:<hash>"``).
    Raises ``ChainError`` naming the first row altered, inserted by hand, or where rows were deleted.
    """
    from psycopg import sql

    from capture.schema import CHANGES_TABLE

    kept = [a if isinstance(a, Anchor) else Anchor.parse(a) for a in anchors]
    conn = connect_changes(dsn)
    own = conn is not dsn
    try:
        try:
            head, digests = _recorded(conn, schema)
        except Exception as exc:  # a first-release table: no chain columns at all
            import psycopg

            if not isinstance(exc, (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn)):
                raise
            raise ChainError(
                f"{schema}.{CHANGES_TABLE} has no hash chain yet: run the capture worker of this version "
                "once (it adds the columns), and verify the rows it writes from then on"
            ) from None
        finally:
            conn.rollback()
        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                from capture.erase import pg_erased_digests
                from capture.prune import pg_horizon

                return verify_rows(
                    _pg_rows(conn, sql.Identifier(schema, CHANGES_TABLE)),
                    source=f"{schema}.{CHANGES_TABLE}",
                    anchors=[*kept, *digests],
                    head=head,
                    erased=pg_erased_digests(conn, schema),
                    horizon=pg_horizon(conn, schema),
                )
        finally:
            conn.rollback()
    finally:
        if own:
            conn.close()


def chain_head(dsn: Any, *, schema: str = "public") -> Anchor | None:
    """The last hashed row's chain hash: the digest to print and store elsewhere (None: no hashed row)."""
    from psycopg import sql

    from capture.schema import CHANGES_TABLE

    conn = connect_changes(dsn)
    try:
        row = conn.execute(
            sql.SQL(
                "SELECT commit_position, ordinal, chain_hash FROM {} WHERE chain_hash IS NOT NULL "
                "ORDER BY commit_position DESC, ordinal DESC LIMIT 1"
            ).format(sql.Identifier(schema, CHANGES_TABLE))
        ).fetchone()
        return None if row is None else Anchor(int(row[0]), int(row[1]), str(row[2]))
    finally:
        conn.rollback()
        if conn is not dsn:
            conn.close()


# -- Parquet export -------------------------------------------------------------------------------------


def _export_rows(directory: str) -> Iterator[ChainRow]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.fs
    import pyarrow.parquet as pq

    from capture.export.dataset import is_delta_table, list_dataset_files, resolve_directory

    filesystem, root = resolve_directory(directory)
    if is_delta_table(filesystem, root):  # a Delta export's files are those of its log's current version
        from capture.export.delta import open_delta_table

        uris = open_delta_table(directory).file_uris()
        local = isinstance(filesystem, pa.fs.LocalFileSystem)
        paths = sorted(uri if local else uri.split("://", 1)[-1] for uri in uris)
    else:
        filesystem, paths = list_dataset_files(directory)
    tables = []
    for path in paths:
        table = pq.read_table(path, filesystem=filesystem)
        for column in ("context_verified", "row_digest", "chain_hash"):  # files of the first release
            if column not in table.column_names:
                kind = pa.bool_() if column == "context_verified" else pa.string()
                table = table.append_column(column, pa.nulls(table.num_rows, kind))
        columns = {}
        for column in CHAIN_COLUMNS:
            data = table[column]
            if column == "committed_at":
                data = pc.cast(pc.cast(data, pa.timestamp("us", tz="UTC")), pa.int64())
            elif isinstance(data.type, pa.ExtensionType):
                data = data.cast(data.type.storage_type)
            columns[column] = data
        tables.append(pa.table(columns))
    if not tables:
        return
    merged = pa.concat_tables(tables).sort_by([("commit_position", "ascending"), ("ordinal", "ascending")])
    for batch in merged.to_batches(max_chunksize=10_000):
        values = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
        for record in zip(*values, strict=True):
            yield ChainRow(*record)


def verify_export(directory: str, *, anchors: Iterable[Anchor | str] = ()) -> Verified:
    """Recompute the chain of a Parquet or Delta export (local or ``s3://``); the number of changes verified.

    The export holds the complete, non-superseded files (see ``capture.export.dataset``); rows deleted at
    its end are only caught by an ``anchor`` at or after them. Raises ``ChainError`` like
    :func:`verify_changes`, naming the row (its key; ``id`` as exported).
    """
    from capture.erase import export_erased_digests
    from capture.prune import export_horizon

    kept = [a if isinstance(a, Anchor) else Anchor.parse(a) for a in anchors]
    return verify_rows(_export_rows(directory), source=f"the export {directory!r}", anchors=kept,
                       erased=export_erased_digests(directory), horizon=export_horizon(directory))


def verify(source: Any, *, schema: str = "public", anchors: Iterable[Anchor | str] = ()) -> Verified:
    """``bemi_tt.verify``: :func:`verify_export` for an export directory (local or ``s3://``), else
    :func:`verify_changes` for a PostgreSQL URL, libpq string or psycopg connection."""
    import os

    if isinstance(source, os.PathLike) or (
        isinstance(source, str) and (source.startswith(("s3://", "file://")) or os.path.isdir(source))
    ):
        return verify_export(os.fspath(source), anchors=anchors)
    return verify_changes(source, schema=schema, anchors=anchors)
