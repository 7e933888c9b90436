"""The phone's package keeps its layering: no import cycle between its modules
(lazy imports inside functions included), and nothing from the server side."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edge_client"
SERVER_SIDE = ("lite_server", "tools", "flask", "sklearn", "waitress")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports at run time (``if TYPE_CHECKING:`` blocks left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and "TYPE_CHECKING" in ast.unparse(block.test) for stmt in block.body for node in ast.walk(stmt)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "edge_client." + (node.module or "") if node.level else node.module or ""
            names.add(base.rstrip("."))
            if node.level and not node.module:
                names.update(f"edge_client.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = {f"edge_client.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_edge_client_modules_import_no_cycle() -> None:
    graph = _graph()
    assert "edge_client.dummies" not in graph["edge_client.scheduler"]  # the scheduler is given its generator
    assert "edge_client.plans" in graph["edge_client.scheduler"] and "edge_client.plans" in graph["edge_client.dummies"]
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(path + [name, nxt])}"
            if nxt not in state:
                visit(nxt, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_edge_client_never_imports_the_server_side() -> None:
    for path in PACKAGE.glob("*.py"):
        bad = {m for m in _imports(path) if m.split(".")[0] in SERVER_SIDE}
        assert not bad, f"{path.name} imports {bad}"
