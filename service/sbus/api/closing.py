"""The worker is shutting down: what long-lived responses and open connections listen for.

A worker's stop (``sbus serve`` on SIGTERM, docs/operations.md section 6) has two
moments. :func:`begin` is the first: ``/admin/health`` already answers 503 and the
worker still accepts (for ``SBUS_SHUTDOWN_DELAY`` seconds), but every ``GET /watch``
stream ends at once with its cursor (:mod:`sbus.api.sse`) and every response from then
on, the ones in flight included, carries ``Connection: close``
(:mod:`sbus.api.connections`): each connection serves one more request at most, then
closes, and a proxy opens its next connection elsewhere. The second is uvicorn's own
shutdown: it stops accepting, closes the connections still idle and waits for the
requests in flight, which the bus's protocol cuts when ``SBUS_DRAIN_TIMEOUT`` runs out
(counted here, so that ``sbus serve`` can exit with a status that says so).

The state is one per event loop (tests run several loops in one process).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable


class Stop:
    """One event loop's stop: whether it has begun, the open connections to wind down
    when it does, and how many requests the drain bound cut."""

    __slots__ = ("connections", "cut", "cutting", "deadline", "event")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        # uvicorn's set of this worker's open connections (the protocol hands it over);
        # the bus's own have ``wind_down()``: answer with Connection: close from now on.
        self.connections: Iterable[object] = ()
        self.deadline: asyncio.TimerHandle | None = None  # when the drain bound runs out
        self.cutting = False  # it has run out
        self.cut = 0  # requests cut then

    def begin(self) -> None:
        if self.event.is_set():
            return
        self.event.set()
        for connection in list(self.connections):
            wind_down = getattr(connection, "wind_down", None)
            if wind_down is not None:
                wind_down()


_stops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Stop] = weakref.WeakKeyDictionary()


def state(loop: asyncio.AbstractEventLoop | None = None) -> Stop:
    """``loop``'s stop (default: the running loop's)."""
    loop = loop or asyncio.get_running_loop()
    found = _stops.get(loop)
    if found is None:
        found = _stops[loop] = Stop()
    return found


def event() -> asyncio.Event:
    """This event loop's shutdown flag: set once the stop has begun."""
    return state().event


def begin() -> None:
    """The worker is going down: end every stream now, close every connection after
    its next response."""
    state().begin()
