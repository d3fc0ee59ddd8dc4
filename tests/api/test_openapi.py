"""The OpenAPI document: every route is described, and every error response is
problem+json with the Problem schema instead of FastAPI's HTTPValidationError (protocol.md §6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

from sbus import __version__
from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app
from sbus.config import Settings
from sbus.security.keys import write_keypair
from tests.api.helpers import ok, problem
from tests.conftest import AppFactory

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
METHODS = {"get", "post", "put", "patch", "delete"}
# A floor under the routes derived from the app (below): the derivation cannot come back
# empty or lose these without the test noticing.
ROUTES = {
    ("post", "/shard"),
    ("get", "/shard/{key}"),
    ("delete", "/shard/{key}"),
    ("get", "/shards"),
    ("post", "/read"),
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
    ("get", "/version"),
    ("get", "/admin/health"),
    ("post", "/admin/reset"),
    ("get", "/admin/config"),
    ("post", "/admin/config"),
    ("get", "/admin/delivery-log"),
    ("post", "/admin/inject-stale"),
    ("post", "/admin/shard"),
    ("post", "/admin/test/advance-clock"),
    ("post", "/mandates"),
    ("post", "/admin/tokens"),
    ("post", "/admin/tokens/revoke"),
}
# The document itself and the browser pages with their assets (sbus.api.routers.pages):
# the only routes the document does not describe.
UNDOCUMENTED = {
    ("get", "/openapi.json"),
    ("get", "/docs"),
    ("get", "/docs/{name}"),
    ("get", "/ui"),
    ("get", "/ui/{name}"),
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


def app_routes(app: FastAPI) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(method, path) of every route the app serves, whether or not it asks to be in the
    schema: (its API routes, its other routes). HEAD, which Starlette adds to GETs, is
    left out."""
    api: set[tuple[str, str]] = set()
    other: set[tuple[str, str]] = set()
    for context in iter_route_contexts(app.routes):
        into = api if isinstance(context.original_route, APIRoute) else other
        assert context.path_format is not None, context
        for method in context.methods or ():
            if method != "HEAD":
                into.add((method.lower(), _normalise(context.path_format)))
    return api, other


@pytest.mark.parametrize("mode", ["open", "token"])
def test_every_route_is_documented(mode: str) -> None:
    settings: dict[str, Any] = {"admin_enabled": True, "test_hooks": True}
    if mode == "token":
        settings |= {"auth": "token", "secret": "x" * 32}
    app = create_app(Settings(store="memory://", **settings))
    api, other = app_routes(app)
    served = api | other
    assert served >= ROUTES, ROUTES - served
    assert served >= UNDOCUMENTED, UNDOCUMENTED - served
    documented = {(method, path) for method, path, _ in _operations(app.openapi())}
    expected = served - UNDOCUMENTED
    assert documented == expected, (expected - documented, documented - expected)


def test_a_route_hidden_from_the_schema_is_caught() -> None:
    """The control for the test above: a route that opts out of the schema is still
    served, so the derived list has it and the document does not."""
    app = create_app(Settings(store="memory://"))

    @app.post("/hidden", include_in_schema=False)
    def hidden() -> None: ...

    api, other = app_routes(app)
    documented = {(method, path) for method, path, _ in _operations(app.openapi())}
    assert (api | other) - UNDOCUMENTED - documented == {("post", "/hidden")}


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


@pytest.mark.parametrize("mode", ["open", "token"])
def test_routes_with_a_body_declare_the_body_deadline(mode: str) -> None:
    """A POST or DELETE whose body is slower than SBUS_BODY_TIMEOUT gets 408
    RequestTimeout from the gate; a GET has no body to wait for."""
    document = _built() if mode == "open" else _token_document()
    for method, path, operation in _operations(document):
        responses = operation["responses"]
        if method in ("post", "delete"):
            content = responses["408"]["content"]
            assert content == {"application/problem+json": {"schema": PROBLEM_REF}}, path
            assert "RequestTimeout" in responses["408"]["description"]
        else:
            assert "408" not in responses, (method, path)


