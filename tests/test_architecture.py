"""The floors of the house, read from the source: the server stands on the protocol alone,
the client library never reaches the server, the protocol reaches neither, and no two
modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = "blackbox.v1"
# Apps on top of both sides: they start or use the server side in process.
APPS_USING_THE_SERVER = {"blackbox.cli", "blackbox.embedded", "blackbox.export", "blackbox.subspace_fit"}


def modules() -> dict[str, Path]:
    found = {}
    for package in ("blackbox", "backbone_server"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (a package's import is its __init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            candidates = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in known and c != name)
    return found


GRAPH = {name: imports_of(name, path, modules()) for name, path in modules().items()}


def test_the_graph_is_read():
    assert "backbone_server.engine" in GRAPH and "blackbox.v1.wire" in GRAPH["backbone_server.servicer"]


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.startswith("backbone_server")))
def test_the_server_stands_on_the_protocol_alone(name):
    outside = {m for m in GRAPH[name] if m.startswith("blackbox") and not m.startswith(PROTOCOL)}
    assert not outside, f"{name} imports {sorted(outside)} of the client package"


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.startswith(PROTOCOL)))
def test_the_protocol_imports_neither_side(name):
    assert all(m.startswith(PROTOCOL) for m in GRAPH[name]), f"{name} imports {sorted(GRAPH[name])}"


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.startswith("blackbox") and n not in APPS_USING_THE_SERVER))
def test_the_client_library_never_reaches_the_server(name):
    server = {m for m in GRAPH[name] if m.startswith("backbone_server")}
    assert not server, f"{name} imports {sorted(server)}"


def test_no_import_circles():
    seen, on_path, circles = set(), [], []

    def visit(name):
        if name in on_path:
            circles.append(on_path[on_path.index(name):] + [name])
            return
        if name in seen:
            return
        seen.add(name)
        on_path.append(name)
        for other in sorted(GRAPH[name]):
            visit(other)
        on_path.pop()

    for name in sorted(GRAPH):
        visit(name)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
