"""The lean handler of the hot routes (``sbus.api.lean``) answers every request exactly
as FastAPI's own handler of the same route does, without running FastAPI's dependency
solver: the same script of good and bad requests is sent to an app serving the hot
routes leanly and to one serving them through FastAPI's handler, and every answer
(status, problem+json body with its ``errors`` list, ETag, SBus-Ignored-Fields,
Idempotent-Replayed) must be the same."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import fastapi.routing
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import APIRouter, Depends, FastAPI
from fastapi.dependencies.utils import request_params_to_args
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import QueryParams

from sbus.api import lean
from sbus.api.deps import get_settings
from sbus.api.ignored import WireRoute
from sbus.api.middleware import query_problem
from sbus.api.routers import commits, mandates, sessions, shards, stats
from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app
from sbus.config import Settings
from sbus.core.rights import Scope
from sbus.security.tokens import Issuer

HOT = {("GET", "/shard/{key:path}"), ("POST", "/commit"), ("POST", "/commit/v2")}
HOT |= {("POST", "/read")}
COMPARED_HEADERS = ("content-type", "etag", "sbus-ignored-fields", "idempotent-replayed")
# What differs between two runs of the same script: commit ids are random, times real.
VOLATILE = re.compile(r'"(commit_id|created_at|updated_at)":"[^"]*"')

Step = tuple[str, str, dict[str, Any]]


def _routes() -> list[WireRoute]:
    found: list[WireRoute] = []
    for module in (shards, commits, sessions, mandates, stats):
        found.extend(r for r in module.router.routes if isinstance(r, WireRoute))
    return found


def _hot_routes() -> list[WireRoute]:
    return [r for r in _routes() if any((m, r.path) in HOT for m in r.methods or ())]


def test_only_the_hot_routes_are_lean() -> None:
    lean_ones = {
        (method, r.path)
        for r in _routes()
        for method in r.methods or ()
        if lean.lean_handler(r.dependant, r._embed_body_fields) is not None
    }
    assert lean_ones == HOT


@contextmanager
def framework_handlers() -> Iterator[None]:
    """Apps created meanwhile serve the hot routes with FastAPI's own handler."""
    WireRoute.lean_path = False
    try:
        yield
    finally:
        WireRoute.lean_path = True


def _settings(**overrides: Any) -> Settings:
    options: dict[str, Any] = {"store": "memory://", "admin_enabled": True, "test_hooks": True}
    return Settings(**(options | overrides))


@asynccontextmanager
async def app_client(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(create_app(_settings(**overrides))) as c:
        yield c


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app) as manager:
        for _ in range(500):
            if runtime_of(app).ready:
                break
            await asyncio.sleep(0.01)
        # An exception the app lets out is a 500 to compare, not an error of the test.
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            yield c


def _commit(**fields: Any) -> dict[str, Any]:
    return {"key": "k", "expected_version": 0, "delta": "x", "agent_id": "A"} | fields


def _raw(text: str) -> dict[str, Any]:
    return _bytes(text.encode())


def _bytes(body: bytes, media: str = "application/json") -> dict[str, Any]:
    return {"content": body, "headers": {"Content-Type": media}}


# Bodies the JSON decoder refuses with something else than a JSONDecodeError: nesting
# past the recursion limit, and a UTF-8 body (NUL bytes are UTF-8) that the decoder's
# encoding detection takes for UTF-16 and cannot decode. FastAPI answers 400 for both.
DEEP = b"[" * 5000 + b"]" * 5000
NOT_UTF16 = b"{\x00}\x00\x00"


def _json(body: Any, **headers: str) -> dict[str, Any]:
    return {"json": body, "headers": {"Content-Type": "application/json", **headers}}


