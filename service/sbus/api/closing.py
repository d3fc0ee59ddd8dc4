"""The worker is shutting down: what long-lived responses listen for.

uvicorn drains in-flight requests on SIGTERM (up to its graceful timeout) before the
lifespan ends, and a change stream never finishes on its own. uvicorn asks every open
connection to shut down first (``shutdown()`` of its protocol); the bus's protocol
(:mod:`sbus.api.connections`) calls :func:`begin` there, and each ``GET /watch`` stream
ends at once with its cursor (:mod:`sbus.api.sse`), so the shutdown is not held up.
"""

from __future__ import annotations

import asyncio
import weakref

_events: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Event] = (
    weakref.WeakKeyDictionary()
)


def event() -> asyncio.Event:
    """This event loop's shutdown flag (one per loop: tests run several)."""
    loop = asyncio.get_running_loop()
    found = _events.get(loop)
    if found is None:
        found = _events[loop] = asyncio.Event()
    return found


def begin() -> None:
    """The worker is going down: end every stream now."""
    event().set()