def _bound_keywords(value: Any) -> list[str]:
    """Every ge/le/gt/lt keyword anywhere in a schema."""
    if isinstance(value, list):
        return [k for item in value for k in _bound_keywords(item)]
    if not isinstance(value, dict):
        return []
    found = [k for k in ("ge", "le", "gt", "lt") if k in value]
    return found + [k for item in value.values() for k in _bound_keywords(item)]


MAX_INT = 2**53 - 1
QUERY_BOUNDS = {
    ("delete", "/shard/{key}", "expected_version"): (0, MAX_INT),
    ("get", "/shards", "limit"): (1, MAX_INT),
    ("get", "/history/{key}", "before"): (0, MAX_INT),
    ("get", "/history/{key}", "limit"): (1, 1000),
    ("get", "/admin/delivery-log", "limit"): (1, 10000),
}


def test_integer_query_parameters_use_minimum_and_maximum() -> None:
    document = _built()
    for method, path, operation in _operations(document):
        for parameter in operation.get("parameters", []):
            assert _bound_keywords(parameter.get("schema", {})) == [], (method, path, parameter)
    for (method, path, name), (low, high) in QUERY_BOUNDS.items():
        (parameter,) = [
            p for p in _operation(document, method, path)["parameters"] if p["name"] == name
        ]
        schema = parameter["schema"]
        integer = next(b for b in schema.get("anyOf", [schema]) if b["type"] == "integer")
        assert (integer["minimum"], integer["maximum"]) == (low, high), (method, path, name)


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


BUILD_DOCUMENT = """
import json, sys
from sbus.bootstrap import create_app
from sbus.config import Settings
document = create_app(Settings(store="memory://", **json.loads(sys.argv[1]))).openapi()
print(json.dumps(document))
"""