READS: list[Step] = [
    ("GET", "/shard/k", {"params": {"agent_id": "A"}}),
    ("GET", "/shard/k", {}),
    ("GET", "/shard/k", {"params": {"record": "false"}}),
    ("GET", "/shard/k", {"params": {"record": "maybe"}}),
    ("GET", "/shard/k", {"params": {"record": "yes", "agent_id": "B"}}),
    ("GET", "/shard/k", {"params": {"record": ""}}),
    ("GET", "/shard/k", {"params": {"record": "0"}}),
    ("GET", "/shard/k", {"params": {"agent_id": ""}}),
    ("GET", "/shard/k", {"params": {"agent_id": "a" * 300}}),
    ("GET", "/shard/k", {"params": {"agent_id": "a\x00b", "record": "x"}}),
    ("GET", "/shard/k", {"params": [("agent_id", "A"), ("agent_id", "B")]}),
    ("GET", "/shard/k", {"params": {"agent_id": "A", "session_id": "s"}}),
    ("GET", "/shard/k", {"params": {"agent_id": "A", "session_id": "s" * 300}}),
    ("GET", "/shard/k", {"params": {"sesion_id": "s", "agent_id": "A"}}),
    ("GET", "/shard/k", {"params": {"agent_id": "A"}, "headers": {"X-Agent-Id": "B"}}),
    ("GET", "/shard/k", {"params": {"agent_id": "A"}, "headers": {"X-SBus-Session-Id": "t"}}),
    ("GET", "/shard/k", {"params": {"session_id": "s"}, "headers": {"X-SBus-Session-Id": "t"}}),
    ("GET", "/shard/missing", {"params": {"agent_id": "A"}}),
    ("GET", "/shard/a//b", {"params": {"agent_id": "A"}}),
    ("GET", "/shard/a/../b", {}),
    ("GET", "/shard/a%20b", {"params": {"record": "nope"}}),
    ("GET", "/shard/" + "x" * 600, {}),
    ("GET", "/shard/k/", {}),
    ("GET", "/shard/dir/k2", {"params": {"agent_id": "A"}}),
    ("HEAD", "/shard/k", {}),
    ("GET", "/shard/k", _raw('{"agent_id": "B", "record": false}')),
    ("GET", "/shard/k", _bytes(b"\xff\xfe", "text/plain")),
    ("GET", "/shard/%6B", {"params": {"agent_id": "A"}}),
    ("GET", "/shard/a%2Fb", {}),
    ("GET", "/shard/" + "k" * 20000, {}),
    ("GET", "/shard/k?record=false&record=maybe", {}),
    ("GET", "/shard/k?agent_id&record", {}),
    ("GET", "/shard/k?=x&&agent_id=A&Agent_Id=B", {}),
    ("GET", "/shard/k?record=TRUE&agent_id=A%20B", {}),
    ("GET", "/shard/k?record=on&session_id=%C3%A9", {}),
    ("GET", "/shard/k?agent_id=%FF", {}),
    ("GET", "/shard/k", _raw("{")),
]

