"""What a worker does with its store once connected: watch its configuration and purge
expired state.

**Watch.** An operator can change what the bus relies on without restarting it: Redis's
``maxmemory-policy`` by ``CONFIG SET``, PostgreSQL's ``fsync`` or ``synchronous_commit``
by a reload. Every :data:`CHECK_INTERVAL_S` each worker asks its store again
(:meth:`Store.check`). While the store must not be used (Redis evicting keys) the worker
is not ready: ``/admin/health`` answers 503 ``not_ready`` with the reason, every store
route 503 ``StoreUnavailable`` (nothing is applied), and its ready marker is withdrawn;
the first check that passes makes it ready again. ``durable`` (``/stats``
``wal_enabled``) follows what the server says. A PostgreSQL server found read-only (a
fenced old primary) has the store drop its connections, so the next use finds the
primary. A store that cannot be asked changes nothing here: every request already
reports that on its own.

**Purge** once a minute. Expiry never depends on it (every read of the DeliveryLog
filters by age); it only bounds storage, the audit log's included (``SBUS_AUDIT_TTL`` and
``SBUS_AUDIT_MAX_ROWS`` on the store clock).
"""

from __future__ import annotations

import asyncio
import logging

from sbus.api.runtime import Runtime
from sbus.core.errors import StoreMisconfigured, StoreUnavailable
from sbus.core.store import Store

log = logging.getLogger("sbus")

CHECK_INTERVAL_S = 5.0
PURGE_INTERVAL_S = 60.0


def stop_if_cancelled() -> None:
    """Stop this task if it was asked to. Python 3.11's ``asyncio.wait_for`` (inside
    redis-py) can swallow a cancellation that lands as its inner call completes; a loop
    that went on would hold up the shutdown for ever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def check_once(runtime: Runtime, store: Store) -> None:
    """One check; moves the worker between ready and not-ready."""
    try:
        await store.check()
    except StoreMisconfigured as exc:
        if runtime.ready:
            log.error("store misconfigured, refusing requests until it is fixed: %s", exc.detail)
        runtime.mark_not_ready(exc)
        return
    except StoreUnavailable as exc:
        log.debug("store check skipped: %s", exc.detail)
        return
    if not runtime.ready:
        log.warning("store configuration fixed: ready again")
        runtime.mark_ready()


async def watch(runtime: Runtime, store: Store) -> None:
    while True:
        await asyncio.sleep(CHECK_INTERVAL_S)
        await check_once(runtime, store)
        stop_if_cancelled()


async def purge(store: Store) -> None:
    while True:
        await asyncio.sleep(PURGE_INTERVAL_S)
        try:
            await store.purge()
        except StoreUnavailable as exc:
            log.warning("purge skipped: %s", exc.detail)
        stop_if_cancelled()


async def run(runtime: Runtime, store: Store) -> None:
    """Both loops until cancelled."""
    async with asyncio.TaskGroup() as loops:
        loops.create_task(watch(runtime, store))
        loops.create_task(purge(store))
