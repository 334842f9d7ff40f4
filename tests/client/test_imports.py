"""client/ imports one way: no module imports, even lazily, one that imports it back."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter

from tests.client.conftest import REPO


def client_imports() -> dict[str, set[str]]:
    """client module -> the client modules it imports, at the top or inside a function."""
    graph = {}
    for path in sorted((REPO / "client").glob("*.py")):
        name = f"client.{path.stem}"
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "client":  # `from client import commands`
                    found |= {f"client.{alias.name}" for alias in node.names}
                elif node.module.startswith("client."):
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("client.")}
        graph[name] = found & {f"client.{p.stem}" for p in (REPO / "client").glob("*.py")}
    return graph


def test_client_modules_import_one_way():
    graph = client_imports()
    graph.pop("client.__init__")  # the package face re-exports; nothing imports it back
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        raise AssertionError(f"client/ imports in a circle: {e.args[1]}") from None
    assert order.index("client.commands") < order.index("client.cli")
    assert "client.cli" not in graph["client.commands"]
    assert {"client.aio"} <= graph["client.sync"]  # the sync face runs the asyncio one
