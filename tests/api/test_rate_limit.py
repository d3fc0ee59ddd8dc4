"""Per-agent rate limits (protocol.md §4 step 5): a token bucket in the store, token
mode only, 429 RateLimited with Retry-After, nothing changed by a limited request."""

from __future__ import annotations

from tests.api.auth_helpers import auth, root_token, token, token_app
from tests.api.helpers import ok, problem
from tests.conftest import AppFactory


async def test_state_changes_are_limited_per_agent(make_client: AppFactory) -> None:
    # One token every 120 s: no refill can come from the real time a loaded machine takes
    # between these requests (at 60/m one second of delay let a refused commit through).
    app, c = await token_app(make_client, rate_limit="30/h,3", test_hooks=True)
    root = auth(root_token(app))
    a = auth(token(app, "A", ("**", "read,write,create")))
    b = auth(token(app, "B", ("**", "read,write,create")))
    for i in range(3):
        ok(await c.post("/shard", json={"key": f"a/{i}", "content": ""}, headers=a), 201)
    r = await c.post("/shard", json={"key": "a/3", "content": ""}, headers=a)
    body = problem(r, 429, "RateLimited")
    assert int(r.headers["retry-after"]) == body["retry_after"]
    assert 100 < body["retry_after"] <= 120  # the next token, less the real time that passed
    problem(await c.get("/shard/a/3", headers=a), 404, "ShardNotFound")  # nothing created
    # GETs are not limited; another agent has its own bucket
    ok(await c.get("/shard/a/0", headers=a))
    ok(await c.post("/shard", json={"key": "b/0", "content": ""}, headers=b), 201)
    commit = {"key": "a/0", "expected_version": 0, "delta": "x"}
    problem(await c.post("/commit/v2", json=commit, headers=a), 429, "RateLimited")
    ok(await c.post("/admin/test/advance-clock", json={"ms": 120_000}, headers=root))
    assert ok(await c.post("/commit/v2", json=commit, headers=a))["new_version"] == 1
    stats = ok(await c.get("/stats", headers=root))
    assert (stats["total_commits"], stats["total_conflicts"]) == (1, 0)


async def test_open_mode_is_never_limited(make_client: AppFactory) -> None:
    _, c = await make_client(rate_limit="60/m,1")
    for i in range(4):
        r = await c.post(
            "/shard", json={"key": f"k{i}", "content": ""}, headers={"X-Agent-Id": "A"}
        )
        assert r.status_code == 201, r.text


async def test_bad_rate_limit_refuses_to_start() -> None:
    from sbus.bootstrap import startup_problem
    from sbus.config import Settings

    for bad in ("fast", "0/s", "10/week", "10/s,0"):
        problem_text = startup_problem(Settings(rate_limit=bad))
        assert problem_text is not None and "SBUS_RATE_LIMIT" in problem_text
    assert startup_problem(Settings(rate_limit="50/s")) is None
