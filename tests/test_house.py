"""The house under regression (issue 10): layers import only downwards, no import circles, no module over
400 lines, no client reaching into another module's private names.

Layers: engine <- core (validation, quadrature, dgm, models, equations, fit, metrics, llm) <- domain <-
clients (checks, studies; neither imports the other) <- cli. Imports inside functions count as much as
imports at module level.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "simstudy"
LAYERS = {"engine": 0, "validation": 1, "quadrature": 1, "draws": 1, "dgm": 1, "models": 1, "equations": 1, "fit": 1,
          "metrics": 1, "llm": 1, "domain": 2, "checks": 3, "studies": 3, "cli": 4, "cli_inputs": 4, "cli_export": 4,
          "cli_merge": 4, "cli_plot": 4, "cli_run_control": 4}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) of every import in the file, relative ones resolved."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            for a in node.names:
                target = f"{module}.{a.name}"
                out.append((target, []) if target in MODULES else (module, [a.name]))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                out.append((node.args[0].value, []))
    return [(m, names) for m, names in out if m.startswith("simstudy")]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


EDGES = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "simstudy" and _layer(m) is None] == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_downwards(name):
    if name == "simstudy":  # the package root re-exports the engine lazily
        return
    mine, top = _layer(name), name.split(".")[1]
    bad = []
    for target, _ in EDGES[name]:
        theirs = _layer(target)
        if target == "simstudy" or theirs is None:
            bad.append(target)  # nothing imports the package root (it would import everything above)
        elif theirs > mine or (theirs == mine == 3 and target.split(".")[1] != top):
            bad.append(target)
    assert bad == [], f"{name} imports upwards or sideways: {bad}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_names_across_modules(name):
    """What one module shares with another has a public name (no check reaches into another's privates)."""
    leaks = [f"{module}.{n}" for module, names in EDGES[name] for n in names if n.startswith("_")
             and not n.startswith("__")]
    assert leaks == []


def test_no_import_circles():
    graph = {m: {t for t, _ in EDGES[m] if t in MODULES and t != m and not m.startswith(t + ".")} for m in MODULES}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt):] + [nxt])
                return True
            if nxt not in state and visit(nxt, path + [nxt]):
                return True
        state[node] = 2
        return False

    for m in sorted(graph):
        if m not in state and visit(m, [m]):
            break
    assert cycle == []


def test_no_module_over_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
