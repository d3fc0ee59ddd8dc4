"""Malformed input of every kind on every endpoint: each is a 4xx problem+json with the
exact status and code, and leaves the bus exactly as it was (protocol.md §§1, 2, 4, 6).
No input may produce a 5xx.

One app per store serves the whole module (the cases only ever fail), seeded with a
small known state that every case compares before and after.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
import pytest_asyncio
from asgi_lifespan import LifespanManager

from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app
from sbus.config import Settings
from tests import backends
from tests.api.helpers import problem, snapshot
from tests.conftest import STORES, store_url

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_BODY = 4096
MAX_DELTA = 1024
MAX_INT = 2**53 - 1
KEYS = ("k", "other")


class Env(NamedTuple):
    client: httpx.AsyncClient
    baseline: dict[str, Any]


class Case(NamedTuple):
    method: str
    url: str
    body: Any  # JSON value, raw bytes, or None for no body
    status: int
    code: str
    headers: Mapping[str, str | bytes] | None = None


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=STORES)
async def env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Env]:
    kind: str = request.param
    await backends.require(kind)
    await backends.wipe(kind)
    path: Path = tmp_path_factory.mktemp(f"bad-{kind}")
    settings = Settings(
        store=store_url(kind, path),
        admin_enabled=True,
        test_hooks=True,
        max_body=MAX_BODY,
        max_delta=MAX_DELTA,
        secret="s" * 48,  # so POST /mandates hashes the context it accepts
    )
    app = create_app(settings)
    async with LifespanManager(app) as manager:
        for _ in range(500):
            if runtime_of(app).ready:
                break
            await asyncio.sleep(0.01)
        assert runtime_of(app).ready, runtime_of(app).not_ready_reason
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app),
            base_url="http://localhost",
            headers={"Content-Type": "application/json"},
        ) as c:
            await _seed(c)
            yield Env(c, await snapshot(c, *KEYS))


async def _seed(c: httpx.AsyncClient) -> None:
    assert (await c.post("/shard", json={"key": "k", "content": "c0"})).status_code == 201
    assert (await c.post("/shard", json={"key": "other", "content": ""})).status_code == 201
    r = await c.post(
        "/commit/v2", json={"key": "k", "expected_version": 0, "delta": "c1", "agent_id": "w"}
    )
    assert r.status_code == 200
    assert (await c.get("/shard/k", params={"agent_id": "x"})).status_code == 200


# -- value catalogues -------------------------------------------------------------------------

SURROGATE = "\ud800"
BAD_INTS: list[Any] = [
    False,
    True,
    "1",
    1.0,
    1.5,
    -1,
    MAX_INT + 1,
    2**64,
    [],
    {},
    float("nan"),
    float("inf"),
]
BAD_STRS: list[Any] = [1, 1.5, True, [], {}, ["a"], "a\x00b", SURROGATE, "x" + SURROGATE + "y"]
BAD_KEYS: list[Any] = [
    "",
    "x" * 257,
    "a b",
    "a//b",
    "./x",
    "x/..",
    "x/./y",
    "..",
    ".",
    "/x",
    "x/",
    "\u00e4",
    "a\\b",
    "a?b",
    "a*b",
    "a\x00b",
    SURROGATE,
    1,
    None,
    [],
    True,
]
BAD_AGENTS: list[Any] = ["x" * 257, "a\x00b", SURROGATE, 1, True, [], {}]
BAD_READ_SETS: list[Any] = [
    {},
    "k",
    1,
    [1],
    [None],
    [{"key": "other"}],
    [{"version_at_read": 0}],
    [{"key": "other", "version_at_read": "0"}],
    [{"key": "other", "version_at_read": -1}],
    [{"key": "other", "version_at_read": MAX_INT + 1}],
    [{"key": "other", "version_at_read": False}],
    [{"key": "a//b", "version_at_read": 0}],
    [{"key": "other", "version_at_read": 0}, {"key": "other", "version_at_read": 0}],
]

# Valid bodies that change nothing (the key exists, or is absent, or the agent has no
# session): if a bad value were wrongly accepted, that case fails alone and the shared
# state survives for the others.
CREATE = {"key": "k", "content": "c"}
COMMIT = {"key": "absent", "expected_version": 1, "delta": "d", "agent_id": "nobody"}
WRITE = {"key": "absent", "expected_version": 1, "delta": "d"}
MULTI = {"agent_id": "nobody", "writes": [WRITE]}
ROLLBACK = {"key": "absent", "target_version": 0, "agent_id": "nobody"}
SESSION = {"agent_id": "nobody"}
REGISTER = {"agent_id": "nobody", "shards_used": ["absent"]}
READ = {"keys": ["absent"], "agent_id": "nobody"}  # a missing key records nothing
CONFIG = {"ori_enabled": True}
INJECT = {"agent_id": "x", "key": "absent", "stale_version": 0}
CLOCK = {"ms": 0}
FEW_INTS = [False, "1", 1.5, -1, MAX_INT + 1]
FEW_STRS: list[Any] = [1, [], "a\x00b", SURROGATE]
FEW_KEYS: list[Any] = ["", "a//b", "x/..", "a b", 1, None]
FEW_AGENTS: list[Any] = ["x" * 257, "a\x00b", 1]

# (path, valid body, {field: bad values}); every listed value alone makes the body invalid.
FIELDS: list[tuple[str, dict[str, Any], dict[str, list[Any]]]] = [
    (
        "/shard",
        CREATE,
        {
            "key": BAD_KEYS,
            "content": [*BAD_STRS, None],
            "goal_tag": [*FEW_STRS, None],
            "policy": [None, [], "x", {"require_mandate": "yes"}, {"require_mandate": 1}],
            "agent_id": FEW_AGENTS,
        },
    ),
    (
        "/admin/shard",
        CREATE,
        {"key": FEW_KEYS, "content": [*FEW_STRS, None], "policy": [[], {"require_mandate": 0}]},
    ),
    (
        "/commit/v2",
        COMMIT,
        {
            "key": BAD_KEYS,
            "expected_version": [*BAD_INTS, None],
            "delta": [*BAD_STRS, None],
            "agent_id": [*BAD_AGENTS, None, ""],
            "session_id": FEW_AGENTS,
            "read_set": BAD_READ_SETS,
            "rationale": FEW_STRS,
            "mandate": FEW_STRS,
            "context": [[], "x", 1],
        },
    ),
    (
        "/commit",
        COMMIT,
        {"key": FEW_KEYS, "expected_version": FEW_INTS, "delta": FEW_STRS},
    ),
    (
        "/commit/multi",
        MULTI,
        {
            "agent_id": [*FEW_AGENTS, None, ""],
            "session_id": FEW_AGENTS,
            "writes": [
                None,
                {},
                "k",
                [1],
                [None],
                [{"key": "k", "delta": "d"}],
                [{"key": "k", "expected_version": 1}],
                [{"expected_version": 1, "delta": "d"}],
                [],
                [WRITE, WRITE],
                *[[{**WRITE, "key": key}] for key in FEW_KEYS],
                *[[{**WRITE, "expected_version": v}] for v in FEW_INTS],
                *[[{**WRITE, "delta": d}] for d in FEW_STRS],
            ],
            "read_set": BAD_READ_SETS[:6],
            "rationale": FEW_STRS,
        },
    ),
    (
        "/rollback",
        ROLLBACK,
        {
            "key": FEW_KEYS,
            "target_version": [*FEW_INTS, None],
            "expected_version": FEW_INTS,
            "agent_id": [*FEW_AGENTS, None, ""],
            "session_id": FEW_AGENTS,
            "read_set": BAD_READ_SETS[:4],
        },
    ),
    ("/session", SESSION, {"agent_id": [*FEW_AGENTS, None, ""], "session_id": FEW_AGENTS}),
    (
        "/delivery_log/register",
        REGISTER,
        {
            "agent_id": [*FEW_AGENTS, None, ""],
            "shards_used": [None, "k", {}, [1], [None], ["a\x00b"], [SURROGATE]],
            "session_id": FEW_STRS,
            "source": FEW_STRS,
        },
    ),
    (
        "/read",
        READ,
        {
            "keys": [
                None,
                "absent",
                {},
                [],
                [1],
                [None],
                *([k] for k in FEW_KEYS),
                ["absent", "absent"],
                ["absent", "k", "absent"],
                [SURROGATE],
            ],
            "agent_id": FEW_AGENTS,
            "session_id": FEW_AGENTS,
            "record": ["true", 1, None, []],
        },
    ),
    ("/admin/config", CONFIG, {"ori_enabled": ["true", 1, None, []]}),
    (
        "/admin/inject-stale",
        INJECT,
        {
            "agent_id": [*FEW_AGENTS, None],
            "key": FEW_KEYS,
            "stale_version": [*FEW_INTS, None],
            "session_id": FEW_AGENTS,
        },
    ),
    ("/admin/test/advance-clock", CLOCK, {"ms": [*FEW_INTS, None]}),
]
POST_PATHS = sorted({path for path, _, _ in FIELDS})


def _field_cases() -> Iterator[Any]:
    for path, valid, fields in FIELDS:
        for name, values in fields.items():
            for i, value in enumerate(values):
                body = {**valid, name: value}
                yield pytest.param(
                    Case("POST", path, body, 422, "ValidationError"), id=f"{path}-{name}-{i}"
                )
    for path, body in (
        ("/shard", {"content": "c"}),
        ("/shard", {"key": "k"}),
        ("/commit/v2", {"key": "absent", "delta": "d", "agent_id": "nobody"}),
        ("/commit/v2", {"key": "absent", "expected_version": 1, "agent_id": "nobody"}),
        ("/commit/v2", {"expected_version": 1, "delta": "d", "agent_id": "nobody"}),
        ("/commit/v2", {"key": "absent", "expected_version": 1, "delta": "d"}),
        ("/commit/multi", {"agent_id": "nobody"}),
        ("/commit/multi", {"writes": [WRITE]}),
        ("/rollback", {"key": "absent", "agent_id": "nobody"}),
        ("/rollback", {"target_version": 0, "agent_id": "nobody"}),
        ("/session", {}),
        ("/delivery_log/register", {"agent_id": "nobody"}),
        ("/delivery_log/register", {"shards_used": ["absent"]}),
        ("/read", {"agent_id": "nobody"}),
        ("/admin/config", {}),
        ("/admin/inject-stale", {"agent_id": "x", "key": "absent"}),
        ("/admin/test/advance-clock", {}),
    ):
        yield pytest.param(
            Case("POST", path, body, 422, "ValidationError"),
            id=f"{path}-missing-{'-'.join(sorted(body))}",
        )


def _alias_cases() -> Iterator[Any]:
    for path, valid in (("/commit/v2", COMMIT), ("/commit", COMMIT)):
        yield pytest.param(
            Case("POST", path, {**valid, "expected_ver": 1}, 422, "AmbiguousField"),
            id=f"{path}-both-versions",
        )
        yield pytest.param(
            Case("POST", path, {**valid, "content": "d"}, 422, "AmbiguousField"),
            id=f"{path}-both-deltas",
        )
    yield pytest.param(
        Case(
            "POST",
            "/commit/multi",
            {**MULTI, "writes": [{**WRITE, "content": "d"}]},
            422,
            "AmbiguousField",
        ),
        id="multi-both-deltas",
    )
    yield pytest.param(
        Case(
            "POST",
            "/rollback",
            {**ROLLBACK, "expected_version": 2, "expected_ver": 2},
            422,
            "AmbiguousField",
        ),
        id="rollback-both-versions",
    )
    base = {"key": "absent", "delta": "d", "agent_id": "nobody"}
    for i, value in enumerate(FEW_INTS):
        yield pytest.param(
            Case("POST", "/commit/v2", {**base, "expected_ver": value}, 422, "ValidationError"),
            id=f"alias-expected_ver-{i}",
        )
    base2: dict[str, Any] = {"key": "absent", "expected_version": 1, "agent_id": "nobody"}
    for i, value in enumerate(FEW_STRS):
        yield pytest.param(
            Case("POST", "/commit/v2", {**base2, "content": value}, 422, "ValidationError"),
            id=f"alias-content-{i}",
        )


MALFORMED: list[bytes] = [
    b"{",
    b"{'key': 'k'}",
    b'{"key": "k",}',
    b"[1,",
    b"nul",
    b"  ",
    b'{"key": "k" "content": ""}',
    b"\xff\xfe",
    b'{"key":"new","content":"\xff"}',
    b'{"key": "new", "content": "unterminated}',
]
NOT_OBJECTS: list[bytes] = [b"[]", b"1", b'"s"', b"null", b"true", b"[{}]", b""]
MAIN_PATHS = ("/shard", "/commit/v2", "/commit/multi")


# Routes that read no field but take an optional JSON object. Each would change the
# seeded state if its body were ignored: the delete removes k (at version 1), the reset
# wipes everything.
NO_FIELD_ROUTES = [("DELETE", "/shard/k?expected_version=1&agent_id=w"), ("POST", "/admin/reset")]


def _body_cases() -> Iterator[Any]:
    for method, url in NO_FIELD_ROUTES:
        for i, raw in enumerate(MALFORMED):
            yield pytest.param(
                Case(method, url, raw, 400, "MalformedJSON"), id=f"{method}{url}-malformed-{i}"
            )
        for i, raw in enumerate(NOT_OBJECTS):
            if raw:  # no body at all is what these routes expect
                yield pytest.param(
                    Case(method, url, raw, 422, "ValidationError"),
                    id=f"{method}{url}-not-object-{i}",
                )
    for path in POST_PATHS:
        main = path in MAIN_PATHS
        for i, raw in enumerate(MALFORMED if main else MALFORMED[:1] + MALFORMED[7:8]):
            yield pytest.param(
                Case("POST", path, raw, 400, "MalformedJSON"), id=f"{path}-malformed-{i}"
            )
        for i, raw in enumerate(NOT_OBJECTS if main else NOT_OBJECTS[:2]):
            yield pytest.param(
                Case("POST", path, raw, 422, "ValidationError"), id=f"{path}-not-object-{i}"
            )


def _limit_cases() -> Iterator[Any]:
    big = "x" * (MAX_DELTA + 1)
    wide = "\u00e9" * (MAX_DELTA // 2 + 1)  # within the cap in characters, not in bytes
    for content in (big, wide):
        tag = "ascii" if content is big else "utf8"
        yield pytest.param(
            Case("POST", "/shard", {**CREATE, "content": content}, 413, "DeltaTooLarge"),
            id=f"create-delta-{tag}",
        )
        yield pytest.param(
            Case("POST", "/admin/shard", {**CREATE, "content": content}, 413, "DeltaTooLarge"),
            id=f"admin-shard-delta-{tag}",
        )
        yield pytest.param(
            Case("POST", "/commit/v2", {**COMMIT, "delta": content}, 413, "DeltaTooLarge"),
            id=f"commit-delta-{tag}",
        )
        yield pytest.param(
            Case(
                "POST",
                "/commit/multi",
                {**MULTI, "writes": [{**WRITE, "delta": content}]},
                413,
                "DeltaTooLarge",
            ),
            id=f"multi-delta-{tag}",
        )
    # SBUS_MAX_READ_KEYS (256 by default) distinct valid keys, plus one: the only fault.
    many = {**READ, "keys": [f"k{i}" for i in range(257)]}
    yield pytest.param(Case("POST", "/read", many, 422, "ValidationError"), id="read-too-many")
    huge = "x" * MAX_BODY
    for path in POST_PATHS:
        yield pytest.param(
            Case("POST", path, {"pad": huge}, 413, "RequestTooLarge"), id=f"{path}-body-too-large"
        )
    yield pytest.param(
        Case(
            "DELETE",
            "/shard/k?expected_version=1&agent_id=nobody",
            {"pad": huge},
            413,
            "RequestTooLarge",
        ),
        id="delete-body-too-large",
    )


def _media_cases() -> Iterator[Any]:
    media_types = (
        "",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "json",
    )
    paths = (
        "/shard",
        "/commit/v2",
        "/commit",
        "/commit/multi",
        "/rollback",
        "/session",
        "/delivery_log/register",
        "/read",
        "/admin/reset",
        "/admin/config",
        "/admin/shard",
    )
    for path in paths:
        yield pytest.param(
            Case("POST", path, b"{}", 415, "UnsupportedMediaType", {"Content-Type": ""}),
            id=f"{path}-media-none",
        )
    for media in media_types[1:]:
        yield pytest.param(
            Case(
                "POST",
                "/commit/v2",
                _encode(COMMIT),
                415,
                "UnsupportedMediaType",
                {"Content-Type": media},
            ),
            id=f"commit-media-{media}",
        )
    for media in media_types[:2]:
        yield pytest.param(
            Case(
                "DELETE",
                "/shard/k?expected_version=1&agent_id=nobody",
                None,
                415,
                "UnsupportedMediaType",
                {"Content-Type": media},
            ),
            id=f"delete-media-{media or 'none'}",
        )


# Keys that end in "/" (the empty one too) make a path with a trailing slash: 404, in
# TRAILING_SLASHES below.
PATH_KEYS = [
    "%2E%2E",
    "%2E/x",
    "x/%2E%2E",
    "x/%2E/y",
    "a//b",
    "/x",
    "a%20b",
    "%00",
    "a%00b",
    "%C3%A4",
    "%FF",
    "%ED%A0%80",
    "x" * 257,
    "a%5Cb",
    "a*b",
]


def _path_cases() -> Iterator[Any]:
    for i, key in enumerate(PATH_KEYS):
        yield pytest.param(
            Case("GET", f"/shard/{key}?agent_id=x", None, 422, "ValidationError"), id=f"get-key-{i}"
        )
    for i, key in enumerate(PATH_KEYS[:6]):
        yield pytest.param(
            Case("GET", f"/history/{key}", None, 422, "ValidationError"), id=f"history-key-{i}"
        )
        yield pytest.param(
            Case(
                "DELETE",
                f"/shard/{key}?expected_version=1&agent_id=nobody",
                None,
                422,
                "ValidationError",
            ),
            id=f"delete-key-{i}",
        )


QUERY_CASES: list[tuple[str, str, int, str]] = [
    ("GET", "/shard/absent?agent_id=a%00b", 422, "ValidationError"),
    ("GET", "/shard/absent?agent_id=" + "x" * 257, 422, "ValidationError"),
    ("GET", "/shard/absent?agent_id=x&session_id=a%00", 422, "ValidationError"),
    ("GET", "/shard/absent?agent_id=x&session_id=" + "s" * 257, 422, "ValidationError"),
    ("GET", "/shard/absent?agent_id=x&record=maybe", 422, "ValidationError"),
    ("GET", "/shard/absent?agent_id=x&record=2", 422, "ValidationError"),
    ("GET", "/shards?limit=0", 422, "ValidationError"),
    ("GET", "/shards?limit=-1", 422, "ValidationError"),
    ("GET", "/shards?limit=1.5", 422, "ValidationError"),
    ("GET", "/shards?limit=" + str(MAX_INT + 1), 422, "ValidationError"),
    ("GET", "/shards?prefix=" + "p" * 257, 422, "ValidationError"),
    ("GET", "/history/k?limit=0", 422, "ValidationError"),
    ("GET", "/history/k?limit=1001", 422, "ValidationError"),
    ("GET", "/history/k?limit=x", 422, "ValidationError"),
    ("GET", "/history/k?before=-1", 422, "ValidationError"),
    ("GET", "/history/k?before=1.5", 422, "ValidationError"),
    ("GET", "/history/k?before=" + str(MAX_INT + 1), 422, "ValidationError"),
    ("GET", "/admin/delivery-log?limit=0", 422, "ValidationError"),
    ("GET", "/admin/delivery-log?limit=abc", 422, "ValidationError"),
    ("DELETE", "/shard/absent?expected_version=-1&agent_id=nobody", 422, "ValidationError"),
    ("DELETE", "/shard/absent?expected_version=abc&agent_id=nobody", 422, "ValidationError"),
    ("DELETE", "/shard/absent?expected_version=true&agent_id=nobody", 422, "ValidationError"),
    (
        "DELETE",
        "/shard/absent?expected_version=" + str(MAX_INT + 1) + "&agent_id=nobody",
        422,
        "ValidationError",
    ),
    ("DELETE", "/shard/absent?expected_version=1&agent_id=a%00", 422, "ValidationError"),
    ("DELETE", "/shard/absent?expected_version=1&agent_id=" + "x" * 257, 422, "ValidationError"),
    (
        "DELETE",
        "/shard/absent?expected_version=1&agent_id=nobody&session_id=%00",
        422,
        "ValidationError",
    ),
    ("DELETE", "/shard/absent?expected_version=1", 422, "ValidationError"),
    ("DELETE", "/shard/k?agent_id=nobody", 428, "PreconditionRequired"),
]


def _query_cases() -> Iterator[Any]:
    for i, (method, url, status, code) in enumerate(QUERY_CASES):
        yield pytest.param(Case(method, url, None, status, code), id=f"query-{i}")


HEADER_CASES: list[tuple[str, str, Any, Mapping[str, str | bytes], int, str]] = [
    ("GET", "/shard/absent", None, {"X-Agent-Id": "x" * 257}, 422, "ValidationError"),
    ("GET", "/shard/absent", None, {"X-SBus-Agent-Id": "x" * 257}, 422, "ValidationError"),
    ("POST", "/commit/v2", COMMIT, {"X-Agent-Id": "x" * 257}, 422, "ValidationError"),
    ("POST", "/commit/v2", COMMIT, {"X-Agent-Id": "other"}, 403, "AgentMismatch"),
    (
        "POST",
        "/commit/v2",
        {**COMMIT, "session_id": "a"},
        {"X-SBus-Session-Id": "b"},
        403,
        "AgentMismatch",
    ),
    ("POST", "/commit/v2", COMMIT, {"If-Match": "*"}, 400, "InvalidPrecondition"),
    ("POST", "/commit/v2", COMMIT, {"If-Match": 'W/"1"'}, 400, "InvalidPrecondition"),
    ("POST", "/commit/v2", COMMIT, {"If-Match": '"1", "2"'}, 400, "InvalidPrecondition"),
    ("POST", "/commit/v2", COMMIT, {"If-Match": f'"{MAX_INT + 1}"'}, 400, "InvalidPrecondition"),
    ("POST", "/commit/v2", COMMIT, {"If-Match": '"2"'}, 422, "PreconditionConflict"),
    ("POST", "/commit/multi", MULTI, {"If-Match": '"1"'}, 400, "InvalidPrecondition"),
    *[
        (method, url, body, {"If-Match": tag}, 400, "InvalidPrecondition")
        for method, url, body in [
            ("POST", "/commit", COMMIT),
            ("POST", "/commit/v2", COMMIT),
            ("POST", "/rollback", ROLLBACK),
            ("DELETE", "/shard/k?agent_id=nobody", None),
        ]
        # Latin-1 superscripts (how an ASGI server decodes header bytes): str.isdigit()
        # took them and int() then raised, a 500.
        for tag in (b'"\xb9"', b'"\xb2\xb3"', b'"0\xb9"', b'"1_0"', b'"+1"', b'" 1"')
    ],
    ("POST", "/commit/v2", COMMIT, {"Idempotency-Key": ""}, 422, "ValidationError"),
    ("POST", "/commit/v2", COMMIT, {"Idempotency-Key": "i" * 256}, 422, "ValidationError"),
    ("POST", "/shard", CREATE, {"Content-Length": "abc"}, 400, "MalformedJSON"),
    # int() reads these; a Content-Length is ASCII digits only.
    ("POST", "/shard", CREATE, {"Content-Length": "1_0"}, 400, "MalformedJSON"),
    ("POST", "/shard", CREATE, {"Content-Length": "+10"}, 400, "MalformedJSON"),
    ("POST", "/shard", CREATE, {"Content-Length": b"\xb9"}, 400, "MalformedJSON"),
    ("POST", "/shard", CREATE, {"Host": "evil.com"}, 403, "HostNotAllowed"),
    ("GET", "/stats", None, {"Host": "evil.com"}, 403, "HostNotAllowed"),
    ("GET", "/shard/absent?agent_id=x", None, {"Host": "127.0.0.2"}, 403, "HostNotAllowed"),
]


def _header_cases() -> Iterator[Any]:
    for i, (method, url, body, headers, status, code) in enumerate(HEADER_CASES):
        yield pytest.param(Case(method, url, body, status, code, headers), id=f"header-{i}")


ROUTE_CASES: list[tuple[str, str, int, str]] = [
    ("GET", "/nope", 404, "NotFound"),
    ("POST", "/nope", 404, "NotFound"),
    ("GET", "/admin/nope", 404, "NotFound"),
    ("GET", "/commit/v3", 404, "NotFound"),
    ("GET", "/shards/k", 404, "NotFound"),
    ("DELETE", "/nope", 404, "NotFound"),
    ("GET", "/shard", 405, "MethodNotAllowed"),
    ("GET", "/commit", 405, "MethodNotAllowed"),
    ("GET", "/commit/v2", 405, "MethodNotAllowed"),
    ("GET", "/commit/multi", 405, "MethodNotAllowed"),
    ("GET", "/rollback", 405, "MethodNotAllowed"),
    ("GET", "/session", 405, "MethodNotAllowed"),
    ("GET", "/delivery_log/register", 405, "MethodNotAllowed"),
    ("GET", "/admin/reset", 405, "MethodNotAllowed"),
    ("GET", "/admin/shard", 405, "MethodNotAllowed"),
    ("GET", "/admin/inject-stale", 405, "MethodNotAllowed"),
    ("POST", "/shard/k", 405, "MethodNotAllowed"),
    ("PUT", "/shard/k", 405, "MethodNotAllowed"),
    ("PATCH", "/shard/k", 405, "MethodNotAllowed"),
    ("PUT", "/commit", 405, "MethodNotAllowed"),
    ("DELETE", "/shards", 405, "MethodNotAllowed"),
    ("DELETE", "/history/k", 405, "MethodNotAllowed"),
    ("POST", "/stats", 405, "MethodNotAllowed"),
    ("POST", "/shards", 405, "MethodNotAllowed"),
    ("POST", "/livez", 405, "MethodNotAllowed"),
    ("POST", "/admin/health", 405, "MethodNotAllowed"),
    ("DELETE", "/admin/reset", 405, "MethodNotAllowed"),
    ("DELETE", "/admin/config", 405, "MethodNotAllowed"),
]


def _route_cases() -> Iterator[Any]:
    for method, url, status, code in ROUTE_CASES:
        body = b"{}" if method in ("POST", "PUT", "PATCH") else None
        yield pytest.param(Case(method, url, body, status, code), id=f"{method}-{url}")


def _nest(depth: int, leaf: Any = 1) -> Any:
    """An object ``depth`` levels deep (the outermost counts as 1)."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def _nest_lists(depth: int) -> Any:
    value: Any = {"a": 1}
    for _ in range(depth - 1):
        value = [value]
    return value


