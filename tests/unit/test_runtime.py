"""The app serves from one typed runtime (sbus.api.runtime): ``app.state`` holds it and
nothing else, no module reads another ``app.state`` attribute, and sbus.bootstrap's
store lifecycle behind it keeps the graceful start and stop: /livez answers while the
store does not, and shutting down cancels the connect loop and closes the store."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

import sbus
import sbus_client
from sbus import __version__
from sbus.api.runtime import NOT_CONNECTED, Runtime, runtime_of
from sbus.bootstrap import create_app
from sbus.bootstrap.lifecycle import StoreLifecycle
from sbus.config import Settings
from sbus.core.errors import StoreUnavailable
from sbus.storage.memory import MemoryStore

ROOTS = [Path(sbus.__file__).parent, Path(sbus_client.__file__).parent]


def state_names(app: FastAPI) -> set[str]:
    return set(vars(app.state)["_state"])


async def test_app_state_holds_only_the_runtime() -> None:
    app = create_app(Settings(store="memory://"))
    assert state_names(app) == {"runtime"}
    runtime = runtime_of(app)
    assert type(runtime) is Runtime
    assert isinstance(runtime.lifecycle, StoreLifecycle)
    async with LifespanManager(app):
        for _ in range(2000):
            if runtime.ready:
                break
            await asyncio.sleep(0.005)
        assert runtime.ready
        assert state_names(app) == {"runtime"}
    assert state_names(app) == {"runtime"}


class _StateReads(ast.NodeVisitor):
    def __init__(self) -> None:
        self.found: list[str] = []

    def visit_Attribute(self, node: ast.Attribute) -> None:
        owner = node.value
        if isinstance(owner, ast.Attribute) and owner.attr == "state" and node.attr != "runtime":
            self.found.append(f"{ast.unparse(node)} (line {node.lineno})")
        self.generic_visit(node)


def test_no_module_uses_another_app_state_attribute() -> None:
    found = []
    for root in ROOTS:
        for path in sorted(root.rglob("*.py")):
            visitor = _StateReads()
            visitor.visit(ast.parse(path.read_text(), str(path)))
            found += [f"{path.name}: {site}" for site in visitor.found]
    assert found == []


def test_the_scan_sees_a_state_read() -> None:
    visitor = _StateReads()
    visitor.visit(ast.parse("a = request.app.state.bus\nb = app.state.runtime.ready\n"))
    assert visitor.found == ["request.app.state.bus (line 1)"]


class UnreachableStore(MemoryStore):
    """A store that never answers; says when it was first asked and when closed."""

    def __init__(self) -> None:
        super().__init__()
        self.tried = asyncio.Event()
        self.closed = False

    async def start(self) -> None:
        self.tried.set()
        raise StoreUnavailable("connection refused (test)")

    async def close(self) -> None:
        self.closed = True
        await super().close()


async def test_serves_livez_before_the_store_answers_and_stops_cleanly() -> None:
    store = UnreachableStore()
    app = create_app(Settings(store="memory://"), store=store)
    runtime = runtime_of(app)
    assert (runtime.ready, runtime.not_ready_reason) == (False, NOT_CONNECTED)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            await store.tried.wait()
            assert (await c.get("/livez")).status_code == 200
            resp = await c.get("/admin/health")
            assert (resp.status_code, resp.json()) == (
                503,
                {
                    "status": "not_ready",
                    "version": __version__,
                    "reason": "connection refused (test)",
                },
            )
            resp = await c.get("/shards")
            assert (resp.status_code, resp.json()["error"]) == (503, "StoreUnavailable")
    # The lifespan's exit cancelled the retry loop (it would retry for ever) and closed
    # the store.
    assert store.closed
    assert runtime.ready is False
