"""The package's modules import alone, and their imports form no cycle.

Two checks that fail differently: importing each module in a fresh interpreter
finds a module that works only when something else was imported first (or a
cycle that bites at import time); walking the import graph from the source
finds every cycle, including those hidden in function-level imports that
happen to run late today.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ramp_dispatcher

PACKAGE = "ramp_dispatcher"
ROOT = Path(ramp_dispatcher.__file__).parent
#: modules (and their submodules) that need an optional extra
OPTIONAL_EXTRAS = {
    f"{PACKAGE}.workers.aws": ("boto3", "paramiko"),
}
#: scripts Alembic loads itself, in its own context: not importable alone
ALEMBIC_SCRIPTS = (f"{PACKAGE}.migrations.env", f"{PACKAGE}.migrations.versions")


def module_name(path: Path, root: Path = ROOT, package: str = PACKAGE) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def package_modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that runs (top level or in a function), not the
    ones under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (resolved to existing modules)."""
    modules = package_modules(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = here
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # ``from . import x``: x is a module (the package itself was
                # imported before this module anyway), else a name of ``base``
                names = [f"{base}.{alias.name}" for alias in node.names]
                targets = [n for n in names if n in modules]
                if len(targets) < len(names):
                    targets.append(base)
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_among_the_packages_modules() -> None:
    graph = import_graph()
    assert graph[f"{PACKAGE}.config"], "the graph walk found no import of config.py at all"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_walk_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    """The checker itself can fail: a small package with the cycles we removed."""
    pkg = tmp_path / "pkg"
    (pkg / "workers").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text(
        "from .configfile import Section\n\ndef load():\n    from .workers import reg\n"
    )
    (pkg / "configfile.py").write_text("from typing import TYPE_CHECKING\n"
                                       "if TYPE_CHECKING:\n    from . import config\n")
    (pkg / "workers" / "__init__.py").write_text("")
    (pkg / "workers" / "reg.py").write_text("def f():\n    from .. import config\n")
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.configfile"] == set()  # TYPE_CHECKING imports do not count
    assert find_cycle(graph) == ["pkg.config", "pkg.workers.reg", "pkg.config"]
    (pkg / "workers" / "reg.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(pkg, "pkg")) is None


def _importable_alone() -> list[str]:
    return [m for m in sorted(package_modules()) if not m.startswith(ALEMBIC_SCRIPTS)]


def _missing_extra(module: str) -> str | None:
    for owner, requirements in OPTIONAL_EXTRAS.items():
        if module == owner or module.startswith(owner + "."):
            for requirement in requirements:
                try:
                    __import__(requirement)
                except ImportError:
                    return requirement
    return None


# One fresh interpreter; before each module every module of the package is
# dropped from sys.modules, so each is imported alone (third-party modules
# stay loaded: they are not what this checks, and it keeps this test fast).
_IMPORT_EACH = r"""
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "{pkg}" or m.startswith("{pkg}.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failed.append(name + ":\n" + traceback.format_exc(limit=-3))
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_each_module_imports_alone() -> None:
    modules = [m for m in _importable_alone() if _missing_extra(m) is None]
    assert f"{PACKAGE}.workers.conda" in modules and f"{PACKAGE}.config" in modules
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH.replace("{pkg}", PACKAGE), *modules],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"modules that do not import alone:\n{proc.stdout}{proc.stderr}"


def test_importing_the_workers_package_loads_no_worker_type() -> None:
    """The registry imports worker types lazily: the package alone stays cheap."""
    code = (
        "import sys, ramp_dispatcher.workers\n"
        "heavy = [m for m in ('ramp_dispatcher.workers.conda', 'ramp_dispatcher.workers.aws',"
        " 'ramp_dispatcher.config', 'yaml', 'sqlalchemy', 'boto3') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