COMMITS: list[Step] = [
    ("POST", "/commit/v2", _json(_commit())),
    ("POST", "/commit/v2", _json(_commit())),  # stale now: 409
    ("POST", "/commit", _json(_commit(expected_version=1, delta="y"))),
    ("POST", "/commit/v2", _raw("")),
    ("POST", "/commit/v2", _raw("null")),
    ("POST", "/commit/v2", _raw("[]")),
    ("POST", "/commit/v2", _raw("123")),
    ("POST", "/commit/v2", _raw('"x"')),
    ("POST", "/commit/v2", _raw("{")),
    ("POST", "/commit/v2", _raw('{"key": "k",}')),
    ("POST", "/commit/v2", _raw("{}")),
    ("POST", "/commit/v2", _raw('{"key":"k","expected_version":NaN,"delta":"x"}')),
    ("POST", "/commit/v2", _raw('{"key":"k","expected_version":1e400,"delta":"x"}')),
    ("POST", "/commit/v2", _raw('{"key":"k","expected_version":2,"delta":"\\ud800"}')),
    ("POST", "/commit/v2", _json({"key": "k", "delta": "x", "agent_id": "A"})),
    ("POST", "/commit/v2", _json({"key": "k", "expected_version": 2, "agent_id": "A"})),
    ("POST", "/commit/v2", _json({"key": "k", "expected_ver": 2, "content": "z", "agent_id": "A"})),
    ("POST", "/commit/v2", _json(_commit(expected_ver=3))),
    ("POST", "/commit/v2", _json(_commit(content="c"))),
    ("POST", "/commit/v2", _json(_commit(expected_version="3"))),
    ("POST", "/commit/v2", _json(_commit(expected_version=True))),
    ("POST", "/commit/v2", _json(_commit(expected_version=-1, delta=5))),
    ("POST", "/commit/v2", _json(_commit(expected_version=2**53))),
    ("POST", "/commit/v2", _json(_commit(expected_version=3.0))),
    ("POST", "/commit/v2", _json(_commit(key="a//b", delta=None))),
    ("POST", "/commit/v2", _json(_commit(agent_id=None))),
    ("POST", "/commit/v2", _json(_commit(agent_id="a" * 300, session_id=7))),
    ("POST", "/commit/v2", _json(_commit(expected_version=3, readset=[], typo=1))),
    ("POST", "/commit/v2", _json(_commit(read_set=[{"key": "r", "version_at_read": 0}] * 2))),
    ("POST", "/commit/v2", _json(_commit(read_set=[{"key": "r", "version_at_read": "0"}]))),
    ("POST", "/commit/v2", _json(_commit(read_set=[{"key": "r", "version_at_read": 0, "x": 1}]))),
    ("POST", "/commit/v2", _json(_commit(read_set="r"))),
    ("POST", "/commit/v2", _json(_commit(context=[1], mandate=5))),
    (
        "POST",
        "/commit/v2",
        _raw('{"key":"k","expected_version":3,"delta":"x","context":{"a":1e999}}'),
    ),
    ("POST", "/commit/v2", _json(_commit(expected_version=None), **{"If-Match": '"3"'})),
    ("POST", "/commit/v2", _json(_commit(expected_version=None), **{"If-Match": 'W/"3"'})),
    ("POST", "/commit/v2", _json(_commit(expected_version=None), **{"If-Match": "*"})),
    ("POST", "/commit/v2", _json(_commit(expected_version=3), **{"If-Match": '"4"'})),
    ("POST", "/commit/v2", _json(_commit(), **{"X-Agent-Id": "B"})),
    ("POST", "/commit/v2", _json(_commit(session_id="s"), **{"X-SBus-Session-Id": "t"})),
    ("POST", "/commit/v2", _json(_commit(expected_version=3), **{"Idempotency-Key": "i1"})),
    ("POST", "/commit/v2", _json(_commit(expected_version=3), **{"Idempotency-Key": "i1"})),
    ("POST", "/commit/v2", _json(_commit(expected_version=4), **{"Idempotency-Key": "i1"})),
    ("POST", "/commit/v2", _json(_commit(expected_version=4), **{"Idempotency-Key": "i" * 256})),
    ("POST", "/commit/v2?x=1&agent_id=B", _json(_commit(expected_version=4))),
    ("POST", "/commit/v2", _json(_commit(key="missing"))),
    ("POST", "/commit", _json(_commit(expected_version=5, rationale="r" * 5000))),
    ("POST", "/commit", _json(_commit(expected_version=5, rationale="why"))),
    ("POST", "/commit/v2", _bytes(DEEP)),
    ("POST", "/commit/v2", _bytes(b'{"key":' * 2000)),
    ("POST", "/commit/v2", _bytes(NOT_UTF16)),
    ("POST", "/commit/v2", _bytes(b'\xef\xbb\xbf{"key":"k","expected_version":6,"delta":"x"}')),
    (
        "POST",
        "/commit/v2",
        _bytes(json.dumps(_commit(expected_version=6)).encode(), "APPLICATION/JSON"),
    ),
    (
        "POST",
        "/commit/v2",
        _bytes(json.dumps(_commit(expected_version=7)).encode(), "application/json; charset=utf-8"),
    ),
    ("POST", "/commit/v2", _bytes(b"{}", "application/json;charset=latin-1")),
    (
        "POST",
        "/commit/v2",
        _bytes(b"key=k&expected_version=8", "application/x-www-form-urlencoded"),
    ),
    ("POST", "/commit/v2", {"content": json.dumps(_commit(expected_version=8)).encode()}),
    ("POST", "/commit/v2", _bytes(b"", "text/plain")),
    ("PUT", "/commit/v2", _json(_commit(expected_version=8))),
    ("GET", "/commit", {}),
    ("GET", "/shard/k", {"params": {"agent_id": "A"}}),
]

