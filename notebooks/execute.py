"""Re-execute notebooks in place, so the outputs they store are the ones nbval compares against.

    .venv/bin/python notebooks/execute.py                      # every notebook in this folder
    .venv/bin/python notebooks/execute.py notebooks/02-*.ipynb  # some of them

Each notebook runs top to bottom in a fresh ``python3`` kernel started in the notebook's folder (as nbval
does); a cell that raises stops the run and leaves the file untouched. Cell ids, sources and metadata are
kept; only outputs and execution counts are replaced. Run it after editing a notebook or after a change that
alters what a notebook prints, then check the diff of the stored outputs (``pytest notebooks`` compares
them, with the machine-specific parts masked by ``sanitize.cfg``).
"""

from __future__ import annotations

import queue
import sys
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.manager import start_new_kernel

TIMEOUT = 300  # seconds per cell, as pytest's timeout in pyproject.toml


def _run_cell(client: Any, source: str) -> tuple[list[Any], int | None]:
    """Execute one cell; its outputs as nbformat nodes (consecutive stream text merged) and its count."""
    msg_id = client.execute(source, store_history=True, allow_stdin=False)
    outputs: list[Any] = []
    while True:
        try:
            msg = client.get_iopub_msg(timeout=TIMEOUT)
        except queue.Empty:
            raise RuntimeError(f"a cell ran longer than {TIMEOUT} s:\n{source}") from None
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        if kind == "status" and msg["content"]["execution_state"] == "idle":
            break
        if kind == "stream":
            last = outputs[-1] if outputs else None
            if last is not None and last.output_type == "stream" and last.name == msg["content"]["name"]:
                last.text += msg["content"]["text"]
                continue
        if kind == "error":
            raise RuntimeError("a cell raised:\n" + "\n".join(msg["content"]["traceback"]))
        if kind == "clear_output":
            outputs.clear()
            continue
        if kind in ("stream", "display_data", "execute_result"):
            outputs.append(nbformat.v4.output_from_msg(msg))
    reply = client.get_shell_msg(timeout=TIMEOUT)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = client.get_shell_msg(timeout=TIMEOUT)
    return outputs, reply["content"].get("execution_count")


def execute(path: Path) -> None:
    """Run ``path`` top to bottom in a fresh kernel and write it back with the new outputs."""
    notebook = nbformat.read(path, as_version=4)
    manager, client = start_new_kernel(kernel_name="python3", cwd=str(path.parent.resolve()))
    try:
        for cell in notebook.cells:
            if cell.cell_type != "code":
                continue
            cell.outputs, cell.execution_count = _run_cell(client, cell.source)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    print(f"executed {path}")


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    paths = [Path(a) for a in argv] or sorted(here.glob("*.ipynb"))
    for path in paths:
        execute(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
