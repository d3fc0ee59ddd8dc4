"""What an app serves from: one :class:`Runtime`, the only thing on ``app.state``
(``app.state.runtime``; read it with :func:`runtime_of`).

The API layer builds nothing here. ``sbus.bootstrap`` builds the runtime (keys, store,
engine, signers) and owns the store's lifecycle behind the small :class:`Lifecycle`
port, which the app's lifespan starts and stops: the API never sees a store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from starlette.applications import Starlette

from sbus.api.auth import Authenticator
from sbus.api.readiness import WorkerReadiness
from sbus.config import Settings
from sbus.core.engine import Bus
from sbus.core.errors import StoreMisconfigured, StoreUnavailable
from sbus.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from sbus.telemetry.tracing import Tracing

NOT_CONNECTED = "store not connected yet"


class Lifecycle(Protocol):
    """The store's life around the app's: what the lifespan starts and stops."""

    async def start(self, runtime: Runtime) -> None:
        """Begin connecting and return at once: the listener must answer ``/livez``
        (and ``/admin/health`` 503 not_ready) before the store does. The work goes on
        in the background and moves ``runtime`` between ready and not ready."""
        ...

    async def stop(self, runtime: Runtime) -> None:
        """Withdraw this worker's readiness, cancel the background work and close the
        store. Returns once all of it is done."""
        ...


def public_reason(exc: StoreUnavailable) -> str:
    """What an unauthenticated caller of /admin/health in token mode may learn: the
    driver's detail names the store's host and port, so only the kind of failure."""
    if isinstance(exc, StoreMisconfigured):
        return "store misconfigured (the server log says how)"
    return "store unreachable"


@dataclass(eq=False, slots=True)
class Runtime:
    """Everything the routes, the gate and the OpenAPI document read, typed.

    The engine (``bus``) holds the signers of POST /admin/tokens and POST /mandates
    (``sbus.bootstrap.signers.install``); without keys they answer 503
    SigningUnavailable naming ``no_issuer_reason``. In open mode without configured keys
    they arrive once the store's secret does."""

    settings: Settings
    bus: Bus
    authenticator: Authenticator
    metrics: Metrics
    readiness: WorkerReadiness
    lifecycle: Lifecycle
    no_issuer_reason: str | None = None
    # OpenTelemetry, when OTEL_TRACES_EXPORTER turns it on (also the engine's tracer).
    tracing: Tracing | None = None
    ready: bool = False
    # Why not ready: the operator's words (open mode, the log) and the public ones.
    not_ready_reason: str | None = NOT_CONNECTED
    not_ready_public: str = NOT_CONNECTED
    # Set when the worker's stop begins (SIGTERM): /admin/health answers 503 from then
    # on while every route still serves until the listener closes.
    stopping: bool = False

    async def start(self) -> None:
        await self.lifecycle.start(self)

    async def stop(self) -> None:
        try:
            await self.lifecycle.stop(self)
        finally:
            if self.tracing is not None:
                # Export what is still queued (the console exporter prints it now).
                self.tracing.shutdown()

    def mark_ready(self) -> None:
        self.ready = True
        self.not_ready_reason = None
        if not self.stopping:
            self.readiness.mark_ready()

    def begin_stopping(self) -> None:
        """Answer 503 on /admin/health from now on, and no longer count as a ready
        worker of this server; the routes keep serving."""
        self.stopping = True
        self.readiness.clear()

    def mark_not_ready(self, exc: StoreUnavailable) -> None:
        """Refuse store routes (503) and withdraw this worker's ready marker."""
        self.ready = False
        self.not_ready_reason = exc.detail
        self.not_ready_public = public_reason(exc)
        self.readiness.clear()


def runtime_of(app: Starlette) -> Runtime:
    """The app's runtime (set once, by :func:`sbus.api.app.assemble`)."""
    return cast(Runtime, app.state.runtime)