# Each breaks the input rules somewhere inside a free-form mandate context. Before they
# were checked, the first ones made the idempotency fingerprint's encoder raise (500).
BAD_CONTEXTS: list[Any] = [
    {"s": SURROGATE},
    {SURROGATE: 1},
    {"n": 2**64},
    {"n": 2**70},
    _nest(33),
    _nest(300),
    _nest_lists(33),
    {"s": "a\x00b"},
    {"a\x00": 1},
    {"n": -1},
    {"n": -0.5},
    {"n": MAX_INT + 1},
    {"n": 1e300},
    {"n": float("nan")},
    {"n": float("inf")},
    {"n": float("-inf")},
    {"l": [0, [1, -1]]},
    {"deep": [{"x": ["ok", SURROGATE]}]},
]
# The limits themselves are accepted: these contexts reach the protocol.
GOOD_CONTEXTS: list[dict[str, Any]] = [
    {},
    _nest(32),
    {"n": MAX_INT, "z": 0, "f": 0.5, "t": True, "null": None, "u": "\u00e9\u2713", "": ""},
    {"l": [[[]], {}], "\U0001f600": "\U0001f600"},
]
CONTEXT_ROUTES: dict[str, dict[str, Any]] = {
    "/commit": COMMIT,
    "/commit/v2": COMMIT,
    "/commit/multi": MULTI,
    "/rollback": ROLLBACK,
    "/mandates": {"holder": "h", "keys": ["absent"], "ttl_s": 60, "agent_id": "nobody"},
}
DELETE_ABSENT = "/shard/absent?expected_version=1&agent_id=nobody"


