"""The one table from error codes to HTTP statuses, and problem+json rendering.

Every error response of the service is built here: RFC 9457 ``application/problem+json``
with ``type``, ``title``, ``status``, ``detail`` (a string), the compat ``error`` code
and the error's structured fields.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from sbus.core import errors as e
from sbus.security import (
    KeyConfigError,
    MandateConsumed,
    MandateContextMismatch,
    MandateExpired,
    MandateHolderMismatch,
    MandateScopeMismatch,
    SigningUnavailable,
    TokenInvalid,
    TokenRevoked,
)
from sbus.telemetry.exchange import HEADER as REQUEST_ID
from sbus.telemetry.exchange import note_outcome, request_id_of

PROBLEM_TYPE = "https://sbus.dev/problems/"
MEDIA_TYPE = "application/problem+json"

STATUS: dict[type[e.SBusError], int] = {
    TokenInvalid: 401,  # Unauthorized, also TokenExpired
    TokenRevoked: 401,
    e.MalformedJSON: 400,
    e.InvalidPrecondition: 400,
    e.AgentRequired: 400,
    e.InvalidCursor: 400,
    e.RequestError: 400,
    e.AgentMismatch: 403,
    e.AdminDisabled: 403,
    e.HostNotAllowed: 403,
    e.CrossSiteRequest: 403,
    e.CapabilityDenied: 403,
    e.MandateRequired: 403,
    MandateHolderMismatch: 403,
    MandateScopeMismatch: 403,
    MandateContextMismatch: 403,
    e.RouteNotFound: 404,
    e.ShardNotFound: 404,
    e.ShardDeleted: 404,
    e.VersionNotFound: 404,
    e.MandateNotFound: 404,
    e.MethodNotAllowed: 405,
    e.ShardAlreadyExists: 409,
    e.VersionMismatch: 409,
    e.CrossShardStale: 409,
    MandateConsumed: 409,
    e.StateError: 409,
    e.SessionExpired: 410,
    MandateExpired: 410,
    e.RequestTimeout: 408,
    e.RequestTooLarge: 413,
    e.DeltaTooLarge: 413,
    e.FieldTooLarge: 413,
    e.ReadSetTooLarge: 413,
    e.TooManyWrites: 413,
    e.UnsupportedMediaType: 415,
    e.ValidationFailed: 422,
    e.AmbiguousField: 422,
    e.PreconditionConflict: 422,
    e.IdempotencyKeyReused: 422,
    e.PreconditionRequired: 428,
    e.RateLimited: 429,
    KeyConfigError: 500,  # refused at startup; never expected while serving
    e.InternalError: 500,
    e.StoreUnavailable: 503,
    # A verify-only replica: the request is fine, another replica (with
    # SBUS_SIGNING_KEY) can serve it. No Retry-After: retrying here cannot help.
    SigningUnavailable: 503,
}

# RFC 6750 section 3: a request without a token gets the bare challenge; one whose
# token was refused learns that the token (not the request) is the problem.
CHALLENGE = "Bearer"
CHALLENGE_INVALID = 'Bearer error="invalid_token"'


def status_of(err: e.SBusError) -> int:
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def problem_body(err: e.SBusError, status: int) -> dict[str, Any]:
    return {
        "type": PROBLEM_TYPE + err.code,
        "title": err.title,
        "status": status,
        "detail": err.detail,
        "error": err.code,
        **err.fields,
    }


def problem_response(err: e.SBusError, *, token_sent: bool = True) -> Response:
    """``token_sent`` only matters for a 401: whether the request carried a bearer
    token, which selects the ``WWW-Authenticate`` challenge."""
    status = status_of(err)
    headers: dict[str, str] = {}
    if isinstance(err, e.StoreUnavailable | e.RateLimited):
        headers["Retry-After"] = str(err.retry_after)
    if isinstance(err, TokenInvalid):
        headers["WWW-Authenticate"] = CHALLENGE_INVALID if token_sent else CHALLENGE
    if isinstance(err, e.RequestTimeout):
        headers["Connection"] = "close"  # the rest of the request may never come
    return Response(
        orjson.dumps(problem_body(err, status)),
        status_code=status,
        media_type=MEDIA_TYPE,
        headers=headers,
    )


def _clean(value: Any) -> Any:
    """Validation error ``input``/``ctx`` may hold bytes or exceptions: keep JSON-safe text."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def validation_problem(exc: RequestValidationError) -> e.SBusError:
    items = list(exc.errors())
    types = {str(item.get("type")) for item in items}
    if "json_invalid" in types:
        return e.MalformedJSON("request body is not valid JSON")
    listed = [
        {
            "loc": _clean(list(item.get("loc", ()))),
            "msg": str(item.get("msg", "")),
            "type": str(item.get("type", "")),
        }
        for item in items
    ]
    if "ambiguous_field" in types:
        return e.AmbiguousField(
            "a field and its alias were both sent; send only one", errors=listed
        )
    summary = "; ".join(f"{'.'.join(map(str, i['loc']))}: {i['msg']}" for i in listed)
    return e.ValidationFailed(summary or "request failed validation", errors=listed)


def install(app: FastAPI) -> None:
    # Each handler also reports the error code as the request's outcome (its log line
    # and span, sbus.telemetry.requests).
    async def on_sbus(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, e.SBusError)
        note_outcome(request.scope, exc.code)
        return problem_response(exc)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        err = validation_problem(exc)
        note_outcome(request.scope, err.code)
        return problem_response(err)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        # Starlette raises these for unknown routes and methods, FastAPI for a body it
        # cannot read; the body cap is the gate's (it answers RequestTooLarge itself).
        err: e.SBusError
        if exc.status_code == 404:
            err = e.RouteNotFound("no such route")
        elif exc.status_code == 405:
            err = e.MethodNotAllowed("method not allowed on this route")
        elif exc.status_code == 400:
            err = e.MalformedJSON(str(exc.detail))
        else:
            # Anything else keeps its own status, in the body as on the wire.
            err = e.RequestError(str(exc.detail))
            note_outcome(request.scope, err.code)
            return Response(
                orjson.dumps(problem_body(err, exc.status_code)),
                status_code=exc.status_code,
                media_type=MEDIA_TYPE,
            )
        note_outcome(request.scope, err.code)
        return problem_response(err)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # Starlette answers with this from outside every middleware (and then re-raises,
        # so the server logs the traceback): the request id is set here.
        err = e.InternalError("the bus failed to answer; its log has the details")
        note_outcome(request.scope, err.code)
        response = problem_response(err)
        found = request_id_of(request.scope)
        if found is not None:
            response.headers[REQUEST_ID] = found
        return response

    app.add_exception_handler(e.SBusError, on_sbus)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