def _built_elsewhere(hash_seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """The document as a fresh interpreter builds it, with its own string hashing (so
    the order of anything built from a set or a hash would come out differently)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBUS_")}
    env["PYTHONHASHSEED"] = str(hash_seed)
    done = subprocess.run(
        [sys.executable, "-c", BUILD_DOCUMENT, json.dumps(settings)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    document: dict[str, Any] = json.loads(done.stdout)
    return document


@pytest.mark.parametrize("mode", ["open", "token"])
def test_document_is_stable(mode: str) -> None:
    """Byte for byte (order included) the same document from every build of the same
    deployment, so generated clients and committed copies do not churn."""
    settings: dict[str, Any] = {} if mode == "open" else {"auth": "token", "secret": "x" * 32}
    here = json.dumps(_built(**settings))
    for seed in (1, 2):
        assert json.dumps(_built_elsewhere(seed, settings)) == here, seed


async def test_the_served_document_is_the_built_one(
    client: httpx.AsyncClient, document: dict[str, Any]
) -> None:
    served = await client.get("/openapi.json")
    assert served.json() == document
    built = _built(admin_enabled=True, test_hooks=True)
    assert json.dumps(document) == json.dumps(built)


# -- what the handlers read and set outside their signatures --------------------------

AGENT_HEADERS = {"X-Agent-Id", "X-SBus-Agent-Id"}
COMMIT_HEADERS = AGENT_HEADERS | {"X-SBus-Session-Id", "Idempotency-Key"}
EXPECTED_HEADERS = {
    ("post", "/shard"): AGENT_HEADERS | {"Idempotency-Key"},
    ("get", "/shard/{key}"): AGENT_HEADERS | {"X-SBus-Session-Id"},
    ("delete", "/shard/{key}"): COMMIT_HEADERS
    | {"If-Match", "X-SBus-Mandate", "X-SBus-Mandate-Context"},
    ("post", "/commit"): COMMIT_HEADERS | {"If-Match"},
    ("post", "/commit/v2"): COMMIT_HEADERS | {"If-Match"},
    ("post", "/commit/multi"): COMMIT_HEADERS,
    ("post", "/rollback"): COMMIT_HEADERS | {"If-Match"},
    ("post", "/session"): AGENT_HEADERS | {"X-SBus-Session-Id"},
    ("post", "/delivery_log/register"): AGENT_HEADERS | {"X-SBus-Session-Id"},
    ("post", "/mandates"): AGENT_HEADERS,
}
ETAG_SUCCESS = {
    ("get", "/shard/{key}", "200"),
    ("post", "/shard", "201"),
    ("delete", "/shard/{key}", "204"),
    ("post", "/commit", "200"),
    ("post", "/commit/v2", "200"),
    ("post", "/rollback", "200"),
}
RATE_LIMITED = {
    ("post", "/shard"),
    ("delete", "/shard/{key}"),
    ("post", "/commit"),
    ("post", "/commit/v2"),
    ("post", "/commit/multi"),
    ("post", "/rollback"),
}
PUBLIC_OPERATIONS = {("get", "/livez"), ("get", "/version"), ("get", "/admin/health")}


def _built(**settings: Any) -> dict[str, Any]:
    """The document as a deployment with these settings serves it (no store needed)."""
    document: dict[str, Any] = create_app(Settings(store="memory://", **settings)).openapi()
    return document


def _token_document() -> dict[str, Any]:
    return _built(auth="token", secret="x" * 32)


def _operation(document: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    for m, p, op in _operations(document):
        if (m, p) == (method, path):
            return op
    raise AssertionError(f"{method} {path} is not documented")


def _header_names(operation: dict[str, Any]) -> set[str]:
    return {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}


@pytest.mark.parametrize("mode", ["open", "token"])
def test_request_headers_are_declared(mode: str) -> None:
    document = _built() if mode == "open" else _token_document()
    for (method, path), expected in EXPECTED_HEADERS.items():
        operation = _operation(document, method, path)
        assert _header_names(operation) >= expected, (method, path)
        for parameter in operation["parameters"]:
            if parameter["in"] == "header":
                assert parameter["required"] is False
                if parameter["name"] == "X-SBus-Mandate-Context":  # JSON in a header
                    schema = parameter["content"]["application/json"]["schema"]
                    assert schema["type"] == "object"
                else:
                    assert parameter["schema"]["type"] == "string"
    # Not accepted there (400 InvalidPrecondition), so not offered.
    assert "If-Match" not in _header_names(_operation(document, "post", "/commit/multi"))


def test_token_mode_declares_the_bearer_scheme() -> None:
    document = _token_document()
    schemes = document["components"]["securitySchemes"]
    assert schemes == {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": schemes["bearer"]["description"],
        }
    }
    assert document["security"] == [{"bearer": []}]
    for method, path, operation in _operations(document):
        if (method, path) in PUBLIC_OPERATIONS:
            assert operation["security"] == [], (method, path)
        else:
            assert "security" not in operation, (method, path)  # the global requirement


def test_open_mode_declares_no_security_scheme() -> None:
    document = _built()
    assert "securitySchemes" not in document.get("components", {})
    assert "security" not in document


def test_429_with_retry_after_on_rate_limited_routes_in_token_mode() -> None:
    document = _token_document()
    for method, path, operation in _operations(document):
        responses = operation["responses"]
        if (method, path) in RATE_LIMITED:
            limited = responses["429"]
            expected = {"Retry-After", "SBus-Ignored-Fields", "X-Request-Id"}
            assert set(limited["headers"]) == expected, (method, path)
            assert limited["content"]["application/problem+json"]["schema"] == PROBLEM_REF
        else:
            assert "429" not in responses, (method, path)
    assert all("429" not in op["responses"] for _, _, op in _operations(_built()))


def test_success_responses_declare_etag_and_replay_headers() -> None:
    document = _built()
    for method, path, status in ETAG_SUCCESS:
        headers = _operation(document, method, path)["responses"][status]["headers"]
        assert headers["ETag"]["schema"] == {"type": "string"}, (method, path)
    for (method, path), expected in EXPECTED_HEADERS.items():
        operation = _operation(document, method, path)
        success = [r for s, r in operation["responses"].items() if int(s) < 300]
        for response in success:
            replayed = "Idempotent-Replayed" in response.get("headers", {})
            assert replayed == ("Idempotency-Key" in expected), (method, path)
    store_down = _operation(document, "post", "/commit")["responses"]["503"]
    assert "Retry-After" in store_down["headers"]


@pytest.mark.parametrize("mode", ["open", "token"])
def test_every_operation_takes_and_every_response_returns_a_request_id(mode: str) -> None:
    """X-Request-Id is read on every route and sent on every response, problems too
    (sbus.telemetry.exchange)."""
    document = _built() if mode == "open" else _token_document()
    for method, path, operation in _operations(document):
        assert "X-Request-Id" in _header_names(operation), (method, path)
        for status, response in operation["responses"].items():
            header = response.get("headers", {}).get("X-Request-Id")
            assert header is not None and header["schema"] == {"type": "string"}, (
                method,
                path,
                status,
            )


BODYLESS = [("delete", "/shard/{key}"), ("post", "/admin/reset")]


@pytest.mark.parametrize(("method", "path"), BODYLESS)
def test_bodyless_routes_declare_an_optional_json_body(method: str, path: str) -> None:
    document = _built()
    body = _operation(document, method, path)["requestBody"]
    assert body.get("required", False) is False
    schema = body["content"]["application/json"]["schema"]
    assert schema["$ref"] == "#/components/schemas/NoFields"
    assert schema["default"] == {}
    declared = document["components"]["schemas"]["NoFields"]
    assert declared["type"] == "object" and declared["properties"] == {}
    assert declared["example"] == {}
    assert "SBus-Ignored-Fields" in declared["description"]


async def test_the_declared_body_is_what_the_server_accepts(client: httpx.AsyncClient) -> None:
    """What a generated client sends for the declarations above: Content-Type and {}."""
    sent = {"Content-Type": "application/json", "X-Agent-Id": "A"}
    ok(await client.post("/shard", json={"key": "k", "content": "c"}), 201)
    deleted = await client.request(
        "DELETE", "/shard/k?expected_version=0", content=b"{}", headers=sent
    )
    assert deleted.status_code == 204, deleted.text
    assert deleted.headers["ETag"] == '"1"'
    reset = await client.request("POST", "/admin/reset", content=b"{}", headers=sent)
    assert reset.status_code == 200, reset.text
    assert reset.json() == {"cleared": 1}


async def test_livez_is_described_truthfully(client: httpx.AsyncClient) -> None:
    operation = _operation(_built(), "get", "/livez")
    text = operation["summary"] + " " + operation.get("description", "")
    assert "never gated" not in text
    assert "Host" in text
    refused = await client.get("/livez", headers={"Host": "attacker.example"})
    assert refused.status_code == 403
    assert refused.json()["error"] == "HostNotAllowed"


SIGNING = {("post", "/mandates"), ("post", "/admin/tokens")}


@pytest.mark.parametrize("mode", ["open", "token"])
def test_retry_after_is_declared_where_it_is_sent(mode: str) -> None:
    """Retry-After goes with StoreUnavailable (and 429). /livez never answers 503, and
    a signing route's 503 may be SigningUnavailable, which carries none."""
    document = _built() if mode == "open" else _token_document()
    assert "503" not in _operation(document, "get", "/livez")["responses"]
    assert "503" not in _operation(document, "get", "/version")["responses"]
    for method, path, operation in _operations(document):
        down = operation["responses"].get("503")
        if down is None or path == "/admin/health":
            continue
        retry = down["headers"]["Retry-After"]
        assert retry["schema"]["type"] == "integer", (method, path)
        if (method, path) in SIGNING:
            assert "SigningUnavailable" in down["description"], (method, path)
            assert retry["required"] is False
            assert "StoreUnavailable only" in retry["description"], (method, path)
        else:
            assert "SigningUnavailable" not in down["description"], (method, path)
    health = _operation(document, "get", "/admin/health")["responses"]["503"]
    assert "Retry-After" not in health.get("headers", {})


async def test_the_declared_503s_are_what_the_server_sends(
    make_client: AppFactory, tmp_path: Path
) -> None:
    """/livez answers while the store is not ready; a signing route then says
    StoreUnavailable with Retry-After, and SigningUnavailable without it."""
    _, public, _ = write_keypair(tmp_path / "k.pem")
    app, c = await make_client(verify_key=str(public))
    mandate = {"agent_id": "G", "holder": "A", "keys": ["k"], "ttl_s": 60}
    tokens = {"agent": "A", "scopes": [{"pattern": "**", "rights": ["read"]}], "ttl_s": 60}
    for url, body in (("/mandates", mandate), ("/admin/tokens", tokens)):
        r = await c.post(url, json=body)
        problem(r, 503, "SigningUnavailable")
        assert "retry-after" not in r.headers
    runtime_of(app).ready = False
    try:
        assert ok(await c.get("/livez")) == {"status": "alive"}
        assert ok(await c.get("/version"))["version"] == __version__
        for url, body in (("/mandates", mandate), ("/admin/tokens", tokens)):
            r = await c.post(url, json=body)
            problem(r, 503, "StoreUnavailable")
            assert int(r.headers["retry-after"]) >= 1
    finally:
        runtime_of(app).ready = True


# -- the real constraints, stated (tests/e2e/test_schema_acceptance.py drives them) ----


def _walk(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, list):
        return [d for item in node for d in _walk(item)]
    if not isinstance(node, dict):
        return []
    return [node] + [d for value in node.values() for d in _walk(value)]


@pytest.mark.parametrize("mode", ["open", "token"])
def test_integer_bounds_are_integers(mode: str) -> None:
    """FastAPI wrote body bounds as 9007199254740991.0; a generator types that a float."""
    document = _built() if mode == "open" else _token_document()
    integers = [d for d in _walk(document) if d.get("type") == "integer"]
    assert len(integers) > 10
    for schema in integers:
        for name in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            assert type(schema.get(name, 0)) is int, schema
    version = document["components"]["schemas"]["CommitBody"]["properties"]["expected_version"]
    assert version["anyOf"] == [{"type": "integer", "minimum": 0, "maximum": MAX_INT}]


def test_version_precondition_is_required_with_if_match_named() -> None:
    document = _built()
    body = document["components"]["schemas"]["CommitBody"]
    assert {"key", "delta", "expected_version"} <= set(body["required"])
    assert "If-Match" in body["properties"]["expected_version"]["description"]
    (param,) = [
        p
        for p in _operation(document, "delete", "/shard/{key}")["parameters"]
        if p["name"] == "expected_version"
    ]
    assert param["required"] is True and "If-Match" in param["description"]
    assert param["schema"] == {"type": "integer", "minimum": 0, "maximum": MAX_INT}


def test_identifiers_text_and_json_state_their_rules() -> None:
    document = _built()
    schemas = document["components"]["schemas"]
    no_nul = "^[^\\u0000]*$"
    for model in ("CommitBody", "SessionBody", "RollbackBody"):
        for name in ("agent_id", "session_id"):
            (string,) = [
                b for b in schemas[model]["properties"][name]["anyOf"] if b["type"] == "string"
            ]
            assert (string["maxLength"], string["pattern"]) == (256, no_nul), (model, name)
    assert schemas["CommitBody"]["properties"]["delta"]["pattern"] == no_nul
    delete = _operation(document, "delete", "/shard/{key}")
    for param in delete["parameters"]:
        if param["name"] in ("agent_id", "session_id", "X-Agent-Id", "X-SBus-Session-Id"):
            schema = param["schema"]
            string = next(b for b in schema.get("anyOf", [schema]) if b["type"] == "string")
            assert (string["maxLength"], string["pattern"]) == (256, no_nul), param
    (context,) = [
        b for b in schemas["CommitBody"]["properties"]["context"]["anyOf"] if b["type"] == "object"
    ]
    assert context["additionalProperties"] == {"$ref": "#/components/schemas/JsonValue"}
    value = schemas["JsonValue"]["anyOf"]
    assert {"type": "number", "minimum": 0, "maximum": MAX_INT} in value