def _context_cases() -> Iterator[Any]:
    for idem in (False, True):
        tag = "idem" if idem else "plain"
        for path, valid in CONTEXT_ROUTES.items():
            for i, context in enumerate(BAD_CONTEXTS):
                headers = {"Idempotency-Key": f"ctx-{i}"} if idem else None
                case = Case("POST", path, {**valid, "context": context}, 422, "ValidationError")
                yield pytest.param(case._replace(headers=headers), id=f"{path}-{tag}-{i}")
        for i, context in enumerate(BAD_CONTEXTS):
            headers = {"X-SBus-Mandate-Context": json.dumps(context)}
            if idem:
                headers["Idempotency-Key"] = f"ctx-{i}"
            yield pytest.param(
                Case("DELETE", DELETE_ABSENT, None, 422, "ValidationError", headers),
                id=f"delete-header-{tag}-{i}",
            )


def _encode(body: Any) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    # ensure_ascii keeps lone surrogates as \ud800 escapes; NaN stays a bare token
    return json.dumps(body, ensure_ascii=True).encode()


def _grouped(params: Iterator[Any]) -> list[Any]:
    """One test per group of cases (id up to its last '-'): the cases of a group share
    one app round of snapshots, which keeps hundreds of cases per store cheap."""
    groups: dict[str, list[Case]] = {}
    for param in params:
        group = str(param.id).rsplit("-", 1)[0]
        groups.setdefault(group, []).extend(param.values)
    return [pytest.param(cases, id=group) for group, cases in groups.items()]


