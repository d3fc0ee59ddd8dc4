"""The API layer never reaches the store: the engine is the only door.

import-linter (``make lint``) keeps sbus.api from importing a store backend, but a router
could still call the store through the engine's ``bus.store`` (typed by the core port),
which no import shows. This test counts such reaches per function; the table is empty and
stays so (a use case that needs the store is a command the engine runs).
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import sbus.api

API = Path(sbus.api.__file__).parent

# (module under sbus/api, function) -> how many times it names the store.
REACHES: dict[tuple[str, str], int] = {}


class _StoreReaches(ast.NodeVisitor):
    """Counts ``<anything>.store`` (but ``settings.store``, the URL) and every read of a
    name ``store``, by enclosing function."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.function = ["<module>"]
        self.found: Counter[tuple[str, str]] = Counter()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.function.append(node.name)
        self.generic_visit(node)
        self.function.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Attribute(self, node: ast.Attribute) -> None:
        owner = node.value
        if node.attr == "store" and not (isinstance(owner, ast.Name) and owner.id == "settings"):
            self.found[(self.module, self.function[-1])] += 1
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id == "store" and isinstance(node.ctx, ast.Load):
            self.found[(self.module, self.function[-1])] += 1


def store_reaches() -> Counter[tuple[str, str]]:
    found: Counter[tuple[str, str]] = Counter()
    for path in sorted(API.rglob("*.py")):
        visitor = _StoreReaches(path.relative_to(API).as_posix())
        visitor.visit(ast.parse(path.read_text(), str(path)))
        found.update(visitor.found)
    return found


def test_the_api_reaches_the_store_only_where_listed() -> None:
    found = store_reaches()
    new = {site: n for site, n in found.items() if n > REACHES.get(site, 0)}
    assert not new, f"new store reaches in sbus.api (route them through the engine): {new}"
    # A reach that went away leaves the table: keep it exact, so it only ever shrinks.
    assert dict(found) == REACHES


def test_the_scan_sees_a_store_reach() -> None:
    source = (
        "async def handler(bus, settings):\n    url = settings.store\n    await bus.store.ping()\n"
    )
    visitor = _StoreReaches("x.py")
    visitor.visit(ast.parse(source))
    assert visitor.found == Counter({("x.py", "handler"): 1})
