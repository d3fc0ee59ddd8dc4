"""Open mode signs with a key of its own when none is configured (docs/security.md):
the store keeps one HS256 secret for every replica of the deployment (SQLite in a file
beside the database, PostgreSQL and Redis in the store, memory per process), so a
default server issues mandates and tokens instead of answering 503, and a mandate
issued by one replica is consumed through another. Token mode never uses it."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app, startup_problem
from sbus.bootstrap.lifecycle import StoreLifecycle
from sbus.config import Settings
from sbus.security import KeyConfigError
from sbus.security.keys import KeySet
from sbus.security.mandates import Mandates
from sbus.storage.memory import MemoryStore
from tests.api.helpers import ok, problem
from tests.conftest import JSON, AppFactory

SHARED = ["sqlite", "postgres", "redis"]
CONTEXT = {"order": 7}


async def guarded(c: httpx.AsyncClient, key: str = "pay") -> None:
    body = {"key": key, "content": "v0", "policy": {"require_mandate": True}}
    ok(await c.post("/shard", json=body), 201)


async def issue(c: httpx.AsyncClient, **extra: Any) -> dict[str, Any]:
    body = {"agent_id": "G", "holder": "A", "keys": ["pay"], "context": CONTEXT, "ttl_s": 60}
    return ok(await c.post("/mandates", json={**body, **extra}), 201)


def keys_from_store(app: FastAPI) -> bool:
    lifecycle = runtime_of(app).lifecycle
    assert isinstance(lifecycle, StoreLifecycle)
    return lifecycle.keys_from_store


def signing_keys(app: FastAPI) -> KeySet:
    mandates = runtime_of(app).bus.mandates
    assert isinstance(mandates, Mandates)
    return mandates.keys


def paid(mandate: str, version: int = 0) -> dict[str, Any]:
    return {
        "agent_id": "A",
        "key": "pay",
        "expected_version": version,
        "delta": "paid",
        "mandate": mandate,
        "context": CONTEXT,
    }


async def test_a_default_open_mode_server_issues_and_consumes_mandates(
    make_client: AppFactory,
) -> None:
    app, c = await make_client()
    assert keys_from_store(app) is True
    await guarded(c)
    m = await issue(c)
    assert ok(await c.post("/commit/v2", json=paid(m["mandate"])))["new_version"] == 1
    body = problem(await c.post("/commit/v2", json=paid(m["mandate"], 1)), 409, "MandateConsumed")
    assert body["jti"] == m["jti"]
    scopes = [{"pattern": "**", "rights": ["read"]}]
    issued = ok(
        await c.post("/admin/tokens", json={"agent": "A", "scopes": scopes, "ttl_s": 60}), 201
    )
    assert issued["claims"]["sub"] == "A"


@pytest.mark.parametrize("store_kind", SHARED, indirect=True)
async def test_replicas_over_one_store_share_the_key(make_client: AppFactory) -> None:
    """Two replicas over one store; the second connects after an /admin/reset, which
    keeps the key as it keeps revocations."""
    first, a = await make_client()
    await guarded(a)
    m = await issue(a)
    ok(await a.post("/admin/reset"))
    second, b = await make_client()
    assert signing_keys(first).signing_kid == signing_keys(second).signing_kid
    await guarded(b)
    assert ok(await b.post("/commit/v2", json=paid(m["mandate"])))["new_version"] == 1
    problem(await a.post("/commit/v2", json=paid(m["mandate"], 1)), 409, "MandateConsumed")
    # and the other way round
    m = await issue(b)
    assert ok(await a.post("/commit/v2", json=paid(m["mandate"], 1)))["new_version"] == 2


async def test_a_mandate_issued_before_a_reset_verifies_after_it(make_client: AppFactory) -> None:
    _, c = await make_client()
    await guarded(c)
    m = await issue(c)
    ok(await c.post("/admin/reset"))
    await guarded(c)
    assert ok(await c.post("/commit/v2", json=paid(m["mandate"])))["new_version"] == 1


@pytest.mark.parametrize("store_kind", ["sqlite"], indirect=True)
async def test_the_sqlite_key_file_is_private(make_client: AppFactory, tmp_path: Path) -> None:
    app, _ = await make_client()
    path = tmp_path / "sbus.db.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bytes.fromhex(path.read_text()) == signing_keys(app).signing


@pytest.mark.parametrize("store_kind", ["memory"], indirect=True)
async def test_memory_keeps_a_key_per_process(make_client: AppFactory) -> None:
    first, _ = await make_client()
    second, _ = await make_client()
    assert signing_keys(first).signing_kid != signing_keys(second).signing_kid


@pytest.mark.parametrize("store_kind", ["sqlite"], indirect=True)
async def test_token_mode_keeps_its_configured_key(make_client: AppFactory, tmp_path: Path) -> None:
    """The store's secret is for open mode only: token mode signs with SBUS_SECRET and
    never makes one; open mode with a configured key uses that key."""
    secret = "k" * 32
    token_app, _ = await make_client(auth="token", secret=secret)
    assert keys_from_store(token_app) is False
    open_app, _ = await make_client(secret=secret)
    assert keys_from_store(open_app) is False
    assert not (tmp_path / "sbus.db.key").exists()
    kid = signing_keys(token_app).signing_kid
    assert signing_keys(open_app).signing_kid == kid


def test_token_mode_without_a_key_still_refuses_to_start() -> None:
    settings = Settings(auth="token", store="memory://")
    problem_text = startup_problem(settings)
    assert problem_text is not None
    for name in ("SBUS_SIGNING_KEY", "SBUS_VERIFY_KEY", "SBUS_SECRET"):
        assert name in problem_text
    with pytest.raises(KeyConfigError):
        create_app(settings)


class SlowSecretStore(MemoryStore):
    """A store whose open-mode secret is not there until the test lets it be."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def open_mode_secret(self, candidate: bytes) -> bytes:
        await self.release.wait()
        return await super().open_mode_secret(candidate)


async def test_not_ready_until_the_key_is_obtained() -> None:
    store = SlowSecretStore()
    app = create_app(Settings(store="memory://", admin_enabled=True), store=store)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", headers=JSON
        ) as c:
            body = {"agent_id": "G", "holder": "A", "keys": ["pay"], "ttl_s": 60}
            r = await c.post("/mandates", json=body)
            assert problem(r, 503, "StoreUnavailable")["outcome"] == "not_applied"
            assert (await c.get("/admin/health")).json()["status"] == "not_ready"
            store.release.set()
            for _ in range(500):
                if runtime_of(app).ready:
                    break
                await asyncio.sleep(0.01)
            assert runtime_of(app).ready
            ok(await c.post("/mandates", json=body), 201)
