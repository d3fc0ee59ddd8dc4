"""The bus starts before its store (protocol.md §7): the listener is up at once, readiness
and every store route say 503 until the store answers, then the same process serves
without a restart."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.concurrency.conftest import new_client
from tests.faults.conftest import (
    RECOVERY_TIMEOUT_S,
    Buses,
    Postgres,
    RedisServer,
    problem_of_503,
    wait_healthy,
)

pytestmark = pytest.mark.faults
# Each worker of a multi-worker bus connects (and backs off) on its own, so one can be
# ready seconds before its sibling; one worker makes "health 200 => serving" exact.
ONE_WORKER = {"SBUS_WORKERS": "1"}


def assert_not_ready(client: httpx.Client) -> str:
    """/livez 200, /admin/health 503 not_ready, store routes 503 StoreUnavailable
    not_applied with Retry-After. Returns the not_ready reason."""
    assert client.get("/livez").status_code == 200
    health = client.get("/admin/health")
    assert health.status_code == 503, health.text
    body = health.json()
    assert body["status"] == "not_ready", body
    assert isinstance(body["reason"], str) and body["reason"], body
    for resp in (
        client.get("/stats"),
        client.get("/shard/plan", params={"agent_id": "a"}),
        client.post("/shard", json={"key": "plan", "content": "x"}),
        client.post(
            "/commit",
            json={"key": "plan", "expected_version": 0, "delta": "y", "agent_id": "a"},
            headers={"Idempotency-Key": "k1"},
        ),
    ):
        assert resp.status_code == 503, resp.text
        assert problem_of_503(resp) is None, problem_of_503(resp)
        # Nothing can have landed before the store was ever reached.
        assert resp.json()["outcome"] == "not_applied", resp.text
    reason: str = body["reason"]
    return reason


def assert_serving(client: httpx.Client) -> None:
    resp = client.post("/shard", json={"key": "plan", "content": "x"})
    assert resp.status_code == 201, resp.text
    resp = client.post(
        "/commit",
        json={"key": "plan", "expected_version": 0, "delta": "y", "agent_id": "a"},
        headers={"Idempotency-Key": "k1"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["new_version"] == 1
    stats = client.get("/stats")
    assert stats.status_code == 200, stats.text
    assert (stats.json()["total_shards"], stats.json()["total_commits"]) == (1, 1)


def wait_reason(client: httpx.Client, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    reason = ""
    while time.monotonic() < deadline:
        resp = client.get("/admin/health")
        assert resp.status_code == 503, resp.text
        reason = str(resp.json()["reason"])
        if needle in reason:
            return reason
        time.sleep(0.1)
    pytest.fail(f"/admin/health reason never mentioned {needle!r} (last: {reason!r})")


def test_postgres_down_at_start(buses: Buses, postgres: Postgres) -> None:
    (bus,) = buses.launch(postgres.url, ONE_WORKER)
    with new_client(bus.base_url) as client:
        assert_not_ready(client)
        time.sleep(1.0)  # a few reconnect rounds: still up, still not ready
        assert "PostgreSQL" in assert_not_ready(client)
        postgres.start()
        # The server answers but has no schema: still not ready, and health says why.
        assert "sbus migrate" in wait_reason(client, "sbus migrate", RECOVERY_TIMEOUT_S)
        assert client.post("/shard", json={"key": "plan", "content": "x"}).status_code == 503
        postgres.migrate()
        wait_healthy(bus.base_url, RECOVERY_TIMEOUT_S)
        assert_serving(client)
    assert bus.alive(), "the bus must start serving without a restart"


def test_redis_down_at_start(buses: Buses, redis_server: RedisServer) -> None:
    (bus,) = buses.launch(redis_server.url, ONE_WORKER)
    with new_client(bus.base_url) as client:
        assert_not_ready(client)
        time.sleep(1.0)
        assert "Redis" in assert_not_ready(client)
        redis_server.start()
        wait_healthy(bus.base_url, RECOVERY_TIMEOUT_S)
        assert_serving(client)
    assert bus.alive(), "the bus must start serving without a restart"
