"""protocol.md section 4, steps 5-9a, on one commit that breaks every rule at once: the
first step answers, and lifting it reveals the next. Token mode, where each step can be
broken: rate limit (5), idempotency (6), limits (7), capabilities (8), mandate (9a).
Nothing is written on the way."""

from __future__ import annotations

from tests.api.auth_helpers import auth, token, token_app
from tests.api.helpers import ok, problem
from tests.conftest import AppFactory


async def test_steps_five_to_nine_a_answer_in_order(make_client: AppFactory) -> None:
    # Two tokens an hour per agent: no refill can come from real time during the test.
    app, c = await token_app(make_client, rate_limit="2/h,2", max_delta=8, test_hooks=True)
    # Tokens outlive the clock moves below (a bucket token per 30 minutes).
    root = auth(token(app, "root", ("**", "read,create,admin"), ttl=86_400))
    ok(await c.post("/shard", json={"key": "k", "content": ""}, headers=root), 201)
    writer = auth(token(app, "A", ("**", "read,write"), ttl=86_400))
    # The same agent, later holding a token that has lost the write right.
    reader = auth(token(app, "A", ("**", "read"), ttl=86_400))
    first = {"key": "k", "expected_version": 0, "delta": "v1"}
    retry = {"Idempotency-Key": "r1"}
    r = await c.post("/commit/v2", json=first, headers={**writer, **retry})
    assert ok(r)["new_version"] == 1
    recorded = r.json()

    # Step 6 precedes step 8: the recorded answer is replayed even though the caller no
    # longer holds the right (protocol.md section 3.4: nothing is applied again).
    r = await c.post("/commit/v2", json=first, headers={**reader, **retry})
    assert ok(r) == recorded
    assert r.headers["idempotent-replayed"] == "true"

    # Step 5 precedes step 6: the bucket is now empty, and even the replay is refused.
    problem(await c.post("/commit/v2", json=first, headers={**reader, **retry}), 429, "RateLimited")

    async def refill() -> None:
        # One bucket token: every later request, even a refused one, takes one.
        ok(await c.post("/admin/test/advance-clock", json={"ms": 1_800_000}, headers=root))

    over = {"key": "k", "expected_version": 1, "delta": "x" * 9, "mandate": "not-a-mandate"}
    # Step 6 precedes 7: the key names another request.
    await refill()
    r = await c.post("/commit/v2", json=over, headers={**reader, **retry})
    problem(r, 422, "IdempotencyKeyReused")
    # Step 7 precedes 8: over the delta limit and without the write right.
    await refill()
    problem(await c.post("/commit/v2", json=over, headers=reader), 413, "DeltaTooLarge")
    # Step 8 precedes 9a: without the write right, carrying a garbled mandate.
    small = over | {"delta": "x"}
    await refill()
    body = problem(await c.post("/commit/v2", json=small, headers=reader), 403, "CapabilityDenied")
    assert (body["key"], body["right"]) == ("k", "write")
    # With the right, the mandate is checked: 9a.
    await refill()
    problem(await c.post("/commit/v2", json=small, headers=writer), 404, "MandateNotFound")

    shard = ok(await c.get("/shard/k", params={"record": "false"}, headers=root))
    assert (shard["version"], shard["content"]) == (1, "v1")
    stats = ok(await c.get("/stats", headers=root))
    assert (stats["total_commits"], stats["total_conflicts"]) == (1, 0)


async def test_a_create_answers_in_the_same_order(make_client: AppFactory) -> None:
    """POST /shard: steps 5-6, the content and goal_tag limits, then the create right
    (protocol.md section 4, "Creates")."""
    app, c = await token_app(make_client, rate_limit="2/h,2", max_delta=8, test_hooks=True)
    root = auth(token(app, "root", ("**", "read,admin"), ttl=86_400))
    creator = auth(token(app, "A", ("**", "read,create"), ttl=86_400))
    reader = auth(token(app, "A", ("**", "read"), ttl=86_400))
    body = {"key": "n", "content": "v"}
    retry = {"Idempotency-Key": "c1"}
    r = await c.post("/shard", json=body, headers={**creator, **retry})
    created = ok(r, 201)
    r = await c.post("/shard", json=body, headers={**reader, **retry})
    assert ok(r, 201) == created
    assert r.headers["idempotent-replayed"] == "true"
    problem(await c.post("/shard", json=body, headers={**reader, **retry}), 429, "RateLimited")

    async def refill() -> None:
        ok(await c.post("/admin/test/advance-clock", json={"ms": 1_800_000}, headers=root))

    await refill()
    over = {"key": "m", "content": "x" * 9}
    r = await c.post("/shard", json=over, headers={**reader, **retry})
    problem(r, 422, "IdempotencyKeyReused")
    await refill()
    problem(await c.post("/shard", json=over, headers=reader), 413, "DeltaTooLarge")
    await refill()
    body = problem(
        await c.post("/shard", json=over | {"content": ""}, headers=reader), 403, "CapabilityDenied"
    )
    assert (body["key"], body["right"]) == ("m", "create")
    problem(await c.get("/shard/m", headers=root), 404, "ShardNotFound")
