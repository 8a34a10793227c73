"""The layers of the design ("the folder list is the architecture"), checked from the source.

Every import in autometa/ (module-level, function-level and TYPE_CHECKING ones, relative ones
resolved) is an edge of the import graph. An edge may stay within a layer or go down, never
up, and the graph has no cycle, so no function-level import can be hiding one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "autometa"
BUILTINS = ROOT / "plugins" / "autometa_builtins"

# Bottom to top. The plugin contract is every module directly in autometa/; the facade
# (autometa/__init__.py, lazy) is the top.
LAYERS = ["contract", "data", "store", "results", "study", "cli", "facade"]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources(folder: Path) -> dict[str, Path]:
    """The modules of the package ``folder`` (files in folders without ``__init__.py``, such as
    the scaffold's templates, are data)."""
    return {module_name(p, folder.parent): p for p in sorted(folder.rglob("*.py")) if (p.parent / "__init__.py").exists()}


MODULES = sources(PACKAGE)


def layer(module: str) -> str:
    parts = module.split(".")
    if parts == ["autometa"]:
        return "facade"
    if len(parts) == 2 and f"autometa.{parts[1]}" in MODULES and not (PACKAGE / parts[1]).is_dir():
        return "contract"
    return parts[1]


def imports(module: str, path: Path) -> list[tuple[str, int]]:
    """Every autometa module ``module`` imports, with the line, anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                found.append((submodule if submodule in MODULES else origin, node.lineno))
    return [(name, line) for name, line in found if name == "autometa" or name.startswith("autometa.")]


def graph() -> dict[str, list[tuple[str, int]]]:
    return {module: [(t, line) for t, line in imports(module, path) if t != module] for module, path in MODULES.items()}


def test_the_layers_are_the_folders():
    assert {layer(m) for m in MODULES} == set(LAYERS)
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(LAYERS) - {
        "contract", "facade"}


def test_every_import_goes_down_or_stays_in_its_layer():
    climbing = [
        f"{MODULES[source].relative_to(ROOT)}:{line}: {source} ({layer(source)}) imports {target} ({layer(target)})"
        for source, targets in graph().items()
        for target, line in targets
        if target in MODULES and LAYERS.index(layer(target)) > LAYERS.index(layer(source))
    ]
    assert not climbing, "imports that climb a layer:\n" + "\n".join(climbing)


def test_every_import_names_an_existing_module():
    unknown = [(s, t) for s, targets in graph().items() for t, _ in targets if t not in MODULES]
    assert not unknown


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in edges.get(node, []):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None


def test_no_import_cycle():
    cycle = find_cycle({source: [t for t, _ in targets] for source, targets in graph().items()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_builtin_plugin_uses_only_the_plugin_contract():
    outside = []
    for path in sorted(BUILTINS.rglob("*.py")):
        for target, line in _builtin_imports(path):
            if target == "autometa" or layer(target) != "contract":
                outside.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert not outside, "the built-in plugin imports beyond the plugin contract:\n" + "\n".join(outside)


def _builtin_imports(path: Path) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found += [(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module, node.lineno)
                      for a in node.names]
    return [(n, line) for n, line in found if n == "autometa" or n.startswith("autometa.")]


@pytest.mark.parametrize("command", [["--help"], ["db", "--help"], ["db", "studies", "--help"]])
def test_light_commands_import_no_torch(command):
    """`autometa --help` and the db commands start without torch, pandas or the plugin registry."""
    code = (
        "import sys\n"
        "from autometa.cli.main import main\n"
        f"sys.argv = ['autometa', *{command!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'pandas', 'sklearn', 'matplotlib') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-2000:]
