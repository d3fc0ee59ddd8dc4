"""The application factory. Nothing happens at import time: ``create_app(settings)``
builds the app; its lifespan connects the store in the background so the listener is
up (``/livez`` 200, ``/admin/health`` 503 not_ready) before the store answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI

from sbus import __version__
from sbus.api import openapi, problems, upkeep
from sbus.api.auth import Authenticator
from sbus.api.browser import Cors, OriginPolicy, listed
from sbus.api.ignored import HEADER as IGNORED_FIELDS
from sbus.api.ignored import IgnoredFieldsHeader
from sbus.api.middleware import Gate
from sbus.api.readiness import WorkerReadiness
from sbus.api.routers import admin, commits, mandates, sessions, shards, stats
from sbus.api.routers.stats import public_reason
from sbus.config import Settings
from sbus.core.engine import Bus
from sbus.core.errors import StoreUnavailable
from sbus.core.store import Store
from sbus.core.types import RateLimit
from sbus.security import KeyConfigError
from sbus.security.keys import KeySet, open_mode_keys
from sbus.security.keys import configured as keys_configured
from sbus.security.mandates import Mandates
from sbus.security.tokens import Issuer, Verifier
from sbus.storage.factory import open_store
from sbus.telemetry.metrics import Metrics, Timing

log = logging.getLogger("sbus")


async def _connect(app: FastAPI, store: Store) -> None:
    """Start the store, retrying with capped exponential backoff until it answers;
    then keep it up (sbus.api.upkeep: configuration checks, the purge)."""
    settings: Settings = app.state.settings
    lagging = settings.test_hooks and settings.test_connect_delay_ms > 0
    if lagging and not app.state.readiness.is_first():
        await asyncio.sleep(settings.test_connect_delay_ms / 1000)
    delay = 0.1
    while True:
        try:
            await store.start()
            if app.state.keys_from_store:
                _install_keys(app, await open_mode_keys(store.open_mode_secret))
        except StoreUnavailable as exc:
            upkeep.stop_if_cancelled()
            app.state.not_ready_reason = exc.detail
            app.state.not_ready_public = public_reason(exc)
            log.warning("store not ready (%s); retrying in %.1fs", exc.detail, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        upkeep.stop_if_cancelled()
        app.state.ready = True
        app.state.not_ready_reason = None
        app.state.readiness.mark_ready()
        log.info("ready: the %s store answers (worker %d)", store.backend, os.getpid())
        break
    await upkeep.run(app, store)


def _keys(settings: Settings) -> tuple[KeySet | None, str | None]:
    """The configured key set, or None and why not. Token mode needs one (KeyConfigError,
    which ``sbus.bootstrap.startup_problem`` reports before we get here); open mode signs
    mandates and POST /admin/tokens with it, and without one configured with the store's
    secret (installed once the store answers, see ``_connect``)."""
    try:
        return KeySet.from_settings(settings), None
    except KeyConfigError as exc:
        if settings.auth_mode == "token":
            raise
        return None, exc.detail


def _install_keys(app: FastAPI, keys: KeySet | None) -> None:
    """The signers of POST /admin/tokens and POST /mandates (None: 503 SigningUnavailable)."""
    settings: Settings = app.state.settings
    app.state.issuer = Issuer.from_settings(settings, keys) if keys is not None else None
    app.state.mandates = Mandates.from_settings(settings, keys) if keys is not None else None


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    settings = settings or Settings()
    keys, no_keys = _keys(settings)
    token_mode = settings.auth_mode == "token"
    store = store or open_store(
        settings.store, settings.store_limits(), settings.namespace, pool_size=settings.pg_pool()
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        connecting = asyncio.create_task(_connect(app, store))
        try:
            yield
        finally:
            app.state.readiness.clear()
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            await store.close()

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
    )
    app.state.settings = settings
    # Rate limits apply in token mode only (protocol.md §4 step 5): in open mode every
    # agent id is self-declared, so a per-agent bucket would limit nothing.
    rate = RateLimit.parse(settings.rate_limit) if settings.auth_mode == "token" else None
    app.state.bus = Bus(store, settings.engine_limits(), rate=rate)
    app.state.ready = False
    app.state.not_ready_reason = app.state.not_ready_public = "store not connected yet"
    app.state.readiness = WorkerReadiness(settings.ready_dir, settings.worker_count())
    app.state.metrics = Metrics()
    _install_keys(app, keys)
    app.state.no_issuer_reason = no_keys
    # Open mode never refuses to start for want of a key: with none configured it signs
    # with the secret the store keeps for every replica, obtained before the worker is
    # ready (until then the gate answers 503 not_ready, as for every store route).
    app.state.keys_from_store = not token_mode and not keys_configured(settings)
    verifier = Verifier.from_settings(settings, keys) if token_mode and keys else None
    # Every request's token is checked against the store's revocation list, so a
    # revocation made through any replica is refused by every replica at once.
    authenticator = Authenticator(
        verifier=verifier, admin_enabled=settings.admin_enabled, revoked=store.revocation
    )
    app.state.authenticator = authenticator
    problems.install(app)
    for module in (shards, commits, sessions, mandates, admin, stats):
        app.include_router(module.router)
    app.add_middleware(IgnoredFieldsHeader)
    openapi.install(app)
    # Each add_middleware wraps the ones before: Timing(Cors(Gate(app))). Timing sees every
    # response; CORS runs outside the gate, so a preflight needs no token and the gate's
    # rejections carry CORS headers too.
    app.add_middleware(
        Gate,
        max_body=settings.max_body,
        origins=None if token_mode else OriginPolicy.from_settings(settings),
        is_ready=lambda: bool(app.state.ready),
        authenticator=authenticator,
        body_timeout=settings.body_timeout,
    )
    if settings.cors_origins:
        app.add_middleware(
            Cors,
            allow_origins=listed(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],
            expose_headers=["ETag", "Idempotent-Replayed", "Retry-After", IGNORED_FIELDS],
        )
    app.add_middleware(Timing, metrics=app.state.metrics)
    return app
