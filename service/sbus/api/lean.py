"""The lean handler of the hot routes (GET /shard/{key}, POST /commit and /commit/v2,
POST /read): the same endpoint function, the same validators and the same errors, without
FastAPI's per-request dependency solver.

FastAPI answers every request by walking the endpoint's dependency graph
(``solve_dependencies``: one recursion per dependency, a cache, exit stacks and a
placeholder response each time), which profiles showed costing more than the endpoint
and the engine together. A route marked :func:`hot` gets instead a handler built once
from the same :class:`~fastapi.dependencies.models.Dependant` FastAPI derived from its
signature (so the OpenAPI document does not change): the only dependencies it takes are
the runtime's parts (``BusDep``, ``SettingsDep``, ``RuntimeDep``), read straight off
the runtime; path, query and body parameters go through FastAPI's own validators
(``request_params_to_args``, ``request_body_to_args``) in FastAPI's order, so every
refusal is the same 4xx with the same ``errors`` list; the body is read and decoded
exactly as FastAPI does (``Request.json``, cached on the request, where the ignored-fields
record finds it). The endpoint then runs unchanged: it builds the Caller and the command
and calls ``Bus.execute`` like every route.
"""

from __future__ import annotations

import email.message
import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import request_body_to_args, request_params_to_args
from fastapi.exceptions import RequestValidationError
from pydantic_core import PydanticUndefined
from starlette.responses import Response

from sbus.api.deps import get_bus, get_runtime, get_settings
from sbus.api.runtime import Runtime, runtime_of

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
F = TypeVar("F", bound=Callable[..., Any])

_MARK = "__sbus_hot__"

# The dependencies a hot route may declare, each read off the runtime directly.
_RUNTIME_PARTS: dict[Callable[..., Any], Callable[[Runtime], Any]] = {
    get_bus: lambda runtime: runtime.bus,
    get_settings: lambda runtime: runtime.settings,
    get_runtime: lambda runtime: runtime,
}

# FastAPI's marker of a request without a body (pydantic's "no value").
_UNDEFINED: Any = PydanticUndefined


def hot(endpoint: F) -> F:
    """Marks an endpoint for the lean handler (apply it under the route decorator)."""
    setattr(endpoint, _MARK, True)
    return endpoint


def lean_handler(dependant: Dependant, embed_body_fields: bool) -> Handler | None:
    """The lean handler of a :func:`hot` endpoint, or None for any other (or one whose
    signature needs what the lean handler does not do: FastAPI's own handler serves it)."""
    call = dependant.call
    if call is None or not getattr(call, _MARK, False) or not _plain(dependant):
        return None
    parts = [(d.name, _RUNTIME_PARTS[d.call]) for d in dependant.dependencies if d.call]
    path_params = dependant.path_params
    query_params = dependant.query_params
    body_params = dependant.body_params
    request_name = dependant.request_param_name

    async def handle(request: Request) -> Response:
        runtime = runtime_of(request.app)
        values: dict[str, Any] = {name: part(runtime) for name, part in parts if name}
        errors: list[Any] = []
        # FastAPI's order: path, then query, then body; every error is collected.
        if path_params:
            found, problems = request_params_to_args(path_params, request.path_params)
            values.update(found)
            errors.extend(problems)
        if query_params:
            found, problems = request_params_to_args(query_params, request.query_params)
            values.update(found)
            errors.extend(problems)
        body: Any = _UNDEFINED
        if body_params:
            body = await read_body(request)
            found, problems = await request_body_to_args(
                body_fields=body_params,
                received_body=body,
                embed_body_fields=embed_body_fields,
            )
            values.update(found)
            errors.extend(problems)
        if errors:
            raise RequestValidationError(errors, body=None if body is _UNDEFINED else body)
        if request_name:
            values[request_name] = request
        response: Response = await call(**values)
        return response

    return handle


def _plain(dependant: Dependant) -> bool:
    """Only what :func:`lean_handler` reproduces: runtime parts as the dependencies (no
    sub-dependencies of their own), no header, cookie, response, background-task,
    websocket or security parameters."""
    for sub in dependant.dependencies:
        if sub.call not in _RUNTIME_PARTS or sub.dependencies or not sub.use_cache:
            return False
        if sub.path_params or sub.query_params or sub.body_params:
            return False
    return not (
        dependant.header_params
        or dependant.cookie_params
        or dependant.response_param_name
        or dependant.background_tasks_param_name
        or dependant.websocket_param_name
        or dependant.http_connection_param_name
        or dependant.security_scopes_param_name
    )


async def read_body(request: Request) -> Any:
    """The request body as FastAPI reads it for a JSON body parameter: nothing sent is
    undefined, a JSON media type is decoded (``Request.json``, cached on the request),
    anything else stays bytes; a decoding error is its ``json_invalid`` error."""
    raw = await request.body()
    if not raw:
        return _UNDEFINED
    media = request.headers.get("content-type")
    if not media or not _is_json(media):
        return raw
    try:
        return await request.json()
    except json.JSONDecodeError as exc:
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", exc.pos),
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": exc.msg},
                }
            ],
            body=exc.doc,
        ) from exc


def _is_json(media: str) -> bool:
    # The gate lets only application/json through; the general rule is FastAPI's.
    if media == "application/json":
        return True
    message = email.message.Message()
    message["content-type"] = media
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")