async def _send(bus: httpx.AsyncClient, case: Case) -> httpx.Response:
    request = bus.build_request(case.method, case.url, content=_encode(case.body))
    for name, value in (case.headers or {}).items():
        if name.lower() == "content-type" and not value:
            del request.headers["content-type"]
        elif isinstance(value, bytes):
            # Sent as these bytes, as clients that encode header values in Latin-1 do.
            request.headers.encoding = "latin-1"
            request.headers[name] = value.decode("latin-1")
        else:
            request.headers[name] = value
    return await bus.send(request)


def _mismatch(case: Case, r: httpx.Response) -> str | None:
    """Why ``r`` is not the expected problem, or None."""
    if r.status_code >= 500:
        return f"{case}: SERVER ERROR {r.status_code} {r.text[:300]}"
    try:
        body = problem(r, case.status, case.code)
        if case.code == "ValidationError":
            assert isinstance(body.get("errors"), list), "no errors list"
            for item in body["errors"]:
                assert set(item) >= {"loc", "msg", "type"}, item
    except (AssertionError, KeyError, ValueError) as exc:
        return f"{case}: got {r.status_code} {r.text[:300]} ({exc!r})"
    return None


async def _check(env: Env, cases: list[Case]) -> None:
    failures = []
    for case in cases:
        reason = _mismatch(case, await _send(env.client, case))
        if reason is not None:
            failures.append(reason)
    assert not failures, "\n".join(failures)
    assert await snapshot(env.client, *KEYS) == env.baseline


