"""POST /admin/tokens/revoke: the revocation list lives in the store and every request
is checked against it (SPEC section 5)."""

from __future__ import annotations

import httpx

from tests.api.auth_helpers import auth, root_token, token, token_app
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
    jti = app.state.authenticator.verifier.verify(a_token).jti
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
    # a reset keeps revocations (SPEC section 2)
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
