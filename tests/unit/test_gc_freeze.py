"""``sbus serve``'s workers freeze what start-up built once their store is ready, so full
collections stop traversing it; an app built any other way (the tests, an embedding
program) freezes nothing, since a frozen object is never collected."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from sbus import cli
from sbus.api.runtime import runtime_of
from sbus.bootstrap.lifecycle import FrozenOnceReady, StoreLifecycle
from sbus.bootstrap.shutdown import GracefulStop
from tests.api.helpers import running_app


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the frozen objects go back to the collector


async def test_a_serve_worker_freezes_once_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SBUS_STORE", f"sqlite:///{tmp_path / 'sbus.db'}")
    app = cli._factory()
    assert isinstance(app, FastAPI)
    lifecycle = runtime_of(app).lifecycle
    assert isinstance(lifecycle, GracefulStop)
    assert isinstance(lifecycle.inner, FrozenOnceReady)
    assert gc.get_freeze_count() == 0
    async with LifespanManager(app):
        for _ in range(1000):  # the store connects in the background; 10 s at most
            if gc.get_freeze_count():
                break
            await asyncio.sleep(0.01)
        assert runtime_of(app).ready
        # the app, its routes and the imports: tens of thousands of objects
        assert gc.get_freeze_count() > 10_000
        frozen = gc.get_freeze_count()
    # once: stopping freezes nothing more (frozen objects freed by stopping leave the count)
    assert gc.get_freeze_count() <= frozen


async def test_an_app_built_elsewhere_freezes_nothing(tmp_path: Path) -> None:
    async with running_app(store=f"sqlite:///{tmp_path / 'sbus.db'}") as (app, client):
        assert type(runtime_of(app).lifecycle) is StoreLifecycle
        assert (await client.get("/livez")).status_code == 200
    assert gc.get_freeze_count() == 0
