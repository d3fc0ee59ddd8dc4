"""What the OpenAPI document cannot learn from the handlers' signatures: the headers the
handlers read from the raw request (identity, session, preconditions, idempotency,
mandates; X-Request-Id on every route), the response headers they set (ETag,
Idempotent-Replayed, Retry-After, SBus-Ignored-Fields, X-Request-Id), the bearer scheme
of token mode and 429 on rate-limited routes.
(The routes that read no field declare an optional body, ``wire.NoFields``, in their
signatures: without one, generated clients and Swagger's "Try it out" would send no
``Content-Type: application/json`` and get 415.)

Declared here, in one table, rather than in every router signature, so the handlers keep
reading headers the one way ``sbus.api.deps`` does. :func:`declare` edits the generated
document in place.
"""

from __future__ import annotations

from typing import Any

from sbus.core.keys import MAX_INT

BEARER = "bearer"

# Identifiers (agent and session ids) and free text: no U+0000 (sbus.core.keys.text_problem;
# a lone surrogate, also refused, cannot be stated in a pattern); identifiers at most 256.
NO_NUL = r"^[^\u0000]*$"
_IDENTIFIER = {"type": "string", "minLength": 1, "maxLength": 256, "pattern": NO_NUL}

HEADERS: dict[str, dict[str, Any]] = {
    "X-Agent-Id": {
        "description": "The calling agent (open mode). In token mode it must name the "
        "token's agent. Any other agent source that disagrees is 403 AgentMismatch.",
        "schema": _IDENTIFIER,
    },
    "X-SBus-Agent-Id": {
        "description": "Synonym of X-Agent-Id.",
        "schema": _IDENTIFIER,
    },
    "X-SBus-Session-Id": {
        "description": 'The agent\'s session (default ""); must equal a session_id field '
        "if both are sent.",
        "schema": {"type": "string", "maxLength": 256, "pattern": NO_NUL},
    },
    "Idempotency-Key": {
        "description": "Replays the recorded answer of a successful request with the same "
        "key and fingerprint (Idempotent-Replayed: true); another request under the same "
        "key is 422 IdempotencyKeyReused.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
    },
    "If-Match": {
        "description": 'The expected version as one strong ETag, e.g. "3"; stands in for '
        "expected_version (both and different: 422 PreconditionConflict).",
        "schema": {"type": "string", "pattern": '^"[0-9]{1,16}"$'},
        "example": '"0"',
    },
    "X-SBus-Mandate": {
        "description": "A mandate (POST /mandates) authorizing this delete.",
        "schema": {"type": "string", "minLength": 1},
    },
    "X-SBus-Mandate-Context": {
        "description": "The mandate's context, as a JSON object.",
        # A header carrying JSON: OpenAPI states it with content, not a string schema.
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "propertyNames": {"pattern": NO_NUL},
                    "additionalProperties": {"$ref": "#/components/schemas/JsonValue"},
                }
            }
        },
    },
}

# Every route reads it (sbus.telemetry.exchange) and every response carries it.
REQUEST_ID = "X-Request-Id"
_REQUEST_ID_DOC = (
    "The request's id in the bus's log line and trace (docs/observability.md): the one "
    "sent if it is 1-128 printable ASCII characters, else a new one."
)
HEADERS[REQUEST_ID] = {
    "description": _REQUEST_ID_DOC,
    "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[ -~]+$"},
}

_AGENT = ("X-Agent-Id", "X-SBus-Agent-Id")
_SESSION = ("X-SBus-Session-Id",)
_COMMIT = (*_AGENT, *_SESSION, "Idempotency-Key")

# (method, path) -> the request headers its handler reads.
REQUEST_HEADERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("post", "/shard"): (*_AGENT, "Idempotency-Key"),
    ("get", "/shard/{key}"): (*_AGENT, *_SESSION),
    ("post", "/read"): (*_AGENT, *_SESSION),
    ("delete", "/shard/{key}"): (*_COMMIT, "If-Match", "X-SBus-Mandate", "X-SBus-Mandate-Context"),
    ("post", "/commit"): (*_COMMIT, "If-Match"),
    ("post", "/commit/v2"): (*_COMMIT, "If-Match"),
    ("post", "/commit/multi"): _COMMIT,
    ("post", "/rollback"): (*_COMMIT, "If-Match"),
    ("post", "/session"): (*_AGENT, *_SESSION),
    ("post", "/delivery_log/register"): (*_AGENT, *_SESSION),
    ("post", "/mandates"): _AGENT,
    ("post", "/admin/shard"): _AGENT,
    ("post", "/admin/inject-stale"): _SESSION,
}

