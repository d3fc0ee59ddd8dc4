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
import logging
import os

from sbus.api.runtime import Runtime
from sbus.bootstrap import signers, upkeep
from sbus.core.errors import StoreUnavailable
from sbus.core.store import Store
from sbus.security.keys import open_mode_keys

log = logging.getLogger("sbus")

FIRST_RETRY_S = 0.1
MAX_RETRY_S = 5.0


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