@pytest.mark.parametrize("cases", _grouped(_field_cases()))
async def test_bad_field(env: Env, cases: list[Case]) -> None:
    await _check(env, cases)


@pytest.mark.parametrize("cases", _grouped(_alias_cases()))
async def test_bad_alias(env: Env, cases: list[Case]) -> None:
    await _check(env, cases)


@pytest.mark.parametrize("cases", _grouped(_body_cases()))
async def test_bad_body(env: Env, cases: list[Case]) -> None:
    await _check(env, cases)


@pytest.mark.parametrize("cases", _grouped(_limit_cases()))
async def test_too_large(env: Env, cases: list[Case]) -> None:
    await _check(env, cases)


@pytest.mark.parametrize("cases", _grouped(_context_cases()))
async def test_bad_context(env: Env, cases: list[Case]) -> None:
    """Every free-form context that breaks the input rules is 422, with or without an
    Idempotency-Key, on every route that takes one (the DELETE's in a header)."""
    await _check(env, cases)


@pytest.mark.parametrize("idem", [False, True], ids=["plain", "idem"])
async def test_context_at_the_limits_is_accepted(env: Env, idem: bool) -> None:
    expected = {
        "/commit": (404, "ShardNotFound"),
        "/commit/v2": (404, "ShardNotFound"),
        "/commit/multi": (404, "ShardNotFound"),
        "/rollback": (404, "ShardNotFound"),
    }
    for i, context in enumerate(GOOD_CONTEXTS):
        headers = {"Idempotency-Key": f"good-{i}"} if idem else {}
        for path, (status, code) in expected.items():
            body = {**CONTEXT_ROUTES[path], "context": context}
            r = await env.client.post(path, content=_encode(body), headers=headers)
            problem(r, status, code)
        body = {**CONTEXT_ROUTES["/mandates"], "context": context}
        r = await env.client.post("/mandates", content=_encode(body), headers=headers)
        assert r.status_code == 201, r.text
        headers["X-SBus-Mandate-Context"] = json.dumps(context)
        problem(await env.client.delete(DELETE_ABSENT, headers=headers), 404, "ShardNotFound")
    assert await snapshot(env.client, *KEYS) == env.baseline