# Success answers that carry ETag: "<version>" of the shard read or written.
ETAG_ROUTES = frozenset(
    {
        ("get", "/shard/{key}"),
        ("post", "/shard"),
        ("delete", "/shard/{key}"),
        ("post", "/commit"),
        ("post", "/commit/v2"),
        ("post", "/rollback"),
        ("post", "/admin/shard"),
    }
)
# Routes the engine rate-limits per agent (token mode with SBUS_RATE_LIMIT).
RATE_LIMITED = frozenset(
    {
        ("post", "/shard"),
        ("delete", "/shard/{key}"),
        ("post", "/commit"),
        ("post", "/commit/v2"),
        ("post", "/commit/multi"),
        ("post", "/rollback"),
    }
)
# Routes whose 503 may also be SigningUnavailable (no signing key on this replica), which
# carries no Retry-After: retrying the same replica cannot help.
SIGNING = frozenset({("post", "/mandates"), ("post", "/admin/tokens")})
SIGNING_503 = (
    "Store unavailable (StoreUnavailable, with Retry-After), or no signing key on this "
    "replica (SigningUnavailable, without Retry-After: retrying here cannot help)"
)
RETRY_AFTER_ON_STORE_ONLY = {
    "description": "Seconds to wait before retrying; sent with StoreUnavailable only, "
    "never with SigningUnavailable.",
    "required": False,
    "schema": {"type": "integer", "minimum": 0, "maximum": MAX_INT},
}

RESPONSE_HEADERS: dict[str, dict[str, Any]] = {
    "ETag": {
        "description": 'The shard\'s version as a strong ETag, e.g. "3".',
        "schema": {"type": "string"},
    },
    "Idempotent-Replayed": {
        "description": "true when this is the recorded answer of an earlier request.",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "Retry-After": {
        "description": "Seconds to wait before retrying (429, and 503 StoreUnavailable).",
        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_INT},
    },
    REQUEST_ID: {"description": _REQUEST_ID_DOC, "schema": {"type": "string"}},
    "SBus-Ignored-Fields": {
        "description": "What the request sent but the bus ignored (unknown), comma-separated: "
        "query parameters marked with `?`, then body fields as paths, e.g. "
        "`?sesion_id, readset, writes[0].foo`; at most 32, then `...`; absent when none.",
        "schema": {"type": "string"},
    },
}

RATE_LIMITED_DESCRIPTION = (
    "Rate limited (token mode with SBUS_RATE_LIMIT): the agent's bucket is empty"
)


def _path_key(path: str) -> str:
    return path.replace("{key:path}", "{key}")


def _add_parameters(operation: dict[str, Any], names: tuple[str, ...]) -> None:
    parameters: list[dict[str, Any]] = operation.setdefault("parameters", [])
    present = {(p.get("in"), str(p.get("name", "")).lower()) for p in parameters}
    for name in names:
        if ("header", name.lower()) not in present:
            parameters.append({"name": name, "in": "header", "required": False, **HEADERS[name]})


def _add_response_header(response: dict[str, Any], name: str) -> None:
    response.setdefault("headers", {})[name] = RESPONSE_HEADERS[name]


def declare(schema: dict[str, Any], *, token_mode: bool, public: frozenset[str]) -> None:
    """Add the declarations described in the module docstring to ``schema``."""
    if token_mode:
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes[BEARER] = {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "A capability token: sbus token issue, or POST /admin/tokens.",
        }
        schema["security"] = [{BEARER: []}]
    for raw_path, methods in schema.get("paths", {}).items():
        path = _path_key(raw_path)
        for method, operation in methods.items():
            route = (method, path)
            responses: dict[str, dict[str, Any]] = operation.setdefault("responses", {})
            if token_mode and path in public:
                operation["security"] = []  # no token needed: no lock in Swagger UI
            _add_parameters(operation, (*REQUEST_HEADERS.get(route, ()), REQUEST_ID))
            for status, response in responses.items():
                code = int(status)
                if code < 300 and route in ETAG_ROUTES:
                    _add_response_header(response, "ETag")
                if code < 300 and "Idempotency-Key" in REQUEST_HEADERS.get(route, ()):
                    _add_response_header(response, "Idempotent-Replayed")
                if code == 503 and route in SIGNING:
                    response["description"] = SIGNING_503
                    response.setdefault("headers", {})["Retry-After"] = RETRY_AFTER_ON_STORE_ONLY
                elif code == 503 and path != "/admin/health":  # health: a plain status body
                    _add_response_header(response, "Retry-After")
                _add_response_header(response, "SBus-Ignored-Fields")
                _add_response_header(response, REQUEST_ID)
            if token_mode and route in RATE_LIMITED:
                limited = responses.setdefault("429", {"description": RATE_LIMITED_DESCRIPTION})
                _add_response_header(limited, "Retry-After")
                _add_response_header(limited, "SBus-Ignored-Fields")
                _add_response_header(limited, REQUEST_ID)
