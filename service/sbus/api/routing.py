"""Exact paths. The app turns off Starlette's slash redirects, so ``/shards/`` matches
nothing; but a ``{key:path}`` parameter also matches the empty string and a trailing
slash, so ``/shard/`` would reach the shard routes (422 for the key, or 405 for a POST)
and ``/shard/a/`` would read as key ``a/``. Every such route refuses a path ending in
``/`` instead, and the router answers 404 NotFound like for any unknown path."""

from __future__ import annotations

from typing import Any

from fastapi.routing import APIRoute
from starlette.convertors import PathConvertor
from starlette.routing import Match
from starlette.types import Scope


class ExactRoute(APIRoute):
    def __init__(self, path: str, endpoint: Any, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        # The router asks every route in turn on every request; only a ``:path``
        # parameter can match a trailing slash, so the other routes skip the check.
        self.open_tail = any(isinstance(c, PathConvertor) for c in self.param_convertors.values())

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if self.open_tail:
            path = scope.get("path", "")
            if len(path) > 1 and path.endswith("/"):
                return Match.NONE, {}
        return super().matches(scope)
