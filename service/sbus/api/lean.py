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

What it reproduces (the body rules, the error shapes, the inclusion context) is the
FastAPI release pinned in pyproject.toml; its internals imported here fail the import,
and so the start, if they move.
"""

from __future__ import annotations

import email.message
import json
import types
from collections.abc import Callable, Coroutine, Mapping
from typing import Annotated, Any, TypeVar, Union, cast, get_args, get_origin

from fastapi import HTTPException, Request, params
from fastapi._compat import ModelField, get_missing_field_error
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


def lean_handler(
    dependant: Dependant,
    embed_body_fields: bool,
    *,
    overrides: Any = None,
    fallback: Handler | None = None,
) -> Handler | None:
    """The lean handler of a :func:`hot` endpoint, or None for any other (or one whose
    signature needs what the lean handler does not do: FastAPI's own handler serves it).

    ``overrides`` is the route's dependency-overrides provider (the app): while its
    ``dependency_overrides`` is not empty, ``fallback`` (FastAPI's handler) answers
    instead, since the runtime parts read here directly would ignore an override."""
    call = dependant.call
    if call is None or not getattr(call, _MARK, False) or not _plain(dependant):
        return None
    parts = [(d.name, _RUNTIME_PARTS[d.call]) for d in dependant.dependencies if d.call]
    path_params = dependant.path_params
    query_params = dependant.query_params
    body_params = dependant.body_params
    request_name = dependant.request_param_name
    path_args = _params_reader(path_params)
    query_args = _params_reader(query_params)

    # The runtime of the app last served: an app's runtime is set once, when it is
    # assembled, and reading it through the app's state costs more than the rest of
    # the parameter work together.
    last: list[Any] = [None, None]

    async def handle(request: Request) -> Response:
        if fallback is not None and getattr(overrides, "dependency_overrides", None):
            return await fallback(request)
        app = request.scope["app"]
        if app is last[0]:
            runtime = last[1]
        else:
            runtime = runtime_of(app)
            last[:] = [app, runtime]
        values: dict[str, Any] = {name: part(runtime) for name, part in parts if name}
        errors: list[Any] = []
        # FastAPI's order: the body is read first (malformed JSON refuses the request
        # at once), then path, query and body parameters, every error collected.
        body: Any = await read_body(request) if body_params else _UNDEFINED
        if path_params:
            found, problems = path_args(request.path_params)
            values.update(found)
            errors.extend(problems)
        if query_params:
            found, problems = query_args(request.query_params)
            values.update(found)
            errors.extend(problems)
        if body_params:
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


Reader = Callable[[Mapping[str, Any]], tuple[dict[str, Any], list[Any]]]
_SCALARS = (str, int, bool)


def _params_reader(fields: list[ModelField]) -> Reader:
    """Path or query parameters to values and errors, as ``request_params_to_args``
    does. When every parameter is one plain value (a string, integer or boolean,
    optional or not, under its own name), this skips FastAPI's per-request look-ups of
    the parameter's kind: an absent one takes its default (or is the same ``missing``
    error), a present one goes through the same validator with the same ``loc``.
    Anything else is FastAPI's own function."""
    if not all(_scalar(field) for field in fields):
        return lambda received: request_params_to_args(fields, received)
    specs = [
        (
            field,
            field.name,
            field.alias,
            (cast(params.Param, field.field_info).in_.value, field.alias),
            field.field_info.is_required(),
            field.default,
        )
        for field in fields
    ]

    def read(received: Mapping[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        values: dict[str, Any] = {}
        errors: list[Any] = []
        for field, name, alias, loc, required, default in specs:
            raw = received.get(alias)
            if raw is None:
                if required:
                    errors.append(get_missing_field_error(loc=loc))
                else:
                    values[name] = default
                continue
            value, problems = field.validate(raw, values, loc=loc)
            if problems:
                errors.extend(problems)
            else:
                values[name] = value
        return values, errors

    return read


def _scalar(field: ModelField) -> bool:
    info = field.field_info
    if not isinstance(info, params.Param) or info.validation_alias is not None:
        return False
    if info.validate_default or field.alias != (info.alias or field.name):
        return False
    if not isinstance(field.default, (*_SCALARS, type(None))) and not info.is_required():
        return False
    annotation = info.annotation
    if get_origin(annotation) is Union or get_origin(annotation) is types.UnionType:
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            return False
        annotation = members[0]
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation in _SCALARS


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
    anything else stays bytes; a decoding error is its ``json_invalid`` error, and any
    other failure to read or decode (nesting past the recursion limit, a body the
    decoder takes for UTF-16) its 400, never a 500."""
    try:
        raw = await request.body()
        if not raw:
            return _UNDEFINED
        media = request.headers.get("content-type")
        if not media or not _is_json(media):
            return raw
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
    except HTTPException:
        raise
    except Exception as exc:
        raise HTTPException(400, "There was an error parsing the body") from exc


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
