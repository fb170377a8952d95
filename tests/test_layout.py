"""The shape of server/: no import cycle, the streaming core imports one way, and only one module
touches Hypercorn's and h11's internals."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parent.parent / "server"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SERVER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, *, typing: bool = False) -> set[str]:
    """Every module ``path`` imports at run time, at any depth (with ``typing``, also those of
    its TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node) and not typing:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _graph(*, typing: bool = False) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SERVER.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = _imports(path, typing=typing)
        graph[name] = {m for m in imported if m in modules and m != name and m != "server"}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_cycle_detection_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_server_has_no_import_cycle() -> None:
    assert _cycle(_graph()) is None
    # Not even one that only the type checker follows (app <-> routes once hid behind one).
    assert _cycle(_graph(typing=True)) is None


def test_the_streaming_core_imports_one_way() -> None:
    graph = _graph()
    core = {name: deps for name, deps in graph.items() if name.startswith("server.stream.")}
    assert set(core) == {
        "server.stream.listener",
        "server.stream.subjects",
        "server.stream.relay",
        "server.stream.bus",
        "server.stream.registry",
        "server.stream.mailbox",
        "server.stream.encoder",
        "server.stream.routes",
        "server.stream.session",
        "server.stream.snapshots",
        "server.stream.observe",
    }
    inner = {
        name: {d for d in deps if d.startswith("server.stream")} for name, deps in core.items()
    }
    assert inner["server.stream.listener"] == set()
    # The NATS bus is a second change source beside the listener: the registry never sees it.
    assert inner["server.stream.subjects"] == set()
    assert inner["server.stream.relay"] == {"server.stream.listener", "server.stream.subjects"}
    assert inner["server.stream.bus"] == {
        "server.stream.listener",
        "server.stream.relay",
        "server.stream.subjects",
    }
    assert {name for name, deps in graph.items() if "server.stream.bus" in deps} == {
        "server.app",
        "server.ops",
        "server.cli",
    }
    assert inner["server.stream.registry"] == {"server.stream.mailbox"}
    for leaf in ("mailbox", "encoder", "snapshots", "observe"):
        assert inner[f"server.stream.{leaf}"] == set(), leaf
    assert inner["server.stream.session"] == {
        "server.stream",
        "server.stream.encoder",
        "server.stream.observe",
        "server.stream.registry",
    }
    # Only the routes run a session.
    assert {name for name, deps in graph.items() if "server.stream.session" in deps} == {
        "server.stream.routes"
    }
    # Nothing outside the routes and the app's wiring reaches into the routes.
    users = {name for name, deps in graph.items() if "server.stream.routes" in deps}
    assert users == {"server.app"}


def test_only_the_adapter_imports_hypercorn_or_h11() -> None:
    offenders = []
    for path in SERVER.rglob("*.py"):
        name = _module_name(path)
        foreign = {m for m in _imports(path) if m.split(".")[0] in ("hypercorn", "h11")}
        if foreign and name != "server.hypercorn_internals":
            offenders.append((name, sorted(foreign)))
    assert offenders == []
