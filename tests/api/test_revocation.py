"""POST /admin/tokens/revoke: the revocation list lives in the store and every request
is checked against it (protocol.md §5)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import httpx

from sbus.api.runtime import runtime_of
from sbus.core.rights import ALL_RIGHTS, Scope
from tests.api.auth_helpers import auth, issuer, root_token, token, token_app, verifier
from tests.api.helpers import ok, problem
from tests.conftest import AppFactory


async def test_revoked_token_is_refused_and_others_are_not(make_client: AppFactory) -> None:
    app, c = await token_app(make_client)
    root = auth(root_token(app))
    ok(await c.post("/shard", json={"key": "plan/a", "content": "v0"}, headers=root), 201)
    a_token = token(app, "A", ("plan/*", "read,write"))
    other = auth(token(app, "B", ("plan/*", "read")))
    a = auth(a_token)
    ok(await c.get("/shard/plan/a", headers=a))
    jti = verifier(app).verify(a_token).jti
    body = ok(await c.post("/admin/tokens/revoke", json={"jti": jti}, headers=root))
    assert (body["revoked"], body["jti"]) == (True, jti)
    for request in (
        c.get("/shard/plan/a", headers=a),
        c.post(
            "/commit/v2",
            json={"key": "plan/a", "expected_version": 0, "delta": "x"},
            headers=a,
        ),
        c.get("/stats", headers=a),
    ):
        r: httpx.Response = await request
        problem(r, 401, "TokenRevoked")
        assert r.headers["www-authenticate"].startswith("Bearer")
    ok(await c.get("/shard/plan/a", headers=other))
    assert ok(await c.get("/shard/plan/a", headers=root))["version"] == 0
    # a reset keeps revocations (protocol.md §2)
    ok(await c.post("/admin/reset", headers=root))
    problem(await c.get("/stats", headers=a), 401, "TokenRevoked")


async def test_revoke_needs_admin_and_a_valid_body(make_client: AppFactory) -> None:
    app, c = await token_app(make_client)
    root = auth(root_token(app))
    a = auth(token(app, "A", ("**", "read,write")))
    problem(
        await c.post("/admin/tokens/revoke", json={"jti": "x"}, headers=a), 403, "CapabilityDenied"
    )
    for bad in ({"jti": ""}, {"jti": 5}, {"jti": "x", "exp": -1}, {"jti": "x", "exp": False}):
        problem(
            await c.post("/admin/tokens/revoke", json=bad, headers=root), 422, "ValidationError"
        )


def _until_ms(body: dict[str, Any]) -> int:
    return int(datetime.fromisoformat(body["until"]).timestamp() * 1000)


async def test_an_exp_in_the_past_still_revokes_for_the_leeway(make_client: AppFactory) -> None:
    """A revocation naming an exp already past is kept for SBUS_CLOCK_LEEWAY from the
    store's now (it used to be stored already expired: ``revoked: true`` to no effect)."""
    app, c = await token_app(make_client, clock_leeway=30)
    root = auth(root_token(app))
    value = token(app, "A", ("**", "read"))
    jti = verifier(app).verify(value).jti
    before = await runtime_of(app).bus.store.now_ms()
    body = ok(
        await c.post(
            "/admin/tokens/revoke", json={"jti": jti, "exp": int(time.time()) - 3600}, headers=root
        )
    )
    after = await runtime_of(app).bus.store.now_ms()
    assert before + 30_000 <= _until_ms(body) <= after + 30_000
    problem(await c.get("/stats", headers=auth(value)), 401, "TokenRevoked")
    # Without exp: the longest a token can live, plus the leeway, from the store's now.
    body = ok(await c.post("/admin/tokens/revoke", json={"jti": "other"}, headers=root))
    assert _until_ms(body) >= after + (86_400 + 30) * 1000


async def test_a_store_clock_ahead_cannot_bring_a_revoked_token_back(
    make_client: AppFactory,
) -> None:
    """The store forgets a revocation at exp + leeway on its own clock. When that clock
    runs ahead of the replica's, the token is still within exp for the replica, so the
    replica must refuse it by the store clock, or the revoked token works again."""
    app, c = await token_app(make_client, clock_leeway=30)
    root_value, _ = issuer(app).issue("root", [Scope("**", ALL_RIGHTS)], 86_400)
    root = auth(root_value)
    revoked = token(app, "A", ("**", "read"), ttl=600)
    unrevoked = auth(token(app, "B", ("**", "read"), ttl=600))
    claims = verifier(app).verify(revoked)
    ok(
        await c.post(
            "/admin/tokens/revoke", json={"jti": claims.jti, "exp": claims.expires_at}, headers=root
        )
    )
    problem(await c.get("/stats", headers=auth(revoked)), 401, "TokenRevoked")
    ok(await c.get("/stats", headers=unrevoked))
    # The store clock moves 700 s ahead of this replica's: past exp + leeway for the
    # store, which may now purge the entry; 100 s before exp for the replica.
    ok(await c.post("/admin/test/advance-clock", json={"ms": 700_000}, headers=root))
    await runtime_of(app).bus.store.purge()
    assert not (await runtime_of(app).bus.store.revocation(claims.jti)).revoked
    assert verifier(app).verify(revoked).jti == claims.jti
    for value in (auth(revoked), unrevoked):
        body = problem(await c.get("/stats", headers=value), 401, "Unauthorized")
        assert "expired by the store clock" in body["detail"]
    ok(await c.get("/stats", headers=root))
