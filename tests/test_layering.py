"""Arrows point down: core/ imports nothing above it, and no module imports itself back through others."""

import ast
from pathlib import Path

import incontext_diffusion

PACKAGE = Path(incontext_diffusion.__file__).parent
# Modules core/ may import besides its own: the base every layer stands on.
CORE_MAY_IMPORT = ("incontext_diffusion.core", "incontext_diffusion.errors", "incontext_diffusion.recipes")
# Cycles their owners are removing (issue 12). An entry that no longer exists fails the test, so this only shrinks.
KNOWN_CYCLES: list[set[str]] = []


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (function-level imports included)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
                targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_sees_relative_and_function_level_imports():
    graph = package_imports()
    assert "incontext_diffusion.core.cache" in graph["incontext_diffusion.core.trainer"]  # from .cache import ... at module level
    assert "incontext_diffusion.heads.tiny_ldm.head" in graph["incontext_diffusion.heads.tiny_ldm.commands"]  # inside functions
    assert "incontext_diffusion.core.tiny" in graph["incontext_diffusion.heads.tiny_ldm.head"]  # from ...core import tiny
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_core_imports_nothing_above_it():
    upward = {(name, target) for name, targets in package_imports().items() if name.startswith("incontext_diffusion.core.")
              for target in targets if not target.startswith(CORE_MAY_IMPORT)}
    assert upward == set()


def test_no_import_cycles():
    found = cycles(package_imports())
    assert [c for c in found if c not in KNOWN_CYCLES] == []
    assert [c for c in KNOWN_CYCLES if c not in found] == [], "a known cycle is gone: remove it from KNOWN_CYCLES"
