"""Token mode looks every token's jti up in the store before the request reaches the app.
When the store cannot answer, the gate refuses with the same 503 StoreUnavailable problem
(Retry-After, outcome not_applied) the routes give, never a bare 500, and never lets the
token through unchecked (docs/security.md)."""

from __future__ import annotations

from sbus.api.runtime import runtime_of
from sbus.core.errors import StoreUnavailable
from sbus.core.types import Revocation
from tests.api.auth_helpers import auth, root_token, token_app
from tests.api.helpers import ok, problem
from tests.conftest import AppFactory


async def test_a_store_outage_during_the_revocation_lookup_is_503(
    make_client: AppFactory,
) -> None:
    app, c = await token_app(make_client)
    root = auth(root_token(app))
    ok(await c.post("/shard", json={"key": "k", "content": "v0"}, headers=root), 201)
    authenticator = runtime_of(app).authenticator
    working = authenticator.revoked

    async def unreachable(jti: str) -> Revocation:
        raise StoreUnavailable("store unreachable")

    authenticator.revoked = unreachable
    for request in (
        c.get("/shard/k", headers=root),
        c.post("/commit/v2", json={"key": "k", "expected_version": 0, "delta": "x"}, headers=root),
    ):
        r = await request
        body = problem(r, 503, "StoreUnavailable")
        assert body["outcome"] == "not_applied"
        assert r.headers["retry-after"] == "1"
        assert "www-authenticate" not in r.headers
    authenticator.revoked = working
    shard = ok(await c.get("/shard/k", headers=root))
    assert shard["version"] == 0  # the refused commit changed nothing
