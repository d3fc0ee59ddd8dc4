"""OpenAPI shaping: every error response of every route is problem+json with the
Problem schema, replacing FastAPI's default 422 ``HTTPValidationError``."""

from __future__ import annotations

from typing import Any, get_args, get_origin

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from sbus.api import openapi_http, wire
from sbus.api.auth import PUBLIC
from sbus.api.schemas import Problem
from sbus.core.keys import MAX_KEY_LENGTH

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
_KEY_CHECK = get_args(wire.Key)[1]


def _is_key(annotation: Any) -> bool:
    return any(check is _KEY_CHECK for check in get_args(annotation)[1:])


def _key_fields() -> dict[str, list[tuple[str, bool]]]:
    """Component name -> the properties that hold a shard key, each with whether it
    holds a list of keys (``list[Key]``) rather than one."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for model in vars(wire).values():
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        for name, field in model.model_fields.items():
            if any(check is _KEY_CHECK for check in field.metadata):
                found.setdefault(model.__name__, []).append((field.alias or name, False))
            elif get_origin(field.annotation) is list and _is_key(get_args(field.annotation)[0]):
                found.setdefault(model.__name__, []).append((field.alias or name, True))
    return found


def _describe_keys(schema: dict[str, Any]) -> None:
    components = schema.get("components", {}).get("schemas", {})
    for model, fields in _key_fields().items():
        properties = components.get(model, {}).get("properties", {})
        for name, many in fields:
            if name in properties:
                target = properties[name].setdefault("items", {}) if many else properties[name]
                target.update(KEY_SCHEMA)
    for methods in schema.get("paths", {}).values():
        for operation in methods.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter.get("name") == "key":
                    parameter.setdefault("schema", {}).update(KEY_SCHEMA)


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
        _describe_keys(schema)
        # The deployment's own cap (SBUS_MAX_READ_KEYS), which no static model knows.
        read_keys = components.get("ReadBody", {}).get("properties", {}).get("keys")
        if read_keys is not None:
            read_keys["maxItems"] = app.state.settings.max_read_keys
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
            schema, token_mode=app.state.settings.auth_mode == "token", public=PUBLIC
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
