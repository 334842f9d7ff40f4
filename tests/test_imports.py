"""Imports go one way (docs/design.md §6): client -> proto only; server -> scheduler, and the
engine's torch-free interface (ipc, launch, logs) and model configs; engine -> scheduler, model;
scheduler and toyworld need no torch; model needs nothing above it.

Checked statically with `ast` over every .py file of each package (imports inside functions
count: they run in the same process), and, for the torch-free packages, by importing them in a
fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = ("client", "engine", "model", "proto", "scheduler", "server", "toyworld", "train")


def _dynamic_import(node: ast.AST) -> str | None:
    """The literal name of an `importlib.import_module("x")` or `__import__("x")` call."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    arg = node.args[0]
    if name in ("import_module", "__import__") and isinstance(arg, ast.Constant):
        return arg.value if isinstance(arg.value, str) else None
    return None


def imported_roots(source: str, package: str) -> dict[str, list[int]]:
    """Top-level module name -> lines importing it, for one file of `package`. A relative
    import stays in the package; a dynamic import with a literal name counts too."""
    roots: dict[str, list[int]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [package if node.level else node.module or ""]
        else:
            dynamic = _dynamic_import(node)
            names = [] if dynamic is None else [dynamic]
        for name in names:
            roots.setdefault(name.split(".")[0], []).append(node.lineno)
    return roots


def violations(package: str, forbidden: set[str]) -> list[str]:
    """`file:line imports root` for every import of a forbidden root in the package."""
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no .py files under {package}/"
    found = []
    for path in files:
        for root, lines in imported_roots(path.read_text(), package).items():
            if root in forbidden:
                found += [f"{path.relative_to(REPO)}:{line} imports {root}" for line in lines]
    return found


def everything_but(*allowed: str) -> set[str]:
    return set(OURS) - set(allowed)


def test_the_import_collector_sees_imports_inside_functions_and_dynamic_ones():
    source = (
        "import os.path\n"
        "from . import sibling\n"
        "def f():\n"
        "    from torch import nn\n"
        "    import importlib\n"
        "    return importlib.import_module('model.dit')\n"
    )
    roots = imported_roots(source, "scheduler")
    assert roots == {"os": [1], "scheduler": [2], "torch": [4], "importlib": [5], "model": [6]}


def test_client_imports_neither_torch_nor_any_server_side_package():
    assert violations("client", everything_but("client", "proto") | {"torch"}) == []


def test_proto_imports_nothing_of_ours_but_itself():
    assert violations("proto", everything_but("proto") | {"torch"}) == []


def test_scheduler_imports_no_torch_and_nothing_of_engine_server_model_or_client():
    assert violations("scheduler", everything_but("scheduler") | {"torch"}) == []


def test_model_imports_nothing_of_the_packages_built_on_it():
    assert violations("model", everything_but("model")) == []


def test_toyworld_imports_no_model_and_no_torch():
    assert violations("toyworld", everything_but("toyworld") | {"torch"}) == []


def test_engine_imports_no_server_and_no_client():
    assert violations("engine", {"server", "client", "train", "toyworld"}) == []


# The server process speaks to the engine process through these torch-free modules, and reads
# model configs to validate requests; nothing else of engine/ or model/ may load in it.
SERVER_MAY_USE = (
    "engine.ipc",
    "engine.launch",
    "engine.logs",
    "engine.snapshot_format",
    "model.config",
)


def imported_modules(source: str) -> dict[str, list[int]]:
    """Dotted module -> lines, `from a import b` counted as `a.b` (b may be a module)."""
    found: dict[str, list[int]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            found.setdefault(name, []).append(node.lineno)
    return found


def test_server_imports_only_the_engines_torch_free_interface_and_model_configs():
    found = []
    for path in sorted((REPO / "server").rglob("*.py")):
        for name, lines in imported_modules(path.read_text()).items():
            root = name.split(".")[0]
            allowed = any(name == m or name.startswith(m + ".") for m in SERVER_MAY_USE)
            if root in {"torch", "engine", "model", "client", "train", "toyworld"} and not allowed:
                found += [f"{path.relative_to(REPO)}:{line} imports {name}" for line in lines]
    assert found == []


def test_importing_every_server_module_loads_no_torch():
    modules = [f"server.{p.stem}" for p in sorted((REPO / "server").glob("*.py"))]
    assert "server.app" in modules and "server.supervisor" in modules
    loaded = loads_in_a_fresh_interpreter(modules)
    assert "torch" not in loaded and "transformers" not in loaded


def loads_in_a_fresh_interpreter(modules: list[str]) -> set[str]:
    """Top-level packages loaded by importing `modules` in a new Python process."""
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_importing_the_client_and_its_cli_loads_no_torch():
    loaded = loads_in_a_fresh_interpreter(["client", "client.cli"])
    assert "client" in loaded
    assert loaded & ({"torch"} | everything_but("client", "proto")) == set()


def test_importing_every_scheduler_module_loads_no_torch():
    modules = [f"scheduler.{p.stem}" for p in sorted((REPO / "scheduler").glob("*.py"))]
    assert "scheduler.scheduler" in modules and "scheduler.__main__" in modules
    loaded = loads_in_a_fresh_interpreter(modules)
    assert loaded & ({"torch"} | everything_but("scheduler")) == set()
