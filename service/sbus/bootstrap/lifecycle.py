"""The store's life around the app's (the :class:`~sbus.api.runtime.Lifecycle` the
lifespan starts and stops).

The listener is up before the store answers: starting only launches the connection in
the background, and until it succeeds ``/livez`` answers 200, ``/admin/health`` 503
not_ready and every store route 503. The connection retries with capped exponential
backoff, then installs the open-mode signing keys from the store's secret (when none are
configured), marks the worker ready and keeps the store up (:mod:`sbus.bootstrap.upkeep`).
Stopping withdraws the ready marker, cancels all of that and closes the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os

from sbus.api.runtime import Lifecycle, Runtime
from sbus.bootstrap import signers, upkeep
from sbus.core.errors import StoreUnavailable
from sbus.core.store import Store
from sbus.security.keys import open_mode_keys

log = logging.getLogger("sbus")

FIRST_RETRY_S = 0.1
MAX_RETRY_S = 5.0
READY_POLL_S = 0.05


class StoreLifecycle:
    """``keys_from_store``: open mode with no keys configured signs with the store's
    secret, installed once the store answers."""

    def __init__(self, store: Store, *, keys_from_store: bool) -> None:
        self.store = store
        self.keys_from_store = keys_from_store
        self._running: asyncio.Task[None] | None = None

    async def start(self, runtime: Runtime) -> None:
        self._running = asyncio.create_task(self._connect(runtime))

    async def stop(self, runtime: Runtime) -> None:
        runtime.readiness.clear()
        if self._running is not None:
            self._running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._running
            self._running = None
        await self.store.close()

    async def _connect(self, runtime: Runtime) -> None:
        """Start the store, retrying until it answers; then keep it up."""
        settings = runtime.settings
        # A test hook: every worker but the first connects late, so a test can see one
        # worker ready while another is not.
        lagging = settings.test_hooks and settings.test_connect_delay_ms > 0
        if lagging and not runtime.readiness.is_first():
            await asyncio.sleep(settings.test_connect_delay_ms / 1000)
        delay = FIRST_RETRY_S
        while True:
            try:
                await self.store.start()
                if self.keys_from_store:
                    signers.install(runtime, await open_mode_keys(self.store.open_mode_secret))
            except StoreUnavailable as exc:
                upkeep.stop_if_cancelled()
                runtime.mark_not_ready(exc)
                log.warning("store not ready (%s); retrying in %.1fs", exc.detail, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_S)
                continue
            upkeep.stop_if_cancelled()
            runtime.mark_ready()
            log.info("ready: the %s store answers (worker %d)", self.store.backend, os.getpid())
            break
        await upkeep.run(runtime, self.store)


class FrozenOnceReady:
    """``sbus serve``'s lifecycle in each worker: ``inner``'s, plus, the first time the
    worker is ready, one full collection and ``gc.freeze()``.

    By then the imports, the app, its routes and schemas and the store's connection
    (its engine, the migrations) exist and live as long as the process: about 120,000
    objects that every full collection would traverse again (about 90 ms on the
    development machine, a pause for every request in flight). Frozen, they leave the
    collector's generations, and a full collection traverses only what was made since.
    Only the serve path does this: a process that builds many apps (the tests) would
    keep every frozen one for good."""

    def __init__(self, inner: Lifecycle) -> None:
        self.inner = inner
        self._waiting: asyncio.Task[None] | None = None

    async def start(self, runtime: Runtime) -> None:
        await self.inner.start(runtime)
        self._waiting = asyncio.create_task(self._freeze_when_ready(runtime))

    async def stop(self, runtime: Runtime) -> None:
        if self._waiting is not None:
            self._waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._waiting
            self._waiting = None
        await self.inner.stop(runtime)

    @staticmethod
    async def _freeze_when_ready(runtime: Runtime) -> None:
        # Readiness is a flag the store's connection sets (and may clear and set
        # again); a look every 50 ms until the first time is all this needs.
        while not runtime.ready:  # noqa: ASYNC110
            await asyncio.sleep(READY_POLL_S)
        gc.collect()
        gc.freeze()
        log.debug("froze %d start-up objects (worker %d)", gc.get_freeze_count(), os.getpid())
