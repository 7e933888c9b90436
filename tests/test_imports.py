"""The layering holds: no import cycle anywhere in the three packages (lazy imports inside
functions included), arrows point down (tools -> lite_server -> edge_client, never back), the
phone's package imports nothing of the server side, and each package keeps its top small."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edge_client", "lite_server", "tools")
#: Which of our packages each may import: the arrows point down.
ALLOWED = {"edge_client": {"edge_client"}, "lite_server": {"edge_client", "lite_server"},
           "tools": {"edge_client", "lite_server", "tools"}}
SERVER_SIDE = ("lite_server", "tools", "flask", "sklearn", "scipy", "waitress", "ray")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
            if p.stem != "__main__"}


def _imports(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports at run time (``if TYPE_CHECKING:`` blocks left out),
    and for ``from X import y`` also ``X.y`` (which is a module when y is one)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and "TYPE_CHECKING" in ast.unparse(block.test) for stmt in block.body for node in ast.walk(stmt)}
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    # a package's __init__ is imported on the way to its modules, but that is no arrow of the code's
    return {name: {m for m in _imports(path, name) if m in modules and m != name
                   and not name.startswith(m + ".")} for name, path in modules.items()}


def test_no_import_cycle_anywhere() -> None:
    graph = _graph()
    assert "edge_client.dummies.generator" not in graph["edge_client.dummies.scheduler"]  # given its generator
    assert "edge_client.dummies.plans" in graph["edge_client.dummies.scheduler"]
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


def test_arrows_point_down() -> None:
    for name, targets in _graph().items():
        upward = {t for t in targets if t.split(".")[0] not in ALLOWED[name.split(".")[0]]}
        assert not upward, f"{name} imports upward: {upward}"


def test_edge_client_never_imports_the_server_side() -> None:
    for name, path in _modules().items():
        if name.startswith("edge_client"):
            bad = {m for m in _imports(path, name) if m.split(".")[0] in SERVER_SIDE}
            assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_shows_its_architecture(package: str) -> None:
    top = [p for p in (ROOT / package).glob("*.py") if p.stem not in ("__init__", "__main__")]
    subpackages = [p for p in (ROOT / package).iterdir() if (p / "__init__.py").is_file()]
    assert len(top) <= 12, f"{package} has {len(top)} modules at its top"
    assert len(subpackages) >= 2, f"{package} has {len(subpackages)} sub-packages"
