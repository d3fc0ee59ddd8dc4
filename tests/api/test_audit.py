"""The audit log (protocol.md section 2.12) on every store: one entry per audited
action with its fields, refusals counted in one entry per (agent, key, minute), a
mandate's consumption written with its commit and never without it, retention by age
and by row count on the store clock, paging by id, and GET /admin/audit for the admin
right only."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fastapi import FastAPI

from sbus.api.runtime import runtime_of
from sbus.core.clock import rfc3339
from sbus.core.rights import ALL_RIGHTS, Scope
from tests.api.auth_helpers import auth, issuer, token, token_app
from tests.api.helpers import ok, problem
from tests.conftest import AppFactory


def bearer(app: FastAPI, agent: str, pattern: str, *rights: str) -> tuple[dict[str, str], str]:
    """A token's headers, and its jti."""
    scope = Scope(pattern, ALL_RIGHTS) if not rights else Scope.of(pattern, *rights)
    value, claims = issuer(app).issue(agent, [scope], 600)
    return auth(value), claims.jti


def root(app: FastAPI) -> tuple[dict[str, str], str]:
    return bearer(app, "root", "**")


async def entries(
    c: httpx.AsyncClient, headers: dict[str, str], **query: Any
) -> list[dict[str, Any]]:
    """Every entry after ``query`` (all pages)."""
    out: list[dict[str, Any]] = []
    params = {"limit": 1000, **query}
    while True:
        page = ok(await c.get("/admin/audit", params=params, headers=headers))
        out.extend(page["entries"])
        if page["next_after"] is None:
            return out
        params["after"] = page["next_after"]


