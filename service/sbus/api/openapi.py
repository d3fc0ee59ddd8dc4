"""OpenAPI shaping: every error response of every route is problem+json with the
Problem schema, replacing FastAPI's default 422 ``HTTPValidationError``."""

from __future__ import annotations

from typing import Any, get_args, get_origin

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from sbus.api import openapi_http, wire
from sbus.api.auth import PUBLIC
from sbus.api.runtime import runtime_of
from sbus.api.schemas import Problem
from sbus.core.keys import MAX_INT, MAX_JSON_DEPTH, MAX_KEY_LENGTH

DESCRIPTIONS = {
    400: "Malformed request (JSON, If-Match, identity)",
    401: "Missing, invalid, expired or revoked bearer token (token mode)",
    403: "Forbidden (Host, cross-site page, identity, capability, admin, mandate)",
    404: "Not found",
    405: "Method not allowed",
    408: "The request body did not arrive within SBUS_BODY_TIMEOUT (RequestTimeout; "
    "nothing applied, the connection is closed)",
    409: "Conflict",
    410: "Session expired",
    413: "Too large",
    415: "Content-Type must be application/json",
    422: "Validation failed",
    428: "Precondition required",
    503: "Store unavailable (StoreUnavailable: not ready yet, busy or failed)",
}
# Statuses any route can answer: the gate (token, Host, readiness, body cap, body
# deadline, media type), validation and unknown methods. PUBLIC routes are never
# authenticated. The body deadline (408) is only run on methods with a body.
COMMON_GET = (401, 403, 404, 422, 503)
COMMON_WRITE = (400, 401, 403, 404, 405, 408, 413, 415, 422, 503)
# Routes that answer without the store, before it is ready too: never a 503.
STORELESS = frozenset({"/livez", "/version"})


# Shard keys (sbus.core.keys.key_problem) as JSON Schema: '/'-separated segments of
# A-Z a-z 0-9 . _ : @ -, none empty, "." or "..". Checked in code by the wire models'
# ``Key`` validator, which FastAPI cannot describe, so the document states it here.
_SEGMENT = (
    r"(?:[A-Za-z0-9_:@-][A-Za-z0-9._:@-]*|\.[A-Za-z0-9_:@-][A-Za-z0-9._:@-]*|\.\.[A-Za-z0-9._:@-]+)"
)
KEY_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_KEY_LENGTH,
    "pattern": rf"^{_SEGMENT}(?:/{_SEGMENT})*$",
}
# Free-form JSON under the input rules (sbus.core.keys.json_problem): strings and object
# keys without U+0000, numbers within 0..2^53-1. The nesting limit (MAX_JSON_DEPTH) is
# stated in the description; a recursive schema cannot count.
JSON_VALUE = "JsonValue"
_JSON_REF = {"$ref": f"#/components/schemas/{JSON_VALUE}"}
JSON_VALUE_SCHEMA: dict[str, Any] = {
    "description": f"Any JSON value: strings without U+0000, numbers within 0..{MAX_INT}, "
    f"arrays and objects nested at most {MAX_JSON_DEPTH} deep.",
    "anyOf": [
        {"type": "string", "pattern": openapi_http.NO_NUL},
        {"type": "number", "minimum": 0, "maximum": MAX_INT},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "array", "items": _JSON_REF},
        {
            "type": "object",
            "propertyNames": {"pattern": openapi_http.NO_NUL},
            "additionalProperties": _JSON_REF,
        },
    ],
}
JSON_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "propertyNames": {"pattern": openapi_http.NO_NUL},
    "additionalProperties": _JSON_REF,
}


# The rules the wire models check in AfterValidators, which FastAPI cannot describe:
# validator -> the JSON Schema keywords that state it.
IDENTIFIER_SCHEMA: dict[str, Any] = {"maxLength": 256, "pattern": openapi_http.NO_NUL}
_RULES: list[tuple[Any, dict[str, Any]]] = [
    (get_args(wire.Key)[1], KEY_SCHEMA),
    (get_args(wire.AgentId)[1], IDENTIFIER_SCHEMA),
    (get_args(wire.SessionId)[1], IDENTIFIER_SCHEMA),
    (get_args(wire.Text)[1], {"pattern": openapi_http.NO_NUL}),
    (get_args(wire.JsonObject)[1], JSON_OBJECT_SCHEMA),
]


def _rule_of(metadata: Any) -> dict[str, Any] | None:
    for check, rule in _RULES:
        if any(item is check for item in metadata):
            return rule
    return None


def _field_rules() -> dict[str, list[tuple[str, bool, dict[str, Any]]]]:
    """Component name -> the properties under a rule of ``_RULES``: (name, whether it
    holds a list of such values rather than one, the rule)."""
    found: dict[str, list[tuple[str, bool, dict[str, Any]]]] = {}
    for model in vars(wire).values():
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        for name, field in model.model_fields.items():
            rule = _rule_of(field.metadata)
            many = False
            annotation = field.annotation
            if rule is None and get_origin(annotation) is list:
                rule, many = _rule_of(get_args(get_args(annotation)[0])[1:]), True
            if rule is None:  # Optional: X | None
                for branch in get_args(annotation):
                    rule = rule or _rule_of(get_args(branch)[1:])
            if rule is not None:
                found.setdefault(model.__name__, []).append((field.alias or name, many, rule))
    return found