BULK: list[Step] = [
    ("POST", "/read", _json({"keys": ["k", "missing", "r"], "agent_id": "A"})),
    ("POST", "/read", _json({"keys": ["k", "k"]})),
    ("POST", "/read", _json({"keys": []})),
    ("POST", "/read", _json({"keys": "k"})),
    ("POST", "/read", _json({"keys": ["k"], "record": "no", "agent_id": 1})),
    ("POST", "/read", _json({"keys": ["k"], "record": False, "extra": {"a": 1}})),
    ("POST", "/read", _json({"keys": ["k"] + [f"n{i}" for i in range(300)]})),
    ("POST", "/read", _json({"keys": ["a//b"], "session_id": "s"})),
    ("POST", "/read", _raw("")),
    ("POST", "/read", _raw("[")),
    ("POST", "/read", _bytes(DEEP)),
    ("POST", "/read", _bytes(NOT_UTF16)),
    ("POST", "/read", _bytes(b'{"keys": ["k"]}', "application/json; charset=UTF-8")),
    ("POST", "/read?record=false", _json({"keys": ["r"]}, **{"X-Agent-Id": "C"})),
    ("POST", "/read", _json({"keys": ["r"], "agent_id": "A"}, **{"X-Agent-Id": "C"})),
]


async def _run(
    steps: list[Step], creator: dict[str, str] | None = None, **overrides: Any
) -> list[tuple[int, dict[str, str], str]]:
    async with app_client(**overrides) as c:
        for body in ({"key": "k", "content": "0"}, {"key": "r", "content": "r"}):
            assert (await c.post("/shard", json=body, headers=creator)).status_code == 201
        answers = []
        for method, path, options in steps:
            r = await c.request(method, path, **options)
            headers = {h: r.headers[h] for h in COMPARED_HEADERS if h in r.headers}
            if "retry-after" in r.headers:  # its value is the time left: only whether sent
                headers["retry-after"] = "sent"
            answers.append((r.status_code, headers, VOLATILE.sub(r'"\1":"-"', r.text)))
        return answers


def _solved(step: Step) -> bool:
    """Whether FastAPI's handler reaches its solver: a trailing slash or another method
    reaches no route, the gate refuses a query that is not UTF-8 and a POST without a
    JSON media type, and a body the decoder refuses is refused before solving (a GET's
    body is never read)."""
    method, path, options = step
    if query_problem(path.partition("?")[2].encode()):
        return False
    if method == "GET":
        return path.startswith("/shard/") and not path.endswith("/")
    if method != "POST" or path.split("?")[0] not in ("/commit", "/commit/v2", "/read"):
        return False
    media = options.get("headers", {}).get("Content-Type", "")
    if media.split(";")[0].strip().lower() != "application/json":
        return False
    try:
        json.loads(options.get("content") or "null")
    except (ValueError, RecursionError):
        return False
    return True


