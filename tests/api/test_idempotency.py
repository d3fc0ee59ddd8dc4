"""Idempotency-Key on every state-changing POST and DELETE (protocol.md §3)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.helpers import (
    advance,
    commit,
    committed,
    create,
    ok,
    problem,
    read,
    snapshot,
)
from tests.conftest import AppFactory

KEY = {"Idempotency-Key": "retry-1"}


def _body(key: str = "k", expected: int = 0, delta: str = "x", agent: str = "a") -> dict[str, Any]:
    return {"key": key, "expected_version": expected, "delta": delta, "agent_id": agent}


async def _replays(
    c: httpx.AsyncClient,
    first: httpx.Response,
    method: str,
    url: str,
    keys: tuple[str, ...],
    **kwargs: Any,
) -> None:
    """Send the request again: identical status, body and ETag, nothing else changes."""
    before = await snapshot(c, *keys)
    again = await c.request(method, url, **kwargs)
    assert again.status_code == first.status_code
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers.get("etag") == first.headers.get("etag")
    assert "idempotent-replayed" not in first.headers
    assert await snapshot(c, *keys) == before


async def test_create_replay(client: httpx.AsyncClient) -> None:
    body = {"key": "k", "content": "c", "goal_tag": "g"}
    first = await client.post("/shard", json=body, headers=KEY)
    ok(first, 201)
    await _replays(client, first, "POST", "/shard", ("k",), json=body, headers=KEY)
    r = await client.post("/shard", json={**body, "content": "other"}, headers=KEY)
    problem(r, 422, "IdempotencyKeyReused")
    # without the key the same request is an ordinary duplicate
    problem(await client.post("/shard", json=body), 409, "ShardAlreadyExists")


@pytest.mark.parametrize("path", ["/commit", "/commit/v2"])
async def test_commit_replay(client: httpx.AsyncClient, path: str) -> None:
    await create(client, "k")
    first = await client.post(path, json=_body(), headers=KEY)
    assert ok(first)["new_version"] == 1
    await _replays(client, first, "POST", path, ("k",), json=_body(), headers=KEY)
    shard = await read(client, "k")
    assert (shard["version"], shard["attempt_count"]) == (1, 1)


async def test_commit_replay_after_others_moved_on(client: httpx.AsyncClient) -> None:
    """The replay answers before any check: a retried commit is not re-validated."""
    await create(client, "k")
    await create(client, "o")
    await read(client, "o", agent="a")
    first = await client.post("/commit/v2", json=_body(), headers=KEY)
    ok(first)
    await committed(client, "k", 1, "y", agent="b")
    await committed(client, "o", 0, "o1", agent="b")
    await _replays(client, first, "POST", "/commit/v2", ("k", "o"), json=_body(), headers=KEY)


async def test_commit_replay_resolves_aliases(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    first = await client.post("/commit/v2", json=_body(), headers=KEY)
    ok(first)
    aliased = {"key": "k", "expected_ver": 0, "content": "x", "agent_id": "a", "extra": 1}
    await _replays(client, first, "POST", "/commit/v2", ("k",), json=aliased, headers=KEY)


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/commit/v2", _body(delta="other"), {}),
        ("/commit/v2", _body(expected=1), {}),
        ("/commit/v2", {**_body(), "rationale": "r"}, {}),
        ("/commit/v2", {**_body(), "session_id": "s"}, {}),
        ("/commit/v2", {"key": "k", "delta": "x", "agent_id": "a"}, {"If-Match": '"0"'}),
        ("/commit", _body(), {}),
    ],
    ids=["delta", "expected", "rationale", "session", "if-match", "route"],
)
async def test_commit_key_reused(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], headers: dict[str, str]
) -> None:
    await create(client, "k")
    ok(await client.post("/commit/v2", json=_body(), headers=KEY))
    before = await snapshot(client, "k")
    r = await client.post(path, json=body, headers={**KEY, **headers})
    problem(r, 422, "IdempotencyKeyReused")
    assert await snapshot(client, "k") == before


async def test_key_scoped_per_agent(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    ok(await client.post("/commit/v2", json=_body(agent="a"), headers=KEY))
    # b's identical key is b's own: evaluated afresh (and stale: k is at 1)
    r = await client.post("/commit/v2", json=_body(agent="b"), headers=KEY)
    assert "idempotent-replayed" not in r.headers
    problem(r, 409, "VersionMismatch")
    r = await client.post("/commit/v2", json=_body(agent="b", expected=1), headers=KEY)
    assert ok(r)["new_version"] == 2


async def test_agent_from_header_scopes_the_key(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    body = {"key": "k", "expected_version": 0, "delta": "x"}
    first = await client.post("/commit/v2", json=body, headers={**KEY, "X-Agent-Id": "h"})
    ok(first)
    await _replays(
        client, first, "POST", "/commit/v2", ("k",), json=body, headers={**KEY, "X-Agent-Id": "h"}
    )


async def test_rejected_request_records_nothing(client: httpx.AsyncClient) -> None:
    # 404: the shard does not exist yet
    problem(await client.post("/commit/v2", json=_body(), headers=KEY), 404, "ShardNotFound")
    await create(client, "k")
    first = await client.post("/commit/v2", json=_body(), headers=KEY)
    assert "idempotent-replayed" not in first.headers
    assert ok(first)["new_version"] == 1
    # 409: a different body under a fresh key after a rejection is not "reused"
    key2 = {"Idempotency-Key": "retry-2"}
    problem(
        await client.post("/commit/v2", json=_body(expected=0, delta="z"), headers=key2),
        409,
        "VersionMismatch",
    )
    r = await client.post("/commit/v2", json=_body(expected=1, delta="z"), headers=key2)
    assert ok(r)["new_version"] == 2


async def test_rejected_stale_commit_then_retry(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    await create(client, "o")
    await read(client, "o", agent="a")
    await committed(client, "o", 0, "o1", agent="b")
    problem(await client.post("/commit/v2", json=_body(), headers=KEY), 409, "CrossShardStale")
    await read(client, "o", agent="a")
    r = await client.post("/commit/v2", json=_body(), headers=KEY)
    assert "idempotent-replayed" not in r.headers
    assert ok(r)["new_version"] == 1


async def test_multi_replay(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    await create(client, "b")
    body = {
        "agent_id": "x",
        "writes": [
            {"key": "b", "expected_version": 0, "delta": "B"},
            {"key": "a", "expected_version": 0, "delta": "A"},
        ],
    }
    first = await client.post("/commit/multi", json=body, headers=KEY)
    ok(first)
    await _replays(client, first, "POST", "/commit/multi", ("a", "b"), json=body, headers=KEY)
    body["writes"] = list(reversed(body["writes"]))
    problem(await client.post("/commit/multi", json=body, headers=KEY), 422, "IdempotencyKeyReused")


async def test_rollback_replay(client: httpx.AsyncClient) -> None:
    await create(client, "k", "c0")
    await committed(client, "k", 0, "c1", agent="r")
    body = {"key": "k", "target_version": 0, "agent_id": "r"}
    first = await client.post("/rollback", json=body, headers=KEY)
    assert ok(first)["version"] == 2
    await _replays(client, first, "POST", "/rollback", ("k",), json=body, headers=KEY)
    problem(
        await client.post("/rollback", json={**body, "target_version": 1}, headers=KEY),
        422,
        "IdempotencyKeyReused",
    )


async def test_delete_replay(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    params = {"expected_version": "0", "agent_id": "a"}
    first = await client.delete("/shard/k", params=params, headers=KEY)
    assert first.status_code == 204
    await _replays(client, first, "DELETE", "/shard/k", ("k",), params=params, headers=KEY)
    r = await client.delete("/shard/k", params={**params, "expected_version": "1"}, headers=KEY)
    problem(r, 422, "IdempotencyKeyReused")
    # the same key on another route is a different request
    r = await client.post("/commit/v2", json=_body(), headers=KEY)
    problem(r, 422, "IdempotencyKeyReused")


async def test_delete_replay_via_if_match(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    headers = {**KEY, "If-Match": '"0"'}
    first = await client.delete("/shard/k", params={"agent_id": "a"}, headers=headers)
    assert first.status_code == 204
    await _replays(
        client, first, "DELETE", "/shard/k", ("k",), params={"agent_id": "a"}, headers=headers
    )


@pytest.mark.parametrize("value", ["", "x" * 256, "tab\there", "caf\u00e9"])
async def test_invalid_key_header(client: httpx.AsyncClient, value: str) -> None:
    await create(client, "k")
    r = await client.post(
        "/commit/v2", json=_body(), headers=[(b"Idempotency-Key", value.encode("latin-1"))]
    )
    problem(r, 422, "ValidationError")
    assert (await read(client, "k"))["version"] == 0


async def test_key_of_255_printable(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    key = {"Idempotency-Key": "~ !" + "z" * 252}
    first = await client.post("/commit/v2", json=_body(), headers=key)
    ok(first)
    await _replays(client, first, "POST", "/commit/v2", ("k",), json=_body(), headers=key)


async def test_record_expires(make_client: AppFactory) -> None:
    _, c = await make_client(idempotency_ttl=10)
    await create(c, "k")
    ok(await c.post("/commit/v2", json=_body(), headers=KEY))
    await advance(c, 10_001)
    r = await c.post("/commit/v2", json=_body(), headers=KEY)
    assert "idempotent-replayed" not in r.headers
    problem(r, 409, "VersionMismatch")


async def test_replay_with_conflicting_fields_still_validated(client: httpx.AsyncClient) -> None:
    """Steps 3-4 come before step 6: a malformed retry is refused, not replayed."""
    await create(client, "k")
    ok(await client.post("/commit/v2", json=_body(), headers=KEY))
    r = await client.post("/commit/v2", json={**_body(), "expected_ver": 0}, headers=KEY)
    problem(r, 422, "AmbiguousField")
    r = await client.post("/commit/v2", json=_body(), headers={**KEY, "X-Agent-Id": "zz"})
    problem(r, 403, "AgentMismatch")
    # the commit did not happen twice
    assert (await commit(client, "k", 1, "y")).status_code == 200


# -- the fingerprint covers the resolved agent and session, wherever they were named --------

AGENT_IN_BODY: dict[str, Any] = {"agent_id": "a"}
AGENT_IN_HEADER = {"X-Agent-Id": "a"}


async def _setup_ops(c: httpx.AsyncClient) -> None:
    await create(c, "k", "c0")
    await create(c, "m")
    await committed(c, "k", 0, "c1", agent="w")


def _op(
    name: str, agent: dict[str, Any], session: dict[str, Any], headers: dict[str, str]
) -> dict[str, Any]:
    """Request arguments for ``name``: the agent and session as body fields (commit,
    multi, rollback), query parameters (delete) or headers."""
    fields = {**agent, **session}
    if name == "commit":
        body = {"key": "k", "expected_version": 1, "delta": "x", **fields}
        return {"method": "POST", "url": "/commit/v2", "json": body, "headers": headers}
    if name == "multi":
        writes = [{"key": "k", "expected_version": 1, "delta": "x"}]
        body = {"writes": writes, **fields}
        return {"method": "POST", "url": "/commit/multi", "json": body, "headers": headers}
    if name == "rollback":
        body = {"key": "k", "target_version": 0, "expected_version": 1, **fields}
        return {"method": "POST", "url": "/rollback", "json": body, "headers": headers}
    if name == "delete":
        params = {"expected_version": "1", **fields}
        return {"method": "DELETE", "url": "/shard/k", "params": params, "headers": headers}
    assert name == "create"
    body = {"key": "n", "content": "", **agent}
    return {"method": "POST", "url": "/shard", "json": body, "headers": headers}


OPS = ["commit", "multi", "rollback", "delete", "create"]


@pytest.mark.parametrize("op", OPS)
async def test_agent_in_body_or_header_is_one_request(client: httpx.AsyncClient, op: str) -> None:
    """The same request naming its agent in the body (query for DELETE) and then in the
    X-Agent-Id header replays; it used to be IdempotencyKeyReused."""
    await _setup_ops(client)
    first = await client.request(**_op(op, AGENT_IN_BODY, {}, KEY))
    assert first.status_code in (200, 201, 204), first.text
    again = _op(op, {}, {}, {**KEY, **AGENT_IN_HEADER})
    await _replays(client, first, keys=("k", "m", "n"), **again)


@pytest.mark.parametrize("op", ["commit", "multi", "rollback", "delete"])
async def test_session_in_body_or_header_is_one_request(client: httpx.AsyncClient, op: str) -> None:
    await _setup_ops(client)
    first = await client.request(**_op(op, AGENT_IN_BODY, {"session_id": "s1"}, KEY))
    assert first.status_code in (200, 204), first.text
    again = _op(op, AGENT_IN_BODY, {}, {**KEY, "X-SBus-Session-Id": "s1"})
    await _replays(client, first, keys=("k", "m", "n"), **again)


@pytest.mark.parametrize("op", ["commit", "multi", "rollback", "delete"])
@pytest.mark.parametrize("via", ["header", "body"])
async def test_retry_from_another_session_is_not_replayed(
    client: httpx.AsyncClient, op: str, via: str
) -> None:
    """Another session's identical request under the same key is a different request:
    it used to replay the first session's result when the session came in a header."""
    await _setup_ops(client)

    def session(name: str) -> tuple[dict[str, Any], dict[str, str]]:
        if via == "header":
            return {}, {**KEY, "X-SBus-Session-Id": name}
        return {"session_id": name}, KEY

    fields, headers = session("s1")
    first = await client.request(**_op(op, AGENT_IN_BODY, fields, headers))
    assert first.status_code in (200, 204), first.text
    before = await snapshot(client, "k", "m")
    fields, headers = session("s2")
    r = await client.request(**_op(op, AGENT_IN_BODY, fields, headers))
    problem(r, 422, "IdempotencyKeyReused")
    assert await snapshot(client, "k", "m") == before


