"""The package's architecture, read from its imports: layers that only import downwards, no cycle,
and a light ``import smartprune``."""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import smartprune

PACKAGE = Path(smartprune.__file__).parent

# Lowest first. A module may import its own layer or any below it, never one above.
LAYERS = [
    ("errors", "options"),
    ("paths", "device", "files", "hf", "data", "testing", "energy"),
    ("modules",),
    ("adapters",),
    ("methods",),
    ("recipes",),
    ("evaluation",),
    ("compression", "storage", "runtimes"),
    ("training",),
    ("runs",),
    ("reporting",),
    ("cli", "__main__"),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    return {".".join(("smartprune", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every smartprune module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("smartprune"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from smartprune.x import module`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("smartprune"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _room(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def test_every_module_has_a_layer():
    rooms = {_room(m) for m in _modules()} - {"__init__"}
    assert rooms <= set(LAYER), f"modules outside the layer table: {sorted(rooms - set(LAYER))}"


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = [(m, d) for m, deps in _graph().items() if _room(m) != "__init__"
              for d in deps if _room(d) != "__init__" and LAYER[_room(d)] > LAYER[_room(m)]]
    assert not upward, f"imports that run back up: {upward}"


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # A package's __init__ importing its own submodules is how a package hands names on, not a cycle.
    real = [c for c in cycles if not any(a == b.rpartition(".")[0] for a, b in itertools.pairwise(c))]
    assert not real, f"import cycles: {real}"


def test_the_layer_test_sees_an_upward_import(tmp_path):
    """The check above can fail: a module of a low layer that imports a run is reported."""
    low = tmp_path / "m.py"
    low.write_text("from smartprune.runs.compress import compress_model\n")
    assert "smartprune.runs.compress" in _imports(low)
    assert LAYER[_room("smartprune.runs.compress")] > LAYER[_room("smartprune.modules.masked")]


def _modules_after(statement: str, heavy: tuple[str, ...] = ()) -> str:
    """The smartprune upper-layer (and `heavy` top-level) modules a fresh interpreter holds after `statement`."""
    code = (f"import sys, smartprune; {statement}; print([m for m in sys.modules if m.split('.')[0] in {heavy!r} "
            "or m.startswith(('smartprune.training', 'smartprune.reporting', 'smartprune.cli', 'smartprune.runs'))])")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_import_smartprune_is_light():
    assert _modules_after("pass", ("torch", "transformers")) == "[]"


def test_loading_a_compressed_model_needs_no_training_reporting_or_cli():
    assert _modules_after("smartprune.load; smartprune.compress") == "[]"
