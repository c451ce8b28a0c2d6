"""Time travel on Spark: ``as_of``, ``diff``, ``history`` and ``register_as_of`` over an export directory
(Parquet or Delta, local or ``s3://``), returning pyspark DataFrames. Needs the ``[spark]`` extra.

    from bemi_tt import spark as bt
    bt.as_of(spark, "/data/export", "todo", "2026-11-27 10:00").show()
    bt.register_as_of(spark, "/data/export", "2026-11-27 10:00")     # every table as a temp view
    spark.sql("SELECT * FROM todo JOIN users ON users.id = todo.user_id")

``as_of`` runs entirely in Spark: the SQL is the engine's one rule (:mod:`bemi_tt.rule`) composed in its
Spark dialect — the same pieces (``cut``, ``latest``, ``moves``, ``truncates``) that DuckDB and PostgreSQL
run — and the columns are typed from the schema record by the mapping of :mod:`bemi_tt.dtypes`.
``diff`` and ``history`` let Spark find, with the same rule, the few changes that decide the answer (the
keys whose row differs between the two cuts, every key they were moved from or to, the TRUNCATEs), bring
only those to the driver and answer with :func:`bemi_tt.diff` / :func:`bemi_tt.history` themselves: the
answers are those of the pandas API by construction; the driver holds the changed rows' changes.

Types (``as_of``, ``history``): ``smallint/integer/bigint`` → SMALLINT/INT/BIGINT, ``boolean``,
``real/double precision`` → FLOAT/DOUBLE (NaN kept), ``numeric(p,s)`` (p ≤ 38) → DECIMAL(p,s) exact,
``timestamptz`` → TIMESTAMP (an instant), ``timestamp`` → TIMESTAMP_NTZ, ``date`` → DATE, text-like types →
STRING; the rest (unconstrained numeric, json, arrays, bytea, time) → STRING holding the value's JSON as
Spark's JSON parser prints it (numbers beyond 17 digits are rounded there: use :func:`bemi_tt.as_of`
for those). Values Spark's types cannot hold (timestamp ``infinity``, BC years, numeric NaN) are NULL.
``diff``'s ``old``/``new`` and the context keys are JSON text (one column holds every column's values).
Tables need their schema record and a primary key.
"""

from __future__ import annotations

import json
import os
from datetime import date, datetime, time, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bemi_tt.arguments import KeyLike, TimeLike
from bemi_tt.dtypes import ColumnType
from bemi_tt.rule import MOVED, SPARK, Query, Rule
from bemi_tt.sources import InMemorySource, ParquetSource, TableName, as_source, json_text
from bemi_tt.state import Layout, layout_at, resolve_table, versions_of
from bemi_tt.timestamps import to_utc
from capture.errors import ConfigurationError
from capture.schema import changes_arrow_schema

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["as_of", "as_of_sql", "diff", "history", "register_as_of"]

#: the columns of ``changes`` the answers read (the JSON ones as text)
_READ = (
    "primary_key",
    "table",
    "operation",
    "before",
    "after",
    "context",
    "committed_at",
    "schema",
    "database",
    "transaction_id",
    "position",
    "commit_position",
    "ordinal",
    "context_verified",
    MOVED,
)
#: a column of the registered changes: true on rows of export files written before they carried ``MOVED``
_EARLIER = "_bemi_earlier"
#: more keys than this changed between the cuts of a diff: a ConfigurationError instead of the driver
DRIVER_LIMIT = 1_000_000


# -- reading the export --------------------------------------------------------------------------------
def _source(path: str | os.PathLike[str]) -> ParquetSource:
    source = as_source(os.fspath(path) if isinstance(path, os.PathLike) else path)
    if not isinstance(source, ParquetSource):  # DeltaSource is one too
        raise ConfigurationError(
            f"path {os.fspath(path)!r} is not an export directory: pass the directory `bemi-tt export` wrote"
        )
    return source


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _changes(spark: SparkSession, source: ParquetSource, table: TableName, view: str) -> str:
    """Register ``table``'s changes as temp view ``view`` (only that table's files); returns its SQL name.
    A Delta table's files come from its current snapshot (no Delta jars needed). Rows of files written
    before exports carried ``before_primary_key`` are marked in ``_bemi_earlier`` (:func:`rule_for`)."""
    from pyspark.sql import functions as F

    filesystem, files = source._files(table)
    earlier = {f for f in files if MOVED not in pq.read_schema(f, filesystem=filesystem).names}
    frames = []
    for group, flag in (([f for f in files if f not in earlier], False), (sorted(earlier), True)):
        if not group:
            continue
        if source.directory.startswith("s3://"):
            group = ["s3a://" + f for f in group]  # Hadoop's S3 filesystem
        # the schema given: no job reading every footer to infer it; JSON columns read as their text, and
        # files of the first release (no context_verified) give NULL there
        frame = spark.read.schema(_spark_schema()).parquet(*group).withColumn(_EARLIER, F.lit(flag))
        frames.append(frame)
    if frames:
        frame = frames[0] if len(frames) == 1 else frames[0].unionByName(frames[1])
        # "a.b" + "c" and "a" + "b.c" share a partition: the rows' own names decide
        frame = frame.where((F.col("schema") == table[0]) & (F.col("table") == table[1]))
    else:
        frame = spark.createDataFrame([], _spark_schema()).withColumn(_EARLIER, F.lit(False))
    frame.createOrReplaceTempView(view)
    return _quote(view)


