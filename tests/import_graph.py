"""Who imports whom, read from the source with :mod:`ast` (nothing is imported to find out).

The architecture tests use it: the guest agent may depend only on the shared part of the tree
(``vmcloud.words``, ``vmcloud.stomp`` and generic helpers), and no module may sit on an import cycle.
Reading the source instead of ``sys.modules`` means a test sees an import that its own run never
executed, and sees it without the side effects of importing.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules(package: str, root: Path = ROOT) -> dict[str, Path]:
    """Every module of ``package`` (a top-level directory of ``root``), by dotted name."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _statements(body: list[ast.stmt], module_level: bool) -> Iterator[ast.stmt]:
    """The import statements of a body: at module level or anywhere.

    Module level includes ``if TYPE_CHECKING:``: an import kept only for the type checker still
    ties the two modules together for a reader and for mypy.
    """
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif not module_level:
            for child in ast.walk(node):
                if isinstance(child, ast.Import | ast.ImportFrom):
                    yield child
        elif isinstance(node, ast.If):
            yield from _statements(node.body, module_level)
            yield from _statements(node.orelse, module_level)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _statements(block, module_level)


def imports(name: str, path: Path, known: set[str], *, module_level: bool = True) -> set[str]:
    """The dotted names ``name`` imports; ``from a import b`` names ``a.b`` when that is a module.

    ``module_level`` keeps to the module's own body (including ``if``/``try`` blocks there, not
    functions or classes); otherwise every import statement counts.
    """
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _statements(tree.body, module_level):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        for alias in node.names:
            child = f"{source}.{alias.name}"
            found.add(child if child in known else source)
    return found


def graph(package: str, *, module_level: bool = True) -> dict[str, set[str]]:
    """Each module of ``package`` with the modules of ``package`` it imports."""
    found = modules(package)
    known = set(found)
    return {
        name: {i for i in imports(name, path, known, module_level=module_level) if i in known}
        for name, path in found.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(start: str) -> None:
        # Tarjan's algorithm, iterative so a deep graph cannot hit the recursion limit.
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
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
                    if len(component) > 1 or node in edges.get(node, ()):
                        found.append(sorted(component))

    for name in sorted(edges):
        if name not in index:
            visit(name)
    return found
