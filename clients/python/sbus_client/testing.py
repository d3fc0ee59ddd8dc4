"""An S-Bus running inside the test process (extra ``sbus-client[testing]``).

:class:`LocalBus` (sync) and :class:`AsyncLocalBus` (async) build the server's app over
its in-memory store, run its lifespan, and hand out clients wired straight into it: no
port, no subprocess, nothing left behind. ::

    with LocalBus() as local:
        with local.bus.session(agent_id="planner") as s:
            s.create("plan", "v1")
        local.advance_clock(3601)      # past SBUS_SESSION_TTL: recorded reads expire

``.bus`` names no agent; a Bus for one agent (or with other options) is
``Bus(local.url, agent_id="planner", http_client=local.http)``.

Keyword arguments override fields of the server's ``Settings`` (``session_ttl=60``,
``max_txn_keys=4``, ``store="sqlite:///..."``). Unlike ``sbus serve``, the environment
is not read: a test must not change behaviour because a developer's shell exports
``SBUS_AUTH=token``. Open mode, as the server's defaults give it.

How the app runs. The async helper enters the app's lifespan with asgi-lifespan's
``LifespanManager`` (``httpx.ASGITransport`` alone runs no lifespan, so the store would
never start) and serves over ``ASGITransport``. The sync helper runs that same async
helper on an event loop in a background thread and forwards each request to it through
a small ``httpx.BaseTransport``; requests from any number of threads all run on that
one loop, which the memory store's atomicity argument needs. It does not use starlette's
``TestClient``: since starlette 1.10 that client is built on ``httpx2`` when installed
(and warns when it is not), so it would stop being the ``httpx.Client`` the SDK takes.

This is the only client module that imports the server package; ``import sbus_client``
never reaches it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import difflib
import threading
from types import TracebackType
from typing import Any

import httpx

from sbus_client._extras import needs_extra

# The server package comes with the extra; say so instead of naming a missing module.
with needs_extra("testing", "sbus_client.testing"):
    from asgi_lifespan import LifespanManager
    from fastapi import FastAPI
    from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

    from sbus.api.runtime import runtime_of
    from sbus.bootstrap import create_app, startup_problem
    from sbus.config import Settings
    from sbus.core.clock import offset_cap_ms
    from sbus.core.errors import SBusError
    from sbus.core.store import Store
    from sbus.storage.factory import open_store

from sbus_client import AsyncBus, Bus

__all__ = ["URL", "AsyncLocalBus", "LocalBus", "local_settings"]

# A loopback name: open mode refuses a Host it does not know (403 HostNotAllowed), and
# the usual test-client default "testserver" is not one.
URL = "http://127.0.0.1:7000"
# How long the store may take to answer once the app has started. The memory store
# answers at once; a store named in the settings (SQLite, ...) may need a moment.
READY_TIMEOUT_S = 30.0


class _LocalSettings(Settings):
    """Settings from keyword arguments and defaults only: no environment, no .env."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def local_settings(**overrides: Any) -> Settings:
    """The settings of an in-process bus: the memory store unless ``store`` is given,
    every other field the server's default unless overridden. Raises ValueError for a
    configuration ``sbus serve`` would refuse to start with (and pydantic's
    ValidationError, a ValueError too, for an invalid value)."""
    unknown = sorted(set(overrides) - set(Settings.model_fields))
    if unknown:
        # The server's settings ignore unknown names (environment variables), but here a
        # misspelt keyword would silently test the default instead.
        hints = [
            f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)
            for name in unknown
            for close in [difflib.get_close_matches(name, Settings.model_fields, n=1)]
        ]
        raise TypeError(
            f"sbus_client.testing: no such setting {', '.join(hints)}; the settings are "
            "docs/configuration.md's variables in lower case without SBUS_"
        )
    settings = _LocalSettings(**{"store": "memory", **overrides})
    problem = startup_problem(settings)
    if problem is not None:
        raise ValueError(f"sbus_client.testing: {problem}")
    return settings


class _Server:
    """The app, its store and the clock handle: what both helpers share."""

    def __init__(self, overrides: dict[str, Any]) -> None:
        self.settings = local_settings(**overrides)
        self.store: Store = open_store(
            self.settings.store,
            self.settings.store_limits(),
            self.settings.namespace,
            pool_size=self.settings.pg_pool(),
        )
        self.app: FastAPI = create_app(self.settings, self.store)

    async def start(self, stack: contextlib.AsyncExitStack) -> httpx.ASGITransport:
        """Run the lifespan (stopped when ``stack`` closes) until the store answers; the
        transport that serves the app."""
        manager = await stack.enter_async_context(LifespanManager(self.app))
        await self._wait_ready()
        return httpx.ASGITransport(app=manager.app)

    async def _wait_ready(self) -> None:
        # The lifespan connects the store in the background; until it answers every
        # store route is 503 not_ready.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        runtime = runtime_of(self.app)
        while not runtime.ready:
            if loop.time() > deadline:
                raise RuntimeError(
                    f"the in-process bus did not become ready: {runtime.not_ready_reason}"
                )
            await asyncio.sleep(0.005)

    async def advance_clock(self, seconds: float) -> int:
        """Move the store clock forward: the offset ``POST /admin/test/advance-clock`` sets
        (same cap), without needing the admin route or test hooks. Returns the total
        offset in ms."""
        if seconds < 0:
            raise ValueError(f"the store clock only moves forward; got {seconds} seconds")
        token_ttl = self.settings.token_max_ttl if self.settings.auth_mode == "token" else None
        try:
            return await self.store.advance_clock(round(seconds * 1000), offset_cap_ms(token_ttl))
        except SBusError as exc:  # past the cap; the offset is unchanged
            raise ValueError(str(exc)) from exc