def _spark_schema() -> Any:
    from pyspark.sql import types as T

    mapping = {
        pa.string(): T.StringType(),
        pa.int64(): T.LongType(),
        pa.int32(): T.IntegerType(),
        pa.bool_(): T.BooleanType(),
        pa.timestamp("us", tz="UTC"): T.TimestampType(),
    }
    fields = {f.name: f.type for f in changes_arrow_schema()}
    return T.StructType([T.StructField(c, mapping[fields[c]], True) for c in _READ])


def _layout(source: ParquetSource, table: TableName, ts: pd.Timestamp | None) -> Layout:
    layout = layout_at(versions_of(source.schemas(table)), ts)
    if layout is None:
        raise ConfigurationError(
            f"table {table[0]}.{table[1]} has no schema record at that time in {source.directory!r}: "
            "the Spark functions type columns from it (use bemi_tt.as_of for an export without one)"
        )
    if not layout.keys:
        raise ConfigurationError(
            f"table {table[0]}.{table[1]} has no primary key: rows without a key are matched by content, "
            "which bemi_tt.as_of does on one machine"
        )
    return layout


# -- typing ---------------------------------------------------------------------------------------------
def spark_type(kind: ColumnType) -> str:
    """The Spark SQL type of a column of PostgreSQL type ``kind`` (the :mod:`bemi_tt.dtypes` mapping)."""
    arrow = kind.arrow
    base = kind.pg_type.split("(")[0].strip().lower()
    if base == "date":
        return "DATE"
    if arrow is None:
        return "STRING"
    if pa.types.is_decimal(arrow):
        return f"DECIMAL({arrow.precision},{arrow.scale})"
    if pa.types.is_timestamp(arrow):
        return "TIMESTAMP" if arrow.tz else "TIMESTAMP_NTZ"
    names = {
        pa.int16(): "SMALLINT",
        pa.int32(): "INT",
        pa.int64(): "BIGINT",
        pa.bool_(): "BOOLEAN",
        pa.float32(): "FLOAT",
        pa.float64(): "DOUBLE",
    }
    return names.get(arrow, "STRING")


def _parsed_as(spark_sql_type: str) -> str:
    """The type ``from_json`` reads a value as: times and dates as their text (cast afterwards)."""
    return "STRING" if spark_sql_type in ("TIMESTAMP", "TIMESTAMP_NTZ", "DATE") else spark_sql_type


def _cast(expr: str, spark_sql_type: str) -> str:
    if spark_sql_type in ("TIMESTAMP", "TIMESTAMP_NTZ", "DATE"):
        return f"try_cast({expr} AS {spark_sql_type})"  # infinity, BC: NULL
    return expr


def _row_type(layout: Layout) -> str:
    """The struct ``from_json`` parses a row's JSON into (one field per column of ``layout``)."""
    return ", ".join(f"{_quote(c.name)} {_parsed_as(spark_type(c.kind))}" for c in layout.columns)


def _typed_columns(layout: Layout, row: str = "r") -> list[str]:
    """The select list typing ``row`` (a row's JSON parsed by ``from_json`` into :func:`_row_type`) into
    the columns of ``layout``; rows last changed before a column was added take its fill."""
    out = []
    for column in layout.columns:
        t = spark_type(column.kind)
        value = _cast(f"{row}.{_quote(column.name)}", t)
        if column.since is not None:
            fill = "NULL"
            if column.fill is not None:
                one = SPARK.literal('{"v":' + column.fill + "}")
                fill = _cast(f"from_json({one}, {SPARK.literal('v ' + _parsed_as(t))}).v", t)
            since = SPARK.position(str(column.since[0]), str(column.since[1]))
            value = (
                f"CASE WHEN {SPARK.position('cp', 'o')} < {since} THEN CAST({fill} AS {t}) ELSE {value} END"
            )
        out.append(f"{value} AS {_quote(column.name)}")
    return out


