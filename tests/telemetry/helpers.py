"""In-process apps for the telemetry tests, served by the lean hot path or by FastAPI's
own handlers (``WireRoute.lean_path``), since every request must be observed alike on
both."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from sbus.api.ignored import WireRoute
from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app
from sbus.config import Settings
from sbus.telemetry.tracing import Tracing

JSON = {"Content-Type": "application/json"}
PATHS = ["lean", "fastapi"]


@contextmanager
def handlers(path: str) -> Iterator[None]:
    """Apps created meanwhile serve the hot routes by ``path`` ("lean" or "fastapi")."""
    WireRoute.lean_path = path == "lean"
    try:
        yield
    finally:
        WireRoute.lean_path = True


def build(path: str, tracing: Tracing | None = None, **settings: Any) -> FastAPI:
    options: dict[str, Any] = {"store": "memory://", "admin_enabled": True} | settings
    with handlers(path):
        return create_app(Settings(**options), tracing=tracing)


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app) as manager:
        for _ in range(500):
            if runtime_of(app).ready:
                break
            await asyncio.sleep(0.01)
        assert runtime_of(app).ready, runtime_of(app).not_ready_reason
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", headers=JSON
        ) as client:
            yield client
