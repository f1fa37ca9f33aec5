"""The house's layering, read from the code's own imports (every import statement, lazy ones too):
data flows one way, cli -> pipelines -> calibrate / training / model / checkpoint / evaluate ->
formats / kernels, and no module imports itself back through a circle. docs/architecture.md is the
prose of the table below."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import nvfp4kit

ROOT = Path(nvfp4kit.__file__).parent

# package (or top-level module) -> the nvfp4kit packages it may import. Leaves import none.
ALLOWED = {
    "formats": set(),
    "policy": set(),
    "progress": set(),
    "losses": set(),
    "version": set(),
    "devices": set(),
    "textfiles": set(),
    "scratch": {"progress"},
    "kernels": {"formats", "progress"},
    "api": {"formats", "kernels"},
    "training": {"formats", "kernels", "policy", "progress", "scratch", "textfiles"},
    "checkpoint": {"formats", "kernels", "policy", "progress", "version", "scratch"},
    "model": {"training", "checkpoint", "losses", "progress", "scratch"},
    "calibrate": {"formats", "kernels", "policy", "progress", "losses", "checkpoint", "scratch", "textfiles"},
    "evaluate": {"checkpoint", "losses", "progress"},
    "pipelines": {"api", "calibrate", "checkpoint", "devices", "evaluate", "formats", "losses", "model", "policy",
                  "progress", "training", "scratch"},
    "cli": {"pipelines", "checkpoint", "evaluate", "model", "training", "progress"},
    "__init__": {"api", "checkpoint", "formats", "version"},
}
# optional.py (which extra brings each optional dependency) is a leaf the layers that import one use
ALLOWED["optional"] = set()
for _pkg in ("textfiles", "kernels", "training", "checkpoint", "model", "calibrate", "evaluate", "pipelines", "cli"):
    ALLOWED[_pkg] = ALLOWED[_pkg] | {"optional"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _targets(module: str, node) -> list[str]:
    base = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        prefix = base[: len(base) - (node.level - 1)] if node.level else []
        target = ".".join(prefix + ([node.module] if node.module else []))
        names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
    out = []
    for t in names:
        while t not in MODULES and "." in t:
            t = t.rsplit(".", 1)[0]
        if t.startswith("nvfp4kit") and t != module:
            out.append(t)
    return out


def _edges() -> dict[str, set[str]]:
    edges = defaultdict(set)
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[m].update(_targets(m, node))
    return edges


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_imports_only_the_layers_below_it():
    wrong = []
    for a, targets in _edges().items():
        for b in targets:
            pa, pb = _package(a), _package(b)
            if pa != pb and pb not in ALLOWED[pa]:
                wrong.append(f"{a} -> {b}")
    assert wrong == []
    assert set(ALLOWED) >= {_package(m) for m in MODULES}  # no package outside the table


def test_formats_is_a_leaf_without_io():
    for m, p in MODULES.items():
        if _package(m) != "formats":
            continue
        tree = ast.parse(p.read_text(encoding="utf-8"))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                     and not n.level}
        assert imported <= {"torch", "__future__", "dataclasses", "typing", "functools", "math"}, (m, imported)
        calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert "open" not in calls, m


def test_no_import_circle():
    edges = _edges()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if state.get(v) == 1:
                circles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)
    assert circles == []


def test_the_layer_check_can_fail():
    """The parser sees lazy imports inside functions, and relative imports of every depth."""
    tree = ast.parse("def f():\n    from ..kernels import dispatch\n    import nvfp4kit.training.loop\n")
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    found = {t for n in nodes for t in _targets("nvfp4kit.formats.nvfp4", n)}
    assert found == {"nvfp4kit.kernels.dispatch", "nvfp4kit.training.loop"}
