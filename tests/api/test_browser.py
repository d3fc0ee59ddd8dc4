"""Web pages in a browser against the bus (docs/security.md, ``sbus.api.browser``): open
mode refuses requests a browser marks as coming from another site, on every route and
before anything is recorded; SBUS_CORS_ORIGINS lets listed pages in; CORS answers
preflights before the token check and decorates every rejection of the gate;
SBUS_ALLOWED_HOSTS and SBUS_HOST widen the Host check of an open bus served to remote
clients."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from sbus.api.runtime import runtime_of
from tests.api.auth_helpers import auth, root_token, token, token_app
from tests.api.helpers import commit, committed, create, dl_entries, ok, problem, read, snapshot
from tests.conftest import AppFactory

PAGE = "https://evil.example"
APP = "https://app.example"

# What an <img>/<script> (no Origin on a GET), a form post and a fetch from a page on
# another site send. ``same-site`` is what a page on another port of localhost gets.
FOREIGN = [
    pytest.param({"Sec-Fetch-Site": "cross-site"}, id="img-cross-site"),
    pytest.param({"Sec-Fetch-Site": "same-site"}, id="img-same-site"),
    pytest.param({"Sec-Fetch-Site": "cross-site", "Origin": PAGE}, id="fetch"),
    pytest.param({"Sec-Fetch-Site": "same-site", "Origin": "http://localhost:3000"}, id="port"),
    pytest.param({"Origin": PAGE}, id="origin-only"),
    pytest.param({"Origin": "null"}, id="origin-null"),
    pytest.param({"Origin": "http://localhost.evil.example"}, id="origin-lookalike"),
    pytest.param({"Origin": "http://127.0.0.1.evil.example:7000"}, id="origin-lookalike-ip"),
    pytest.param({"Sec-Fetch-Site": "CROSS-SITE"}, id="upper-case"),
]

# Requests a local tool or the bus's own /docs page sends.
LOCAL = [
    pytest.param({}, id="no-headers"),
    pytest.param({"Sec-Fetch-Site": "none"}, id="typed-url"),
    pytest.param({"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"}, id="docs"),
    pytest.param({"Origin": "http://127.0.0.1:8080"}, id="loopback-origin"),
    pytest.param({"Origin": "https://[::1]:7000"}, id="ipv6-origin"),
    pytest.param({"Origin": "http://LOCALHOST:7000"}, id="upper-case-origin"),
]


async def stale_setup(c: httpx.AsyncClient) -> None:
    """A has read k and j at version 0; B then moved k on, so A's next commit is stale."""
    await create(c, "k")
    await create(c, "j")
    await read(c, "k", agent="A")
    await read(c, "j", agent="A")
    await committed(c, "k", 0, "b", agent="B")


@pytest.mark.parametrize("headers", FOREIGN)
async def test_a_foreign_page_cannot_refresh_a_stale_read(
    make_client: AppFactory, headers: dict[str, str]
) -> None:
    _, c = await make_client()
    await stale_setup(c)
    r = await c.get("/shard/k", params={"agent_id": "A"}, headers=headers)
    problem(r, 403, "CrossSiteRequest")
    assert await dl_entries(c, "A") == {"k": 0, "j": 0}
    # Had the read been recorded, this commit would succeed on a refreshed entry.
    body = problem(await commit(c, "j", 0, "a", agent="A"), 409, "CrossShardStale")
    assert (body["key"], body["version_at_read"], body["current_version"]) == ("k", 0, 1)


@pytest.mark.parametrize("headers", LOCAL)
async def test_local_clients_and_the_docs_page_are_served(
    make_client: AppFactory, headers: dict[str, str]
) -> None:
    _, c = await make_client()
    await create(c, "k")
    ok(await c.get("/shard/k", params={"agent_id": "A"}, headers=headers))
    assert await dl_entries(c, "A") == {"k": 0}
    r = await c.post(
        "/commit/v2",
        json={"key": "k", "expected_version": 0, "delta": "x", "agent_id": "A"},
        headers=headers,
    )
    assert ok(r)["new_version"] == 1


ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/shard/k?agent_id=A", None),
    ("GET", "/shards", None),
    ("GET", "/history/k", None),
    ("GET", "/stats", None),
    ("GET", "/livez", None),
    ("GET", "/version", None),
    ("GET", "/admin/health", None),
    ("GET", "/admin/config", None),
    ("GET", "/admin/delivery-log", None),
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
    ("GET", "/no/such/route", None),
    ("POST", "/shard", {"key": "n", "content": ""}),
    ("POST", "/commit/v2", {"key": "k", "expected_version": 0, "delta": "x", "agent_id": "A"}),
    ("POST", "/commit", {"key": "k", "expected_version": 0, "delta": "x", "agent_id": "A"}),
    ("POST", "/session", {"agent_id": "A"}),
    ("POST", "/read", {"keys": ["k"], "agent_id": "A"}),
    ("POST", "/delivery_log/register", {"agent_id": "A", "keys": ["k"]}),
    ("POST", "/admin/reset", None),
    ("POST", "/admin/config", {"ori_enabled": False}),
    ("DELETE", "/shard/k?expected_version=0&agent_id=A", None),
    ("OPTIONS", "/shard/k", None),
]


