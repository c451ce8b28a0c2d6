"""The capture side's layout: which of its modules import which, read from the source with ``ast``.

An import cycle means two modules are one concept split in two (or a leaf that is not one); the export
package is ordered leaf first (``capture.export.layout``), so no cycle may run through it.
"""

from __future__ import annotations

import ast
from pathlib import Path

CAPTURE = Path(__file__).resolve().parents[2] / "capture"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(CAPTURE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(*, inside_functions: bool) -> dict[str, set[str]]:
    """Module → the capture modules it imports (at module level, or anywhere with ``inside_functions``)."""
    modules = {_module_name(p): p for p in CAPTURE.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        nodes = ast.walk(tree) if inside_functions else iter(tree.body)
        for node in nodes:
            if isinstance(node, ast.If):  # TYPE_CHECKING blocks import nothing at run time
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from capture.export import run`` imports the module capture.export.run
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(edges[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_capture_modules_import_each_other_without_a_cycle_at_module_level() -> None:
    assert _cycles(_imports(inside_functions=False)) == []


def test_no_import_cycle_runs_through_the_export_modules_even_inside_functions() -> None:
    cycles = _cycles(_imports(inside_functions=True))
    through_export = [c for c in cycles if any(m.startswith("capture.export") for m in c)]
    assert through_export == []


def test_the_export_layout_is_a_leaf_of_the_export_package() -> None:
    imported = _imports(inside_functions=True)["capture.export.layout"]
    assert not [m for m in imported if m.startswith("capture.export")]


def test_capture_modules_import_each_other_without_a_cycle_even_inside_functions() -> None:
    assert _cycles(_imports(inside_functions=True)) == []
