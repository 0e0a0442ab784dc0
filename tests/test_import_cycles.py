"""No import cycles between the modules of ow_prefect/ and flows/, read statically from their source.

Every import that runs counts, at the top of a module or deferred into a function: a deferred import hides a
cycle from Python's import machinery, not from a reader (two modules that need each other are one concern in two
files). Imports under ``if TYPE_CHECKING:`` never run (annotations name a class, e.g. a resource's client) and
are not counted. A package's `__init__` is not counted as imported by its submodules (Python runs it first, but
that is not a dependency of the submodule's code)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ow_prefect", "flows")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ours that the module `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in _running(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {target for target in targets if target in known and target != name}


def _running(tree: ast.AST):
    """Every node of `tree` but what is under ``if TYPE_CHECKING:`` (its ``else:`` runs)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield child
                yield from _running(child)
            continue
        yield node
        yield from _running(node)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def test_no_import_cycles():
    graph = import_graph()
    unknown = cycles(graph)
    described = ["\n".join(f"  {m} -> {sorted(graph[m] & set(c))}" for m in c) for c in unknown]
    assert unknown == [], "import cycles (move what both sides need into a leaf module):\n" + "\n\n".join(described)


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}, "g": set()}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["e", "f"]]


def test_deferred_imports_count(tmp_path):
    known = {"pkg.one": tmp_path / "one.py", "pkg.two": tmp_path / "two.py"}
    known["pkg.one"].write_text("def f():\n    from pkg.two import g\n")
    known["pkg.two"].write_text("from pkg import one\n")
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert cycles(graph) == [["pkg.one", "pkg.two"]]


def test_type_checking_imports_do_not_count(tmp_path):
    known = {"pkg.one": tmp_path / "one.py", "pkg.two": tmp_path / "two.py"}
    known["pkg.one"].write_text(
        "import typing\nif typing.TYPE_CHECKING:\n    from pkg.two import g\nelse:\n    g = 1\n"
    )
    known["pkg.two"].write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    pass\nelse:\n    import pkg.one\n"
    )
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert graph == {"pkg.one": set(), "pkg.two": {"pkg.one"}}


def test_the_client_resources_and_run_log_import_no_client_module_above_them():
    """ow_prefect/client/: `_client` builds the resources, the resources use the leaf modules (`_loop`,
    `_queries`, `_logs`), never `_client` (their annotations name it under TYPE_CHECKING only)."""
    graph = import_graph()
    for resource in ("api", "files", "jobs", "runs", "_loop", "_queries", "_logs"):
        assert "ow_prefect.client._client" not in graph[f"ow_prefect.client.{resource}"], resource
    assert {"ow_prefect.client.jobs", "ow_prefect.client.api"} <= graph["ow_prefect.client._client"]