class AsyncLocalBus:
    """An in-process bus for async code (an async context manager). Inside ``async
    with``: ``.bus`` is an ``AsyncBus`` on it, ``.http`` the ``httpx.AsyncClient`` under
    that, ``.url`` its base URL, ``.app`` and ``.settings`` the server's; ``await
    .advance_clock(seconds)``."""

    def __init__(self, **settings: Any) -> None:
        self._server = _Server(settings)
        self.url = URL
        self.settings: Settings = self._server.settings
        self.app: FastAPI = self._server.app
        self._http: httpx.AsyncClient | None = None
        self._bus: AsyncBus | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("not running: use `async with AsyncLocalBus() as local:`")
        return self._http

    @property
    def bus(self) -> AsyncBus:
        if self._bus is None:
            raise RuntimeError("not running: use `async with AsyncLocalBus() as local:`")
        return self._bus

    async def advance_clock(self, seconds: float) -> int:
        """Move the store clock ``seconds`` forward; returns the total offset in ms."""
        if self._http is None:
            raise RuntimeError("not running: use `async with AsyncLocalBus() as local:`")
        return await self._server.advance_clock(seconds)

    async def __aenter__(self) -> AsyncLocalBus:
        if self._stack is not None:
            raise RuntimeError("this AsyncLocalBus is already running")
        async with contextlib.AsyncExitStack() as stack:
            transport = await self._server.start(stack)
            self._http = await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url=self.url)
            )
            self._bus = await stack.enter_async_context(AsyncBus(self.url, http_client=self._http))
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack, self._http, self._bus = self._stack, None, None, None
        if stack is not None:
            await stack.aclose()


class _LoopTransport(httpx.BaseTransport):
    """A sync transport that sends each request through ``inner`` on ``loop`` (running
    in another thread) and waits for the whole response there."""

    def __init__(self, inner: httpx.AsyncBaseTransport, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._loop = loop

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # the body becomes bytes, readable from the loop's side
        return asyncio.run_coroutine_threadsafe(self._send(request), self._loop).result()

    async def _send(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        try:
            # Raw bytes: the calling client decodes any Content-Encoding itself.
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
        finally:
            await response.aclose()
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=httpx.ByteStream(raw),
            extensions=response.extensions,
        )


class LocalBus:
    """An in-process bus for sync code (a context manager). Inside ``with``: ``.bus`` is
    a ``Bus`` on it, ``.http`` the ``httpx.Client`` under that, ``.url`` its base URL,
    ``.app`` and ``.settings`` the server's; ``.advance_clock(seconds)``. Usable from many
    threads at once."""

    def __init__(self, **settings: Any) -> None:
        self._server = _Server(settings)
        self.url = URL
        self.settings: Settings = self._server.settings
        self.app: FastAPI = self._server.app
        self._http: httpx.Client | None = None
        self._bus: Bus | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._serving: concurrent.futures.Future[None] | None = None
        self._stop: asyncio.Event | None = None

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            raise RuntimeError("not running: use `with LocalBus() as local:`")
        return self._http

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError("not running: use `with LocalBus() as local:`")
        return self._bus

    def advance_clock(self, seconds: float) -> int:
        """Move the store clock ``seconds`` forward; returns the total offset in ms."""
        if self._loop is None or self._http is None:
            raise RuntimeError("not running: use `with LocalBus() as local:`")
        future = asyncio.run_coroutine_threadsafe(self._server.advance_clock(seconds), self._loop)
        return future.result()

    async def _serve(
        self, started: concurrent.futures.Future[httpx.ASGITransport], stop: asyncio.Event
    ) -> None:
        try:
            async with contextlib.AsyncExitStack() as stack:
                started.set_result(await self._server.start(stack))
                await stop.wait()
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    def __enter__(self) -> LocalBus:
        if self._loop is not None:
            raise RuntimeError("this LocalBus is already running")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="sbus-local-bus", daemon=True)
        thread.start()
        started: concurrent.futures.Future[httpx.ASGITransport] = concurrent.futures.Future()
        stop = asyncio.Event()
        serving = asyncio.run_coroutine_threadsafe(self._serve(started, stop), loop)
        self._loop, self._thread, self._serving, self._stop = loop, thread, serving, stop
        try:
            transport = started.result()
        except BaseException:
            self._shutdown(quiet=True)  # the start's own error is the one to see
            raise
        self._http = httpx.Client(transport=_LoopTransport(transport, loop), base_url=self.url)
        self._bus = Bus(self.url, http_client=self._http)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._shutdown(quiet=False)

    def _shutdown(self, *, quiet: bool) -> None:
        bus, http, self._bus, self._http = self._bus, self._http, None, None
        if bus is not None:
            bus.close()
        if http is not None:
            http.close()
        loop, thread, serving, stop = self._loop, self._thread, self._serving, self._stop
        self._loop = self._thread = self._serving = self._stop = None
        if loop is None or thread is None or serving is None or stop is None:
            return
        try:
            loop.call_soon_threadsafe(stop.set)
            try:
                serving.result()  # the lifespan's shutdown, store closed
            except Exception:
                if not quiet:
                    raise
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
