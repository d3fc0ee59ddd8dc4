"""One request's report: its id (``X-Request-Id``), and what the layers it passes learn
on the way (the agent and session it resolved to, the outcome), for its log line and
its span (:mod:`sbus.telemetry.requests`).

The middleware leaves an :class:`Exchange` in the ASGI scope; the API layer fills it in
through :func:`note_caller` and :func:`note_outcome`, which do nothing for a scope
without one (an app assembled without the middleware, a unit test's bare request).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, MutableMapping
from typing import Any

HEADER = "X-Request-Id"
_HEADER_KEY = HEADER.lower().encode()
# The scope key of the exchange (the scope may be copied on the way to the route; the
# exchange it points to is not).
SCOPE_KEY = "sbus.exchange"
# An accepted request id: 1 to 128 printable ASCII characters (space to tilde).
MAX_REQUEST_ID = 128
_VALID = re.compile(rb"[\x20-\x7e]{1,%d}" % MAX_REQUEST_ID)

COMMITTED = "committed"
REPLAYED = "replayed"
OK = "ok"
# A refusal that named no error code (none of the service's own do).
ERROR = "error"
# An exception nothing handled (the answer is 500 InternalError).
INTERNAL = "InternalError"

_PREFIX = os.urandom(8).hex()
_counter = itertools.count()


def _reseed() -> None:
    # A forked child would hand out its parent's ids (as the engine's commit ids would).
    global _PREFIX
    _PREFIX = os.urandom(8).hex()


os.register_at_fork(after_in_child=_reseed)


def new_request_id() -> str:
    """32 hex digits, unique across processes: 64 random bits drawn once per process,
    then a counter (cheaper than a uuid4 per request)."""
    return f"{_PREFIX}{next(_counter):016x}"


def request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The request's ``X-Request-Id`` (the first one) if it is 1-128 printable ASCII
    characters, else a new one."""
    for name, value in headers:
        if name == _HEADER_KEY:
            if _VALID.fullmatch(value):
                return value.decode("ascii")
            break
    return new_request_id()


class Exchange:
    """What one request's log line and span report."""

    __slots__ = ("agent", "done_ns", "outcome", "request_id", "session")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.agent: str | None = None
        self.session: str | None = None
        # The error code of a refusal, or COMMITTED / REPLAYED for a state change.
        self.outcome: str | None = None
        # When the use case answered (traced requests only: the render span starts there).
        self.done_ns: int | None = None

    def result(self, status: int) -> str:
        if self.outcome is not None:
            return self.outcome
        return OK if status < 400 else ERROR


def note_caller(scope: MutableMapping[str, Any], agent: str | None, session: str) -> None:
    """The agent and session the request resolved to (``sbus.api.deps.caller_of``)."""
    exchange = scope.get(SCOPE_KEY)
    if exchange is not None and agent is not None:
        exchange.agent = agent
        exchange.session = session


def request_id_of(scope: MutableMapping[str, Any]) -> str | None:
    """The request's id, if the middleware gave it one."""
    exchange = scope.get(SCOPE_KEY)
    return None if exchange is None else str(exchange.request_id)


def note_outcome(scope: MutableMapping[str, Any], outcome: str) -> None:
    """The request's outcome: an error code, or ``committed`` / ``replayed``."""
    exchange = scope.get(SCOPE_KEY)
    if exchange is not None:
        exchange.outcome = outcome
