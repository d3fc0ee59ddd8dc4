"""Exact paths. The app turns off Starlette's slash redirects, so ``/shards/`` matches
nothing; but a ``{key:path}`` parameter also matches the empty string and a trailing
slash, so ``/shard/`` would reach the shard routes (422 for the key, or 405 for a POST)
and ``/shard/a/`` would read as key ``a/``. Every route refuses a path ending in ``/``
instead, and the router answers 404 NotFound like for any unknown path."""

from __future__ import annotations

from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope


class ExactRoute(APIRoute):
    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = scope.get("path", "")
        if len(path) > 1 and path.endswith("/"):
            return Match.NONE, {}
        return super().matches(scope)
