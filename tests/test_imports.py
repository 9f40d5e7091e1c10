"""The module graph of dynalign/ (no Ray, no imports executed): every import of a dynalign module,
at module level or inside a function, is an edge; the graph must have no cycle, so that no
module reaches "upward" through a function-local import. The split-up modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "dynalign"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def with_parents(target: str, importer: str, known: dict[str, Path]) -> list[str]:
    """``target`` and the packages above it: importing a submodule runs its package's __init__
    first, unless the importer is inside that package (then the package is already importing)."""
    parts = target.split(".")
    names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [n for n in names if n in known and (n == target or not importer.startswith(n + "."))]


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The dynalign modules ``path`` imports anywhere in the file."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[:len(package) - (node.level - 1)])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            targets = [module]
            # ``from package import submodule`` imports the submodule too
            targets += [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in known]
        for target in targets:
            if target == "dynalign" or target.startswith("dynalign."):
                found.update(with_parents(target, name, known))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, colouring)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_sees_function_local_and_relative_imports(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    fake = tmp_path / "fake.py"  # as if it were dynalign/fake.py
    fake.write_text("import os\n\ndef f():\n    from .judge import jobs\n    from . import stats\n"
                    "    import dynalign.value\n")
    assert imported_modules("dynalign.fake", fake, modules()) == {
        "dynalign", "dynalign.judge", "dynalign.judge.jobs", "dynalign.stats", "dynalign.value"}
    graph = import_graph()
    assert "dynalign.judge" in graph and "dynalign.judge.pool" in graph
    assert "dynalign.config" in graph["dynalign.driver"]
    # a submodule import reaches its package's __init__ too
    assert "dynalign.judge" in graph["dynalign.driver"]


def test_no_import_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_judge_package_never_imports_itself():
    """Submodules of dynalign.judge import their siblings directly, never the package (its
    __init__ re-exports them: that would be a cycle)."""
    graph = import_graph()
    for name, imports in graph.items():
        if name.startswith("dynalign.judge."):
            assert "dynalign.judge" not in imports, f"{name} imports the dynalign.judge package"


def test_split_modules_are_small():
    paths = [*sorted((PACKAGE / "judge").glob("*.py")), PACKAGE / "value.py", PACKAGE / "stats.py"]
    long = {str(p.relative_to(REPO)): n for p in paths if (n := len(p.read_text().splitlines())) >= MAX_LINES}
    assert len(paths) > 3 and not long, f"modules of {MAX_LINES} lines or more: {long}"


def test_no_source_file_is_over_600_lines():
    long = {str(p.relative_to(REPO)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"source files over {MAX_LINES} lines: {long}"
