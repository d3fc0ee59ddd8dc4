"""GET /watch, the change stream (protocol.md section 3.10), on every store, through a
real HTTP server in the test's event loop (tests/sse.py)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from asgi_lifespan import LifespanManager

from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app
from sbus.config import Settings
from tests.api.helpers import TIMESTAMP, problem
from tests.conftest import store_url
from tests.sse import Served, Stream, open_stream, serve

SECRET = "w" * 32


def settings(kind: str, tmp_path: Path, **overrides: Any) -> Settings:
    options: dict[str, Any] = {"store": store_url(kind, tmp_path), "admin_enabled": True}
    options.update(overrides)
    return Settings(**options)


@pytest.fixture
async def bus(store_kind: str, tmp_path: Path) -> AsyncIterator[Served]:
    async with serve(settings(store_kind, tmp_path)) as served:
        yield served


async def create(client: httpx.AsyncClient, key: str, agent: str = "A") -> None:
    r = await client.post("/shard", json={"key": key, "content": "v0", "agent_id": agent})
    assert r.status_code == 201, r.text


async def commit(client: httpx.AsyncClient, key: str, expected: int, agent: str = "A") -> str:
    r = await client.post(
        "/commit",
        json={
            "key": key,
            "expected_version": expected,
            "delta": f"v{expected + 1}",
            "agent_id": agent,
        },
    )
    assert r.status_code == 200, r.text
    commit_id: str = r.json()["commit_id"]
    return commit_id


async def test_one_event_per_version_in_order(bus: Served) -> None:
    client = bus.client
    async with open_stream(client, "doc/") as stream:
        await stream.subscribed()
        await create(client, "doc/a", "A")
        first = await commit(client, "doc/a", 0, "B")
        await create(client, "other", "A")  # outside the prefix
        r = await client.post(
            "/rollback",
            json={"key": "doc/a", "target_version": 0, "expected_version": 1, "agent_id": "C"},
        )
        assert r.status_code == 200, r.text
        r = await client.request(
            "DELETE",
            "/shard/doc/a",
            params={"expected_version": 2, "agent_id": "D"},
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 204, r.text
        await create(client, "doc/a", "E")  # over the tombstone: version 4
        events = await stream.events(5)
    data = [m.json() for m in events]
    assert [(d["key"], d["version"], d["op"], d["agent_id"]) for d in data] == [
        ("doc/a", 0, "create", "A"),
        ("doc/a", 1, "commit", "B"),
        ("doc/a", 2, "rollback", "C"),
        ("doc/a", 3, "delete", "D"),
        ("doc/a", 4, "create", "E"),
    ]
    assert data[1]["commit_id"] == first
    assert all(
        set(d) == {"key", "version", "op", "agent_id", "commit_id", "committed_at"} for d in data
    )
    assert all(TIMESTAMP.match(d["committed_at"]) for d in data)
    assert all(m.event is None and m.id for m in events)
    assert len({m.id for m in events}) == 5


@pytest.mark.parametrize("prefix", [None, ""], ids=["absent", "empty"])
async def test_without_a_prefix_every_key_is_watched(bus: Served, prefix: str | None) -> None:
    """An absent or empty prefix watches every key (what the dashboard shows)."""
    client = bus.client
    params = {} if prefix is None else {"prefix": prefix}
    async with client.stream("GET", "/watch", params=params) as response:
        assert response.status_code == 200, await response.aread()
        stream = Stream(response)
        await stream.subscribed()
        await create(client, "a/one", "A")
        await create(client, "zz", "B")
        await commit(client, "a/one", 0, "C")
        events = await stream.events(3)
    assert [(m.json()["key"], m.json()["version"]) for m in events] == [
        ("a/one", 0),
        ("zz", 0),
        ("a/one", 1),
    ]


async def test_resume_after_a_disconnect_with_last_event_id(bus: Served) -> None:
    client = bus.client
    await create(client, "r/k")
    async with open_stream(client, "r/") as stream:
        start = await stream.subscribed()
        for v in range(3):
            await commit(client, "r/k", v)
        seen = await stream.events(2)
    # disconnected after two of three; two more commits while away
    for v in range(3, 5):
        await commit(client, "r/k", v)
    async with open_stream(client, "r/", last_event_id=seen[-1].id) as stream:
        assert await stream.subscribed() == seen[-1].id
        rest = await stream.events(3)
    assert [m.json()["version"] for m in seen + rest] == [1, 2, 3, 4, 5]
    # and from the subscribed cursor: everything since
    async with open_stream(client, "r/", last_event_id=start) as stream:
        await stream.subscribed()
        again = await stream.events(5)
    assert [m.json()["version"] for m in again] == [1, 2, 3, 4, 5]


async def test_a_refused_commit_is_no_event(bus: Served) -> None:
    client = bus.client
    await create(client, "x/k")
    async with open_stream(client, "x/") as stream:
        await stream.subscribed()
        r = await client.post(
            "/commit", json={"key": "x/k", "expected_version": 7, "delta": "no", "agent_id": "A"}
        )
        problem(r, 409, "VersionMismatch")
        await commit(client, "x/k", 0)
        (only,) = await stream.events(1)
    assert (only.json()["version"], only.json()["op"]) == (1, "commit")


async def test_expired_cursor_gets_a_reset(store_kind: str, tmp_path: Path) -> None:
    async with serve(settings(store_kind, tmp_path, watch_max_changes=2)) as served:
        client = served.client
        await create(client, "e/k")
        async with open_stream(client, "e/") as stream:
            old = await stream.subscribed()
            for v in range(4):
                await commit(client, "e/k", v)
            await stream.events(4)
        await runtime_of(served.app).bus.store.purge()  # what the upkeep loop runs
        async with open_stream(client, "e/", last_event_id=old) as stream:
            head = await stream.subscribed()
            reset = await stream.next()
            assert reset is not None
            assert (reset.event, reset.json()) == ("reset", {"reason": "cursor_expired"})
            assert reset.id == head  # the live edge: a new stream may start there
            assert await stream.next() is None  # the stream ends
        async with open_stream(client, "e/", last_event_id=head) as stream:
            await stream.subscribed()
            await commit(client, "e/k", 4)
            (ev,) = await stream.events(1)
            assert ev.json()["version"] == 5


async def test_heartbeat(store_kind: str, tmp_path: Path) -> None:
    opts = settings(store_kind, tmp_path, watch_heartbeat=0.05)
    async with serve(opts) as served, open_stream(served.client, "h/") as stream:
        await stream.subscribed()
        beat = await stream.next()
        assert beat is not None and beat.comments == ["heartbeat"] and beat.data is None


async def test_conflicts_for_an_admin(bus: Served) -> None:
    client = bus.client
    await create(client, "c/k")
    await create(client, "c/other")
    async with open_stream(client, "c/", include="conflicts") as stream:
        await stream.subscribed()
        r = await client.post(
            "/commit", json={"key": "c/k", "expected_version": 3, "delta": "x", "agent_id": "Z"}
        )
        problem(r, 409, "VersionMismatch")
        await commit(client, "c/other", 0)
        got = await stream.events(2)
    by_op = {m.json()["op"]: m for m in got}
    conflict = by_op["conflict"]
    assert conflict.event == "conflict"
    assert conflict.json() == {
        "key": "c/k",
        "op": "conflict",
        "agent_id": "Z",
        "error": "VersionMismatch",
        "stale_keys": ["c/k"],
    }
    assert by_op["commit"].json()["key"] == "c/other"
    # the cursor carries both positions: resuming after the conflict sees the commit
    # again only if it came after it
    assert "~" in (conflict.id or "")


async def test_cross_shard_stale_is_a_conflict(bus: Served) -> None:
    client = bus.client
    await create(client, "s/a")
    await create(client, "s/b")
    r = await client.get("/shard/s/b", params={"agent_id": "R"})
    assert r.status_code == 200
    await commit(client, "s/b", 0, "W")
    async with open_stream(client, "s/", include="conflicts") as stream:
        await stream.subscribed()
        r = await client.post(
            "/commit", json={"key": "s/a", "expected_version": 0, "delta": "x", "agent_id": "R"}
        )
        problem(r, 409, "CrossShardStale")
        (conflict,) = await stream.events(1)
    assert conflict.json() == {
        "key": "s/a",
        "op": "conflict",
        "agent_id": "R",
        "error": "CrossShardStale",
        "stale_keys": ["s/b"],
    }


@pytest.mark.parametrize(
    ("params", "headers", "status", "code"),
    [
        ({"prefix": "a\u0001"}, {}, 422, "ValidationError"),
        ({"prefix": "/a"}, {}, 422, "ValidationError"),
        ({"prefix": "a b"}, {}, 422, "ValidationError"),
        ({"prefix": "a" * 257}, {}, 422, "ValidationError"),
        ({"prefix": "a", "include": "everything"}, {}, 422, "ValidationError"),
        ({"prefix": "a"}, {"Last-Event-ID": "not a cursor"}, 400, "InvalidCursor"),
        ({"prefix": "a"}, {"Last-Event-ID": "zz"}, 400, "InvalidCursor"),
        ({"prefix": "a"}, {"Last-Event-ID": "~"}, 400, "InvalidCursor"),
    ],
    ids=[
        "control-char",
        "leading-slash",
        "space",
        "too-long",
        "bad-include",
        "spaces",
        "foreign",
        "separator-only",
    ],
)
async def test_bad_input(
    bus: Served, params: dict[str, str], headers: dict[str, str], status: int, code: str
) -> None:
    r = await bus.client.get("/watch", params=params, headers=headers)
    problem(r, status, code)


async def test_conflicts_need_admin_in_open_mode(store_kind: str, tmp_path: Path) -> None:
    async with serve(settings(store_kind, tmp_path, admin_enabled=False)) as served:
        r = await served.client.get("/watch", params={"prefix": "a", "include": "conflicts"})
        problem(r, 403, "AdminDisabled")


def token(agent: str, scopes: list[dict[str, Any]]) -> dict[str, str]:
    """A capability token signed with :data:`SECRET` (protocol.md section 5.2)."""
    now = int(time.time())
    kid = hmac.new(SECRET.encode(), b"sbus key id v1", hashlib.sha256).hexdigest()[:16]
    claims = {
        "sub": agent,
        "scopes": scopes,
        "iat": now,
        "exp": now + 600,
        "jti": secrets.token_urlsafe(8),
        "iss": "sbus",
        "aud": "sbus",
    }
    signed = jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": kid, "typ": "at+jwt"})
    return {"Authorization": f"Bearer {signed}"}


async def test_token_mode_filters_by_the_read_right(tmp_path: Path, store_kind: str) -> None:
    root = token("root", [{"pattern": "**", "rights": ["read", "write", "create", "admin"]}])
    reader = token("r", [{"pattern": "pub/**", "rights": ["read"]}])
    opts = settings(store_kind, tmp_path, auth="token", secret=SECRET)
    async with serve(opts) as served:
        client = served.client
        async with open_stream(client, "p", headers=reader) as stream:
            await stream.subscribed()
            for key in ("priv/x", "pub/a"):
                r = await client.post("/shard", json={"key": key, "content": ""}, headers=root)
                assert r.status_code == 201, r.text
            (only,) = await stream.events(1)
            assert only.json()["key"] == "pub/a"
        r = await client.get(
            "/watch", params={"prefix": "p", "include": "conflicts"}, headers=reader
        )
        problem(r, 403, "CapabilityDenied")
        r = await client.get("/watch", params={"prefix": "p"})
        problem(r, 401, "Unauthorized")
        async with open_stream(client, "p", include="conflicts", headers=root) as stream:
            await stream.subscribed()
        # The audit log names who was refused the conflicts and who used the admin right.
        r = await client.get("/admin/audit", headers=root)
        assert r.status_code == 200, r.text
        seen = [
            (entry["kind"], entry["agent"], entry["details"].get("right") or entry["details"]["op"])
            for entry in r.json()["entries"]
            if entry["kind"] in ("denied", "admin")
        ]
        assert seen == [("denied", "r", "admin"), ("admin", "root", "watch_conflicts")]


async def test_slow_consumer_is_cut(store_kind: str, tmp_path: Path) -> None:
    """A client that stops reading: once a write waits SBUS_WATCH_SEND_TIMEOUT for it,
    the stream ends without completing the response (the server closes the
    connection), and the ids already sent resume it. Driven at the ASGI level, with a
    send that never returns once the stream is open, so no socket buffer has to fill."""
    app = create_app(settings(store_kind, tmp_path, watch_send_timeout=0.05))
    sent: list[dict[str, Any]] = []
    blocked = asyncio.Event()
    opened = asyncio.Event()

    async def send(message: Any) -> None:
        sent.append(message)
        if len(sent) == 2:
            opened.set()  # the start and ": subscribed"
        if message["type"] == "http.response.body" and len(sent) > 2:
            blocked.set()
            await asyncio.Event().wait()  # the client never reads again

    async def receive() -> Any:
        await asyncio.Event().wait()  # the client never leaves either

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/watch",
        "raw_path": b"/watch",
        "query_string": b"prefix=slow/",
        "root_path": "",
        "headers": [(b"host", b"localhost")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    async with LifespanManager(app) as manager:
        for _ in range(500):
            if runtime_of(app).ready:
                break
            await asyncio.sleep(0.01)
        watcher = asyncio.ensure_future(manager.app(scope, receive, send))
        async with asyncio.timeout(30):
            await opened.wait()
        for i in range(3):
            r = await _post(manager.app, "/shard", {"key": f"slow/{i}", "content": ""})
            assert r == 201
        async with asyncio.timeout(30):
            await watcher  # returns: the stream was cut
    assert sent[0]["status"] == 200
    assert sent[1]["body"].startswith(b": subscribed ")
    assert blocked.is_set()
    assert not any(m.get("more_body") is False for m in sent)  # never completed


async def _post(app: Any, path: str, body: dict[str, Any]) -> int:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost"
    ) as client:
        return (await client.post(path, json=body)).status_code


def test_the_openapi_document_describes_the_stream() -> None:
    document = create_app(Settings(store="memory://")).openapi()
    operation = document["paths"]["/watch"]["get"]
    assert list(operation["responses"]["200"]["content"]) == ["text/event-stream"]
    assert {"400", "403", "422"} <= set(operation["responses"])
    params = {(p["in"], p["name"]): p for p in operation["parameters"]}
    assert ("query", "prefix") in params  # absent or empty: every key
    assert ("query", "include") in params
    assert ("header", "Last-Event-ID") in params
