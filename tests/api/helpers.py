"""Shared helpers for the API suite: exact problem assertions, small request wrappers
and an independent re-implementation of the history hash chain (protocol.md §3)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app
from sbus.config import Settings

PROBLEM = "application/problem+json"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
GENESIS = "00" * 32
SHARD_FIELDS = {
    "key",
    "id",
    "version",
    "content",
    "owner",
    "goal_tag",
    "attempt_count",
    "conflict_count",
    "delta_log_depth",
    "created_at",
    "updated_at",
    "policy",
}
STATS_FIELDS = {
    "total_shards",
    "total_commits",
    "total_conflicts",
    "cross_shard_stale",
    "view_divergent_commits",
    "view_checked_commits",
    "view_divergence_rate",
    "ori_enabled",
    "total_attempts",
    "scr",
    "wal_enabled",
    "delivery_log",
    "backend",
}


def problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert ``r`` is the RFC 9457 problem ``code`` with ``status``; return its body."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].split(";")[0] == PROBLEM, r.headers
    body: dict[str, Any] = r.json()
    assert body["error"] == code, body
    assert body["status"] == status
    assert isinstance(body["detail"], str)
    assert isinstance(body["title"], str)
    assert isinstance(body["type"], str)
    return body


def ok(r: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].split(";")[0] == "application/json"
    body: dict[str, Any] = r.json()
    return body


async def create(c: httpx.AsyncClient, key: str, content: str = "", **extra: Any) -> dict[str, Any]:
    return ok(await c.post("/shard", json={"key": key, "content": content, **extra}), 201)


async def read(
    c: httpx.AsyncClient, key: str, agent: str | None = None, session: str | None = None
) -> dict[str, Any]:
    params: dict[str, str] = {}
    if agent is not None:
        params["agent_id"] = agent
    else:
        params["record"] = "false"
    if session is not None:
        params["session_id"] = session
    return ok(await c.get(f"/shard/{key}", params=params))


async def commit(
    c: httpx.AsyncClient,
    key: str,
    expected: int,
    delta: str,
    agent: str = "a",
    path: str = "/commit/v2",
    **extra: Any,
) -> httpx.Response:
    body = {"key": key, "expected_version": expected, "delta": delta, "agent_id": agent, **extra}
    return await c.post(path, json=body)


async def committed(
    c: httpx.AsyncClient, key: str, expected: int, delta: str, agent: str = "a", **extra: Any
) -> dict[str, Any]:
    body = ok(await commit(c, key, expected, delta, agent, **extra))
    assert body["new_version"] == expected + 1
    return body


async def delete(
    c: httpx.AsyncClient, key: str, expected: int, agent: str = "a", **params: str
) -> httpx.Response:
    return await c.delete(
        f"/shard/{key}", params={"expected_version": str(expected), "agent_id": agent, **params}
    )


async def stats(c: httpx.AsyncClient) -> dict[str, Any]:
    return ok(await c.get("/stats"))


async def advance(c: httpx.AsyncClient, ms: int) -> None:
    ok(await c.post("/admin/test/advance-clock", json={"ms": ms}))


async def dl(c: httpx.AsyncClient) -> dict[str, Any]:
    return ok(await c.get("/admin/delivery-log"))


async def dl_entries(c: httpx.AsyncClient, agent: str, session: str = "") -> dict[str, int]:
    """key -> recorded version for (agent, session); {} when nothing is live."""
    sessions = (await dl(c))["sessions"]
    entries = sessions.get(agent, {}).get(session, {})
    return {k: v["version"] for k, v in entries.items()}


async def history(c: httpx.AsyncClient, key: str, **params: int) -> list[dict[str, Any]]:
    body = ok(await c.get(f"/history/{key}", params=params))
    assert body["key"] == key
    entries: list[dict[str, Any]] = body["entries"]
    return entries


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def entry_hash(entry: dict[str, Any]) -> str:
    """protocol.md §3, re-implemented independently of sbus.core.chain."""
    meta = {k: entry[k] for k in ("agent_id", "commit_id", "committed_at", "rationale", "deleted")}
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256()
    digest.update(bytes.fromhex(entry["prev_hash"]))
    digest.update(int(entry["version"]).to_bytes(8, "big"))
    digest.update(hashlib.sha256(canonical.encode()).digest())
    digest.update(entry["content"].encode())
    return digest.hexdigest()


def verify_chain(entries: list[dict[str, Any]], *, from_genesis: bool) -> None:
    """Entries newest first: every hash recomputes and links to the next older one."""
    for newer, older in itertools.pairwise(entries):
        assert newer["prev_hash"] == older["hash"]
        assert newer["version"] == older["version"] + 1
    for entry in entries:
        assert entry["hash"] == entry_hash(entry), entry
    if from_genesis:
        assert entries[-1]["version"] == 0
        assert entries[-1]["prev_hash"] == GENESIS


async def snapshot(c: httpx.AsyncClient, *keys: str) -> dict[str, Any]:
    """Everything a rejected request must leave untouched (timestamps included)."""
    shards = {}
    for key in keys:
        r = await c.get(f"/shard/{key}", params={"record": "false"})
        shards[key] = (r.status_code, r.json())
    log = await dl(c)
    for by_session in log["sessions"].values():
        for entries in by_session.values():
            for entry in entries.values():
                entry.pop("age_secs")
    log["agents"] = {}
    return {"stats": await stats(c), "shards": shards, "dl": log}


@contextlib.asynccontextmanager
async def running_app(**options: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app built from ``Settings(**options)``, its lifespan running and its store ready
    (10 s at most), with a client over ASGI."""
    app = create_app(Settings(**options))
    async with LifespanManager(app) as manager:
        for _ in range(1000):
            if runtime_of(app).ready:
                break
            await asyncio.sleep(0.01)
        assert runtime_of(app).ready, runtime_of(app).not_ready_reason
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield app, client
