"""Connection limits uvicorn does not have: how long a client may take to send a
request's headers, and how many connections one worker holds.

uvicorn times out only an idle keep-alive connection after a response
(``SBUS_KEEPALIVE_TIMEOUT``); a client that connects and sends nothing, or trickles its
headers a byte at a time, was held for ever (thousands of such sockets exhaust the
worker). Its own ``limit_concurrency`` still accepts and reads every connection, then
answers a text/plain 503. :class:`GuardedHttpToolsProtocol` is uvicorn's protocol with:

- a **header deadline**: the request line and headers must be complete within
  ``SBUS_HEADER_TIMEOUT`` seconds, counted from the connection (first request) or from
  the request's first byte (later requests; the idle time between requests is the
  keep-alive timeout's). A connection that sent nothing is then closed silently; one in
  the middle of its headers gets 408 ``RequestTimeout`` (problem+json) and is closed;
- a **connection cap**: a connection beyond ``SBUS_MAX_CONNECTIONS`` held by this worker
  is closed at once, before anything is read; the client sees the connection closed
  without a response and may retry;
- a **graceful stop** (:mod:`sbus.api.closing`): once the worker's stop begins, every
  response carries ``Connection: close``. A connection idle in keep-alive is not closed
  then but after its next request (if one comes before uvicorn's shutdown closes the
  idle ones): a client may be sending on it at the moment it closes, and would see the
  connection closed without an answer, where a close after a response races nothing.
  When uvicorn's shutdown has waited ``SBUS_DRAIN_TIMEOUT`` seconds for the requests in
  flight, the connections still open are reset and their requests cancelled, quietly
  (uvicorn would log each cancelled request as an application error with a traceback,
  and answer 500 where nothing was sent yet, which a client would take for a failure
  when the outcome is unknown).

The body's deadline (``SBUS_BODY_TIMEOUT``) is the ASGI gate's (sbus.api.middleware),
which can answer it with a problem document. ``sbus serve`` selects this class with
uvicorn's ``http`` option; each worker reads the limits from its environment.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from sbus.api import closing
from sbus.api.problems import MEDIA_TYPE, problem_body
from sbus.config import Settings
from sbus.core.errors import RequestTimeout

log = logging.getLogger("sbus")

# How often a refused connection may be logged (an attack would flood the log).
REFUSAL_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float
    max_connections: int
    drain_timeout: float


@functools.cache
def configured_limits() -> ConnectionLimits:
    """This worker's limits, read once from the environment (``sbus serve`` checked
    the settings before starting any worker)."""
    settings = Settings()
    return ConnectionLimits(
        settings.header_timeout, settings.max_connections, settings.drain_timeout
    )


def timeout_response(seconds: float) -> bytes:
    """A complete HTTP/1.1 408 with a problem document, for a connection the app never saw."""
    error = RequestTimeout(f"the request headers did not arrive within {seconds:g} s")
    body = orjson.dumps(problem_body(error, 408))
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        f"content-type: {MEDIA_TYPE}\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _RefusalLog:
    """Log refused connections at most once per interval, with how many there were."""

    def __init__(self) -> None:
        self.last = float("-inf")
        self.count = 0

    def note(self, cap: int) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= REFUSAL_LOG_INTERVAL_S:
            log.warning(
                "refused %d connection(s): this worker holds SBUS_MAX_CONNECTIONS=%d",
                self.count,
                cap,
            )
            self.last, self.count = now, 0


_refusals = _RefusalLog()


def cut_in_flight(
    stop: closing.Stop, connections: Iterable[object], tasks: Iterable[asyncio.Task[None]]
) -> None:
    """The drain bound ran out: reset every connection still open and cancel its request
    (an awaited store call included; the store's own rules end its transaction)."""
    stop.cutting = True
    stop.cut += sum(c.cut() for c in list(connections) if isinstance(c, GuardedHttpToolsProtocol))
    for task in list(tasks):
        task.cancel()
    if stop.cut:
        log.error(
            "SBUS_DRAIN_TIMEOUT=%gs ran out: cut %d request(s) in flight; their clients see "
            "the connection reset (outcome unknown: resend with the same Idempotency-Key)",
            configured_limits().drain_timeout,
            stop.cut,
        )


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = configured_limits()
        self.header_timer: asyncio.TimerHandle | None = None
        self.partial = False  # some bytes of the pending request's head have arrived
        self.refused = False
        self.stop = closing.state(self.loop)
        self.inner_app = self.app
        self.app = self.run_app

    async def run_app(self, scope: Any, receive: Any, send: Any) -> None:
        """The app, except that a request cut at the drain bound ends quietly: its
        connection is already reset, and uvicorn would log the cancellation as an
        application error."""
        try:
            await self.inner_app(scope, receive, send)
        except asyncio.CancelledError:
            if not self.stop.cutting:
                raise

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.refused = True
            _refusals.note(self.limits.max_connections)
            transport.close()
            return
        super().connection_made(transport)
        self.stop.connections = self.connections
        self._arm(partial=False)

    def shutdown(self) -> None:
        # uvicorn stops accepting and waits for the requests in flight: the stop has
        # begun if it had not yet (the change streams would hold it up until the drain
        # bound), and the bound starts now.
        stop = self.stop
        stop.begin()
        if stop.deadline is None:
            stop.deadline = self.loop.call_later(
                self.limits.drain_timeout, cut_in_flight, stop, self.connections, self.tasks
            )
        super().shutdown()

    def wind_down(self) -> None:
        # The response in flight carries Connection: close (or, if already started, the
        # connection closes after it); the next request's does (data_received).
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False

    def cut(self) -> bool:
        """Reset this connection; whether a request was in flight on it."""
        cycle = self.cycle
        busy = cycle is not None and not cycle.response_complete
        if busy:
            cycle.disconnected = True  # the app's sends go nowhere from now on
        self.transport.abort()
        return busy

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if not self.refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm(partial=True)  # the first bytes of a new request
        elif self.header_timer is not None:
            self.partial = True
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:
            self._disarm()  # the headers are complete: the request is the app's now
            if self.stop.event.is_set():
                self.cycle.keep_alive = False  # answered with Connection: close

    def _arm(self, *, partial: bool) -> None:
        self._disarm()
        self.partial = partial
        self.header_timer = self.loop.call_later(self.limits.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _expired(self) -> None:
        self.header_timer = None
        if self.transport.is_closing():
            return
        if self.partial:
            self.transport.write(timeout_response(self.limits.header_timeout))
        self.transport.close()
