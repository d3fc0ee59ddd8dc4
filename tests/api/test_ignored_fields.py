"""Unknown request fields stay ignored (compat) but are named in ``SBus-Ignored-Fields``
on every response to a request whose JSON body was parsed, errors included; a
``/commit/multi`` write carrying ``create`` or ``delete`` is refused, not overwritten."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.helpers import create, dl, dl_entries, ok, problem, read
from tests.conftest import AppFactory

HEADER = "SBus-Ignored-Fields"


def _commit(**extra: Any) -> dict[str, Any]:
    return {"key": "k", "expected_version": 0, "delta": "x", "agent_id": "a", **extra}


async def test_typos_are_named(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    r = await client.post("/commit/v2", json=_commit(readset=[], sesion_id="s"))
    assert ok(r)["new_version"] == 1
    assert r.headers[HEADER] == "readset, sesion_id"


async def test_nested_paths(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    await create(client, "b")
    body = {
        "agent_id": "x",
        "extra": {"deep": 1},
        "writes": [
            {"key": "a", "expected_version": 0, "delta": "A"},
            {"key": "b", "expected_version": 0, "delta": "B", "foo": 1, "delte": True},
        ],
        "read_set": [{"key": "a", "version_at_read": 0, "bar": None}],
    }
    r = await client.post("/commit/multi", json=body)
    ok(r)
    assert r.headers[HEADER] == "extra, writes[1].foo, writes[1].delte, read_set[0].bar"
    r = await client.post("/shard", json={"key": "c", "content": "", "policy": {"requre": True}})
    ok(r, 201)
    assert r.headers[HEADER] == "policy.requre"


async def test_known_fields_aliases_and_context_contents_are_not_named(
    client: httpx.AsyncClient,
) -> None:
    await create(client, "k")
    body = {"key": "k", "expected_ver": 0, "content": "x", "agent_id": "a", "context": {"z": 1}}
    r = await client.post("/commit/v2", json=body)
    ok(r)
    assert HEADER not in r.headers
    r = await client.post("/session", json={"agent_id": "a", "session_id": "s"})
    ok(r)
    assert HEADER not in r.headers
    assert HEADER not in (await client.get("/shard/k", params={"agent_id": "a"})).headers


@pytest.mark.parametrize(
    ("body", "status", "code", "named"),
    [
        (_commit(expected_version=5, readset=[]), 409, "VersionMismatch", "readset"),
        (_commit(key="absent", sesion_id="s"), 404, "ShardNotFound", "sesion_id"),
        (
            {"key": "k", "expected_version": 0, "delt": "x", "agent_id": "a"},
            422,
            "ValidationError",
            "delt",
        ),
        ({**_commit(), "content": "y", "x": 1}, 422, "AmbiguousField", "x"),
        (_commit(agent_id="", agnet_id="a"), 422, "ValidationError", "agnet_id"),
    ],
    ids=["conflict", "not-found", "validation", "ambiguous", "missing-agent"],
)
async def test_named_on_error_responses(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, code: str, named: str
) -> None:
    await create(client, "k")
    r = await client.post("/commit/v2", json=body)
    problem(r, status, code)
    assert r.headers[HEADER] == named
    assert (await read(client, "k"))["version"] == 0


async def test_not_named_without_a_parsed_body(client: httpx.AsyncClient) -> None:
    r = await client.post("/commit/v2", content=b'{"key": "k", "readset": ')
    problem(r, 400, "MalformedJSON")
    assert HEADER not in r.headers
    r = await client.post("/commit/v2", content=b'["readset"]')
    problem(r, 422, "ValidationError")
    assert HEADER not in r.headers


async def test_routes_without_fields_name_every_member(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    r = await client.request(
        "DELETE", "/shard/k", params={"expected_version": "0", "agent_id": "a"}, json={"why": 1}
    )
    assert r.status_code == 204
    assert r.headers[HEADER] == "why"
    r = await client.post("/admin/reset", json={"everything": True, "n": {"deep": 1}})
    ok(r)
    assert r.headers[HEADER] == "everything, n"
    for body in (b"{}", b""):
        r = await client.post("/admin/reset", content=body)
        assert ok(r) == {"cleared": 0}
        assert HEADER not in r.headers


async def test_routes_without_fields_refuse_broken_bodies(client: httpx.AsyncClient) -> None:
    """A malformed body is 400 and a JSON value that is not an object 422, with nothing
    done: the delete and the reset used to go through as if the body were empty."""
    await create(client, "k")
    for raw, status, code in (
        (b"{bad json", 400, "MalformedJSON"),
        (b"[]", 422, "ValidationError"),
    ):
        r = await client.request(
            "DELETE", "/shard/k", params={"expected_version": "0", "agent_id": "a"}, content=raw
        )
        problem(r, status, code)
        problem(await client.post("/admin/reset", content=raw), status, code)
        assert (await read(client, "k"))["version"] == 0


async def test_every_write_route_declares_a_body(client: httpx.AsyncClient) -> None:
    """So FastAPI parses (and refuses) every body, and the header can name its members."""
    document = ok(await client.get("/openapi.json"))
    for path, methods in document["paths"].items():
        for method in ("post", "delete"):
            if method in methods:
                assert "requestBody" in methods[method], (method, path)


async def test_names_are_escaped_and_capped(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    odd = {"a, b": 1, "line\r\nX-Injected: 1": 2, "caf\u00e9": 3, "x" * 100: 4, "ok_name-1": 5}
    r = await client.post("/commit/v2", json=_commit(**odd))
    ok(r)
    assert "x-injected" not in r.headers
    assert r.headers[HEADER] == ", ".join(
        [
            '["a\\u002c b"]',
            '["line\\r\\nX-Injected: 1"]',
            '["caf\\u00e9"]',
            '["' + "x" * 64 + '..."]',
            "ok_name-1",
        ]
    )
    many = {f"f{i:02}": i for i in range(40)}
    r = await client.post("/commit/v2", json=_commit(expected_version=1, **many))
    ok(r)
    assert r.headers[HEADER] == ", ".join([f"f{i:02}" for i in range(32)] + ["..."])


async def test_exposed_to_browsers(make_client: AppFactory) -> None:
    origin = "http://app.test"
    _, c = await make_client(cors_origins=origin)
    await create(c, "k")
    r = await c.post("/commit/v2", json=_commit(readset=[]), headers={"Origin": origin})
    ok(r)
    assert r.headers[HEADER] == "readset"
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert HEADER.lower() in exposed


async def test_declared_in_openapi(client: httpx.AsyncClient) -> None:
    paths = ok(await client.get("/openapi.json"))["paths"]
    for path, method, status in [
        ("/commit/v2", "post", "200"),
        ("/commit/v2", "post", "409"),
        ("/shard/{key}", "delete", "204"),
        ("/admin/reset", "post", "200"),
        ("/shards", "get", "200"),
        ("/shard/{key}", "get", "200"),
        ("/shard/{key}", "get", "404"),
        ("/history/{key}", "get", "422"),
        ("/stats", "get", "200"),
    ]:
        assert HEADER in paths[path][method]["responses"][status]["headers"], (path, status)
    for path, methods in paths.items():
        for method, operation in methods.items():
            for status, response in operation["responses"].items():
                assert HEADER in response.get("headers", {}), (method, path, status)
    described = paths["/shards"]["get"]["responses"]["200"]["headers"][HEADER]["description"]
    assert "`?sesion_id" in described


# -- query parameters -------------------------------------------------------------------


async def test_unknown_query_parameters_on_a_read(client: httpx.AsyncClient) -> None:
    """The reads the probe found: a misspelt session records in session "" and a
    misspelt agent records nothing, both silently. The reads still happen (compat), but
    the answer names the parameters."""
    await create(client, "k")
    r = await client.get("/shard/k?agent_id=A&sesion_id=S")
    ok(r)
    assert r.headers[HEADER] == "?sesion_id"
    assert await dl_entries(client, "A", "") == {"k": 0}
    assert await dl_entries(client, "A", "S") == {}
    r = await client.get("/shard/k?agentid=B")
    ok(r)
    assert r.headers[HEADER] == "?agentid"
    assert "B" not in (await dl(client))["sessions"]
    r = await client.get("/shard/k?agent_id=A&session_id=S")
    ok(r)
    assert HEADER not in r.headers
    assert await dl_entries(client, "A", "S") == {"k": 0}


@pytest.mark.parametrize(
    ("method", "url", "body", "status", "named"),
    [
        ("GET", "/shard/absent?agentid=A", None, 404, "?agentid"),
        ("GET", "/shard/k?agent_id=A&x=1&x=2&y", None, 200, "?x, ?y"),
        ("GET", "/shards?limt=1", None, 200, "?limt"),
        ("GET", "/history/k?limit=0&befor=1", None, 422, "?befor"),
        ("GET", "/stats?verbose=1", None, 200, "?verbose"),
        ("GET", "/admin/config?a%20b=1&caf%C3%A9=2", None, 200, '?["a b"], ?["caf\\u00e9"]'),
        ("POST", "/commit/v2?sesion_id=s", _commit(readset=[]), 200, "?sesion_id, readset"),
        ("POST", "/commit/v2?agent_id=a", _commit(), 200, "?agent_id"),
        ("POST", "/session?x=1", {"agent_id": "a"}, 200, "?x"),
        ("DELETE", "/shard/k?expected_version=0&agent_id=a&sesion=s", None, 204, "?sesion"),
        ("DELETE", "/shard/k?expected_version=5&agent_id=a&sesion=s", None, 409, "?sesion"),
        ("POST", "/admin/reset?confirm=yes", {"all": True}, 200, "?confirm, all"),
    ],
)
async def test_unknown_query_parameters_are_named(
    client: httpx.AsyncClient, method: str, url: str, body: Any, status: int, named: str
) -> None:
    await create(client, "k")
    r = await client.request(method, url, json=body)
    assert r.status_code == status, r.text
    assert r.headers[HEADER] == named


async def test_query_and_body_share_the_cap(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    query = "&".join(f"q{i:02}=1" for i in range(20))
    body = _commit(**{f"f{i:02}": i for i in range(20)})
    r = await client.post(f"/commit/v2?{query}", json=body)
    ok(r)
    names = [f"?q{i:02}" for i in range(20)] + [f"f{i:02}" for i in range(12)]
    assert r.headers[HEADER] == ", ".join([*names, "..."])
