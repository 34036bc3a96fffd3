"""The shape of the code: no import circle and no file over 450 lines.

The graph is read from the source (``ast``), not by importing it: every ``import`` and
``from ... import`` in ``vllm_early_exit/`` and ``scripts/``, at module level or inside a
function (a deferred import still ties two modules together), is an arrow to the module it
names (``from a.b import c`` points at ``a.b.c`` when that is a module, else at ``a.b``).
Arrows to a package's ``__init__`` that Python adds on the way down are not counted: they
are how packages load, not a dependency one module chose.

Two rules of the layout are checked too: the runtime (``config/``, ``model_executor/``,
``plugin/``) never imports a workflow (``tools/``), and the settings (``config/``) never import
what runs in the forward pass (``model_executor/``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450


def modules() -> dict[str, Path]:
    """Dotted name -> file: the package's modules (``vllm_early_exit.x``) and the scripts' (named
    as they import each other, from ``scripts/``: ``gpu_check``, ``gpu_checks.report``)."""
    found: dict[str, Path] = {}
    for base, folder in ((ROOT, ROOT / "vllm_early_exit"), (ROOT / "scripts", ROOT / "scripts")):
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that ``name`` imports."""
    tree = ast.parse(path.read_text(), str(path))
    targets: set[str] = set()

    def deepest(dotted: str) -> str | None:
        while dotted:
            if dotted in known:
                return dotted
            dotted = dotted.rpartition(".")[0]
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = deepest(alias.name)
                if target:
                    targets.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(name, path)
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                target = deepest(f"{source}.{alias.name}") if f"{source}.{alias.name}" in known else deepest(source)
                if target:
                    targets.add(target)
    targets.discard(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_checker_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_file_over_450_lines():
    long = {
        str(path.relative_to(ROOT)): n
        for path in modules().values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_runtime_never_imports_a_workflow_and_the_settings_never_import_the_model():
    graph = import_graph()
    runtime = ("vllm_early_exit.config", "vllm_early_exit.model_executor", "vllm_early_exit.plugin")
    up = {
        (a, b) for a, targets in graph.items() for b in targets
        if (a.startswith(runtime) and b.startswith("vllm_early_exit.tools"))
        or (a.startswith("vllm_early_exit.config") and b.startswith("vllm_early_exit.model_executor"))
    }
    assert not up, sorted(up)
