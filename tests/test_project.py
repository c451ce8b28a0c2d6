"""Project promises: one version, the conda file matches pyproject, the public API is locked, every
command has help and is documented in the README."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_names_every_runtime_dependency() -> None:
    conda_aliases = {"duckdb": "python-duckdb", "psycopg": "psycopg"}
    text = (ROOT / "environment.yml").read_text()
    names = {_name(line.strip().lstrip("- ")) for line in text.splitlines() if line.strip().startswith("- ")}
    for requirement in _pyproject()["project"]["dependencies"]:
        name = _name(requirement)
        assert conda_aliases.get(name, name) in names, f"environment.yml lacks {name}"


def test_version_is_defined_once() -> None:
    import bemi_tt

    assert bemi_tt.__version__ == _pyproject()["project"]["version"]
    pattern = re.compile(r"__version__\s*=\s*['\"]\d")
    hits = [p for p in (ROOT / "bemi_tt").rglob("*.py") if pattern.search(p.read_text())]
    assert hits == []


def test_public_api_is_exactly_this() -> None:
    import bemi_tt

    assert bemi_tt.__all__ == sorted(bemi_tt.__all__)
    assert set(bemi_tt.__all__) == {
        "Bemi", "BemiError", "BemiFastAPIMiddleware", "ChainError", "ConfigurationError", "ConflictError",
        "DecodeError", "EmbeddedPostgres", "Freshness", "InMemorySource", "SlotLostError", "SourceError",
        "StaleWarning", "__version__", "as_of", "audit", "blame", "changes", "configure_context", "connect",
        "context", "diff", "duckdb", "erase", "export_parquet", "freshness", "get_context", "history",
        "install", "plot_activity", "prune", "register_as_of", "restore", "revert", "set_context",
        "uninstall", "verify",
    }
    # Import every submodule first: a submodule named like a public function would shadow it.
    for path in (ROOT / "bemi_tt").glob("*.py"):
        importlib.import_module(f"bemi_tt.{path.stem}" if path.stem != "__init__" else "bemi_tt")
    for name in bemi_tt.__all__:
        value = getattr(bemi_tt, name)
        assert value is not None and not inspect.ismodule(value), name


def test_public_classes_show_bemi_tt_as_their_module() -> None:
    import pickle

    import bemi_tt

    classes = [getattr(bemi_tt, n) for n in bemi_tt.__all__ if isinstance(getattr(bemi_tt, n), type)]
    assert {c.__name__ for c in classes} >= {"InMemorySource", "ConfigurationError", "EmbeddedPostgres"}
    for cls in classes:
        assert cls.__module__ == "bemi_tt", cls
    error = pickle.loads(pickle.dumps(bemi_tt.ConfigurationError("bad value")))
    assert type(error) is bemi_tt.ConfigurationError and str(error) == "bad value"
    assert pickle.loads(pickle.dumps(bemi_tt.InMemorySource())).changes.num_rows == 0


def test_importing_bemi_tt_does_not_import_pandas_or_duckdb() -> None:
    code = "import sys, bemi_tt; print('pandas' in sys.modules, 'duckdb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def _commands() -> list[str]:
    from bemi_tt.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return list(sub.choices)  # type: ignore[arg-type]


def test_cli_has_help_for_every_command_and_option() -> None:
    from bemi_tt.cli import _parser

    sub = next(a for a in _parser()._actions if a.dest == "command")
    for name, command in sub.choices.items():  # type: ignore[union-attr]
        assert command.description, f"bemi-tt {name} has no description"
        for action in command._actions:
            if action.dest != "help":
                assert action.help, f"bemi-tt {name} {action.dest} has no help"


@pytest.mark.parametrize("command", _commands())
def test_every_command_is_documented_in_the_readme(command: str) -> None:
    assert f"bemi-tt {command}" in (ROOT / "README.md").read_text()


def test_cli_help_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "bemi_tt.cli", "demo", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--bindir" in out
