"""The OpenAPI document: every route is described, and every error response is
problem+json with the Problem schema instead of FastAPI's HTTPValidationError (SPEC 6)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.api.helpers import ok

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
METHODS = {"get", "post", "put", "patch", "delete"}
ROUTES = {
    ("post", "/shard"),
    ("get", "/shard/{key}"),
    ("delete", "/shard/{key}"),
    ("get", "/shards"),
    ("get", "/history/{key}"),
    ("post", "/commit"),
    ("post", "/commit/v2"),
    ("post", "/commit/multi"),
    ("post", "/rollback"),
    ("post", "/session"),
    ("post", "/delivery_log/register"),
    ("get", "/stats"),
    ("get", "/metrics"),
    ("get", "/livez"),
    ("get", "/admin/health"),
    ("post", "/admin/reset"),
    ("get", "/admin/config"),
    ("post", "/admin/config"),
    ("get", "/admin/delivery-log"),
    ("post", "/admin/inject-stale"),
    ("post", "/admin/shard"),
    ("post", "/admin/test/advance-clock"),
}


def _normalise(path: str) -> str:
    return path.replace("{key:path}", "{key}")


@pytest.fixture
async def document(client: httpx.AsyncClient) -> dict[str, Any]:
    return ok(await client.get("/openapi.json"))


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, _normalise(path), op)
        for path, methods in document["paths"].items()
        for method, op in methods.items()
        if method in METHODS
    ]


async def test_every_route_is_documented(document: dict[str, Any]) -> None:
    documented = {(method, path) for method, path, _ in _operations(document)}
    assert documented >= ROUTES, ROUTES - documented


async def test_error_responses_are_problem_json(document: dict[str, Any]) -> None:
    for method, path, op in _operations(document):
        errors = {s: r for s, r in op["responses"].items() if 400 <= int(s) < 500}
        assert errors, (method, path)
        for status, response in errors.items():
            content = response.get("content", {})
            assert set(content) == {"application/problem+json"}, (method, path, status)
            assert content["application/problem+json"]["schema"] == PROBLEM_REF


async def test_validation_and_common_statuses_declared(document: dict[str, Any]) -> None:
    for method, path, op in _operations(document):
        declared = set(op["responses"])
        assert "422" in declared, (method, path)
        if method in ("post", "delete"):
            assert {"400", "413", "415"} <= declared, (method, path, declared)


async def test_commit_routes_declare_protocol_errors(document: dict[str, Any]) -> None:
    for path in ("/commit", "/commit/v2", "/commit/multi", "/rollback"):
        declared = set(document["paths"][path]["post"]["responses"])
        assert {"200", "403", "404", "409", "410", "413", "422"} <= declared, (path, declared)
    delete = document["paths"]["/shard/{key}"]["delete"]["responses"]
    assert {"204", "409", "428"} <= set(delete)


async def test_no_http_validation_error_schema(document: dict[str, Any]) -> None:
    text = json.dumps(document)
    assert "HTTPValidationError" not in text
    assert "#/components/schemas/ValidationError" not in text
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    problem = schemas["Problem"]
    assert {"type", "title", "status", "detail", "error"} <= set(problem["required"])


async def test_document_is_stable(client: httpx.AsyncClient, document: dict[str, Any]) -> None:
    assert ok(await client.get("/openapi.json")) == document
