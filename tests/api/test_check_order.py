"""The gate's refusals come in the order docs/errors.md gives ("Order of checks"): a
request that breaks several rules at once is answered for the first, and each rule
lifted in turn reveals the next. Nothing is written on the way."""

from __future__ import annotations

import httpx

from sbus.api.runtime import runtime_of
from tests.api.auth_helpers import auth, root_token, token_app
from tests.api.helpers import create, problem, read
from tests.conftest import AppFactory

MAX_BODY = 100
BIG = b'{"key": "new", "content": "' + b"x" * 200 + b'"}'


async def _post(c: httpx.AsyncClient, url: str, body: bytes, **headers: str) -> httpx.Response:
    return await c.post(url, content=body, headers={"Content-Type": "text/plain", **headers})


async def test_open_mode(make_client: AppFactory) -> None:
    app, c = await make_client(max_body=MAX_BODY)
    await create(c, "k")
    foreign = {"Host": "evil.example", "Sec-Fetch-Site": "cross-site"}
    try:
        runtime_of(app).ready = False
        r = await _post(c, "/shard?agent_id=%FF", BIG, **foreign)
        problem(r, 403, "HostNotAllowed")
        r = await _post(c, "/shard?agent_id=%FF", BIG, **{"Sec-Fetch-Site": "cross-site"})
        problem(r, 403, "CrossSiteRequest")
        problem(await _post(c, "/shard?agent_id=%FF", BIG), 422, "ValidationError")
        problem(await _post(c, "/shard", BIG), 503, "StoreUnavailable")
        runtime_of(app).ready = True
        problem(await _post(c, "/shard", BIG), 413, "RequestTooLarge")
        problem(await _post(c, "/shard", b"{}"), 415, "UnsupportedMediaType")
    finally:
        runtime_of(app).ready = True
    problem(await c.get("/shard/new"), 404, "ShardNotFound")
    assert (await read(c, "k"))["version"] == 0


async def test_token_mode(make_client: AppFactory) -> None:
    app, c = await token_app(make_client, max_body=MAX_BODY)
    root = auth(root_token(app))
    try:
        runtime_of(app).ready = False
        problem(await _post(c, "/shard?agent_id=%FF", BIG), 401, "Unauthorized")
        problem(await _post(c, "/shard?agent_id=%FF", BIG, **root), 422, "ValidationError")
        problem(await _post(c, "/shard", BIG, **root), 503, "StoreUnavailable")
        runtime_of(app).ready = True
        problem(await _post(c, "/shard", BIG, **root), 413, "RequestTooLarge")
        problem(await _post(c, "/shard", b"{}", **root), 415, "UnsupportedMediaType")
    finally:
        runtime_of(app).ready = True
    problem(await c.get("/shard/new", headers=root), 404, "ShardNotFound")