def counting_solver(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    # FastAPI's handler calls the solver through its module's global.
    solve = fastapi.routing.solve_dependencies  # type: ignore[attr-defined]

    def counted(**kwargs: Any) -> Awaitable[Any]:
        calls[0] += 1
        return solve(**kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counted)
    return calls


@pytest.mark.parametrize(
    ("steps", "statuses"),
    [
        (READS, {200, 403, 404, 405, 422}),
        (COMMITS, {200, 400, 403, 404, 405, 409, 413, 415, 422}),
        (BULK, {200, 400, 403, 422}),
    ],
    ids=["read", "commit", "bulk"],
)
async def test_lean_answers_as_fastapi(
    steps: list[Step], statuses: set[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    solver = counting_solver(monkeypatch)
    lean_answers = await _run(steps)
    lean_solves = solver[0]
    with framework_handlers():
        framework_answers = await _run(steps)
    # The lean run solved dependencies only for the two creates; FastAPI's for those
    # and every other step but the ones it refused before solving.
    assert lean_solves == 2
    assert solver[0] - lean_solves == 2 + len([s for s in steps if _solved(s)])
    for step, got, want in zip(steps, lean_answers, framework_answers, strict=True):
        assert got == want, step
    # The script reaches the answers it is meant to compare.
    assert {status for status, _, _ in lean_answers} == statuses


def _query_fields() -> list[Any]:
    (route,) = [r for r in _hot_routes() if r.path == "/shard/{key:path}"]
    return list(route.dependant.query_params) + list(route.dependant.path_params)


NAMES = st.sampled_from(["agent_id", "session_id", "record", "key", "other"])
VALUES = st.one_of(
    st.sampled_from(["", "true", "false", "1", "0", "yes", "off", "A", "x/y", "a//b", "TRUE"]),
    st.text(max_size=8),
    st.text(min_size=250, max_size=300, alphabet="ab"),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NAMES, VALUES), max_size=6))
def test_parameter_reader_is_fastapis(pairs: list[tuple[str, str]]) -> None:
    """The lean reader of plain parameters gives FastAPI's values and errors exactly."""
    fields = _query_fields()
    received = QueryParams(pairs)
    assert lean._params_reader(fields)(received) == request_params_to_args(fields, received)


def test_the_hot_parameters_take_the_short_reader() -> None:
    fields = _query_fields()
    assert all(lean._scalar(f) for f in fields)


async def test_solver_counter_sees_the_framework(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter the comparison relies on does count FastAPI's solver."""
    calls = counting_solver(monkeypatch)
    with framework_handlers():
        async with app_client() as c:
            await c.get("/shard/nothing")
    assert calls[0] == 1


async def test_an_inclusion_dependency_keeps_fastapis_handler() -> None:
    """A hot endpoint included with a dependency of the inclusion's own is not lean: the
    lean handler would skip that dependency, so FastAPI's handler serves it and runs it
    (here first, before the endpoint's own parts fail for want of a runtime)."""
    ran: list[str] = []

    async def marker() -> None:
        ran.append("marker")

    router = APIRouter(route_class=WireRoute)
    router.add_api_route("/shard/{key:path}", shards.read_shard, methods=["GET"])
    app = FastAPI()
    app.include_router(router, dependencies=[Depends(marker)])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        await c.get("/shard/k")
    assert ran == ["marker"]


async def test_a_dependency_override_is_honoured() -> None:
    """An app that overrides a dependency (as tests do with ``dependency_overrides``) is
    served by FastAPI's handler, which applies the override: the lean handler would read
    the runtime's settings and ignore it."""
    app = create_app(_settings())

    async def strict() -> Settings:
        return _settings(require_agent_id=True)

    async with serve(app) as c:
        assert (await c.post("/shard", json={"key": "k", "content": "0"})).status_code == 201
        assert (await c.get("/shard/k")).status_code == 200
        app.dependency_overrides[get_settings] = strict
        r = await c.get("/shard/k")
        assert (r.status_code, r.json().get("error")) == (400, "AgentRequired")
        r = await c.post("/read", json={"keys": ["k"]})
        assert (r.status_code, r.json().get("error")) == (400, "AgentRequired")
        app.dependency_overrides.clear()
        assert (await c.get("/shard/k")).status_code == 200


async def _read_without_agent(c: httpx.AsyncClient, times: int) -> set[int]:
    answers = await asyncio.gather(*(c.get("/shard/k") for _ in range(times)))
    return {r.status_code for r in answers}


async def test_two_apps_keep_their_own_runtime() -> None:
    """Two apps in one process, requests interleaved and concurrent: each request is
    served from its own app's runtime (one app requires an agent id, the other not)."""
    strict, lax = create_app(_settings(require_agent_id=True)), create_app(_settings())
    async with serve(strict) as s, serve(lax) as x:
        for c in (s, x):
            assert (await c.post("/shard", json={"key": "k", "content": "0"})).status_code == 201
        for _ in range(3):
            assert (await s.get("/shard/k")).status_code == 400
            assert (await x.get("/shard/k")).status_code == 200
        both = await asyncio.gather(_read_without_agent(s, 50), _read_without_agent(x, 50))
        assert list(both) == [{400}, {200}]


def test_two_apps_in_two_threads_keep_their_own_runtime() -> None:
    """The same with each app on its own event loop in its own thread."""

    async def hammer(app: FastAPI) -> set[int]:
        async with serve(app) as c:
            assert (await c.post("/shard", json={"key": "k", "content": "0"})).status_code == 201
            seen: set[int] = set()
            for _ in range(20):
                seen |= await _read_without_agent(c, 10)
            return seen

    apps = [create_app(_settings(require_agent_id=True)), create_app(_settings())]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda app: asyncio.run(hammer(app)), apps))
    assert results == [{400}, {200}]


TOKEN_MODE: dict[str, Any] = {"auth": "token", "secret": "t" * 32, "admin_enabled": False}
TOKEN_MODE |= {"rate_limit": "1/h,5"}


