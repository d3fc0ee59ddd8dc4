"""``sbus serve``'s graceful stop in each worker (docs/operations.md section 6).

uvicorn stops accepting as soon as it sees SIGTERM or SIGINT. A load balancer still
sends new connections until its health check has seen the worker not ready, so the
worker first answers ``/admin/health`` 503 ``shutting down`` while serving on for
``SBUS_SHUTDOWN_DELAY`` seconds (its streams ended, each connection closing after its
next response: :mod:`sbus.api.closing`), and only then hands the signal to uvicorn, which closes the
listener and waits for the requests in flight until ``SBUS_DRAIN_TIMEOUT`` cuts them
(:mod:`sbus.api.connections`); the lifespan then closes the store.

:class:`GracefulStop` takes over the two signals once the worker's lifespan starts (the
moment uvicorn has put its own handlers in place). Only the first signal starts the
stop; a later SIGINT (a second Ctrl-C) skips what is left of the delay, anything else
is only logged: a repeated signal never reaches uvicorn, whose second SIGINT would
force an exit that skips closing the store, and never shortens the drain. Once the
lifespan ends, the handlers it found are put back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from sbus.api import closing
from sbus.api.runtime import Lifecycle, Runtime

log = logging.getLogger("sbus")

HANDLED = (signal.SIGTERM, signal.SIGINT)

# What a single-worker `sbus serve` learnt outside any worker's lifespan: signals that came
# before the lifespan took them over, and how many requests the drain bound cut.
_early: list[int] = []
_cut = 0


def note_signal(sig: int, frame: FrameType | None) -> None:
    """The process's handler outside the server's run (:func:`noting_signals`): a signal
    before start-up finished stops the server as soon as it would serve (one worker: as
    soon as its lifespan starts), and the one uvicorn raises again after stopping is not
    the process's death."""
    _early.append(sig)


@contextlib.contextmanager
def noting_signals() -> Iterator[None]:
    """``sbus serve`` from its start, before the settings and the store's first check:
    a signal is noted (see :func:`stopped_early`), not the process's death (nor, in a
    container's process 1, where a signal without a handler does nothing, lost). The
    handlers found are put back at the end."""
    found = {sig: signal.getsignal(sig) for sig in HANDLED}
    for sig in HANDLED:
        signal.signal(sig, note_signal)
    try:
        yield
    finally:
        for sig, handler in found.items():
            signal.signal(sig, handler)


def stopped_early() -> str | None:
    """The name of the signal that came before serving began, if one did."""
    return signal.Signals(_early[0]).name if _early else None


def take_early() -> list[int]:
    """The signals noted so far, handed over to whoever serves next."""
    taken = list(_early)
    _early.clear()
    return taken


def requests_cut() -> int:
    """Requests this process's workers cut at the drain bound."""
    return _cut


class GracefulStop:
    """``inner``'s lifecycle, plus the signal handling above (``sbus serve`` only: an
    app run any other way keeps its host's signal handling)."""

    def __init__(self, inner: Lifecycle, *, delay_s: float, drain_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.drain_s = drain_s
        self.received: int | None = None
        self._uvicorn: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runtime: Runtime | None = None
        self._delay: asyncio.Task[None] | None = None

    async def start(self, runtime: Runtime) -> None:
        await self.inner.start(runtime)
        self._runtime = runtime
        self._loop = asyncio.get_running_loop()
        if threading.current_thread() is not threading.main_thread():
            return  # signals only reach the main thread's handlers
        for sig in HANDLED:
            self._uvicorn[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        for early in _early:
            self._received(early)
        _early.clear()

    async def stop(self, runtime: Runtime) -> None:
        global _cut
        for sig, handler in self._uvicorn.items():
            signal.signal(sig, handler)
        if self._delay is not None:
            self._delay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._delay
        cut = closing.state().cut
        if cut:
            _cut += cut
            runtime.readiness.record_cut(cut)
        await self.inner.stop(runtime)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of whatever the loop was doing: hand the work to it.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._received, sig)

    def _received(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.received is None:
            self.received = sig
            assert self._runtime is not None
            self._runtime.begin_stopping()
            closing.begin()
            if self.delay_s > 0:
                log.info(
                    "%s: shutting down (worker %d): /admin/health answers 503; serving on for "
                    "SBUS_SHUTDOWN_DELAY=%gs, then no new connections and up to "
                    "SBUS_DRAIN_TIMEOUT=%gs for the requests in flight",
                    name,
                    os.getpid(),
                    self.delay_s,
                    self.drain_s,
                )
                self._delay = asyncio.create_task(self._hand_over_after(sig, self.delay_s))
            else:
                log.info(
                    "%s: shutting down (worker %d): no new connections; up to "
                    "SBUS_DRAIN_TIMEOUT=%gs for the requests in flight",
                    name,
                    os.getpid(),
                    self.drain_s,
                )
                self._hand_over(sig)
        elif sig == signal.SIGINT and self._delay is not None and not self._delay.done():
            log.info("SIGINT: skipping the rest of SBUS_SHUTDOWN_DELAY (worker %d)", os.getpid())
            self._delay.cancel()
            self._hand_over(self.received)
        else:
            log.info("%s: already shutting down (worker %d)", name, os.getpid())

    async def _hand_over_after(self, sig: int, seconds: float) -> None:
        await asyncio.sleep(seconds)
        log.info("SBUS_SHUTDOWN_DELAY is over: no new connections (worker %d)", os.getpid())
        self._hand_over(sig)

    def _hand_over(self, sig: int) -> None:
        """uvicorn's own handler: stop accepting, wait for the requests in flight."""
        handler = self._uvicorn.get(sig)
        if callable(handler):
            handler(sig, None)