@pytest.mark.parametrize(("method", "url", "body"), ROUTES)
async def test_every_route_refuses_a_cross_site_request(
    make_client: AppFactory, method: str, url: str, body: dict[str, Any] | None
) -> None:
    _, c = await make_client()
    await create(c, "k")
    await read(c, "k", agent="A")
    before = await snapshot(c, "k")
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": PAGE}):
        r = await c.request(method, url, json=body, headers=headers)
        problem(r, 403, "CrossSiteRequest")
    assert await snapshot(c, "k") == before


async def test_the_host_check_comes_first(make_client: AppFactory) -> None:
    _, c = await make_client()
    r = await c.get("/stats", headers={"Host": "evil.example", "Sec-Fetch-Site": "cross-site"})
    problem(r, 403, "HostNotAllowed")


async def test_listed_origins_are_served_with_cors_headers(make_client: AppFactory) -> None:
    _, c = await make_client(cors_origins=f"{APP}, http://other.example")
    await create(c, "k")
    page = {"Origin": APP, "Sec-Fetch-Site": "cross-site"}
    r = await c.get("/shard/k", params={"agent_id": "A"}, headers=page)
    ok(r)
    assert r.headers["access-control-allow-origin"] == APP
    assert await dl_entries(c, "A") == {"k": 0}
    # Listing one page lets no other in, nor the listed page's Origin-less requests.
    problem(await c.get("/stats", headers={"Origin": PAGE}), 403, "CrossSiteRequest")
    problem(
        await c.get("/stats", headers={"Sec-Fetch-Site": "cross-site"}), 403, "CrossSiteRequest"
    )


async def test_any_origin_when_cors_allows_every_origin(make_client: AppFactory) -> None:
    _, c = await make_client(cors_origins="*")
    r = await c.get("/stats", headers={"Origin": PAGE, "Sec-Fetch-Site": "cross-site"})
    ok(r)
    assert r.headers["access-control-allow-origin"] == "*"
    problem(
        await c.get("/stats", headers={"Sec-Fetch-Site": "cross-site"}), 403, "CrossSiteRequest"
    )


async def test_token_mode_does_not_check_origins(make_client: AppFactory) -> None:
    app, c = await token_app(make_client)
    root = auth(root_token(app))
    r = await c.get("/stats", headers={**root, "Origin": PAGE, "Sec-Fetch-Site": "cross-site"})
    ok(r)


# -- CORS outside the gate --------------------------------------------------------------------

PREFLIGHT = {"Origin": APP, "Access-Control-Request-Method": "POST"}


def assert_cors(r: httpx.Response) -> None:
    assert r.headers["access-control-allow-origin"] == APP, r.headers
    assert "Retry-After" in r.headers["access-control-expose-headers"]