def _bearer(agent: str, *scopes: tuple[str, str]) -> dict[str, str]:
    """A token the token-mode apps of one comparison all accept (same secret)."""
    issuer = Issuer.from_settings(_settings(**TOKEN_MODE))
    value, _ = issuer.issue(agent, [Scope.of(p, *rights.split(",")) for p, rights in scopes], 600)
    return {"Authorization": f"Bearer {value}"}


def _token_steps() -> list[Step]:
    writer = _bearer("A", ("k", "read,write"))
    reader = _bearer("R", ("**", "read"))
    forged = {"Authorization": writer["Authorization"][:-4] + "AAAA"}
    good = _commit(agent_id=None)
    return [
        ("GET", "/shard/k", {"headers": writer}),
        ("GET", "/shard/r", {"headers": writer}),
        ("GET", "/shard/k", {}),
        ("GET", "/shard/k", {"headers": forged}),
        ("GET", "/shard/k", {"headers": writer, "params": {"agent_id": "B"}}),
        ("GET", "/shard/k", {"headers": {**writer, "X-Agent-Id": "A"}}),
        ("GET", "/shard/k", {"headers": reader, "params": {"record": "false"}}),
        ("POST", "/read", _json({"keys": ["k", "r"]}, **writer)),
        ("POST", "/read", _json({"keys": ["k", "r"]}, **reader)),
        ("POST", "/read", _json({"keys": ["k"]})),
        ("POST", "/commit/v2", _json(good | {"key": "r"}, **writer)),
        ("POST", "/commit/v2", _json(good, **reader)),
        ("POST", "/commit/v2", _json(good, **forged)),
        ("POST", "/commit/v2", _json(good | {"agent_id": "B"}, **writer)),
        ("POST", "/commit/v2", _raw("{")),
        ("POST", "/commit/v2", {"content": b"{", "headers": _raw("")["headers"] | writer}),
        ("POST", "/commit/v2", _json(good | {"expected_version": "x"})),
        ("POST", "/commit/v2", _json(good | {"expected_version": "x"}, **writer)),
        ("POST", "/commit/v2", _json(good, **writer)),
        ("POST", "/commit", _json(good, **writer)),
        # Past the rate limit's burst: 429 RateLimited with Retry-After.
        ("POST", "/commit", _json(good | {"expected_version": 1}, **writer)),
        ("POST", "/commit", _json(good | {"expected_version": 2}, **writer)),
        ("POST", "/commit", _json(good | {"expected_version": 3}, **writer)),
    ]


async def test_lean_answers_as_fastapi_in_token_mode() -> None:
    """The same comparison in token mode: the gate's 401s, the rights' 403s and the
    agent checks and the rate limit's 429 are the same with and without the lean handler."""
    steps = _token_steps()
    creator = _bearer("root", ("**", "read,write,create"))
    lean_answers = await _run(steps, creator, **TOKEN_MODE)
    with framework_handlers():
        framework_answers = await _run(steps, creator, **TOKEN_MODE)
    for step, got, want in zip(steps, lean_answers, framework_answers, strict=True):
        assert got == want, step
    assert {status for status, _, _ in lean_answers} == {200, 400, 401, 403, 409, 422, 429}


async def _contended() -> tuple[str, list[int], list[int]]:
    async with app_client() as c:
        document = (await c.get("/openapi.json")).text
        assert (await c.post("/shard", json={"key": "hot", "content": "0"})).status_code == 201
        commits = [
            c.post("/commit/v2", json=_commit(key="hot", delta=str(i), agent_id=f"a{i}"))
            for i in range(40)
        ]
        reads = [c.get("/shard/hot", params={"agent_id": f"r{i}"}) for i in range(40)]
        reads += [c.post("/read", json={"keys": ["hot"], "agent_id": f"b{i}"}) for i in range(40)]
        answers = await asyncio.gather(*commits, *reads)
        statuses = [r.status_code for r in answers]
        return document, sorted(statuses[:40]), sorted(statuses[40:])


async def test_concurrent_requests_and_the_document_are_fastapis() -> None:
    """Many concurrent commits at one version and reads on one app: one commit wins,
    every other is 409, every read 200, as with FastAPI's handler; the OpenAPI document
    is the same byte for byte."""
    lean_run = await _contended()
    with framework_handlers():
        framework_run = await _contended()
    assert lean_run == framework_run
    assert lean_run[1] == [200] + [409] * 39
    assert lean_run[2] == [200] * 80
