"""The layout's seams, checked over raycv's own imports (every ``import`` statement, at module level or in a
function): dependencies point one way, from the commands down to storage, and no module imports itself back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import raycv

ROOT = Path(raycv.__file__).parent

# Lower numbers are lower in the stack; a module may import its own layer or lower ones only.
LAYERS = {
    "raycv.errors": 0,
    "raycv.storage": 1,
    "raycv.runtime": 1,
    "raycv.data": 2,
    "raycv.models": 3,
    "raycv.tasks": 4,
    "raycv.outputs": 5,
    "raycv.config": 6,  # validated against the model and task registries; read by pipelines and commands
    "raycv.training": 7,
    "raycv.annotation": 7,
    "raycv.cli": 8,
    "raycv.demo": 8,
    "raycv.submit": 8,
    "raycv": 8,  # the package's public surface
}
SIBLINGS_APART = {("raycv.training", "raycv.annotation"), ("raycv.annotation", "raycv.training")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the raycv modules it imports (``from raycv import x`` counts as raycv.x)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        name, found = _module_name(path), set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "raycv"}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "raycv":
                found |= {
                    f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}") else node.module
                    for a in node.names
                }
        graph[name] = {m for m in found if m != name}
    return graph


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def _unit(module: str) -> str:
    """The layer key of a module: its top-level module or package under raycv."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_every_module_has_a_layer():
    assert {_unit(m) for m in _imports()} <= set(LAYERS)


def test_dependencies_point_down():
    upward = sorted(
        f"{m} imports {dep}"
        for m, deps in _imports().items()
        for dep in deps
        if LAYERS[_unit(dep)] > LAYERS[_unit(m)] or (_unit(m), _unit(dep)) in SIBLINGS_APART
    )
    assert upward == []


def test_no_import_cycles():
    graph = _imports()
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == "open":
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_at_most_eight_top_level_modules_and_none_over_400_lines():
    assert len(list(ROOT.glob("*.py"))) <= 8
    long = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if len(p.read_text().splitlines()) > 400]
    assert long == []
