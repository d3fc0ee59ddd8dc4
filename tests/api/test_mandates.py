"""Mandates over HTTP (protocol.md §§4 step 9a and 5): issue, consume once, and every
refusal in its order, with state (versions, the consumed record) left untouched by a
refusal."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.api.auth_helpers import auth, root_token, token, token_app
from tests.api.helpers import ok, problem
from tests.conftest import AppFactory
from tests.history.client import Recorder
from tests.history.verify import verify

Env = tuple[FastAPI, httpx.AsyncClient, dict[str, str], dict[str, str], dict[str, str]]


@pytest.fixture
async def env(make_client: AppFactory) -> Env:
    """pay/1..pay/16 require a mandate; G may grant mandates on pay/*; A may write."""
    app, c = await token_app(make_client, test_hooks=True)
    root = auth(root_token(app))
    for i in range(1, 17):
        body = {"key": f"pay/{i}", "content": "v0", "policy": {"require_mandate": True}}
        ok(await c.post("/shard", json=body, headers=root), 201)
    ok(await c.post("/shard", json={"key": "free", "content": "v0"}, headers=root), 201)
    g = auth(token(app, "G", ("pay/*", "mandate")))
    a = auth(token(app, "A", ("**", "read,write,delete")))
    return app, c, root, g, a


async def issue(
    c: httpx.AsyncClient, grantor: dict[str, str], holder: str = "A", **extra: Any
) -> dict[str, Any]:
    body = {"holder": holder, "keys": ["pay/*"], "context": {"order": 7}, "ttl_s": 60}
    body.update(extra)
    return ok(await c.post("/mandates", json=body, headers=grantor), 201)


def commit(key: str, mandate: str | None, context: Any = None, version: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"key": key, "expected_version": version, "delta": "paid"}
    if mandate is not None:
        body["mandate"] = mandate
        body["context"] = {"order": 7} if context is None else context
    return body


async def version(c: httpx.AsyncClient, root: dict[str, str], key: str) -> int:
    v: int = ok(await c.get(f"/shard/{key}", params={"record": "false"}, headers=root))["version"]
    return v


async def test_consumed_once(env: Env) -> None:
    _, c, root, g, a = env
    m = await issue(c, g)
    assert len(m["context_hash"]) == 64
    problem(
        await c.post("/commit/v2", json=commit("pay/1", None), headers=a), 403, "MandateRequired"
    )
    out = ok(await c.post("/commit/v2", json=commit("pay/1", m["mandate"]), headers=a))
    assert out["new_version"] == 1
    again = await c.post("/commit/v2", json=commit("pay/2", m["mandate"]), headers=a)
    body = problem(again, 409, "MandateConsumed")
    assert body["jti"] == m["jti"]
    assert (await version(c, root, "pay/1"), await version(c, root, "pay/2")) == (1, 0)
    stats = ok(await c.get("/stats", headers=root))
    assert (stats["total_commits"], stats["total_conflicts"]) == (1, 0)


async def test_refusals_in_order_leave_the_mandate_usable(env: Env) -> None:
    app, c, root, g, a = env
    b = auth(token(app, "B", ("**", "read,write")))
    m = await issue(c, g)
    cases = [
        (b, commit("pay/1", m["mandate"]), 403, "MandateHolderMismatch"),
        (a, commit("free", m["mandate"]), 403, "MandateScopeMismatch"),
        (a, commit("pay/1", m["mandate"], context={"order": 8}), 403, "MandateContextMismatch"),
        (a, commit("pay/1", m["mandate"] + "x"), 404, "MandateNotFound"),
        (a, commit("pay/1", "garbage"), 404, "MandateNotFound"),
    ]
    for headers, body, status, code in cases:
        problem(await c.post("/commit/v2", json=body, headers=headers), status, code)
    assert await version(c, root, "pay/1") == 0
    # none of the refusals consumed it
    ok(await c.post("/commit/v2", json=commit("pay/1", m["mandate"]), headers=a))


async def test_expired_on_the_store_clock(env: Env) -> None:
    _, c, root, g, a = env
    m = await issue(c, g, ttl_s=5)
    ok(await c.post("/admin/test/advance-clock", json={"ms": 6_000}, headers=root))
    problem(
        await c.post("/commit/v2", json=commit("pay/1", m["mandate"]), headers=a),
        410,
        "MandateExpired",
    )
    assert await version(c, root, "pay/1") == 0


async def test_delete_with_mandate_headers(env: Env) -> None:
    _, c, _, g, a = env
    m = await issue(c, g)
    headers = {**a, "X-SBus-Mandate": m["mandate"], "X-SBus-Mandate-Context": '{"order": 7}'}
    problem(
        await c.delete("/shard/pay/3", params={"expected_version": 0}, headers=a),
        403,
        "MandateRequired",
    )
    r = await c.delete("/shard/pay/3", params={"expected_version": 0}, headers=headers)
    assert r.status_code == 204, r.text
    bad = {**headers, "X-SBus-Mandate-Context": "[1]"}
    problem(
        await c.delete("/shard/pay/4", params={"expected_version": 0}, headers=bad),
        422,
        "ValidationError",
    )


async def test_issuing_needs_the_mandate_right_and_a_bounded_ttl(env: Env) -> None:
    _, c, _, g, a = env
    body = {"holder": "A", "keys": ["pay/*"], "context": {}, "ttl_s": 60}
    problem(await c.post("/mandates", json=body, headers=a), 403, "CapabilityDenied")
    problem(
        await c.post("/mandates", json={**body, "ttl_s": 3601}, headers=g), 422, "ValidationError"
    )
    problem(
        await c.post("/mandates", json={**body, "ttl_s": False}, headers=g), 422, "ValidationError"
    )


async def test_sixteen_concurrent_commits_with_one_mandate(env: Env, store_kind: str) -> None:
    _, c, root, g, a = env
    m = await issue(c, g)
    recorder = Recorder()
    recorder.attach_async(c)
    results = await asyncio.gather(
        *(
            c.post("/commit/v2", json=commit(f"pay/{i}", m["mandate"]), headers=a)
            for i in range(1, 17)
        )
    )
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200] + [409] * 15, [r.text for r in results]
    assert all(r.json()["error"] == "MandateConsumed" for r in results if r.status_code == 409)
    versions = [await version(c, root, f"pay/{i}") for i in range(1, 17)]
    assert sorted(versions) == [0] * 15 + [1]
    # The history of the race passes the checker (MandateConsumeOnce among the rest).
    ops = recorder.history.ops
    assert sorted(op.result for op in ops if op.mandate == m["jti"]) == ["fail"] * 15 + ["ok"]
    for a_op, b_op in itertools.combinations(ops, 2):  # a process is one request at a time
        if a_op.process == b_op.process:
            first, second = sorted((a_op, b_op), key=lambda o: o.invoke_ns)
            assert first.complete_ns is not None and first.complete_ns <= second.invoke_ns
    verify(ops, label=f"mandate-race-{store_kind}")


async def test_idempotent_retry_of_a_mandated_commit_replays(env: Env) -> None:
    _, c, root, g, a = env
    m = await issue(c, g)
    headers = {**a, "Idempotency-Key": "pay-1"}
    first = await c.post("/commit/v2", json=commit("pay/1", m["mandate"]), headers=headers)
    assert first.status_code == 200, first.text
    again = await c.post("/commit/v2", json=commit("pay/1", m["mandate"]), headers=headers)
    assert (again.status_code, again.json()) == (200, first.json())
    assert again.headers["idempotent-replayed"] == "true"
    assert await version(c, root, "pay/1") == 1


async def test_mandate_patterns_are_bounded_at_issue(env: Env) -> None:
    """A 64 KB mandate (128 patterns of 500 characters, which once took ~0.8 s to match)
    is refused, as is anything past 4096 characters or 256 patterns; the bound itself is
    served."""
    _, c, _, g, a = env
    for keys, words in (
        (["pay/" + "*a" * 248] * 128, "at most 4096"),
        (["pay/" + "x" * 508] * 9, "at most 4096"),
        (["pay/x"] * 257, "at most 256"),
    ):
        r = await c.post("/mandates", json={"holder": "A", "keys": keys, "ttl_s": 60}, headers=g)
        body = problem(r, 422, "ValidationError")
        assert body["errors"][0]["loc"][-1] == "keys"
        assert words in body["detail"]
    wide = [f"pay/{i}" + "*" * (i % 2) for i in range(1, 17)] + ["pay/" + "x" * 508] * 7
    issued = await issue(c, g, keys=wide)
    r = await c.post("/commit/v2", json=commit("pay/3", issued["mandate"]), headers=a)
    assert ok(r)["new_version"] == 1


async def test_a_recreated_key_keeps_requiring_a_mandate(env: Env) -> None:
    """require_mandate survives delete and re-create: the tombstone keeps it and a
    re-create's policy is the tombstone's OR the request's, through POST /shard (with or
    without a policy, replayed by an Idempotency-Key) and POST /admin/shard alike. A
    re-create may strengthen the policy, never weaken it."""
    _, c, root, g, a0 = env
    sessions = itertools.count()

    def agent(**extra: str) -> dict[str, str]:
        # a session per request: no DeliveryLog entry of one step is stale in the next
        return {**a0, "X-SBus-Session-Id": f"s{next(sessions)}", **extra}

    async def delete(key: str, at: int, mandated: bool = True) -> None:
        headers = agent()
        if mandated:
            m = await issue(c, g)
            headers["X-SBus-Mandate"] = m["mandate"]
            headers["X-SBus-Mandate-Context"] = '{"order": 7}'
        r = await c.delete(f"/shard/{key}", params={"expected_version": at}, headers=headers)
        assert r.status_code == 204, r.text

    async def recreate(
        key: str, policy: bool | None, at: int, path: str = "/shard", **extra: str
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"key": key, "content": "again"}
        if policy is not None:
            body["policy"] = {"require_mandate": policy}
        created = ok(await c.post(path, json=body, headers={**root, **extra}), 201)
        assert created["version"] == at
        return created

    async def protected(key: str, at: int, created: dict[str, Any]) -> None:
        assert created["policy"] == {"require_mandate": True}
        got = ok(await c.get(f"/shard/{key}", params={"record": "false"}, headers=root))
        assert (got["version"], got["policy"]) == (at, {"require_mandate": True})
        r = await c.post("/commit/v2", json=commit(key, None, version=at), headers=agent())
        assert problem(r, 403, "MandateRequired")["key"] == key
        assert await version(c, root, key) == at

    await delete("pay/3", 0)
    await protected("pay/3", 2, await recreate("pay/3", None, 2))
    await delete("pay/3", 2)
    first = await recreate("pay/3", False, 4, **{"Idempotency-Key": "again"})
    await protected("pay/3", 4, first)
    body = {"key": "pay/3", "content": "again", "policy": {"require_mandate": False}}
    replay = await c.post("/shard", json=body, headers={**root, "Idempotency-Key": "again"})
    assert (replay.status_code, replay.json()) == (201, first)
    assert replay.headers["idempotent-replayed"] == "true"
    await delete("pay/3", 4)
    await protected("pay/3", 6, await recreate("pay/3", False, 6, path="/admin/shard"))

    # "free" never required one: re-created without a policy it still needs none, and a
    # re-create may add the requirement, which then holds.
    await delete("free", 0, mandated=False)
    assert (await recreate("free", None, 2))["policy"] == {"require_mandate": False}
    r = await c.post("/commit/v2", json=commit("free", None, version=2), headers=agent())
    assert ok(r)["new_version"] == 3
    await delete("free", 3, mandated=False)
    await protected("free", 5, await recreate("free", True, 5))
