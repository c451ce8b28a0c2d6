"""``python -m capture --dsn URL [--destination URL] [--once] [--snapshot]``: the worker without the CLI."""

from __future__ import annotations

import argparse
import logging
import sys

from capture.errors import BemiError
from capture.worker import run


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the worker, print its statistics; errors print one line and exit 1."""
    parser = argparse.ArgumentParser(prog="python -m capture", description=__doc__)
    parser.add_argument("--dsn", help="source database (default: BEMI_TT_DSN or DB_HOST/DB_PORT/...)")
    parser.add_argument("--destination", help="database that receives changes (default: the source)")
    parser.add_argument("--once", action="store_true", help="drain what is committed now, then exit")
    parser.add_argument("--snapshot", action="store_true", help="record the current rows again")
    parser.add_argument("--no-snapshot", action="store_true", help="never record the current rows")
    parser.add_argument("--slot", default="bemi_tt")
    parser.add_argument("--publication", default="bemi_tt")
    parser.add_argument("--batch-changes", type=int, default=50_000)
    parser.add_argument("--export-to")
    parser.add_argument("--export-every", type=float, default=60.0)
    parser.add_argument(
        "--reader",
        choices=("stream", "sql"),
        default="stream",
        help="read the slot with the streaming protocol (default) or the SQL functions (fallback)",
    )
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    snapshot = True if args.snapshot else (False if args.no_snapshot else None)
    try:
        stats = run(
            args.dsn,
            destination=args.destination,
            once=args.once,
            snapshot=snapshot,
            slot=args.slot,
            publication=args.publication,
            export_to=args.export_to,
            export_every=args.export_every,
            batch_changes=args.batch_changes,
            reader=args.reader,
        )
    except BemiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
