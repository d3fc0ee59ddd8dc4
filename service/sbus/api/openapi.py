"""OpenAPI shaping: every error response of every route is problem+json with the
Problem schema, replacing FastAPI's default 422 ``HTTPValidationError``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from sbus.api.auth import PUBLIC
from sbus.api.schemas import Problem

DESCRIPTIONS = {
    400: "Malformed request (JSON, If-Match, identity)",
    401: "Missing, invalid, expired or revoked bearer token (token mode)",
    403: "Forbidden (Host, identity, capability, admin, mandate)",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    410: "Session expired",
    413: "Too large",
    415: "Content-Type must be application/json",
    422: "Validation failed",
    428: "Precondition required",
    503: "Store unavailable (or, issuing tokens, no signing key on this replica)",
}
# Statuses any route can answer: the gate (token, Host, readiness, body cap, media
# type), validation and unknown methods. PUBLIC routes are never authenticated.
COMMON_GET = (401, 403, 404, 422, 503)
COMMON_WRITE = (400, 401, 403, 404, 405, 413, 415, 422, 503)


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
        for path, methods in schema.get("paths", {}).items():
            for method, operation in methods.items():
                responses = operation.setdefault("responses", {})
                common = COMMON_GET if method == "get" else COMMON_WRITE
                for status in common:
                    if status == 401 and path in PUBLIC:
                        continue
                    responses.setdefault(str(status), {"description": DESCRIPTIONS[status]})
                for status, response in responses.items():
                    code = int(status)
                    if code >= 400 and not (path == "/admin/health" and code == 503):
                        response["content"] = _problem_ref()
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi  # type: ignore[method-assign]