def _string_branch(prop: dict[str, Any]) -> dict[str, Any]:
    """The string (or object) schema inside ``prop`` (itself, or that branch of X | None)."""
    for branch in prop.get("anyOf", ()):
        if branch.get("type") in ("string", "object"):
            found: dict[str, Any] = branch
            return found
    return prop


def _describe_rules(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components[JSON_VALUE] = JSON_VALUE_SCHEMA
    for model, fields in _field_rules().items():
        properties = components.get(model, {}).get("properties", {})
        for name, many, rule in fields:
            if name in properties:
                prop = properties[name]
                target = _string_branch(prop.setdefault("items", {}) if many else prop)
                if rule is JSON_OBJECT_SCHEMA:
                    target.pop("additionalProperties", None)
                target.update(rule)
    for methods in schema.get("paths", {}).values():
        for operation in methods.values():
            for parameter in operation.get("parameters", []):
                where, name = parameter.get("in"), parameter.get("name")
                if where == "path" and name == "key":
                    parameter.setdefault("schema", {}).update(KEY_SCHEMA)
                elif where == "query" and name in ("agent_id", "session_id"):
                    _string_branch(parameter.setdefault("schema", {})).update(IDENTIFIER_SCHEMA)


def _integer_bounds(node: Any) -> None:
    """FastAPI writes an int model's bounds as floats (9007199254740991.0); a client
    generator reads those as numbers. An integer's bounds are integers."""
    if isinstance(node, list):
        for item in node:
            _integer_bounds(item)
    elif isinstance(node, dict):
        if node.get("type") == "integer":
            for name in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                value = node.get(name)
                if isinstance(value, float) and value.is_integer():
                    node[name] = int(value)
        for value in node.values():
            _integer_bounds(value)


# The version precondition: the body's (or DELETE's query) expected_version, or If-Match.
# A schema cannot make a body field optional on a header, so the document requires the
# field and names If-Match as the alternative: a client that follows it always passes.
PRECONDITION = (
    "The version the write expects (required: send it, or leave it out and send If-Match "
    "instead; both sent must agree, else 422 PreconditionConflict). Alias: expected_ver."
)


def _require_precondition(schema: dict[str, Any]) -> None:
    body = schema.get("components", {}).get("schemas", {}).get("CommitBody")
    if body is not None:
        body["required"] = sorted({*body.get("required", ()), "expected_version"})
        version = body["properties"]["expected_version"]
        version["description"] = PRECONDITION
        version["anyOf"] = [b for b in version.get("anyOf", ()) if b.get("type") != "null"]
    delete = schema.get("paths", {}).get("/shard/{key}", {}).get("delete")
    for parameter in (delete or {}).get("parameters", []):
        if parameter.get("in") == "query" and parameter.get("name") == "expected_version":
            parameter["required"] = True
            parameter["description"] = PRECONDITION.replace(" Alias: expected_ver.", "")
            branches = parameter["schema"].get("anyOf")
            if branches:
                (parameter["schema"],) = [b for b in branches if b.get("type") != "null"]


# FastAPI copies a Query()'s ge/le/gt/lt into the parameter's schema under those names
# when the annotated type is not a plain int (wire.QueryInt); JSON Schema spells them so.
_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _standard_bounds(schema: dict[str, Any]) -> None:
    for name, standard in _BOUNDS.items():
        if name in schema:
            schema[standard] = schema.pop(name)
    for keyword in ("anyOf", "oneOf", "allOf"):
        for branch in schema.get(keyword, ()):
            _standard_bounds(branch)


def _standard_parameter_bounds(schema: dict[str, Any]) -> None:
    for methods in schema.get("paths", {}).values():
        for operation in methods.values():
            for parameter in operation.get("parameters", []):
                _standard_bounds(parameter.get("schema", {}))


def errs(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": Problem, "description": DESCRIPTIONS[s]} for s in statuses}


def _problem_ref() -> dict[str, Any]:
    return {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


def install(app: FastAPI) -> None:
    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        components["Problem"] = Problem.model_json_schema()
        _describe_rules(schema)
        _integer_bounds(schema)
        _require_precondition(schema)
        # The deployment's own cap (SBUS_MAX_READ_KEYS), which no static model knows.
        read_keys = components.get("ReadBody", {}).get("properties", {}).get("keys")
        if read_keys is not None:
            read_keys["maxItems"] = runtime_of(app).settings.max_read_keys
        _standard_parameter_bounds(schema)
        for path, methods in schema.get("paths", {}).items():
            for method, operation in methods.items():
                responses = operation.setdefault("responses", {})
                common = COMMON_GET if method == "get" else COMMON_WRITE
                for status in common:
                    if (status == 401 and path in PUBLIC) or (status == 503 and path in STORELESS):
                        continue
                    responses.setdefault(str(status), {"description": DESCRIPTIONS[status]})
        openapi_http.declare(
            schema, token_mode=runtime_of(app).settings.auth_mode == "token", public=PUBLIC
        )
        for path, methods in schema.get("paths", {}).items():
            for operation in methods.values():
                for status, response in operation["responses"].items():
                    code = int(status)
                    if code >= 400 and not (path == "/admin/health" and code == 503):
                        response["content"] = _problem_ref()
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi  # type: ignore[method-assign]
