"""The reference server's clients, replayed request for request: the experiment harness,
the Python agents, the analysis scripts and the Rust LLM proxy (protocol.md "compat" names)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.api.helpers import SHARD_FIELDS, TIMESTAMP, ok, problem, sha256_hex

# -- the harness ----------------------------------------------------------------------------------


async def _harness_setup(c: httpx.AsyncClient, ori: bool) -> None:
    r = await c.post("/admin/reset")  # no body, Content-Type: application/json
    assert r.status_code == 200
    assert "cleared" in r.json()
    r = await c.post("/admin/config", json={"ori_enabled": ori})
    assert r.status_code == 200
    assert r.json()["ori_enabled"] is ori
    for key in ("plan", "budget"):
        r = await c.post(
            "/admin/shard", json={"key": key, "content": f"{key} v0", "goal_tag": "exp"}
        )
        assert r.status_code in (200, 201)


async def _agent_step(c: httpx.AsyncClient, agent: str, key: str, text: str) -> int:
    """The reference agent loop: read, commit, on 409 re-read and retry. Returns 409s seen."""
    for conflicts in range(5):
        r = await c.get(f"/shard/{key}?agent_id={agent}")
        assert r.status_code == 200
        data = r.json()
        r = await c.post(
            "/commit/v2",
            json={
                "key": key,
                "expected_version": data["version"],
                "delta": data["content"] + text,
                "agent_id": agent,
                "additive_hint": False,
            },
        )
        if r.status_code == 200:
            return conflicts
        assert r.status_code == 409
        assert r.json()["error"] in ("CrossShardStale", "VersionMismatch")
    raise AssertionError("agent never committed")


async def test_harness_run(client: httpx.AsyncClient) -> None:
    await _harness_setup(client, ori=True)
    r = await client.post("/admin/shard", json={"key": "plan", "content": "x", "goal_tag": "exp"})
    assert (r.status_code, r.json()) == (200, {"status": "already_exists"})
    # agent-1 reads budget; agent-2 then moves budget under it
    assert (await client.get("/shard/budget?agent_id=agent-1")).json()["version"] == 0
    assert await _agent_step(client, "agent-2", "budget", " +2") == 0
    data = (await client.get("/shard/plan?agent_id=agent-1")).json()
    r = await client.post(
        "/commit/v2",
        json={
            "key": "plan",
            "expected_version": data["version"],
            "delta": "p1",
            "agent_id": "agent-1",
            "additive_hint": False,
        },
    )
    assert r.status_code == 409
    assert r.json()["error"] == "CrossShardStale"
    # the agent re-reads what it used and retries
    assert (await client.get("/shard/budget?agent_id=agent-1")).json()["version"] == 1
    assert await _agent_step(client, "agent-1", "plan", " +1") == 0
    stats = (await client.get("/stats")).json()
    assert stats["ori_enabled"] is True
    assert stats["view_checked_commits"] == 2
    assert stats["view_divergent_commits"] == 1
    assert stats["view_divergence_rate"] == 0.5
    assert stats["cross_shard_stale"] == 1
    assert stats["total_commits"] == 2


async def test_harness_ori_off_counts_divergence(client: httpx.AsyncClient) -> None:
    await _harness_setup(client, ori=False)
    r = await client.get("/shard/budget?agent_id=agent-1")
    assert r.json()["version"] == 0
    assert await _agent_step(client, "agent-2", "budget", " +2") == 0
    r = await client.post(
        "/commit/v2",
        json={
            "key": "plan",
            "expected_version": 0,
            "delta": "p1",
            "agent_id": "agent-1",
            "additive_hint": False,
        },
    )
    assert r.status_code == 200
    stats = (await client.get("/stats")).json()
    assert stats["ori_enabled"] is False
    # agent-2's own read of the key it wrote is not a read-set entry: one check only
    assert stats["view_divergent_commits"] == 1
    assert stats["view_checked_commits"] == 1
    assert stats["view_divergence_rate"] == 1.0
    # reset keeps the flag, as the harness expects between runs
    await client.post("/admin/reset")
    assert (await client.get("/stats")).json()["ori_enabled"] is False


async def test_agent_conflict_retry(client: httpx.AsyncClient) -> None:
    await _harness_setup(client, ori=True)
    r = await client.get("/shard/plan?agent_id=a1")
    v = r.json()["version"]
    r = await client.get("/shard/plan?agent_id=a2")
    assert r.json()["version"] == v
    body: dict[str, Any] = {
        "key": "plan",
        "expected_version": v,
        "delta": "a1's plan",
        "agent_id": "a1",
        "additive_hint": False,
    }
    assert (await client.post("/commit/v2", json=body)).status_code == 200
    body.update(delta="a2's plan", agent_id="a2")
    r = await client.post("/commit/v2", json=body)
    assert r.status_code == 409
    assert r.json()["error"] == "VersionMismatch"
    r = await client.get("/shard/plan?agent_id=a2")
    body["expected_version"] = r.json()["version"]
    r = await client.post("/commit/v2", json=body)
    assert r.status_code == 200
    assert r.json()["new_version"] == 2


# -- the scripts ----------------------------------------------------------------------------------


async def test_scripts_session_and_explicit_read_set(client: httpx.AsyncClient) -> None:
    await _harness_setup(client, ori=True)
    r = await client.post("/session", json={"agent_id": "s1", "session_ttl": 3600})
    assert r.status_code == 200
    assert r.json() == {"agent_id": "s1", "status": "created"}
    # the target key itself in the read set, at an old version: filtered out
    await client.post(
        "/commit/v2",
        json={"key": "plan", "expected_version": 0, "delta": "p1", "agent_id": "other"},
    )
    r = await client.post(
        "/commit/v2",
        json={
            "key": "plan",
            "expected_version": 1,
            "delta": "p2",
            "agent_id": "s1",
            "read_set": [
                {"key": "plan", "version_at_read": 0},
                {"key": "budget", "version_at_read": 0},
            ],
        },
    )
    assert r.status_code == 200, r.text
    r = await client.post(
        "/commit/v2",
        json={
            "key": "plan",
            "expected_version": 2,
            "delta": "p3",
            "agent_id": "s1",
            "read_set": [{"key": "budget", "version_at_read": 7}],
        },
    )
    assert r.status_code == 409
    assert r.json()["error"] in ("CrossShardStale", "VersionMismatch")
    assert r.json()["error"] == "CrossShardStale"


async def test_scripts_delivery_log_and_inject(client: httpx.AsyncClient) -> None:
    await _harness_setup(client, ori=True)
    await client.get("/shard/plan?agent_id=agent-7")
    await client.get("/shard/budget?agent_id=agent-7")
    data = (await client.get("/admin/delivery-log")).json()
    assert sorted(data["agents"]["agent-7"].keys()) == ["budget", "plan"]
    await client.post(
        "/commit/v2",
        json={"key": "plan", "expected_version": 0, "delta": "p1", "agent_id": "w"},
    )
    r = await client.post(
        "/admin/inject-stale", json={"agent_id": "agent-7", "key": "plan", "stale_version": 0}
    )
    assert r.json() == {"injected": True}
    r = await client.post(
        "/commit/v2",
        json={"key": "budget", "expected_version": 0, "delta": "b1", "agent_id": "agent-7"},
    )
    assert r.status_code == 409
    assert r.json()["error"] == "CrossShardStale"
    assert (await client.get("/stats")).json()["cross_shard_stale"] == 1


# -- the Rust LLM proxy ---------------------------------------------------------------------------


async def test_proxy_register(client: httpx.AsyncClient) -> None:
    await _harness_setup(client, ori=True)
    r = await client.post(
        "/delivery_log/register",
        headers={"X-SBus-Agent-Id": "llm-agent", "X-SBus-Session-Id": "task-42"},
        json={
            "agent_id": "llm-agent",
            "session_id": "task-42",
            "shards_used": ["plan", "budget", "missing"],
            "source": "proxy",
            "timestamp_ms": 123,
        },
    )
    assert r.status_code == 200
    data = r.json()
    assert data["ok"] is True
    assert data["registered"] >= 1
    assert data == {
        "ok": True,
        "registered": 2,
        "skipped_existing": [],
        "skipped_no_shard": ["missing"],
    }
    sessions = (await client.get("/admin/delivery-log")).json()["sessions"]
    assert sorted(sessions["llm-agent"]["task-42"]) == ["budget", "plan"]


async def test_shards_listing(client: httpx.AsyncClient) -> None:
    await _harness_setup(client, ori=True)
    data = (await client.get("/shards")).json()
    assert data["shards"] == ["budget", "plan"]
    assert data["count"] == 2


# -- ShardResponse --------------------------------------------------------------------------------


async def test_shard_response_compat_fields(client: httpx.AsyncClient) -> None:
    r = await client.post("/shard", json={"key": "doc", "content": "first", "goal_tag": "g"})
    created = ok(r, 201)
    r = await client.post(
        "/commit",
        json={"key": "doc", "expected_ver": 0, "content": "second", "agent_id": "a"},
    )
    commit = ok(r)
    assert commit["shard_id"] == sha256_hex("first")
    shard = ok(await client.get("/shard/doc?agent_id=a"))
    assert set(shard) == SHARD_FIELDS
    assert shard["id"] == created["id"] == commit["shard_id"]
    assert shard["owner"] is None
    assert shard["version"] == 1
    assert shard["content"] == "second"
    assert shard["goal_tag"] == "g"
    assert (shard["attempt_count"], shard["conflict_count"], shard["delta_log_depth"]) == (1, 0, 1)
    assert shard["policy"] == {"require_mandate": False}
    for field in ("created_at", "updated_at"):
        assert TIMESTAMP.match(shard[field]), shard[field]
    assert shard["created_at"] == created["created_at"]
    assert shard["updated_at"] >= shard["created_at"]


async def test_error_field_on_every_rejection(client: httpx.AsyncClient) -> None:
    """Compat clients branch on resp.json()["error"]."""
    problem(await client.get("/shard/none?agent_id=x"), 404, "ShardNotFound")
    problem(
        await client.post(
            "/commit/v2",
            json={"key": "none", "expected_version": 0, "delta": "", "agent_id": "x"},
        ),
        404,
        "ShardNotFound",
    )
