"""The package's import layers (docs/architecture.md, "Layers of the Python package"): cli -> run -> plan ->
config/methods/models/tokenizer -> io -> errors. A module may import its own layer or the layers below, never one
above; imports form no cycle; and no module imports another module's private (``_name``) attribute: a name two
modules need is public in one of them.

Read from the source with ``ast`` (nothing is imported), so an import inside a function counts too: a lazy import
hides a dependency from the import system, not from the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "python" / "ferromerge"

#: module (or package) prefix -> layer; a module belongs to its longest matching prefix. Within a layer imports
#: go either way (no cycles, though); across layers only downwards.
LAYERS: dict[str, int] = {
    "ferromerge._core": 0,
    "ferromerge.errors": 0,
    "ferromerge._engine": 1,
    "ferromerge._validate": 1,
    "ferromerge.progress": 1,
    "ferromerge.io": 2,
    "ferromerge.config": 3,
    "ferromerge.methods": 3,
    "ferromerge.models": 3,
    "ferromerge.tokenizer": 3,
    "ferromerge.torch_spectral": 3,
    "ferromerge.arrays": 3,
    "ferromerge._plan": 4,
    "ferromerge.output_files": 4,
    "ferromerge.model_card": 4,
    "ferromerge.tensors": 4,
    "ferromerge.synth": 4,
    "ferromerge.executors": 4,
    "ferromerge._run": 5,
    "ferromerge._compress": 5,
    "ferromerge._extract_lora": 5,
    "ferromerge.adapters": 5,
    "ferromerge.multi": 5,
    "ferromerge.compat": 5,
    "ferromerge.demo": 6,
    "ferromerge.cli": 7,
    "ferromerge": 8,  # the package's __init__: the public API re-exports everything
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file() \
        or any((PACKAGE.parent / rel.parent).glob(f"{rel.name}.*.so")) or (PACKAGE.parent / rel).with_suffix(".pyi").is_file()


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) of every ferromerge import in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "ferromerge"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "ferromerge":
                target = node.module
            else:
                continue
            for a in node.names:
                if _is_module(f"{target}.{a.name}"):
                    out.append((f"{target}.{a.name}", None, node.lineno))
                else:
                    out.append((target, a.name, node.lineno))
    return out


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
EDGES = {m: _imports(p) for m, p in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        assert _layer(module) is not None


def test_no_upward_imports() -> None:
    upward = [
        f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, edges in EDGES.items()
        for t, _, line in edges
        if _layer(t) > _layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_private_names_imported_from_other_modules() -> None:
    private = [
        f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {m} imports {name} from {t}"
        for m, edges in EDGES.items()
        for t, name, line in edges
        if name is not None and name.startswith("_") and not name.startswith("__") and t != m
    ]
    assert not private, "\n".join(private)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def _graph() -> dict[str, set[str]]:
    """Module -> the modules it imports. Importing from a package counts as importing its ``__init__``, and a
    package's ``__init__`` re-exporting its own modules is how packages work, not a circle: it is left out."""
    graph: dict[str, set[str]] = {}
    for m, edges in EDGES.items():
        for t, _, _ in edges:
            if t in MODULES and t != m and not (MODULES[m].name == "__init__.py" and t.startswith(m + ".")):
                graph.setdefault(m, set()).add(t)
    return graph


def test_no_import_cycles() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("edges", "expected"),
    [({"a": {"b"}, "b": {"c"}}, None), ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"])],
)
def test_cycle_finder(edges: dict[str, set[str]], expected: list[str] | None) -> None:
    assert _cycle(edges) == expected
