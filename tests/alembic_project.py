"""A throwaway Alembic project for tests: one ``env.py`` that runs online or offline on a given URL."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

from alembic.config import Config

ENV = '''
from alembic import context
from sqlalchemy import create_engine

url = context.config.attributes["url"]
if context.is_offline_mode():
    context.configure(url=url, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
'''


def alembic_project(root: Path, url: object, migrations: Mapping[str, str]) -> Config:
    """Write ``env.py`` and ``versions/<name>.py`` for each migration under ``root``; its Config."""
    (root / "versions").mkdir(parents=True)
    (root / "env.py").write_text(ENV)
    for name, text in migrations.items():
        (root / "versions" / f"{name}.py").write_text(textwrap.dedent(text))
    config = Config()
    config.set_main_option("script_location", str(root))
    config.attributes["url"] = url
    return config