# -- a DELETE's fingerprint covers its mandate headers, as a commit's covers its fields ---


async def _mandate(c: httpx.AsyncClient) -> str:
    body = {"agent_id": "G", "holder": "a", "keys": ["pay/*"], "context": {"order": 7}}
    token: str = ok(await c.post("/mandates", json={**body, "ttl_s": 60}), 201)["mandate"]
    return token


def _mandated(token: str | None, context: str | None) -> dict[str, str]:
    headers = dict(KEY)
    if token is not None:
        headers["X-SBus-Mandate"] = token
    if context is not None:
        headers["X-SBus-Mandate-Context"] = context
    return headers


async def test_delete_retry_with_another_mandate_or_context_is_not_replayed(
    client: httpx.AsyncClient,
) -> None:
    """A retried DELETE presenting another mandate or context used to replay the first
    answer (204) although nothing it presented had been checked; now it is refused
    like a commit retried with another ``mandate`` or ``context``."""
    guarded = {"require_mandate": True}
    await create(client, "pay/1", policy=guarded)
    await create(client, "pay/2", policy=guarded)
    first_token, other_token = await _mandate(client), await _mandate(client)
    params = {"expected_version": "0", "agent_id": "a"}
    first = await client.delete(
        "/shard/pay/1", params=params, headers=_mandated(first_token, '{"order": 7}')
    )
    assert first.status_code == 204, first.text
    # the context is fingerprinted parsed and canonical, not as the header's bytes
    same = _mandated(first_token, '{ "order" : 7 }')
    await _replays(client, first, "DELETE", "/shard/pay/1", ("pay/1",), params=params, headers=same)
    before = await snapshot(client, "pay/1", "pay/2")
    for token, context in [
        (other_token, '{"order": 7}'),
        (first_token, '{"order": 8}'),
        (first_token, None),
        (None, '{"order": 7}'),
        (None, None),
    ]:
        r = await client.delete("/shard/pay/1", params=params, headers=_mandated(token, context))
        problem(r, 422, "IdempotencyKeyReused")
    assert await snapshot(client, "pay/1", "pay/2") == before
    # the refused retry did not consume the other mandate (a fresh request, no key)
    headers = _mandated(other_token, '{"order": 7}')
    del headers["Idempotency-Key"]
    r = await client.delete("/shard/pay/2", params=params, headers=headers)
    assert r.status_code == 204, r.text


async def test_delete_without_mandate_then_retry_with_one(client: httpx.AsyncClient) -> None:
    await create(client, "pay/1")
    token = await _mandate(client)
    params = {"expected_version": "0", "agent_id": "a"}
    first = await client.delete("/shard/pay/1", params=params, headers=KEY)
    assert first.status_code == 204, first.text
    before = await snapshot(client, "pay/1")
    r = await client.delete("/shard/pay/1", params=params, headers=_mandated(token, '{"order": 7}'))
    problem(r, 422, "IdempotencyKeyReused")
    assert await snapshot(client, "pay/1") == before
