"""The FastAPI assembly: routers, middleware, problem handlers and the OpenAPI document
around a :class:`~sbus.api.runtime.Runtime` built elsewhere (``sbus.bootstrap``, whose
``create_app`` is the application factory). Nothing happens at import time; the
lifespan starts the runtime, which connects the store in the background so the listener
is up (``/livez`` 200, ``/admin/health`` 503 not_ready) before the store answers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from sbus import __version__
from sbus.api import openapi, problems
from sbus.api.browser import Cors, OriginPolicy, listed
from sbus.api.ignored import HEADER as IGNORED_FIELDS
from sbus.api.ignored import IgnoredFieldsHeader
from sbus.api.middleware import Gate
from sbus.api.routers import admin, commits, mandates, pages, sessions, shards, stats, watch
from sbus.api.runtime import Runtime
from sbus.telemetry.exchange import HEADER as REQUEST_ID
from sbus.telemetry.requests import Observe


def assemble(runtime: Runtime) -> FastAPI:
    """The app serving ``runtime``, which becomes its only state (``app.state.runtime``)."""
    settings = runtime.settings
    token_mode = settings.auth_mode == "token"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="S-Bus",
        version=__version__,
        description=(
            "HTTP state bus with observable-read isolation for multi-agent LLM systems. "
            "Errors are RFC 9457 problem+json carrying the compat `error` code."
        ),
        lifespan=lifespan,
        # A trailing slash is a 404 like any unknown path: no redirect (whose Location
        # would echo the Host header) and no empty body.
        redirect_slashes=False,
        # /docs is served from the package (sbus.api.routers.pages), not from a CDN.
        docs_url=None,
        redoc_url=None,
        # The bus traces with its own provider (sbus.telemetry.tracing, one span tree
        # for the lean and the FastAPI handlers alike): FastAPI's built-in telemetry
        # stays off, so it neither adds a second server span when a global provider is
        # set nor looks the global providers up on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False, "auto_configure": False},
    )
    app.state.runtime = runtime
    problems.install(app)
    for module in (shards, commits, sessions, mandates, admin, stats, pages, watch):
        app.include_router(module.router)
    app.add_middleware(IgnoredFieldsHeader)
    openapi.install(app)
    # Each add_middleware wraps the ones before: Observe(Cors(Gate(app))). Observe sees
    # every request and response (request id, latency, log line, server span); CORS runs
    # outside the gate, so a preflight needs no token and the gate's rejections carry
    # CORS headers too.
    app.add_middleware(
        Gate,
        max_body=settings.max_body,
        origins=None if token_mode else OriginPolicy.from_settings(settings),
        is_ready=lambda: runtime.ready,
        authenticator=runtime.authenticator,
        body_timeout=settings.body_timeout,
        tracer=runtime.bus.tracer,
    )
    if settings.cors_origins:
        app.add_middleware(
            Cors,
            allow_origins=listed(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],
            expose_headers=[
                "ETag",
                "Idempotent-Replayed",
                "Retry-After",
                IGNORED_FIELDS,
                REQUEST_ID,
            ],
        )
    app.add_middleware(Observe, metrics=runtime.metrics, tracing=runtime.tracing)
    return app
