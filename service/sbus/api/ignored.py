"""Unknown request fields and query parameters are ignored (compat), but never
silently: every response a route gives, errors included, names them in
``SBus-Ignored-Fields``, so a typo such as ``"readset"`` in a body or ``?sesion_id=``
in a URL shows up in the answer. Query parameters come first, marked by a leading
``?`` (``?sesion_id``); body fields follow as paths (``readset``, ``writes[0].foo``).

Two pieces: :class:`WireRoute` (the route class of every router) works the list out
once the request is parsed and leaves it in the request scope; :class:`IgnoredFieldsHeader`
(an ASGI middleware) adds it to whatever response follows, error responses included.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, TypeGuard, Union, get_args, get_origin

import fastapi.routing
from fastapi import Request
from fastapi.dependencies.models import Dependant
from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sbus.api.lean import Handler, lean_handler
from sbus.api.routing import ExactRoute
from sbus.api.wire import WireModel
from sbus.core.keys import path_text

HEADER = "SBus-Ignored-Fields"
_HEADER_NAME = HEADER.lower().encode()
# The scope key of a per-request list the middleware hands down and the route fills in
# (the scope itself may be copied on the way to the route, the list is not; the
# scope's "state" may be shared by every request of the lifespan).
_SCOPE_KEY = "sbus.ignored_fields"
# A body may hold thousands of unknown fields; the header names the first few.
MAX_LISTED = 32
BODYLESS = frozenset({"GET", "HEAD", "OPTIONS"})
QUERY_MARK = "?"

Path = list[str | int]


def ignored_paths(model: type[BaseModel], data: Any) -> list[Path]:
    """The paths in ``data`` (a parsed JSON body) that ``model`` does not read.
    Free-form fields (a mandate ``context``) are read whole, so nothing inside them is
    ever listed."""
    found: list[Path] = []
    _walk(model, data, [], found)
    return found


def _walk(annotation: Any, value: Any, path: Path, found: list[Path]) -> None:
    origin = get_origin(annotation)
    if origin is Annotated:
        _walk(get_args(annotation)[0], value, path, found)
    elif origin is Union or origin is types.UnionType:
        for member in get_args(annotation):
            _walk(member, value, path, found)
    elif origin is list and isinstance(value, list):
        (item_type,) = get_args(annotation)
        for i, item in enumerate(value):
            _walk(item_type, item, [*path, i], found)
    elif _is_model(annotation) and isinstance(value, dict):
        _walk_model(annotation, value, path, found)


def _walk_model(
    model: type[BaseModel], value: dict[str, Any], path: Path, found: list[Path]
) -> None:
    if value.keys() <= _plain_names(model):
        return  # the common case: every field known, none can hold an unknown one
    fields = model.model_fields
    aliases = _aliases(model)
    for name, item in value.items():
        field = fields.get(aliases.get(name, name))
        if field is None:
            found.append([*path, name])
        else:
            _walk(field.annotation, item, [*path, name], found)


def _aliases(model: type[BaseModel]) -> dict[str, str]:
    return model.wire_aliases if issubclass(model, WireModel) else {}


@functools.cache
def _plain_names(model: type[BaseModel]) -> frozenset[str]:
    """The body names ``model`` reads (field names and wire aliases) whose type holds
    no model, so that nothing under them is ever listed. A body object whose names are
    all plain needs no walk: this spares every request the per-field walk, which costs
    more than the rest of the ignored-fields work together."""
    fields = model.model_fields
    aliases = _aliases(model)
    plain = set()
    for name in {*fields, *aliases}:
        field = fields.get(aliases.get(name, name))
        if field is not None and not _holds_model(field.annotation):
            plain.add(name)
    return frozenset(plain)


def _holds_model(annotation: Any) -> bool:
    """Whether a model appears anywhere in ``annotation`` (conservative: a model
    in a container :func:`_walk` does not enter still counts)."""
    return _is_model(annotation) or any(_holds_model(arg) for arg in get_args(annotation))


def _is_model(annotation: Any) -> TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def ignored_query(known: frozenset[str], names: Iterable[str]) -> list[str]:
    """The query parameter names a route does not read, once each, in order."""
    return [name for name in dict.fromkeys(names) if name not in known]


def header_value(query: list[str], paths: list[Path]) -> str:
    names = [QUERY_MARK + path_text([name]) for name in query]
    names.extend(path_text(p) for p in paths)
    listed = names[:MAX_LISTED]
    if len(names) > MAX_LISTED:
        listed.append("...")
    return ", ".join(listed)


def _query_names(dependant: Dependant) -> frozenset[str]:
    """The query parameters a route reads: its own and its dependencies'."""
    names: set[str] = set()
    pending = [dependant]
    while pending:
        current = pending.pop()
        names.update(param.alias for param in current.query_params)
        pending.extend(current.dependencies)
    return frozenset(names)