@pytest.mark.parametrize("mode", ["open", "token"])
async def test_preflight_from_a_listed_origin(make_client: AppFactory, mode: str) -> None:
    if mode == "token":
        _, c = await token_app(make_client, cors_origins=APP)
    else:
        _, c = await make_client(cors_origins=APP)
    headers = {**PREFLIGHT, "Access-Control-Request-Headers": "authorization, content-type"}
    r = await c.options("/commit/v2", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == APP
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "authorization, content-type"
    # A preflight the policy refuses is a problem document, not Starlette's plain text.
    for refused in (
        {**PREFLIGHT, "Origin": PAGE},
        {**PREFLIGHT, "Access-Control-Request-Method": "PUT"},
    ):
        body = problem(await c.options("/commit/v2", headers=refused), 403, "CrossSiteRequest")
        assert "CORS preflight refused" in body["detail"]


async def test_gate_rejections_carry_cors_headers_in_token_mode(make_client: AppFactory) -> None:
    app, c = await token_app(make_client, cors_origins=APP, max_body=100)
    page = {"Origin": APP}
    root = {**auth(root_token(app)), **page}
    r = await c.get("/stats", headers=page)
    problem(r, 401, "Unauthorized")
    assert_cors(r)
    r = await c.post("/shard", content=b"{}", headers={**root, "Content-Type": "text/plain"})
    problem(r, 415, "UnsupportedMediaType")
    assert_cors(r)
    r = await c.post("/shard", json={"key": "k", "content": "x" * 200}, headers=root)
    problem(r, 413, "RequestTooLarge")
    assert_cors(r)
    runtime_of(app).ready = False
    r = await c.get("/stats", headers=root)
    runtime_of(app).ready = True
    problem(r, 503, "StoreUnavailable")
    assert_cors(r)
    # and a refusal past the gate, as before
    reader = {**page, **auth(token(app, "A", ("**", "read")))}
    r = await c.post("/admin/tokens/revoke", json={"jti": "x"}, headers=reader)
    problem(r, 403, "CapabilityDenied")
    assert_cors(r)


async def test_gate_rejections_carry_cors_headers_in_open_mode(make_client: AppFactory) -> None:
    app, c = await make_client(cors_origins=APP, max_body=100)
    page = {"Origin": APP}
    r = await c.get("/stats", headers={**page, "Host": "evil.example"})
    problem(r, 403, "HostNotAllowed")
    assert_cors(r)
    r = await c.post("/shard", content=b"{}", headers={**page, "Content-Type": "text/plain"})
    problem(r, 415, "UnsupportedMediaType")
    assert_cors(r)
    r = await c.post("/shard", json={"key": "k", "content": "x" * 200}, headers=page)
    problem(r, 413, "RequestTooLarge")
    assert_cors(r)
    runtime_of(app).ready = False
    r = await c.get("/stats", headers=page)
    runtime_of(app).ready = True
    problem(r, 503, "StoreUnavailable")
    assert_cors(r)


# -- open mode served to remote clients ---------------------------------------------------------


async def test_open_mode_on_a_public_bind_accepts_its_own_names(make_client: AppFactory) -> None:
    _, c = await make_client(
        host="192.0.2.10", auth="open", allow_insecure=True, allowed_hosts="bus.lan, Bus.Test:7000"
    )
    await create(c, "k")
    for host in ("192.0.2.10:7000", "192.0.2.10", "bus.lan:7000", "bus.test", "localhost:7000"):
        ok(await c.get("/shard/k", params={"agent_id": "A"}, headers={"Host": host}))
    for host in ("evil.example", "192.0.2.11:7000", "bus.lan.evil.example"):
        r = await c.get("/shard/k", params={"agent_id": "B"}, headers={"Host": host})
        problem(r, 403, "HostNotAllowed")
    assert await dl_entries(c, "B") == {}
    # The bus's own page (its /docs) under an allowed name is same-origin...
    own = {"Host": "bus.lan:7000", "Origin": "http://bus.lan:7000", "Sec-Fetch-Site": "same-origin"}
    r = await c.post(
        "/commit/v2",
        json={"key": "k", "expected_version": 0, "delta": "x", "agent_id": "A"},
        headers=own,
    )
    assert ok(r)["new_version"] == 1
    # ...a page elsewhere is not, even one on another allowed name.
    other = {"Host": "bus.lan:7000", "Origin": "http://bus.test:7000"}
    problem(await c.get("/stats", headers=other), 403, "CrossSiteRequest")


async def test_ipv6_bind_and_names(make_client: AppFactory) -> None:
    _, c = await make_client(
        host="fd00::2", auth="open", allow_insecure=True, allowed_hosts="fd00::3"
    )
    for host in ("[fd00::2]:7000", "[FD00::3]", "[::1]:7000"):
        ok(await c.get("/stats", headers={"Host": host}))
    problem(await c.get("/stats", headers={"Host": "[fd00::4]"}), 403, "HostNotAllowed")


async def test_allowed_hosts_are_ignored_in_token_mode(make_client: AppFactory) -> None:
    # Token mode has no Host check at all: the token is the credential.
    app, c = await token_app(make_client, allowed_hosts="bus.lan")
    ok(await c.get("/stats", headers={**auth(root_token(app)), "Host": "anything.example"}))
