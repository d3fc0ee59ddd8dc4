"""Every route the app serves, called in token mode, answers what one table says.

The routes come from the app itself (``app.routes``: those hidden from the schema, the
documentation pages and the HEAD that Starlette adds to them included), so a new route
that nobody put in :data:`TABLE` fails :func:`test_the_table_names_every_route`, and a
table row for a route that is gone fails it too. Each route is called three ways, each
answer compared with its row:

- without a token: 401 ``Unauthorized``, except the routes protocol.md section 5.1 names
  public (``/livez``, ``/version``, ``/admin/health``, ``/openapi.json``, and the browser
  pages ``/docs`` and ``/ui`` with their assets);
- with a valid token that holds no scopes at all: the routes that need a right answer 403
  ``CapabilityDenied`` naming the key and right (protocol.md section 5.3, errors.md), and
  the state of the bus is unchanged afterwards; the routes any valid token may call
  (``/stats``, ``/metrics``, ``GET /admin/config``, ``POST /session`` for its own agent)
  answer 200, and ``GET /shards`` and ``POST /delivery_log/register`` answer 200 with
  nothing in them (the one shard is not the caller's to read);
- with a token holding every right on ``**``: the route's success status, on a fresh bus
  each time, which shows that each request in the table is well formed and would have
  been carried out had the right not been missing.

The test needs only ``create_app`` and HTTP: the tokens are signed here, by the format
protocol.md section 5.2 gives, and readiness is ``GET /admin/health``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import re
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts

from sbus.api import closing
from sbus.bootstrap import create_app
from sbus.config import Settings

SECRET = "route-guard-secret-of-32-bytes!!"
NAMESPACE = "sbus"
ALL_RIGHTS = ["read", "write", "create", "delete", "mandate", "admin"]
# The scopeless caller, and the jti of its token: POST /admin/tokens/revoke names it,
# so a revocation that got through would lock the caller out of every later request.
AGENT = "a"
SCOPELESS_JTI = "scopeless-token"
ROOT = "root"
# Stands for the calling agent in a request body.
ME = "<caller>"

# The one shard of the seeded bus (version 1); NEW is a key nobody created.
KEY = "k"

JSON = "application/json"
PROBLEM = "application/problem+json"
HTML = "text/html"
TEXT = "text/plain"
SCRIPT = "text/javascript"
EVENTS = "text/event-stream"


@dataclass(frozen=True)
class Call:
    """A minimal well-formed request: path parameters are filled with :data:`KEY`, or
    with ``param`` where given."""

    body: Any = None
    query: Mapping[str, str | int] = field(default_factory=dict)
    param: str = KEY
    # A stream that never ends (GET /watch): only its status and headers are compared;
    # the request is sent with the worker shutting down, which ends the stream at once.
    stream: bool = False


@dataclass(frozen=True)
class Answer:
    status: int
    error: str | None = None  # the problem document's `error` code
    media: str = JSON
    fields: Mapping[str, Any] = field(default_factory=dict)  # exact members of the body
    exact: bool = False  # the body is exactly ``fields``


@dataclass(frozen=True)
class Row:
    call: Call
    anonymous: Answer
    scopeless: Answer
    granted: int  # the status with every right


NEW = "new"

UNAUTHORIZED = Answer(401, "Unauthorized", PROBLEM)


def denied(right: str, key: str | None = KEY) -> Answer:
    fields: dict[str, Any] = {"right": right}
    if key is not None:
        fields["key"] = key
    return Answer(403, "CapabilityDenied", PROBLEM, fields)


ADMIN_DENIED = denied("admin", "**")


def public(answer: Answer) -> tuple[Answer, Answer]:
    """Answered alike with or without a token."""
    return answer, answer


def row(call: Call, answers: tuple[Answer, Answer], granted: int = 200) -> Row:
    return Row(call, answers[0], answers[1], granted)


def guarded(call: Call, scopeless: Answer, granted: int = 200) -> Row:
    return Row(call, UNAUTHORIZED, scopeless, granted)


def any_token(answer: Answer) -> tuple[Answer, Answer]:
    """Any valid token may call it (protocol.md section 5.3); none is 401."""
    return UNAUTHORIZED, answer


GET = Call()
DOCS_ASSET = Call(param="swagger-init.js")
UI_ASSET = Call(param="dashboard.js")
OK = Answer(200)
HEALTH = Answer(200, fields={"status": "ok"})

# (method, path as the app declares it) -> what each caller gets. Checked against
# protocol.md sections 2.3, 2.9, 2.11, 5.1, 5.3 and 5.5 and security.md's rights table.
TABLE: dict[tuple[str, str], Row] = {
    # The public routes (protocol.md section 5.1).
    ("GET", "/livez"): row(GET, public(Answer(200, fields={"status": "alive"}, exact=True))),
    ("GET", "/version"): row(GET, public(Answer(200, fields={"name": "sbus", "api": 1}))),
    ("GET", "/admin/health"): row(GET, public(HEALTH)),
    ("GET", "/openapi.json"): row(GET, public(Answer(200, fields={"openapi": "3.1.0"}))),
    ("HEAD", "/openapi.json"): row(GET, public(Answer(200))),
    # The browser pages and their assets (sbus.api.assets): public, like the document.
    ("GET", "/docs"): row(GET, public(Answer(200, media=HTML))),
    ("HEAD", "/docs"): row(GET, public(Answer(200, media=HTML))),
    ("GET", "/docs/{name}"): row(DOCS_ASSET, public(Answer(200, media=SCRIPT))),
    ("HEAD", "/docs/{name}"): row(DOCS_ASSET, public(Answer(200, media=SCRIPT))),
    ("GET", "/ui"): row(GET, public(Answer(200, media=HTML))),
    ("HEAD", "/ui"): row(GET, public(Answer(200, media=HTML))),
    ("GET", "/ui/{name}"): row(UI_ASSET, public(Answer(200, media=SCRIPT))),
    ("HEAD", "/ui/{name}"): row(UI_ASSET, public(Answer(200, media=SCRIPT))),
    # Any valid token (protocol.md section 5.3).
    ("GET", "/stats"): row(GET, any_token(Answer(200, fields={"total_shards": 1}))),
    ("GET", "/metrics"): row(GET, any_token(Answer(200, media=TEXT))),
    ("GET", "/admin/config"): row(
        GET,
        any_token(
            Answer(
                200,
                fields={
                    "ok": True,
                    "ori_enabled": True,
                    "view_checked_commits": 0,
                    "view_divergent_commits": 0,
                },
                exact=True,
            )
        ),
    ),
    ("POST", "/session"): row(
        Call({}),
        any_token(Answer(200, fields={"agent_id": AGENT, "status": "created"}, exact=True)),
    ),
    # Filtered by the read right: nothing readable, nothing listed or recorded.
    ("GET", "/shards"): row(
        Call(query={"include": "content"}),
        any_token(
            Answer(
                200,
                fields={"shards": [], "count": 0, "next_after": None, "items": []},
                exact=True,
            )
        ),
    ),
    ("POST", "/delivery_log/register"): row(
        Call({"agent_id": ME, "shards_used": [KEY]}),
        any_token(
            Answer(
                200,
                fields={
                    "ok": True,
                    "registered": 0,
                    "skipped_existing": [],
                    "skipped_no_shard": [KEY],
                },
                exact=True,
            )
        ),
    ),
    # Filtered by the read right (the admin right for include=conflicts): an empty
    # stream (headers only).
    ("GET", "/watch"): row(
        Call(query={"prefix": "k"}, stream=True), any_token(Answer(200, media=EVENTS))
    ),
    # The read right.
    ("GET", "/shard/{key}"): guarded(GET, denied("read")),
    ("POST", "/read"): guarded(Call({"keys": [KEY]}), denied("read")),
    ("GET", "/history/{key}"): guarded(GET, denied("read")),
    # The write, create and delete rights on the keys a request writes.
    ("POST", "/shard"): guarded(Call({"key": NEW, "content": ""}), denied("create", NEW), 201),
    ("POST", "/commit"): guarded(
        Call({"key": KEY, "expected_version": 1, "delta": "v2"}), denied("write")
    ),
    ("POST", "/commit/v2"): guarded(
        Call({"key": KEY, "expected_version": 1, "delta": "v2"}), denied("write")
    ),
    ("POST", "/commit/multi"): guarded(
        Call({"writes": [{"key": KEY, "expected_version": 1, "delta": "v2"}]}), denied("write")
    ),
    ("POST", "/rollback"): guarded(
        Call({"key": KEY, "target_version": 0, "expected_version": 1}), denied("write")
    ),
    ("DELETE", "/shard/{key}"): guarded(Call(query={"expected_version": 1}), denied("delete"), 204),
    # The mandate right, held on some pattern (protocol.md section 5.5): no key to name.
    ("POST", "/mandates"): guarded(
        Call({"holder": "b", "keys": [KEY], "ttl_s": 60}), denied("mandate", None), 201
    ),
    # The admin right on ** (protocol.md section 2.9), whatever SBUS_ADMIN_ENABLED says.
    ("POST", "/admin/reset"): guarded(Call({}), ADMIN_DENIED),
    ("POST", "/admin/config"): guarded(Call({"ori_enabled": False}), ADMIN_DENIED),
    ("GET", "/admin/delivery-log"): guarded(GET, ADMIN_DENIED),
    ("GET", "/admin/audit"): guarded(Call(query={"limit": 10}), ADMIN_DENIED),
    ("POST", "/admin/inject-stale"): guarded(
        Call({"agent_id": ROOT, "key": KEY, "stale_version": 0}), ADMIN_DENIED
    ),
    ("POST", "/admin/shard"): guarded(Call({"key": NEW, "content": ""}), ADMIN_DENIED, 201),
    ("POST", "/admin/test/advance-clock"): guarded(Call({"ms": 1}), ADMIN_DENIED),
    ("POST", "/admin/tokens"): guarded(
        Call({"agent": "b", "scopes": [], "ttl_s": 60}), ADMIN_DENIED, 201
    ),
    ("POST", "/admin/tokens/revoke"): guarded(Call({"jti": SCOPELESS_JTI}), ADMIN_DENIED),
}


def kid(secret: str) -> str:
    """protocol.md section 5.2: an HS256 secret's kid."""
    return hmac.new(secret.encode(), b"sbus key id v1", hashlib.sha256).hexdigest()[:16]


