"""Token mode over HTTP (protocol.md §§2, 4 steps 1/4/8 and 5): authentication,
identity binding, capabilities on every route that changes or reveals state, and
POST /admin/tokens. Every refusal asserts the exact status and code and that no state
changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from sbus import __version__
from sbus.api.runtime import runtime_of
from sbus.bootstrap import startup_problem
from sbus.config import Settings
from sbus.core.rights import ALL_RIGHTS, Scope
from sbus.security.keys import KeySet, load_private_key, write_keypair
from sbus.security.tokens import Issuer
from tests.api.auth_helpers import (
    BAD_ADMIN_ROUTES,
    SECRET,
    alg_none_token,
    auth,
    expired_token,
    root_token,
    token,
    token_app,
    wrong_secret_token,
)
from tests.api.helpers import ok, problem
from tests.conftest import AppFactory

Env = tuple[FastAPI, httpx.AsyncClient, dict[str, str], dict[str, str]]


@pytest.fixture
async def env(make_client: AppFactory) -> Env:
    """Shards plan/a, code/A/x, secret/s; ``root`` holds every right; agent A may read
    plan/* and code/A/*, and write, create and delete code/A/*."""
    app, c = await token_app(make_client)
    root = auth(root_token(app))
    for key in ("plan/a", "code/A/x", "secret/s"):
        ok(await c.post("/shard", json={"key": key, "content": "v0"}, headers=root), 201)
    a = auth(token(app, "A", ("plan/*", "read"), ("code/A/*", "read,write,create,delete")))
    return app, c, root, a


async def version(c: httpx.AsyncClient, root: dict[str, str], key: str) -> int:
    body = ok(await c.get(f"/shard/{key}", params={"record": "false"}, headers=root))
    v: int = body["version"]
    return v


async def dl_keys(c: httpx.AsyncClient, root: dict[str, str], agent: str) -> set[str]:
    body = ok(await c.get("/admin/delivery-log", headers=root))
    return set(body["agents"].get(agent, {}))


def denied(r: httpx.Response, key: str, right: str) -> None:
    body = problem(r, 403, "CapabilityDenied")
    assert (body["key"], body["right"]) == (key, right), body


# -- step 1: authentication -----------------------------------------------------------------


async def test_bad_tokens_are_401_on_commit_and_get(make_client: AppFactory) -> None:
    app, c = await token_app(make_client)
    root = auth(root_token(app))
    ok(await c.post("/shard", json={"key": "k", "content": ""}, headers=root), 201)
    commit = {"key": "k", "expected_version": 0, "delta": "x"}
    cases: list[tuple[dict[str, str], str]] = [
        ({}, "Bearer"),
        ({"Authorization": "Basic YTpi"}, "Bearer"),
        ({"Authorization": "Bearer"}, "Bearer"),
        ({"Authorization": "Bearer not-a-jwt"}, 'Bearer error="invalid_token"'),
        (auth(expired_token(app)), 'Bearer error="invalid_token"'),
        (auth(alg_none_token(app)), 'Bearer error="invalid_token"'),
        (auth(wrong_secret_token(app)), 'Bearer error="invalid_token"'),
    ]
    for headers, challenge in cases:
        for r in (
            await c.post("/commit", json=commit, headers=headers),
            await c.get("/shard/k", headers=headers),
            await c.get("/stats", headers=headers),
        ):
            problem(r, 401, "Unauthorized")
            assert r.headers["www-authenticate"] == challenge, (headers, r.headers)
    assert await version(c, root, "k") == 0
    assert await dl_keys(c, root, "a") == set()


async def test_auth_runs_before_the_body_cap(make_client: AppFactory) -> None:
    _, c = await token_app(make_client, max_body=10)
    r = await c.post("/commit", content=b"x" * 100)
    problem(r, 401, "Unauthorized")


async def test_public_routes_need_no_token(make_client: AppFactory) -> None:
    app, c = await token_app(make_client)
    assert (await c.get("/livez")).status_code == 200
    assert ok(await c.get("/version")) == {"name": "sbus", "version": __version__, "api": 1}
    assert ok(await c.get("/admin/health"))["status"] == "ok"
    assert (await c.get("/openapi.json")).status_code == 200
    problem(await c.get("/metrics"), 401, "Unauthorized")
    problem(await c.get("/admin/config"), 401, "Unauthorized")
    problem(await c.get("/no/such/route"), 401, "Unauthorized")
    weak = auth(token(app, "w", ("nothing/*", "read")))
    ok(await c.get("/stats", headers=weak))
    r = await c.get("/metrics", headers=weak)
    assert r.status_code == 200
    assert ok(await c.get("/admin/config", headers=weak))["ok"] is True


# -- step 4: identity -----------------------------------------------------------------------


async def test_the_token_is_the_agent(env: Env) -> None:
    _, c, root, a = env
    body = {"key": "code/A/x", "expected_version": 0, "delta": "x"}
    problem(
        await c.post("/commit", json={**body, "agent_id": "B"}, headers=a), 403, "AgentMismatch"
    )
    for header in ("X-Agent-Id", "X-SBus-Agent-Id"):
        r = await c.post("/commit", json=body, headers={**a, header: "B"})
        problem(r, 403, "AgentMismatch")
    r = await c.get("/shard/plan/a", params={"agent_id": "B"}, headers=a)
    problem(r, 403, "AgentMismatch")
    assert await version(c, root, "code/A/x") == 0
    assert await dl_keys(c, root, "B") == set()
    # Naming yourself is fine; naming nobody records for the token's agent.
    ok(await c.post("/commit", json={**body, "agent_id": "A"}, headers={**a, "X-Agent-Id": "A"}))
    ok(await c.get("/shard/plan/a", headers=a))
    assert await dl_keys(c, root, "A") == {"plan/a", "code/A/x"}
    history = ok(await c.get("/history/code/A/x", headers=a))
    assert history["entries"][0]["agent_id"] == "A"


async def test_identity_is_checked_before_capabilities(env: Env) -> None:
    _, c, root, a = env
    body = {"key": "secret/s", "expected_version": 0, "delta": "x", "agent_id": "B"}
    problem(await c.post("/commit", json=body, headers=a), 403, "AgentMismatch")
    assert await version(c, root, "secret/s") == 0


async def test_limits_are_checked_before_capabilities(make_client: AppFactory) -> None:
    app, c = await token_app(make_client, max_delta=4)
    root = auth(root_token(app))
    ok(await c.post("/shard", json={"key": "s", "content": ""}, headers=root), 201)
    reader = auth(token(app, "r", ("**", "read")))
    body = {"key": "s", "expected_version": 0, "delta": "too long"}
    problem(await c.post("/commit", json=body, headers=reader), 413, "DeltaTooLarge")
    denied(await c.post("/commit", json={**body, "delta": "ok"}, headers=reader), "s", "write")
    assert await version(c, root, "s") == 0


# -- step 8: capabilities on every route ----------------------------------------------------


async def test_writes_need_the_write_right(env: Env) -> None:
    _, c, root, a = env
    one = {"expected_version": 0, "delta": "x"}
    for path in ("/commit", "/commit/v2"):
        denied(await c.post(path, json={"key": "plan/a", **one}, headers=a), "plan/a", "write")
        r = await c.post(
            path,
            json={
                "key": "code/A/x",
                **one,
                "read_set": [{"key": "secret/s", "version_at_read": 0}],
            },
            headers=a,
        )
        denied(r, "secret/s", "read")
    multi = {
        "writes": [
            {"key": "code/A/x", "expected_version": 0, "delta": "x"},
            {"key": "plan/a", "expected_version": 0, "delta": "x"},
        ],
        "read_set": [{"key": "secret/s", "version_at_read": 0}],
    }
    # Sorted order: plan/a (write) comes before secret/s (read).
    denied(await c.post("/commit/multi", json=multi, headers=a), "plan/a", "write")
    r = await c.post("/rollback", json={"key": "plan/a", "target_version": 0}, headers=a)
    denied(r, "plan/a", "write")
    for key in ("plan/a", "code/A/x", "secret/s"):
        assert await version(c, root, key) == 0, key
    stats = ok(await c.get("/stats", headers=root))
    assert stats["total_commits"] == 0 and stats["total_attempts"] == 0


async def test_create_and_delete_need_their_rights(env: Env) -> None:
    _, c, root, a = env
    denied(
        await c.post("/shard", json={"key": "plan/b", "content": ""}, headers=a), "plan/b", "create"
    )
    problem(await c.get("/shard/plan/b", headers=root), 404, "ShardNotFound")
    r = await c.delete("/shard/secret/s", params={"expected_version": 0}, headers=a)
    denied(r, "secret/s", "delete")
    r = await c.delete("/shard/plan/a", headers={**a, "If-Match": '"0"'})
    denied(r, "plan/a", "delete")
    assert await version(c, root, "secret/s") == 0
    assert await version(c, root, "plan/a") == 0
    # Within its scope the same token works.
    ok(await c.post("/shard", json={"key": "code/A/y", "content": ""}, headers=a), 201)
    r = await c.delete("/shard/code/A/y", params={"expected_version": 0}, headers=a)
    assert r.status_code == 204


async def test_reads_need_the_read_right_and_are_not_recorded(env: Env) -> None:
    _, c, root, a = env
    for params in ({}, {"record": "false"}):
        denied(await c.get("/shard/secret/s", params=params, headers=a), "secret/s", "read")
    denied(await c.get("/history/secret/s", headers=a), "secret/s", "read")
    denied(await c.get("/shard/never/was", headers=a), "never/was", "read")
    assert await dl_keys(c, root, "A") == set()
    ok(await c.get("/shard/plan/a", headers=a))
    assert await dl_keys(c, root, "A") == {"plan/a"}


async def test_list_shows_only_readable_keys(env: Env) -> None:
    _app, c, root, a = env
    assert ok(await c.get("/shards", headers=a)) == {
        "shards": ["code/A/x", "plan/a"],
        "count": 2,
        "next_after": None,
    }
    page = ok(await c.get("/shards", params={"limit": 1}, headers=a))
    assert page == {"shards": ["code/A/x"], "count": 1, "next_after": "code/A/x"}
    page = ok(await c.get("/shards", params={"limit": 1, "after": "code/A/x"}, headers=a))
    assert page == {"shards": ["plan/a"], "count": 1, "next_after": None}
    # Many unreadable keys between readable ones: pages may come back short, but
    # paging by next_after yields every readable key exactly once.
    for i in range(40):
        ok(await c.post("/shard", json={"key": f"m/{i:02}", "content": ""}, headers=root), 201)
    seen: list[str] = []
    after: str | None = None
    for _ in range(100):
        params: dict[str, Any] = {"limit": 1} | ({"after": after} if after else {})
        page = ok(await c.get("/shards", params=params, headers=a))
        assert page["count"] == len(page["shards"]) <= 1
        seen.extend(page["shards"])
        after = page["next_after"]
        if after is None:
            break
    assert seen == ["code/A/x", "plan/a"]
    everything = ok(await c.get("/shards", headers=root))
    assert everything["count"] == 43


async def test_list_paging_never_names_an_unreadable_key(env: Env) -> None:
    """A cursor is a key: one the caller may not read must never be handed back as
    next_after, even when the bounded scan ends among many unreadable keys (it would
    name them one page at a time, and an ``after`` of the caller's choosing would find
    the rest)."""
    _app, c, root, a = env
    for i in range(60):
        ok(await c.post("/shard", json={"key": f"m/{i:02}", "content": ""}, headers=root), 201)
    queries: list[dict[str, Any]] = [
        {"prefix": "m/"},
        {"prefix": "m/", "limit": 1},
        {"limit": 1, "after": "m"},
    ]
    for query in queries:
        page = ok(await c.get("/shards", params=query, headers=a))
        assert page["next_after"] in (None, *page["shards"]), (query, page)
    assert ok(await c.get("/shards", params={"prefix": "m/", "limit": 1}, headers=a)) == {
        "shards": [],
        "count": 0,
        "next_after": None,
    }
    seen: list[str] = []
    after: str | None = None
    for _ in range(100):
        params: dict[str, Any] = {"limit": 1} | ({"after": after} if after else {})
        page = ok(await c.get("/shards", params=params, headers=a))
        assert page["next_after"] in (None, *page["shards"]), page
        seen.extend(page["shards"])
        after = page["next_after"]
        if after is None:
            break
    assert seen == ["code/A/x", "plan/a"]


async def test_register_skips_unreadable_keys(env: Env) -> None:
    _, c, root, a = env
    body = {"agent_id": "A", "shards_used": ["secret/s", "plan/a", "nope/x"]}
    result = ok(await c.post("/delivery_log/register", json=body, headers=a))
    assert result == {
        "ok": True,
        "registered": 1,
        "skipped_existing": [],
        "skipped_no_shard": ["secret/s", "nope/x"],
    }
    assert await dl_keys(c, root, "A") == {"plan/a"}
    r = await c.post("/delivery_log/register", json={**body, "agent_id": "B"}, headers=a)
    problem(r, 403, "AgentMismatch")
    assert await dl_keys(c, root, "B") == set()


async def test_session_of_another_agent_needs_admin(env: Env) -> None:
    app, c, root, a = env
    ok(await c.get("/shard/plan/a", headers=auth(token(app, "B", ("**", "read")))))
    problem(await c.post("/session", json={"agent_id": "B"}, headers=a), 403, "AgentMismatch")
    # Who may act for B is decided before the session the request names is read.
    for session, header in (("x", "y"), (None, "s" * 300)):
        body = {"agent_id": "B"} | ({"session_id": session} if session else {})
        r = await c.post("/session", json=body, headers={**a, "X-SBus-Session-Id": header})
        assert problem(r, 403, "AgentMismatch")["detail"] == (
            "the token is for agent 'A'; resetting 'B''s session needs the admin right"
        )
    assert await dl_keys(c, root, "B") == {"plan/a"}
    assert ok(await c.post("/session", json={"agent_id": "A"}, headers=a)) == {
        "agent_id": "A",
        "status": "created",
    }
    assert ok(await c.post("/session", json={}, headers=a))["agent_id"] == "A"
    r = await c.post("/session", json={"agent_id": "B"}, headers={**root, "X-Agent-Id": "B"})
    problem(r, 403, "AgentMismatch")
    ok(await c.post("/session", json={"agent_id": "B"}, headers=root))
    assert await dl_keys(c, root, "B") == set()


ADMIN_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/admin/reset", None),
    ("POST", "/admin/config", {"ori_enabled": False}),
    ("GET", "/admin/delivery-log", None),
    ("POST", "/admin/inject-stale", {"agent_id": "A", "key": "plan/a", "stale_version": 0}),
    ("POST", "/admin/shard", {"key": "code/A/new", "content": "x"}),
    ("POST", "/admin/test/advance-clock", {"ms": 1000}),
    (
        "POST",
        "/admin/tokens",
        {"agent": "A", "scopes": [{"pattern": "**", "rights": ["admin"]}], "ttl_s": 60},
    ),
]


async def test_admin_routes_need_the_admin_right(env: Env) -> None:
    app, c, root, a = env
    before = ok(await c.get("/stats", headers=root))
    # Every right but admin, on every key, is still not admin.
    almost = auth(token(app, "A", ("**", "read,write,create,delete,mandate")))
    for headers in (a, almost):
        for method, path, body in ADMIN_ROUTES:
            r = await c.request(method, path, json=body, headers=headers)
            denied(r, "**", "admin")
    assert ok(await c.get("/stats", headers=root)) == before
    assert ok(await c.get("/admin/config", headers=root))["ori_enabled"] is True
    problem(await c.get("/shard/code/A/new", headers=root), 404, "ShardNotFound")


async def test_admin_routes_refuse_a_non_admin_before_reading_the_body(env: Env) -> None:
    _app, c, root, a = env
    for method, path, body in BAD_ADMIN_ROUTES:
        problem(await c.request(method, path, json=body, headers=root), 422, "ValidationError")
        denied(await c.request(method, path, json=body, headers=a), "**", "admin")


async def test_admin_shard_also_needs_create(env: Env) -> None:
    app, c, root, _ = env
    admin_only = auth(token(app, "op", ("**", "admin"), ("plan/*", "create")))
    r = await c.post("/admin/shard", json={"key": "code/B/x", "content": ""}, headers=admin_only)
    denied(r, "code/B/x", "create")
    problem(await c.get("/shard/code/B/x", headers=root), 404, "ShardNotFound")
    r = await c.post("/admin/shard", json={"key": "plan/new", "content": ""}, headers=admin_only)
    assert ok(r, 201)["version"] == 0


async def test_all_rights_token_can_do_everything(env: Env) -> None:
    _app, c, root, _ = env
    ok(await c.post("/shard", json={"key": "z/1", "content": "a"}, headers=root), 201)
    ok(
        await c.post(
            "/commit", json={"key": "z/1", "expected_version": 0, "delta": "b"}, headers=root
        )
    )
    multi = {
        "writes": [
            {"key": "z/1", "expected_version": 1, "delta": "c"},
            {"key": "secret/s", "expected_version": 0, "delta": "c"},
        ],
        "read_set": [{"key": "plan/a", "version_at_read": 0}],
    }
    ok(await c.post("/commit/multi", json=multi, headers=root))
    ok(await c.post("/rollback", json={"key": "z/1", "target_version": 0}, headers=root))
    assert ok(await c.get("/shard/z/1", headers=root))["content"] == "a"
    assert len(ok(await c.get("/history/z/1", headers=root))["entries"]) == 4
    assert (
        await c.delete("/shard/z/1", params={"expected_version": 3}, headers=root)
    ).status_code == 204
    ok(
        await c.post(
            "/delivery_log/register",
            json={"agent_id": "root", "shards_used": ["plan/a"]},
            headers=root,
        )
    )
    ok(await c.post("/session", json={"agent_id": "A"}, headers=root))
    ok(await c.post("/admin/config", json={"ori_enabled": False}, headers=root))
    ok(
        await c.post(
            "/admin/inject-stale",
            json={"agent_id": "A", "key": "plan/a", "stale_version": 0},
            headers=root,
        )
    )
    ok(await c.post("/admin/shard", json={"key": "z/2", "content": ""}, headers=root), 201)
    issued = ok(
        await c.post(
            "/admin/tokens",
            json={"agent": "C", "scopes": [{"pattern": "z/*", "rights": ["read"]}], "ttl_s": 60},
            headers=root,
        ),
        201,
    )
    assert issued["claims"]["sub"] == "C"
    assert issued["claims"]["scopes"] == [{"pattern": "z/*", "rights": ["read"]}]
    assert issued["jti"] == issued["claims"]["jti"]
    assert issued["expires_at"].endswith("Z")
    c_auth = auth(issued["token"])
    assert ok(await c.get("/shards", headers=c_auth))["shards"] == ["z/2"]
    denied(await c.get("/shard/plan/a", headers=c_auth), "plan/a", "read")
    assert ok(await c.post("/admin/reset", headers=root))["cleared"] >= 1
    assert ok(await c.get("/shards", headers=root))["count"] == 0


# -- POST /admin/tokens ---------------------------------------------------------------------


async def test_issue_token_validates(make_client: AppFactory) -> None:
    app, c = await token_app(make_client, token_max_ttl=3600)
    root = auth(root_token(app))
    good = {"agent": "A", "scopes": [{"pattern": "a/*", "rights": ["read"]}], "ttl_s": 60}
    bad: list[dict[str, Any]] = [
        {**good, "scopes": [{"pattern": "a/*", "rights": ["admin"]}]},
        {**good, "scopes": [{"pattern": "a/*", "rights": ["fly"]}]},
        {**good, "scopes": [{"pattern": "a/***", "rights": ["read"]}]},
        {**good, "ttl_s": 3601},
        {**good, "ttl_s": 0},
        {**good, "ttl_s": True},
        {**good, "agent": ""},
    ]
    for body in bad:
        problem(await c.post("/admin/tokens", json=body, headers=root), 422, "ValidationError")


async def test_verify_only_replica_cannot_issue(make_client: AppFactory, tmp_path: Path) -> None:
    private, public, _ = write_keypair(tmp_path / "k.pem")
    app, c = await make_client(auth="token", verify_key=str(public), admin_enabled=False)
    signer = Issuer.from_settings(
        runtime_of(app).settings, KeySet.from_ed25519(load_private_key(private))
    )
    root, _ = signer.issue("root", [Scope("**", ALL_RIGHTS)], 600)
    ok(await c.get("/stats", headers=auth(root)))
    body = {"agent": "A", "scopes": [{"pattern": "**", "rights": ["read"]}], "ttl_s": 60}
    r = await c.post("/admin/tokens", json=body, headers=auth(root))
    problem(r, 503, "SigningUnavailable")
    assert "retry-after" not in r.headers
    # An HS256 token is refused by an EdDSA deployment.
    problem(await c.get("/stats", headers=auth(wrong_secret_token(app))), 401, "Unauthorized")


# -- open mode --------------------------------------------------------------------------------


async def test_open_mode_admin_tokens(make_client: AppFactory, tmp_path: Path) -> None:
    _, c = await make_client(secret=SECRET)
    body = {"agent": "A", "scopes": [{"pattern": "**", "rights": ["read"]}], "ttl_s": 60}
    assert ok(await c.post("/admin/tokens", json=body), 201)["claims"]["sub"] == "A"
    # Without a configured key open mode signs with the store's (test_open_mode_keys.py);
    # a verify-only configuration still cannot sign.
    _, bare = await make_client()
    assert ok(await bare.post("/admin/tokens", json=body), 201)["claims"]["sub"] == "A"
    _, public, _ = write_keypair(tmp_path / "k.pem")
    _, verify_only = await make_client(verify_key=str(public))
    problem(await verify_only.post("/admin/tokens", json=body), 503, "SigningUnavailable")
    mandate = {"agent_id": "G", "holder": "A", "keys": ["k"], "ttl_s": 60}
    problem(await verify_only.post("/mandates", json=mandate), 503, "SigningUnavailable")
    _, closed = await make_client(secret=SECRET, admin_enabled=False)
    problem(await closed.post("/admin/tokens", json=body), 403, "AdminDisabled")


async def test_open_mode_ignores_tokens(make_client: AppFactory) -> None:
    _, c = await make_client()
    r = await c.get("/shards", headers={"Authorization": "Bearer junk"})
    assert ok(r)["count"] == 0


def test_token_mode_starts_with_a_key() -> None:
    assert startup_problem(Settings(host="0.0.0.0", secret=SECRET)) is None
    problem_text = startup_problem(Settings(host="0.0.0.0", secret="short"))
    assert problem_text is not None and "SBUS_SECRET" in problem_text
    assert startup_problem(Settings(host="0.0.0.0")) is not None
    problem_text = startup_problem(Settings(host="0.0.0.0", auth="open"))
    assert problem_text is not None and "SBUS_ALLOW_INSECURE" in problem_text


async def test_issue_refuses_tokens_the_verifier_would_refuse(make_client: AppFactory) -> None:
    """Within every pattern bound, 256 scopes of non-ASCII patterns (each character
    \\u-escaped to 12 bytes in the JSON) still sign to more than the 64 KiB a verifier
    reads: 422 at issue, not a token that can never authenticate."""
    app, c = await token_app(make_client)
    root = auth(root_token(app))
    rights = ["read", "write", "create", "delete", "mandate"]
    scopes = [{"pattern": f"{i:03d}/" + "\U0001f600" * 12, "rights": rights} for i in range(256)]
    body = {"agent": "A", "scopes": scopes, "ttl_s": 60}
    detail = problem(await c.post("/admin/tokens", json=body, headers=root), 422, "ValidationError")
    assert "65536" in detail["detail"]
    ok(await c.post("/admin/tokens", json={**body, "scopes": scopes[:64]}, headers=root), 201)


async def test_issue_bounds_the_scope_patterns(make_client: AppFactory) -> None:
    app, c = await token_app(make_client)
    root = auth(root_token(app))
    scope = {"pattern": "p/" + "x" * 510, "rights": ["read"]}
    body = {"agent": "A", "scopes": [scope] * 8, "ttl_s": 60}
    issued = ok(await c.post("/admin/tokens", json=body, headers=root), 201)
    ok(await c.get("/stats", headers=auth(issued["token"])))
    over = {**body, "scopes": [scope] * 9}  # 4608 characters of patterns
    r = await c.post("/admin/tokens", json=over, headers=root)
    assert "at most 4096" in problem(r, 422, "ValidationError")["detail"]