# -- as_of ----------------------------------------------------------------------------------------------
def _timestamp(ts: pd.Timestamp) -> str:
    return f"TIMESTAMP '{ts.isoformat()}'"


def rule_for(keys: tuple[str, ...]) -> Rule:
    """The rule in the Spark dialect: an UPDATE's old key is ``before_primary_key`` as the worker wrote it;
    on rows of an earlier release's files (``_bemi_earlier``), it is read from ``before``, which is exact
    where a key's JSON text is its PostgreSQL text (not for times and booleans: re-export those)."""
    if not keys:
        return Rule(SPARK, keys)
    from_before = SPARK.field_text("before", keys[0]) if len(keys) == 1 else SPARK.key_array("before", keys)
    old = (
        f"CASE WHEN NOT {_EARLIER} THEN {MOVED} WHEN operation <> 'UPDATE' OR before = '{{}}' THEN NULL "
        f"ELSE {from_before} END"
    )
    return Rule(SPARK, keys, old_key=old)


def present_query(rel: str, keys: tuple[str, ...], ts: pd.Timestamp | None) -> Query:
    """The rule's ``present`` over ``rel``'s changes up to the prefix cut at ``ts`` (None: all), in Spark
    SQL: ``k, cp, o, payload`` per present key."""
    rule = rule_for(keys)
    query = Query()
    scoped = rel
    if ts is not None:
        query = query.with_("cut", rule.cut(rel, _timestamp(ts))).with_(
            "scoped",
            f"SELECT c.* FROM {rel} c CROSS JOIN cut WHERE cut.p IS NULL OR c.commit_position < cut.p",
        )
        scoped = "scoped"
    present = rule.present(scoped)
    for name, body in present.ctes:
        query = query.with_(name, body)
    return query.then(present.select)


def as_of_sql(path: str | os.PathLike[str], table: str, ts: TimeLike, *, changes: str = "changes") -> str:
    """The Spark SQL :func:`as_of` runs, over a table or view ``changes`` holding ``table``'s changes (the
    ``changes`` columns, JSON as text): to read, or to run where the export is already a table."""
    source = _source(path)
    name = resolve_table(source, table)
    when = to_utc(ts)
    return _as_of_sql(_layout(source, name, when), changes, when)


def _as_of_sql(layout: Layout, rel: str, ts: pd.Timestamp | None) -> str:
    query = present_query(rel, tuple(layout.keys), ts)
    query = query.with_("present", query.select).with_(
        "parsed", f"SELECT cp, o, from_json(payload, {SPARK.literal(_row_type(layout))}) AS r FROM present"
    )
    return query.then(f"SELECT {', '.join(_typed_columns(layout))} FROM parsed").sql()


def _view_name(prefix: str, table: TableName) -> str:
    return f"bemi_tt_{prefix}_" + "".join(ch if ch.isalnum() else "_" for ch in f"{table[0]}_{table[1]}")


def as_of(spark: SparkSession, path: str | os.PathLike[str], table: str, ts: TimeLike) -> DataFrame:
    """``table`` as it was at ``ts`` (the rows of :func:`bemi_tt.as_of`, key columns included, in the
    table's column order, typed as the module docstring says), computed by Spark from the export at
    ``path``. Rows come in no particular order."""
    source = _source(path)
    name = resolve_table(source, table)
    when = to_utc(ts)
    layout = _layout(source, name, when)
    rel = _changes(spark, source, name, _view_name("changes", name))
    # the cut first (two columns read), so that the rest reads only the prefix: a filter Spark pushes
    # into the Parquet scan instead of a join with a one-row aggregate
    cut = spark.sql(Rule(SPARK).cut(rel, _timestamp(when))).collect()[0][0]
    scoped = spark.table(rel) if cut is None else spark.table(rel).where(f"commit_position < {int(cut)}")
    scoped.createOrReplaceTempView(_view_name("scoped", name))
    return spark.sql(_as_of_sql(layout, _quote(_view_name("scoped", name)), None))


