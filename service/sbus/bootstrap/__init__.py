"""Building a server: everything above the API layer that ``sbus serve``, the tests and
``sbus_client.testing`` call before a request is served.

- :func:`startup_problem`: whether a configuration may serve at all. It may read the key
  files the settings name; the settings themselves never read files
  (:meth:`sbus.config.Settings.own_problem`).
- :func:`create_app`: the application factory. It builds the key set, the store, the
  engine and the signers into one :class:`~sbus.api.runtime.Runtime` and hands it to
  the API layer's assembly (:func:`sbus.api.app.assemble`), with the store's lifecycle
  (:mod:`sbus.bootstrap.lifecycle`: connect with backoff, the open-mode key install,
  :mod:`sbus.bootstrap.upkeep`, close). Nothing happens at import time.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from sbus.api.app import assemble
from sbus.api.auth import Authenticator
from sbus.api.readiness import WorkerReadiness
from sbus.api.runtime import Runtime
from sbus.bootstrap import signers
from sbus.bootstrap.lifecycle import StoreLifecycle
from sbus.config import Settings
from sbus.core.engine import Bus
from sbus.core.store import Store
from sbus.core.types import RateLimit
from sbus.security.keys import configured as keys_configured
from sbus.security.keys import token_mode_problem
from sbus.security.tokens import Verifier
from sbus.storage.factory import open_store
from sbus.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from fastapi import FastAPI

    from sbus.telemetry.tracing import Tracing

__all__ = ["create_app", "startup_problem"]


# The variable that can turn tracing on (sbus.telemetry.tracing): without it the
# OpenTelemetry SDK (about a tenth of a second of imports per worker) is never loaded.
TRACING_SWITCH = "OTEL_TRACES_EXPORTER"


def tracing_from_environment() -> Tracing | None:
    """The tracing the ``OTEL_*`` variables configure, or None when it is off."""
    if not os.environ.get(TRACING_SWITCH):
        return None
    from sbus.telemetry.tracing import Tracing

    return Tracing.from_environment()


def startup_problem(settings: Settings) -> str | None:
    """Why this configuration must not serve, or None: the settings' own problem, then in
    token mode the key it needs (a missing, short or unreadable key)."""
    problem = settings.own_problem()
    if problem is None and settings.auth_mode == "token":
        problem = token_mode_problem(settings)
    if problem is None and os.environ.get(TRACING_SWITCH):
        from sbus.telemetry.tracing import problem as tracing_problem

        problem = tracing_problem()
    return problem


def create_app(
    settings: Settings | None = None,
    store: Store | None = None,
    *,
    tracing: Tracing | None = None,
) -> FastAPI:
    """The app for ``settings`` (default: the environment) over ``store`` (default: the
    one ``settings.store`` names), traced into ``tracing`` (default: what the
    ``OTEL_*`` variables configure, none unless ``OTEL_TRACES_EXPORTER`` is set). Token
    mode without usable keys raises :class:`~sbus.security.KeyConfigError` before any
    store is opened."""
    settings = settings or Settings()
    keys, no_keys = signers.configured_keys(settings)
    token_mode = settings.auth_mode == "token"
    store = store or open_store(
        settings.store,
        settings.store_limits(),
        settings.namespace,
        pool_size=settings.pg_pool(),
        redis_wait=settings.redis_wait(),
    )
    # Rate limits apply in token mode only (protocol.md §4 step 5): in open mode every
    # agent id is self-declared, so a per-agent bucket would limit nothing.
    rate = RateLimit.parse(settings.rate_limit) if token_mode else None
    verifier = Verifier.from_settings(settings, keys) if token_mode and keys else None
    tracing = tracing or tracing_from_environment()
    # Traced, the engine and the token check reach the store through its spans; the
    # lifecycle (connect, upkeep, close) reaches it directly.
    traced = store if tracing is None else tracing.traced_store(store)
    bus = Bus(traced, settings.engine_limits(), rate=rate)
    bus.tracer = tracing
    runtime = Runtime(
        settings=settings,
        bus=bus,
        # Every request's token is checked against the store's revocation list, so a
        # revocation made through any replica is refused by every replica at once.
        authenticator=Authenticator(
            verifier=verifier, admin_enabled=settings.admin_enabled, revoked=traced.revocation
        ),
        metrics=Metrics(),
        readiness=WorkerReadiness(settings.ready_dir, settings.worker_count()),
        # Open mode never refuses to start for want of a key: with none configured it
        # signs with the secret the store keeps for every replica, obtained before the
        # worker is ready (until then the gate answers 503 not_ready, as for every store
        # route).
        lifecycle=StoreLifecycle(
            store, keys_from_store=not token_mode and not keys_configured(settings)
        ),
        no_issuer_reason=no_keys,
        tracing=tracing,
    )
    signers.install(runtime, keys)
    return assemble(runtime)