def sign(agent: str, scopes: list[dict[str, Any]], jti: str | None = None) -> str:
    """A capability token as protocol.md section 5.2 lays it out."""
    now = int(time.time())
    claims = {
        "sub": agent,
        "scopes": scopes,
        "iat": now,
        "exp": now + 600,
        "jti": jti or secrets.token_urlsafe(16),
        "iss": NAMESPACE,
        "aud": NAMESPACE,
    }
    headers = {"kid": kid(SECRET), "typ": "at+jwt"}
    return jwt.encode(claims, SECRET, algorithm="HS256", headers=headers)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def scopeless() -> dict[str, str]:
    """Signed when used: a token made at import would expire in a long run."""
    return bearer(sign(AGENT, [], SCOPELESS_JTI))


def everything() -> dict[str, str]:
    return bearer(sign(ROOT, [{"pattern": "**", "rights": ALL_RIGHTS}]))


def served_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, from the app itself."""
    return {
        (method, context.path_format)
        for context in iter_route_contexts(app.routes)
        if context.path_format is not None
        for method in context.methods or ()
    }


BUSES = itertools.count()


def settings(store: str, database: Path, switches: bool = True) -> Settings:
    """``switches``: admin and test hooks on. In token mode neither grants anything, and
    with them on every admin route would do its work if the right check let it through."""
    url = "memory://" if store == "memory" else f"sqlite:///{database}"
    return Settings(
        store=url, auth="token", secret=SECRET, admin_enabled=switches, test_hooks=switches
    )


@asynccontextmanager
async def seeded_bus(
    store: str, tmp_path: Path, switches: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """A bus in token mode holding one shard, KEY at version 1, which ROOT has read."""
    app = create_app(settings(store, tmp_path / f"guard-{next(BUSES)}.db", switches))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", headers={"Content-Type": JSON}
        ) as client:
            for _ in range(500):
                if (await client.get("/admin/health")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
            seed = [
                await client.post(
                    "/shard", json={"key": KEY, "content": "v0"}, headers=everything()
                ),
                await client.post(
                    "/commit",
                    json={"key": KEY, "expected_version": 0, "delta": "v1"},
                    headers=everything(),
                ),
                await client.get(f"/shard/{KEY}", headers=everything()),
            ]
            assert [r.status_code for r in seed] == [201, 200, 200], [r.text for r in seed]
            yield client


def filled(path: str, param: str = KEY) -> str:
    return re.sub(r"\{[^}]*\}", param, path)


def with_caller(body: Any, agent: str) -> Any:
    if body == ME:
        return agent
    if isinstance(body, dict):
        return {name: with_caller(value, agent) for name, value in body.items()}
    if isinstance(body, list):
        return [with_caller(value, agent) for value in body]
    return body


async def send(
    client: httpx.AsyncClient,
    route: tuple[str, str],
    headers: dict[str, str],
    agent: str,
) -> httpx.Response:
    method, path = route
    call = TABLE[route].call
    body = None if call.body is None else with_caller(call.body, agent)
    if call.stream:
        closing.begin()
    try:
        return await client.request(
            method, filled(path, call.param), json=body, params=dict(call.query), headers=headers
        )
    finally:
        closing.event().clear()


def mismatch(r: httpx.Response, want: Answer, method: str) -> str | None:
    """How ``r`` differs from ``want``, or None."""
    media = r.headers.get("content-type", "").split(";")[0]
    got = f"{r.status_code} {media} {r.text[:300]!r}"
    if r.status_code != want.status or media != want.media:
        return got
    if method == "HEAD":
        return None if r.content == b"" else got
    if want.media not in (JSON, PROBLEM):
        return None
    body = r.json()
    if want.error is not None and body.get("error") != want.error:
        return got
    if want.exact:
        return None if body == dict(want.fields) else got
    if any(body.get(name, object()) != value for name, value in want.fields.items()):
        return got
    return None


async def snapshot(client: httpx.AsyncClient) -> list[Any]:
    """Everything a refused request could have changed, read without recording."""
    reads = [
        client.get("/shards", params={"include": "content"}, headers=everything()),
        client.get(f"/history/{KEY}", headers=everything()),
        client.get("/admin/delivery-log", headers=everything()),
        client.get("/admin/config", headers=everything()),
        client.get("/stats", headers=everything()),
        # Still accepted: its revocation was refused.
        client.get("/stats", headers=scopeless()),
    ]
    return [(r.status_code, without_ages(r.json())) for r in [await read for read in reads]]


def without_ages(body: Any) -> Any:
    """A DeliveryLog dump less its ``age_secs``, which grow while the test runs."""
    if isinstance(body, dict):
        return {k: without_ages(v) for k, v in body.items() if k != "age_secs"}
    return body


def test_the_table_names_every_route() -> None:
    """Both ways: a served route missing from the table, and a row for no route."""
    app = create_app(settings("memory", Path()))
    served = served_routes(app)
    assert len(served) >= 30, served  # the derivation itself found the routes
    missing = sorted(served - TABLE.keys())
    assert not missing, f"routes the app serves with no row in TABLE: {missing}"
    gone = sorted(TABLE.keys() - served)
    assert not gone, f"rows in TABLE for routes the app no longer serves: {gone}"


def test_a_new_route_is_caught() -> None:
    """The control for the test above: a route added to the app, even one hidden from
    the schema, is a served route the table lacks."""
    app = create_app(settings("memory", Path()))

    @app.post("/unlisted", include_in_schema=False)
    def unlisted() -> None: ...

    assert served_routes(app) - TABLE.keys() == {("POST", "/unlisted")}


@pytest.mark.parametrize("switches", [True, False], ids=["admin-and-hooks-on", "defaults"])
@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_without_a_token_or_with_no_scopes(
    store: str, switches: bool, tmp_path: Path
) -> None:
    """One bus: each route without a token, then with the scopeless token, and the
    bus's state compared after every call. The answers do not depend on
    SBUS_ADMIN_ENABLED or SBUS_TEST_HOOKS: the right is checked first."""
    wrong: list[str] = []
    async with seeded_bus(store, tmp_path, switches) as client:
        before = await snapshot(client)
        assert all(status == 200 for status, _ in before), before
        for route, expected in TABLE.items():
            r = await send(client, route, {}, AGENT)
            found = mismatch(r, expected.anonymous, route[0])
            if found:
                wrong.append(f"{route} without a token: {found}")
            r = await send(client, route, scopeless(), AGENT)
            found = mismatch(r, expected.scopeless, route[0])
            if found:
                wrong.append(f"{route} with no scopes: {found}")
            after = await snapshot(client)
            changed = [(was, now) for was, now in zip(before, after, strict=True) if was != now]
            if changed:
                wrong.append(f"{route} with no scopes changed the bus: {changed}")
                before = after
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_every_request_succeeds_with_every_right(store: str, tmp_path: Path) -> None:
    """The control: each request of the table, on a fresh bus, is carried out for a
    token holding every right, so a 403 above is the missing right and nothing else."""
    wrong: list[str] = []
    for route, expected in TABLE.items():
        async with seeded_bus(store, tmp_path) as client:
            r = await send(client, route, everything(), ROOT)
            if r.status_code != expected.granted:
                wrong.append(f"{route}: {r.status_code} {r.text[:300]!r}")
    assert not wrong, "\n".join(wrong)
