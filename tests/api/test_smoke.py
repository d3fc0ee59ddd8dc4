from __future__ import annotations

import httpx


async def test_create_read_commit(client: httpx.AsyncClient) -> None:
    r = await client.post("/shard", json={"key": "plan", "content": "v0"})
    assert r.status_code == 201
    assert r.json()["version"] == 0
    r = await client.get("/shard/plan", params={"agent_id": "a"})
    assert r.status_code == 200
    assert r.headers["etag"] == '"0"'
    r = await client.post(
        "/commit/v2", json={"key": "plan", "expected_version": 0, "delta": "v1", "agent_id": "a"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["new_version"] == 1
