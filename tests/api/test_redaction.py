"""Store URLs and store errors never leak secrets: the password of a store URL is
masked wherever the bus prints the URL (the ``sbus serve`` banner, ``sbus migrate``,
store errors), and in token mode the unauthenticated ``/admin/health`` names only the
kind of store failure, not the host and port the driver's error carries."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from typer.testing import CliRunner

from sbus import __version__, cli
from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app
from sbus.config import Settings
from sbus.storage.urls import redact_url
from tests import backends

PASSWORD = "s3cret-Pw"
SECRET = "x" * 32


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("sqlite:///./sbus.db", "sqlite:///./sbus.db"),
        ("memory://", "memory://"),
        (
            "postgresql+asyncpg://bus:pa%40ss@db:5432/sbus",
            "postgresql+asyncpg://bus:***@db:5432/sbus",
        ),
        ("postgresql://bus@db/sbus", "postgresql://bus@db/sbus"),
        ("redis://:pw@127.0.0.1:6379/0?namespace=a", "redis://:***@127.0.0.1:6379/0?namespace=a"),
        ("redis://u:p@ss@h/0", "redis://u:***@h/0"),
        ("redis://h:1/0?password=abc&namespace=n", "redis://h:1/0?password=***&namespace=n"),
        ("postgresql://u@h/db?Password=x#frag", "postgresql://u@h/db?Password=***#frag"),
        ("postgresql://[::1", "<unparseable store URL>"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def unreachable_url(kind: str, port: int) -> str:
    if kind == "postgres":
        return f"postgresql+asyncpg://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"
    return f"redis://:{PASSWORD}@127.0.0.1:{port}/0"


async def failing_app(**options: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(Settings(**options))
    async with LifespanManager(app) as manager:
        # Wait for the first failed connection attempt to be recorded.
        for _ in range(1000):
            if runtime_of(app).not_ready_reason != "store not connected yet":
                break
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield app, client


@pytest.mark.parametrize("kind", ["postgres", "redis"])
async def test_token_mode_health_names_no_host_or_port(kind: str) -> None:
    port = closed_port()
    options = {"store": unreachable_url(kind, port), "auth": "token", "secret": SECRET}
    async for app, client in failing_app(**options):
        reason = runtime_of(app).not_ready_reason
        assert reason is not None and str(port) in reason  # the operator's log still has it
        resp = await client.get("/admin/health")
        assert resp.status_code == 503
        assert resp.json() == {
            "status": "not_ready",
            "version": __version__,
            "reason": "store unreachable",
        }


@pytest.mark.parametrize("kind", ["postgres", "redis"])
async def test_open_mode_health_shows_the_detail_without_the_password(kind: str) -> None:
    port = closed_port()
    async for _, client in failing_app(store=unreachable_url(kind, port)):
        resp = await client.get("/admin/health")
        assert resp.status_code == 503
        body = resp.json()
        assert body["status"] == "not_ready"
        assert f"127.0.0.1:{port}" in body["reason"] or str(port) in body["reason"]
        assert PASSWORD not in body["reason"]


def test_serve_banner_masks_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """The banner (and the preflight's "not reachable yet" line) print the URL masked;
    uvicorn itself is not started."""
    started: list[dict[str, Any]] = []
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: started.append(k))
    for name in ("SBUS_STORE", "SBUS_WORKERS"):  # serve exports them for its workers
        monkeypatch.setenv(name, "")
    url = unreachable_url("redis", closed_port())
    result = CliRunner().invoke(cli.app, ["serve", "--store", url, "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert len(started) == 1
    assert PASSWORD not in result.output
    assert "store redis://:***@127.0.0.1:" in result.output
    assert "cannot reach Redis at redis://:***@127.0.0.1:" in result.output


def test_migrate_masks_the_password() -> None:
    asyncio.run(backends.require("postgres"))
    # The test server trusts every connection, so any password is accepted.
    head, _, rest = backends.POSTGRES_URL.partition("://")
    user, _, host = rest.partition("@")
    url = f"{head}://{user.split(':', 1)[0]}:{PASSWORD}@{host}"
    result = CliRunner().invoke(cli.app, ["migrate", "--store", url])
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    assert f"{head}://{user.split(':', 1)[0]}:***@{host}" in result.output
