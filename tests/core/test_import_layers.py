"""The layers of the source (docs/architecture.md section 7), read from the import statements of
every module, function-level imports included: no import circle anywhere, nothing lower importing
anything higher."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("impl_torch", "impl_flax", "impl_keras", "weights_convert")
IMPLEMENTATIONS = ("impl_torch", "impl_flax", "impl_keras")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports(path: Path, name: str, modules: dict) -> set[str]:
    """The project modules that module ``name`` (file ``path``) imports anywhere in its body: for
    ``from a import b``, ``a.b`` where that is a module, else ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports(path, name, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
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
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def offenders(graph, importer_prefixes, imported_prefixes) -> list[str]:
    def under(name, prefixes):
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    return sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        if under(a, importer_prefixes)
        for b in targets
        if under(b, imported_prefixes)
    )


def test_the_graph_is_read(graph):
    """The reader finds the imports it must (else every rule below would hold vacuously)."""
    assert "weights_convert.core.loop" in graph["impl_torch.trainer"]
    assert "impl_keras.runner" in graph["weights_convert.harness.keras_worker"]  # a function-level import


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle(graph):
    assert circles(graph) == []


def test_implementations_never_import_the_harness(graph):
    assert offenders(graph, IMPLEMENTATIONS, ("weights_convert.harness",)) == []


def test_core_and_formats_never_import_an_implementation(graph):
    lower = ("weights_convert.core", "weights_convert.formats")
    assert offenders(graph, lower, IMPLEMENTATIONS) == []


def test_core_imports_nothing_above_it(graph):
    above = ("weights_convert.formats", "weights_convert.harness", "weights_convert.processes")
    assert offenders(graph, ("weights_convert.core",), above) == []


def external_imports(path: Path) -> set[str]:
    """The top-level package of every import of ``path``, function-level ones included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_the_project_never_imports_monai():
    """MONAI is the tests' oracle for its AttentionUnet, not a dependency: reading, converting and
    running a MONAI checkpoint needs none of it."""
    importers = sorted(str(path) for path in module_files().values() if "monai" in external_imports(path))
    assert importers == []
    assert "torch" in external_imports(REPO / "impl_torch" / "monai_model.py")  # the reader sees imports