def strip(found: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, agent, details) of each entry, the admin reads of the log itself left out."""
    return [
        (e["kind"], e["agent"], e["details"])
        for e in found
        if not (e["kind"] == "admin" and e["details"]["op"] == "audit")
    ]


async def start_of_a_minute(app: FastAPI) -> None:
    """Move the store clock to just past the start of a minute, so that what follows
    shares one aggregation minute (59 s of store time). Through the store: the admin
    route would write entries of its own."""
    store = runtime_of(app).bus.store
    await store.advance_clock(60_000 - await store.now_ms() % 60_000 + 1)


async def test_each_audited_action_writes_one_entry(make_client: AppFactory) -> None:
    app, c = await token_app(make_client, test_hooks=True)
    admin, admin_jti = root(app)
    for key, mandated in (("pay/1", True), ("free", False)):
        body = {"key": key, "content": "v0", "policy": {"require_mandate": mandated}}
        ok(await c.post("/shard", json=body, headers=admin), 201)
    g, g_jti = bearer(app, "G", "pay/*", "mandate")
    a, a_jti = bearer(app, "A", "**", "read", "write")
    # Creates, reads and commits without a mandate are not audited.
    ok(await c.get("/shard/free", headers=a))
    ok(
        await c.post(
            "/commit/v2", json={"key": "free", "expected_version": 0, "delta": "x"}, headers=a
        )
    )
    assert strip(await entries(c, admin)) == []

    issued = ok(
        await c.post(
            "/admin/tokens",
            json={"agent": "B", "scopes": [{"pattern": "b/*", "rights": ["read"]}], "ttl_s": 60},
            headers=admin,
        ),
        201,
    )
    ok(await c.post("/admin/tokens/revoke", json={"jti": issued["jti"]}, headers=admin))
    grant: dict[str, Any] = {"holder": "A", "keys": ["pay/*"], "context": {"order": 7}, "ttl_s": 60}
    mandate = ok(await c.post("/mandates", json=grant, headers=g), 201)
    paid = {"key": "pay/1", "delta": "paid", "mandate": mandate["mandate"], "context": {"order": 7}}
    # A commit refused in the atomic step consumes nothing and writes no entry...
    stale = await c.post("/commit/v2", json={**paid, "expected_version": 5}, headers=a)
    problem(stale, 409, "VersionMismatch")
    # ...the one that lands writes the consumption with it.
    landed = ok(await c.post("/commit/v2", json={**paid, "expected_version": 0}, headers=a))
    ok(await c.post("/admin/config", json={"ori_enabled": False}, headers=admin))
    ok(await c.post("/session", json={"agent_id": "A"}, headers=a))
    ok(await c.get("/admin/delivery-log", headers=admin))
    ok(await c.post("/admin/reset", headers=admin))

    found = await entries(c, admin)
    assert [e["id"] for e in found] == sorted({e["id"] for e in found})
    assert all(isinstance(e["at"], int) for e in found)
    actions = strip(found)
    until = actions[1][2]["until"]
    mandate_expiry = actions[2][2]["expires_at"]
    assert rfc3339(mandate_expiry) == mandate["expires_at"]
    assert actions == [
        (
            "token_issue",
            "root",
            {
                "token_id": issued["jti"],
                "subject": "B",
                "scopes": [{"pattern": "b/*", "rights": ["read"]}],
                "expires_at": issued["claims"]["exp"] * 1000,
                "via_token": admin_jti,
            },
        ),
        (
            "token_revoke",
            "root",
            {
                "token_id": issued["jti"],
                "until": until,
                "via_token": admin_jti,
            },
        ),
        (
            "mandate_issue",
            "G",
            {
                "mandate_id": mandate["jti"],
                "holder": "A",
                "keys": ["pay/*"],
                "expires_at": mandate_expiry,
                "via_token": g_jti,
            },
        ),
        (
            "mandate_consume",
            "A",
            {"mandate_id": mandate["jti"], "commit_id": landed["commit_id"], "keys": ["pay/1"]},
        ),
        ("config", "root", {"ori_enabled": False, "via_token": admin_jti}),
        ("session_reset", "A", {"agent": "A", "session": "", "via_token": a_jti}),
        ("admin", "root", {"op": "delivery_log", "via_token": admin_jti, "count": 1}),
        ("reset", "root", {"shards": 2, "via_token": admin_jti}),
    ]
    revoke_entry = next(e for e in found if e["kind"] == "token_revoke")
    assert until > revoke_entry["at"]


async def test_a_flood_of_refusals_is_one_counted_entry(make_client: AppFactory) -> None:
    app, c = await token_app(make_client, test_hooks=True)
    admin, _ = root(app)
    ok(await c.post("/shard", json={"key": "k", "content": "v0"}, headers=admin), 201)
    reader = auth(token(app, "R", ("k", "read")))
    await start_of_a_minute(app)
    body = {"key": "k", "expected_version": 0, "delta": "x"}
    answers = await asyncio.gather(
        *(c.post("/commit/v2", json=body, headers=reader) for _ in range(30))
    )
    for answer in answers:
        problem(answer, 403, "CapabilityDenied")
    # another key, and the admin right, are entries of their own
    problem(await c.get("/shard/other", headers=reader), 403, "CapabilityDenied")
    problem(await c.get("/admin/audit", headers=reader), 403, "CapabilityDenied")
    problem(await c.get("/admin/audit", headers=reader), 403, "CapabilityDenied")

    denied = [e for e in await entries(c, admin) if e["kind"] == "denied"]
    assert [(e["agent"], e["details"]) for e in denied] == [
        ("R", {"key": "k", "right": "write", "count": 30}),
        ("R", {"key": "other", "right": "read", "count": 1}),
        ("R", {"key": "**", "right": "admin", "count": 2}),
    ]
    # the next minute of the store clock starts a new entry
    await runtime_of(app).bus.store.advance_clock(60_000)
    problem(await c.post("/commit/v2", json=body, headers=reader), 403, "CapabilityDenied")
    denied = [e for e in await entries(c, admin) if e["kind"] == "denied"]
    assert [e["details"]["count"] for e in denied] == [30, 1, 2, 1]


async def test_retention_by_age_and_by_rows_on_the_store_clock(make_client: AppFactory) -> None:
    app, c = await make_client(audit_ttl=600, audit_max_rows=3)
    # The store is read and its clock moved directly: the admin routes write entries.
    store = runtime_of(app).bus.store

    async def flags() -> list[bool]:
        return [e.details["ori_enabled"] for e in await store.audit_log(None, 100)]

    for flag in (False, True):
        ok(await c.post("/admin/config", json={"ori_enabled": flag}))
    await store.advance_clock(300_000)
    ok(await c.post("/admin/config", json={"ori_enabled": False}))
    await store.purge()
    assert await flags() == [False, True, False]  # none is 600 s old yet
    # 600.001 s after the first two (and well under 600 s after the third)
    await store.advance_clock(300_001)
    await store.purge()
    assert await flags() == [False]
    # the row cap keeps the newest three
    for flag in (True, False, True):
        ok(await c.post("/admin/config", json={"ori_enabled": flag}))
    ids = [e.id for e in await store.audit_log(None, 100)]
    assert len(ids) == 4
    await store.purge()
    assert [e.id for e in await store.audit_log(None, 100)] == ids[1:]
    assert await flags() == [True, False, True]


async def test_paging_by_id(make_client: AppFactory) -> None:
    app, c = await make_client()
    await start_of_a_minute(app)  # the reads below share one admin entry
    for flag in (False, True, False, True, False):
        ok(await c.post("/admin/config", json={"ori_enabled": flag}))
    first = ok(await c.get("/admin/audit", params={"limit": 2}))
    assert [e["details"]["ori_enabled"] for e in first["entries"]] == [False, True]
    assert first["next_after"] == first["entries"][-1]["id"]
    second = ok(await c.get("/admin/audit", params={"limit": 2, "after": first["next_after"]}))
    assert [e["details"]["ori_enabled"] for e in second["entries"]] == [False, True]
    assert second["entries"][0]["id"] > first["entries"][-1]["id"]
    third = ok(await c.get("/admin/audit", params={"limit": 2, "after": second["next_after"]}))
    # the fifth toggle, then the one admin entry of the reads of the log so far
    assert [e["kind"] for e in third["entries"]] == ["config", "admin"]
    assert third["entries"][1]["details"] == {"op": "audit", "count": 2}
    assert third["next_after"] is None
    last = ok(await c.get("/admin/audit", params={"after": third["entries"][-1]["id"]}))
    assert last == {"entries": [], "next_after": None}
    # an id past the end is an empty page, not an error
    assert ok(await c.get("/admin/audit", params={"after": 2**53 - 1}))["entries"] == []


BAD_QUERIES = [
    {"after": "-1"},
    {"after": "x"},
    {"after": "1.5"},
    {"after": str(2**53)},
    {"limit": "0"},
    {"limit": "1001"},
    {"limit": ""},
]


async def test_a_bad_cursor_or_limit_is_422(make_client: AppFactory) -> None:
    app, c = await make_client()
    ok(await c.post("/admin/config", json={"ori_enabled": False}))
    for query in BAD_QUERIES:
        problem(await c.get("/admin/audit", params=query), 422, "ValidationError")
    # refused before it ran: no read of the log was counted
    kinds = [e.kind for e in await runtime_of(app).bus.store.audit_log(None, 10)]
    assert kinds == ["config"]


async def test_only_the_admin_right_reads_the_log(make_client: AppFactory) -> None:
    app, c = await token_app(make_client)
    everything = auth(token(app, "A", ("**", "read,write,create,delete,mandate")))
    body = problem(await c.get("/admin/audit", headers=everything), 403, "CapabilityDenied")
    assert (body["key"], body["right"]) == ("**", "admin")
    _, open_c = await make_client(admin_enabled=False)
    problem(await open_c.get("/admin/audit"), 403, "AdminDisabled")


async def test_concurrent_commits_with_one_mandate_leave_one_consumption(
    make_client: AppFactory,
) -> None:
    app, c = await token_app(make_client)
    admin, _ = root(app)
    for i in range(8):
        body = {"key": f"pay/{i}", "content": "v0", "policy": {"require_mandate": True}}
        ok(await c.post("/shard", json=body, headers=admin), 201)
    g, _ = bearer(app, "G", "pay/*", "mandate")
    a, _ = bearer(app, "A", "**", "read", "write")
    grant: dict[str, Any] = {"holder": "A", "keys": ["pay/*"], "context": {}, "ttl_s": 60}
    mandate = ok(await c.post("/mandates", json=grant, headers=g), 201)
    bodies = [
        {"key": f"pay/{i}", "expected_version": 0, "delta": "paid", "mandate": mandate["mandate"]}
        for i in range(8)
    ]
    answers = await asyncio.gather(*(c.post("/commit/v2", json=b, headers=a) for b in bodies))
    landed = [r.json()["commit_id"] for r in answers if r.status_code == 200]
    assert len(landed) == 1
    for refused in (r for r in answers if r.status_code != 200):
        problem(refused, 409, "MandateConsumed")
    consumed = [e for e in await entries(c, admin) if e["kind"] == "mandate_consume"]
    assert [e["details"]["commit_id"] for e in consumed] == landed