def register_as_of(spark: SparkSession, path: str | os.PathLike[str], ts: TimeLike) -> dict[str, str]:
    """Register a temp view per tracked table showing it as of ``ts`` (tables created later have none),
    named by the table (``<schema>_<table>`` when another schema's table has the name, public first), so
    any Spark SQL runs against one consistent point of history. Returns view name → ``schema.table``."""
    source = _source(path)
    when = to_utc(ts)
    schemas = source.schemas()
    tables = sorted(set(zip(schemas["schema"].to_pylist(), schemas["table"].to_pylist(), strict=True)))
    tables.sort(key=lambda t: (t[0] != "public", t))
    views: dict[str, str] = {}
    for schema, table in tables:
        layout = layout_at(versions_of(source.schemas((schema, table))), when)
        if layout is None or not layout.keys:
            continue
        view = table if table not in views else f"{schema}_{table}"
        rel = _changes(spark, source, (schema, table), _view_name("changes", (schema, table)))
        spark.sql(_as_of_sql(layout, rel, when)).createOrReplaceTempView(view)
        views[view] = f"{schema}.{table}"
    return views


# -- diff and history: Spark picks the changes, the engine answers ---------------------------------------
def _lineage(spark: SparkSession, rel: str, layout: Layout, names: set[str]) -> set[str]:
    """``names`` and every key they were moved from or to by key UPDATEs (the rule's ``moves``: UPDATEs
    that changed the key, few next to the changes, so they are brought to the driver once)."""
    moves = rule_for(tuple(layout.keys)).moves(rel)
    pairs = [(row[0], row[1]) for row in spark.sql(f"SELECT k, to_k FROM ({moves}) m").collect()]
    for _ in range(len(pairs) + 1):
        grown = names | {k for pair in pairs if pair[0] in names or pair[1] in names for k in pair}
        if grown == names:
            break
        names = grown
    return names


def _deciding(
    spark: SparkSession, source: ParquetSource, name: TableName, rel: str, layout: Layout, keys: set[str]
) -> InMemorySource:
    """The changes that decide ``keys`` (their changes, the key UPDATEs away from them, every TRUNCATE)
    with the table's schema record, as a source for the engine."""
    rule = rule_for(tuple(layout.keys))
    # a view, not spark.sql's {name} formatting: the rule's SQL holds braces ('{}')
    wanted = _view_name("keys", name)
    spark.createDataFrame([(k,) for k in sorted(keys)], "k STRING").createOrReplaceTempView(wanted)
    rows = spark.sql(
        f"SELECT c.* FROM {rel} c LEFT JOIN {_quote(wanted)} w ON w.k = c.primary_key\n"
        f"LEFT JOIN {_quote(wanted)} v ON c.operation = 'UPDATE' AND v.k = {rule.old_key_of('c.before')}\n"
        "WHERE w.k IS NOT NULL OR v.k IS NOT NULL OR c.operation = 'TRUNCATE'"
    ).collect()
    # collect() gives times in the driver's local zone, naive: the instants they are
    changes = []
    for row in rows:
        change = {**row.asDict(), "committed_at": row["committed_at"].astimezone(timezone.utc)}
        if change.pop(_EARLIER):  # an earlier release's row: the source computes its old key, as the worker
            del change[MOVED]
        changes.append(change)
    return InMemorySource(changes, source.schemas(name))


def _to_spark(
    spark: SparkSession, frame: pd.DataFrame, types: dict[str, str], as_json: set[str]
) -> DataFrame:
    """A pandas answer as a Spark DataFrame: ``types`` for typed columns, JSON text for ``as_json`` (and
    any column not in ``types``)."""
    columns = [str(c) for c in frame.columns]
    schema = ", ".join(f"{_quote(c)} {types.get(c, 'STRING')}" for c in columns)
    rows = [
        tuple(
            _json(v) if c in as_json or c not in types else _spark_value(v, types[c])
            for c, v in zip(columns, row, strict=True)
        )
        for row in frame.itertuples(index=False, name=None)
    ]
    return spark.createDataFrame(rows, schema)


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or value is pd.NaT


def _spark_value(value: Any, spark_sql_type: str) -> Any:
    """A typed cell as Spark holds it (what :func:`as_of`'s SQL gives for the same value)."""
    if _missing(value):
        return None
    if spark_sql_type == "STRING":  # text, or a value Spark has no type for: as from_json reads it
        if isinstance(value, str):
            return value
        if isinstance(value, (pd.Timestamp, datetime, date, time)):
            return value.isoformat()
        if isinstance(value, bytes):
            return "\\x" + value.hex()
        return _json(value)
    if spark_sql_type.startswith("ARRAY"):
        return list(value)
    if isinstance(value, float) and value != value and spark_sql_type not in ("DOUBLE", "FLOAT"):
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if isinstance(value, Decimal) and not value.is_finite():
        return None
    if spark_sql_type in ("DATE", "TIMESTAMP", "TIMESTAMP_NTZ") and not isinstance(value, (date, datetime)):
        return None  # infinity, BC: text no Python datetime holds
    return value.item() if hasattr(value, "item") and not isinstance(value, (Decimal, datetime)) else value