@pytest.mark.parametrize("cases", _grouped(_media_cases()))
async def test_bad_media_type(env: Env, cases: list[Case]) -> None:
    await _check(env, cases)


@pytest.mark.parametrize("cases", _grouped(_path_cases()))
async def test_bad_path_key(env: Env, cases: list[Case]) -> None:
    await _check(env, cases)


@pytest.mark.parametrize("cases", _grouped(_query_cases()))
async def test_bad_query(env: Env, cases: list[Case]) -> None:
    await _check(env, cases)


@pytest.mark.parametrize("cases", _grouped(_header_cases()))
async def test_bad_header(env: Env, cases: list[Case]) -> None:
    await _check(env, cases)


@pytest.mark.parametrize("cases", _grouped(_route_cases()))
async def test_bad_route(env: Env, cases: list[Case]) -> None:
    await _check(env, cases)


@pytest.mark.parametrize("path", POST_PATHS)
async def test_streamed_body_too_large(env: Env, path: str) -> None:
    """A chunked body with no Content-Length is capped while it is read."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"key": "new", "content": "'
        for _ in range(MAX_BODY // 512 + 2):
            yield b"x" * 512
        yield b'"}'

    request = env.client.build_request("POST", path, content=chunks())
    assert "content-length" not in request.headers
    problem(await env.client.send(request), 413, "RequestTooLarge")
    assert await snapshot(env.client, *KEYS) == env.baseline


async def test_max_integer_is_accepted(env: Env) -> None:
    """2^53-1 passes validation and reaches the protocol (here: a commit to a key that
    does not exist, by an agent without a session, so nothing is counted)."""
    r = await env.client.post("/commit/v2", json={**COMMIT, "expected_version": MAX_INT})
    problem(r, 404, "ShardNotFound")
    r = await env.client.get(f"/history/k?before={MAX_INT}")
    assert r.status_code == 200
    assert await snapshot(env.client, *KEYS) == env.baseline


# -- one test per reported service bug (see the xfail reasons) -----------------------------


async def test_nul_in_list_cursors(env: Env) -> None:
    await _check(
        env,
        [
            Case("GET", "/shards?prefix=%00", None, 422, "ValidationError"),
            Case("GET", "/shards?after=a%00", None, 422, "ValidationError"),
            Case("GET", "/admin/delivery-log?after=%00", None, 422, "ValidationError"),
        ],
    )


async def test_invalid_utf8_in_query(env: Env) -> None:
    await _check(
        env,
        [
            Case("GET", "/shard/absent?agent_id=%FF", None, 422, "ValidationError"),
            Case("GET", "/shard/absent?agent_id=%ED%A0%80", None, 422, "ValidationError"),
            Case("GET", "/shard/absent?agent_id=x&session_id=%C3", None, 422, "ValidationError"),
        ],
    )


async def test_lax_query_integers(env: Env) -> None:
    await _check(
        env,
        [
            Case(
                "DELETE",
                "/shard/absent?expected_version=1.0&agent_id=nobody",
                None,
                422,
                "ValidationError",
            ),
            Case("GET", "/history/k?limit=1.0", None, 422, "ValidationError"),
            Case("GET", "/history/k?before=1.0", None, 422, "ValidationError"),
            Case("GET", "/shards?limit=2.0", None, 422, "ValidationError"),
        ],
    )


async def test_validation_problems_list_errors(env: Env) -> None:
    await _check(
        env,
        [
            Case(
                "GET",
                "/shard/absent",
                None,
                422,
                "ValidationError",
                {"X-Agent-Id": "x", "X-SBus-Session-Id": "s" * 257},
            ),
            Case(
                "POST",
                "/commit/v2",
                COMMIT,
                422,
                "ValidationError",
                {"X-SBus-Session-Id": "s" * 257},
            ),
            Case(
                "POST",
                "/admin/inject-stale",
                {"agent_id": "x", "key": "k", "stale_version": 2},
                422,
                "ValidationError",
            ),
        ],
    )


async def test_utf8_encoded_surrogate_is_malformed(env: Env) -> None:
    """Bytes ED A0 80 are not UTF-8 (RFC 3629), so such a body is not JSON."""
    surrogate = b"\xed\xa0\x80"
    await _check(
        env,
        [
            Case(
                "POST",
                path,
                b'{"key":"absent","content":"' + surrogate + b'"}',
                400,
                "MalformedJSON",
            )
            for path in MAIN_PATHS
        ]
        + [
            Case(
                "POST",
                "/admin/config",
                b'{"ori_enabled": true, "n": "' + surrogate + b'"}',
                400,
                "MalformedJSON",
            ),
        ],
    )


TRAILING_SLASHES = [
    ("GET", "/shards/"),
    ("GET", "/stats/"),
    ("GET", "/livez/"),
    ("GET", "/admin/health/"),
    ("GET", "/admin/config/"),
    ("POST", "/commit/"),
    ("POST", "/commit/v2/"),
    ("POST", "/commit/multi/"),
    ("POST", "/rollback/"),
    ("POST", "/session/"),
    ("POST", "/mandates/"),
    ("POST", "/admin/reset/"),
    ("POST", "/admin/tokens/revoke/"),
    # A {key:path} parameter matched these: 422 for the key "" or "k/", 405 for a POST.
    ("GET", "/shard/"),
    ("POST", "/shard/"),
    ("DELETE", "/shard/"),
    ("GET", "/shard/k/"),
    ("GET", "/shard/k/?agent_id=x"),
    ("DELETE", "/shard/k/?expected_version=1&agent_id=x"),
    ("GET", "/shard/a/"),
    ("GET", "/shard/a/b/"),
    ("GET", "/history/"),
    ("GET", "/history/k/"),
    ("DELETE", "/history/"),
]


@pytest.mark.parametrize(("method", "url"), TRAILING_SLASHES)
async def test_trailing_slash_is_not_found(env: Env, method: str, url: str) -> None:
    """No redirect (its Location would be built from the Host header), no empty body:
    a path with a trailing slash is an unknown path."""
    body = b"{}" if method == "POST" else None
    r = await env.client.request(method, url, content=body, headers={"Host": "localhost:7000"})
    problem(r, 404, "NotFound")
    assert "location" not in r.headers
    assert await snapshot(env.client, *KEYS) == env.baseline
