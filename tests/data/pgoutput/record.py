"""Regenerate the golden pgoutput fixtures in this directory from a real (embedded) server.

    /tmp/venv/bin/python tests/data/pgoutput/record.py

Each scenario of ``tests/capture/pgoutput_scenarios.py`` becomes ``<name>.hex`` (one message a line,
hex) and an entry of ``manifest.json`` (description, message kinds, server version).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psycopg
from psycopg import sql

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "capture"))

from pgoutput_scenarios import run_all  # noqa: E402

from bemi_tt.embedded import EmbeddedPostgres  # noqa: E402


def main() -> None:
    manifest: dict[str, object] = {}
    with EmbeddedPostgres() as pg:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("golden")))
            version = conn.execute("SHOW server_version").fetchone()
        dsn = psycopg.conninfo.make_conninfo(pg.dsn, dbname="golden")
        fixtures = {}
        for scenario, messages in run_all(dsn):
            (HERE / f"{scenario.name}.hex").write_text("".join(m.hex() + "\n" for m in messages))
            fixtures[scenario.name] = {
                "description": scenario.description,
                "options": scenario.options,
                "kinds": "".join(chr(m[0]) for m in messages),
            }
            print(f"{scenario.name:28} {fixtures[scenario.name]['kinds']}")
        manifest = {
            "server_version": version[0] if version else None,
            "protocol_version": 1,
            "recorded_by": "tests/data/pgoutput/record.py",
            "fixtures": fixtures,
        }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
