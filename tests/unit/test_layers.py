"""The package's house rules (docs/development.md), kept by reading every ``import`` of ``moekit/``.

Imports inside functions count as much as those at the top of a module: a lazy import is still a
dependency, it only runs later. The rules:

- layers: a module imports only modules of its own layer or of a lower one (:data:`LAYERS`);
- no import cycle between modules, lazy imports included;
- small pieces: no file over 400 lines, no function body over 60 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "moekit"

# (module prefix, layer): a module is in the layer of the longest prefix that names it.
LAYERS: list[tuple[str, int]] = [
    ("moekit.cli", 6),
    ("moekit.__main__", 6),
    ("moekit.commands", 5),
    ("moekit.steps", 4),
    ("moekit.train", 3),
    ("moekit.report", 3),
    ("moekit.recipe", 2),
    ("moekit.launch_spec", 2),
    ("moekit.cluster", 2),
    ("moekit.config", 2),
    ("moekit.manifest", 2),
    ("moekit.provenance", 2),
    ("moekit.models", 2),
    ("moekit.inspection", 2),
    ("moekit.routing", 2),
    ("moekit.data", 2),
    ("moekit.tasks", 2),
    ("moekit.harness_tasks", 2),
    ("moekit.builtin_data", 2),
    ("moekit.tiny", 2),
    ("moekit.progress", 2),
    ("moekit.devices", 2),
    ("moekit.arch", 1),
    ("moekit.modeling", 0),
    ("moekit.io", 0),
    ("moekit.errors", 0),
    ("moekit", 0),  # the package's __init__ only (not a prefix: every module must be listed)
]
# Pairs of one layer that must not depend on each other either way.
INDEPENDENT = [("moekit.train", "moekit.report")]
MAX_FILE_LINES = 400
MAX_FUNCTION_BODY_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _lazy_exports(package: Path) -> dict[str, str]:
    """name -> submodule for a package whose ``__init__`` exports names lazily through an ``_EXPORTS`` literal."""
    init = package / "__init__.py"
    for node in ast.parse(init.read_text()).body if init.is_file() else []:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            exports = ast.literal_eval(node.value)
            return {name: module for module, names in exports.items() for name in names}
    return {}


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every moekit module ``module`` imports, at any depth of its code (lazy imports included)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from package, up level - 1 packages
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            lazy = _lazy_exports(known[base].parent) if base in known and known[base].name == "__init__.py" else {}
            for alias in node.names:
                if f"{base}.{alias.name}" in known:  # a submodule
                    found.add(f"{base}.{alias.name}")
                elif alias.name in lazy:
                    found.add(f"{base}.{lazy[alias.name]}")
                else:
                    found.add(base)
    return {name for name in found if name in known and name != module}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imports_of(module, path, known) for module, path in known.items()}


def layer_of(module: str) -> int:
    matches = [
        (len(prefix), layer)
        for prefix, layer in LAYERS
        if module == prefix or (prefix != "moekit" and module.startswith(prefix + "."))
    ]
    assert matches, f"{module} is in no layer: add it to LAYERS (and docs/development.md)"
    return max(matches)[1]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a higher layer, or across an independent pair."""
    found = [
        f"{a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)})"
        for a, targets in graph.items()
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    for one, other in INDEPENDENT:
        found += [
            f"{a} -> {b} (independent packages)"
            for a, targets in graph.items()
            for b in sorted(targets)
            if (a.startswith(one) and b.startswith(other)) or (a.startswith(other) and b.startswith(one))
        ]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
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


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_no_module_imports_a_higher_layer():
    assert layer_violations(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_a_wrong_import_is_caught():
    """The checks above can fail: an io module importing a step, and a pair importing each other."""
    graph = import_graph()
    graph["moekit.io.atomic"] = graph["moekit.io.atomic"] | {"moekit.steps.mix.build"}
    assert layer_violations(graph) == ["moekit.io.atomic (layer 0) -> moekit.steps.mix.build (layer 4)"]
    graph = import_graph()
    graph["moekit.manifest"] = graph["moekit.manifest"] | {"moekit.provenance"}
    assert cycles(graph) == [["moekit.manifest", "moekit.provenance"]]


def _function_body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body, without its signature and docstring."""
    body = node.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(getattr(body[0], "value", None), ast.Constant)
        and len(body) > 1
    ):
        body = body[1:]
    return node.end_lineno - body[0].lineno + 1


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_and_functions_stay_small(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_FILE_LINES, f"{path} has over {MAX_FILE_LINES} lines: split it by concern"
    long = [
        f"{node.name} ({_function_body_lines(node)} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and _function_body_lines(node) > MAX_FUNCTION_BODY_LINES
    ]
    assert long == [], f"{path}: function bodies over {MAX_FUNCTION_BODY_LINES} lines: {long}"