def _json(value: Any) -> str | None:
    """A cell's value as JSON text (None for NULL): numbers exact, times ISO 8601, bytes as PostgreSQL's
    hex."""
    if _missing(value):
        return None
    if isinstance(value, (pd.Timestamp, datetime, date, time)):
        return json.dumps(value.isoformat())
    if isinstance(value, bytes):
        return json.dumps("\\x" + value.hex())
    if hasattr(value, "item") and not isinstance(value, Decimal):
        value = value.item()
    return json_text(value)


def _column_types(layout: Layout) -> dict[str, str]:
    return {c.name: spark_type(c.kind) for c in layout.columns}


def diff(
    spark: SparkSession, path: str | os.PathLike[str], table: str, t1: TimeLike, t2: TimeLike
) -> DataFrame:
    """:func:`bemi_tt.diff` of ``table`` between ``t1`` and ``t2`` as a Spark DataFrame: the key columns,
    ``column``, ``change``, ``old``/``new`` (JSON text), ``operation``, ``committed_at`` and the context keys
    (JSON text). Spark finds the keys whose row differs between the cuts; only their changes reach the
    driver (at most :data:`DRIVER_LIMIT` keys)."""
    import bemi_tt.timetravel as tt

    source = _source(path)
    name = resolve_table(source, table)
    start, end = to_utc(t1, "t1"), to_utc(t2, "t2")
    if end < start:
        raise ConfigurationError(f"t2 {end.isoformat()} is before t1 {start.isoformat()}: swap them")
    layout = _layout(source, name, end)
    rel = _changes(spark, source, name, _view_name("changes", name))
    keys = tuple(layout.keys)
    same_columns = layout == layout_at(versions_of(source.schemas(name)), start)
    old = present_query(rel, keys, start).sql()
    new = present_query(rel, keys, end).sql()
    # a key whose row comes from the same change at both cuts is unchanged (unless the columns changed)
    differs = "TRUE" if not same_columns else "o.k IS NULL OR n.k IS NULL OR o.cp <> n.cp OR o.o <> n.o"
    touched = spark.sql(
        f"SELECT coalesce(n.k, o.k) AS k FROM ({old}) o FULL OUTER JOIN ({new}) n ON o.k = n.k\n"
        f"WHERE {differs}"
    )
    found = touched.limit(DRIVER_LIMIT + 1).collect()
    if len(found) > DRIVER_LIMIT:
        raise ConfigurationError(
            f"more than DRIVER_LIMIT ({DRIVER_LIMIT}) rows of {name[0]}.{name[1]} differ between t1 and t2: "
            "compare two as_of() DataFrames in Spark instead"
        )
    names = _lineage(spark, rel, layout, {r[0] for r in found})
    answer = tt.diff(
        table=f"{name[0]}.{name[1]}",
        t1=start,
        t2=end,
        source=_deciding(spark, source, name, rel, layout, names),
    )
    frame = answer.reset_index()
    types = {c: t for c, t in _column_types(layout).items() if c in layout.keys}
    types.update({"column": "STRING", "change": "STRING", "operation": "STRING", "committed_at": "TIMESTAMP"})
    return _to_spark(spark, frame, types, {"old", "new"})


def history(spark: SparkSession, path: str | os.PathLike[str], table: str, key: KeyLike) -> DataFrame:
    """:func:`bemi_tt.history` of one row as a Spark DataFrame (key UPDATEs followed): ``operation``,
    ``committed_at``, ``valid_from``/``valid_to``, ``changed`` (array of column names),
    ``commit_position``, ``ordinal``, the row's columns typed like :func:`as_of`, the context keys (JSON
    text). Spark finds the row's changes; the engine orders them into versions."""
    import bemi_tt.timetravel as tt
    from bemi_tt.state import key_text

    source = _source(path)
    name = resolve_table(source, table)
    layout = _layout(source, name, None)
    rel = _changes(spark, source, name, _view_name("changes", name))
    names = _lineage(spark, rel, layout, {key_text(layout, key)})
    frame = tt.history(f"{name[0]}.{name[1]}", key, source=_deciding(spark, source, name, rel, layout, names))
    types = _column_types(layout)
    types.update(
        {
            "committed_at": "TIMESTAMP",
            "valid_from": "TIMESTAMP",
            "valid_to": "TIMESTAMP",
            "changed": "ARRAY<STRING>",
            "commit_position": "BIGINT",
            "ordinal": "INT",
            "operation": "STRING",
        }
    )
    return _to_spark(spark, frame, types, set())