class WireRoute(ExactRoute):
    """The route class of every router: an exact-path route that records the query
    parameters it does not read and the ignored fields of the body it parsed. Every
    POST and DELETE declares a body model (those that read no field, ``wire.NoFields``),
    so FastAPI parses every body, refuses a malformed one, and caches what it parsed on
    the request: nothing is parsed twice."""

    # Whether routes built from now on serve the hot endpoints leanly (read when an
    # app's route handlers are built, never per request): the API tests turn it off to
    # hold the lean handler to FastAPI's own, answer for answer.
    lean_path: ClassVar[bool] = True

    def get_route_handler(self) -> Handler:
        # A hot route (``sbus.api.lean``) skips FastAPI's dependency solver; its
        # parameters and errors are FastAPI's, so the record is the same. FastAPI's
        # handler stays at hand for an app that overrides a dependency.
        framework = super().get_route_handler()
        if not self.lean_path:
            return self._recorded(framework)
        dependant, embed, overrides = self._effective()
        lean = lean_handler(dependant, embed, overrides=overrides, fallback=framework)
        return self._recorded(lean or framework)

    def _effective(self) -> tuple[Dependant, bool, Any]:
        """The dependant the handler is built for and its overrides provider. Recent
        FastAPI builds an included route's handler under the inclusion's context, whose
        dependant also holds the dependencies given to ``include_router``: the lean
        handler must see those (it refuses any it does not reproduce, so FastAPI's
        handler then runs them). Older FastAPI copies the route at inclusion, with them
        in its own dependant."""
        holder = getattr(fastapi.routing, "_effective_route_context_var", None)
        context = holder.get() if holder is not None else None
        if context is not None and getattr(context, "original_route", None) is self:
            return (
                context.dependant,
                context._embed_body_fields,
                context.dependency_overrides_provider,
            )
        return self.dependant, self._embed_body_fields, self.dependency_overrides_provider

    def _recorded(self, handler: Handler) -> Handler:
        field = self.body_field
        annotation = field.field_info.annotation if field is not None else None
        model = annotation if _is_model(annotation) else None
        known = _query_names(self.dependant)

        async def handle(request: Request) -> Response:
            try:
                response = await handler(request)
            except Exception:
                _record(request, known, model)
                raise
            _record(request, known, model)
            return response

        return handle


def _record(request: Request, known: frozenset[str], model: type[BaseModel] | None) -> None:
    slot: list[str] | None = request.scope.get(_SCOPE_KEY)
    if slot is None:
        return
    query = (
        ignored_query(known, request.query_params.keys())
        if request.scope.get("query_string")
        else []
    )
    paths: list[Path] = []
    if model is not None and request.method not in BODYLESS:
        # The JSON FastAPI parsed (cached by Request.json()); absent when there was no
        # body or it was not JSON.
        paths = ignored_paths(model, getattr(request, "_json", None))
    if query or paths:
        slot.append(header_value(query, paths))


class IgnoredFieldsHeader:
    """Adds the recorded ``SBus-Ignored-Fields`` to the response, whichever part of the
    app built it (the route, or an exception handler for its error)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        slot: list[str] = []
        scope[_SCOPE_KEY] = slot

        async def send_with_header(message: Message) -> None:
            # Usually nothing was recorded: test the empty list first.
            if slot and message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((_HEADER_NAME, slot[-1].encode("ascii")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)
