"""``bemi-tt demo``: the whole product on a throwaway PostgreSQL, in a few seconds.

Creates a ``todo`` table, installs tracking, runs a scripted workload with contexts (as in the seed's
example), drains the capture worker once, then prints ``changes``, ``as_of`` at two instants and the diff.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import sqlalchemy as sa

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["run_demo"]

_TODO = sa.Table(
    "todo",
    sa.MetaData(),
    sa.Column("id", sa.Integer, sa.Identity(start=26), primary_key=True),
    sa.Column("task", sa.Text, nullable=False),
    sa.Column("is_completed", sa.Boolean, nullable=False, server_default=sa.false()),
)


def _server_now(engine: sa.Engine) -> datetime:
    with engine.connect() as conn:
        value = conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
    assert isinstance(value, datetime)
    return value


def _workload(engine: sa.Engine) -> tuple[datetime, datetime]:
    """The seed's story: three todos created, one completed, one deleted. Returns two instants."""
    from bemi_tt.context import context

    user = 187234
    with context(user_id=user, endpoint="/todo", method="POST"), engine.begin() as conn:
        for task in ("Sleep", "Eat", "Repeat"):
            conn.execute(_TODO.insert().values(task=task))
    after_create = _server_now(engine)
    with context(user_id=user, endpoint="/todo/complete", method="PUT"), engine.begin() as conn:
        conn.execute(_TODO.update().where(_TODO.c.id == 26).values(is_completed=True))
    with context(user_id=user, endpoint="/todo/27", method="DELETE"), engine.begin() as conn:
        conn.execute(_TODO.delete().where(_TODO.c.id == 27))
    return after_create, _server_now(engine)


def _left_aligned(frame: pd.DataFrame) -> str:
    """A plain text table with left-aligned cells: JSON reads better flush left than pandas' default."""
    cells = [[str(c) for c in frame.columns]]
    cells += [[str(v) for v in row] for row in frame.itertuples(index=False)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(frame.columns))]
    lines = ("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells)
    return "\n".join(lines)


def _heading(out: TextIO, text: str) -> None:
    out.write(f"\n== {text}\n")


def run_demo(*, bindir: str | Path | None = None, out: TextIO = sys.stdout) -> None:
    """Run the tour end to end on an embedded PostgreSQL and print what each stage produced."""
    import pandas as pd

    from bemi_tt.embedded import EmbeddedPostgres
    from bemi_tt.timetravel import as_of, changes, diff
    from bemi_tt.triggers import install
    from capture.worker import run as capture

    with EmbeddedPostgres(bindir=bindir) as pg:
        engine = sa.create_engine(pg.url("postgresql+psycopg"))
        try:
            _TODO.metadata.create_all(engine)
            install(engine)
            capture(pg.dsn, once=True)  # first start: creates the slot; history begins here
            out.write(f"started PostgreSQL ({pg.dsn}); created table todo; installed tracking; "
                      "started capture\n")
            t1, t2 = _workload(engine)
            capture(pg.dsn, once=True)
            _heading(out, "changes (captured from the WAL, with the application's context)")
            feed = changes(source=pg.dsn)
            seed_columns = ["primary_key", "table", "operation", "before", "after", "context", "committed_at"]
            shown = feed[seed_columns].copy()
            for column in ("before", "after", "context"):
                shown[column] = shown[column].map(lambda value: json.dumps(value, default=str))
            with pd.option_context("display.width", 250, "display.max_colwidth", 120,
                                   "display.max_columns", 20):
                out.write(_left_aligned(shown) + "\n")
                _heading(out, f"as_of('todo', {t1.isoformat()})  -- after the three creates")
                out.write(as_of("todo", t1, source=pg.dsn).to_string() + "\n")
                _heading(out, f"as_of('todo', {t2.isoformat()})  -- now")
                out.write(as_of("todo", t2, source=pg.dsn).to_string() + "\n")
                _heading(out, "diff('todo', t1, t2)  -- what changed in between, and who did it")
                out.write(diff("todo", t1, t2, source=pg.dsn).to_string() + "\n")
        finally:
            engine.dispose()
    out.write("\nstopped the embedded PostgreSQL and removed its files\n")
