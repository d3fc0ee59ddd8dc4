"""The ``GET /watch`` response: a Server-Sent Events stream over one
:class:`~sbus.core.watch.Feed` (protocol.md section 3.11).

The stream opens with ``: subscribed <cursor>``, then carries one ``id``/``data``
event per change (``event: conflict`` for the conflict ring), a ``: heartbeat`` comment
when nothing was sent for ``SBUS_WATCH_HEARTBEAT`` seconds, and ends:

- when the client goes away;
- with ``event: reset`` when the cursor is too old to resume (its ``id`` is the live
  edge, from which a new stream may start);
- at shutdown or when the store fails, with a last block holding only ``id: <cursor>``
  (which sets the client's Last-Event-ID without dispatching an event) after a comment
  saying why, so that the client resumes where it stopped;
- by being cut when one write waits longer than ``SBUS_WATCH_SEND_TIMEOUT`` seconds for
  the client to read (a slow consumer): the ids it already received resume it.

Memory per watcher is one page of the log plus the transport's write buffer: a write
waits for the client, it never queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from sbus.api import closing
from sbus.core.changes import CursorExpired
from sbus.core.errors import StoreUnavailable
from sbus.core.watch import Feed, WatchEvent

log = logging.getLogger("sbus")

MEDIA_TYPE = "text/event-stream"
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    # a reverse proxy (nginx) must pass each event on as it comes
    (b"x-accel-buffering", b"no"),
]
RESET = orjson.dumps({"reason": "cursor_expired"}).decode()


class SlowConsumer(Exception):
    """A write waited longer than the send timeout."""


def event_text(event: WatchEvent) -> str:
    kind = "event: conflict\n" if event.kind == "conflict" else ""
    return f"{kind}id: {event.cursor}\ndata: {orjson.dumps(event.data).decode()}\n\n"


class EventStream(Response):
    """An ASGI response streaming ``feed`` until one of the ends above (a Response
    subclass only so that a route may return it)."""

    def __init__(
        self, feed: Feed, *, poll_s: float, heartbeat_s: float, send_timeout_s: float
    ) -> None:
        super().__init__(media_type=MEDIA_TYPE)
        self.feed = feed
        self.poll_s = poll_s
        self.heartbeat_s = heartbeat_s
        self.send_timeout_s = send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def listen() -> None:
            while True:
                message: Message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    return

        async def write(text: str) -> None:
            message = {"type": "http.response.body", "body": text.encode(), "more_body": True}
            try:
                await asyncio.wait_for(send(message), self.send_timeout_s)
            except TimeoutError:
                raise SlowConsumer from None

        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        listener = asyncio.create_task(listen())
        try:
            await self._run(write, gone)
        except SlowConsumer:
            # The response is left incomplete: the server closes the connection.
            log.info("change stream cut: the client read too slowly (at %s)", self.feed.cursor)
            return
        except OSError:
            return  # the connection broke under the write
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _run(self, write: Callable[[str], Awaitable[None]], gone: asyncio.Event) -> None:
        feed = self.feed
        stopping = closing.event()
        await write(f": subscribed {feed.cursor}\n\n")
        if feed.expired:
            await write(f"event: reset\nid: {feed.cursor}\ndata: {RESET}\n\n")
            return
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while not gone.is_set():
            if stopping.is_set():
                await write(f": shutting down\nid: {feed.cursor}\n\n")
                return
            try:
                events = await feed.read()
            except CursorExpired:
                # The watcher fell behind the retention while connected.
                head = await feed.restart()
                await write(f"event: reset\nid: {head}\ndata: {RESET}\n\n")
                return
            except StoreUnavailable as exc:
                await write(f": store unavailable ({exc.detail})\nid: {feed.cursor}\n\n")
                return
            except Exception:
                # A bug must not leave the client without its cursor.
                log.exception("change stream failed at %s", feed.cursor)
                await write(f": internal error\nid: {feed.cursor}\n\n")
                return
            if events:
                await write("".join(event_text(ev) for ev in events))
                quiet_since = loop.time()
                continue
            left = quiet_since + self.heartbeat_s - loop.time()
            if left <= 0:
                await write(": heartbeat\n\n")
                quiet_since = loop.time()
                continue
            await _first(feed.wait(min(self.poll_s, left)), gone.wait(), stopping.wait())


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of ``waits`` finishes; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
