"""The layers are a contract: cli -> deployments -> flows -> tasks -> mess_ai, arrows pointing down only.

Read from the source (every import, also those inside functions), so a deferred import that goes up a layer or
closes a circle fails here as surely as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Top to bottom: a module may import its own layer and the layers below it.
LAYERS = ("cli", "deployments", "flows", "tasks", "mess_ai")
# The core is pure: no orchestration library either.
CORE_FORBIDDEN = ("prefect",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for layer in LAYERS for path in sorted((REPO / layer).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``path`` imports, as written (``from a.b import c`` is ``a.b.c`` when that is a module of ours,
    else ``a.b``); relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return found


def _layer(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in LAYERS else None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_every_import_points_down_the_layers():
    wrong = []
    for module, imported in _graph().items():
        rank = LAYERS.index(_layer(module))
        for target in imported:
            layer = _layer(target)
            if layer is not None and LAYERS.index(layer) < rank:
                wrong.append(f"{module} imports {target} (layer {layer} is above {_layer(module)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_core_imports_no_orchestration():
    wrong = [f"{module} imports {target}" for module, imported in _graph().items() if _layer(module) == "mess_ai"
             for target in imported if target.split(".")[0] in CORE_FORBIDDEN]
    assert not wrong, "\n".join(sorted(wrong))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_circle_between_files():
    cycles = _cycles(_graph())
    assert not cycles, "\n".join(" <-> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_the_circle_finder_finds_circles(graph, expected):
    assert _cycles(graph) == expected


def test_the_contract_reads_every_layer():
    """A layer folder renamed or emptied would make the tests above pass on nothing."""
    modules = _modules()
    assert {_layer(name) for name in modules} == set(LAYERS)
    assert "cli.main" in modules and "mess_ai.pipeline" in modules
    # It does see a deferred import inside a function body (the CLI starts flows that way).
    assert "flows.extract" in _graph()["cli.main"]
