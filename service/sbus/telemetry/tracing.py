"""Tracing with the OpenTelemetry SDK, on only when ``OTEL_TRACES_EXPORTER`` names an
exporter (docs/observability.md).

The SDK configures itself from the standard variables: the exporters
``OTEL_TRACES_EXPORTER`` names are found by the SDK's own functions (its entry points,
``OTEL_EXPORTER_OTLP_PROTOCOL`` choosing between the gRPC and HTTP OTLP exporters), the
resource reads ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (the service is
``sbus`` unless they name one), the sampler ``OTEL_TRACES_SAMPLER``, the batch
processor ``OTEL_BSP_*``, the exporters their ``OTEL_EXPORTER_*`` variables, and the
incoming context is read with the propagators of ``OTEL_PROPAGATORS`` (W3C
``traceparent`` by default). Nothing here parses one of them. Each app has its own
provider; the global one is left alone.

A request gets one server span (:meth:`Tracing.begin`, from
``sbus.telemetry.requests``), named by its method and route template, a child of the
caller's ``traceparent``; the gate and the engine add their steps as child spans
through the :class:`sbus.core.tracing.Tracer` port this class implements, and every
store call in a request is a ``store.<operation>`` client span (:class:`TracedStore`).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk._configuration import _get_exporter_names, _import_exporters
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import Scope

from sbus import __version__
from sbus.core import errors as e
from sbus.core import tracing as tr
from sbus.core.store import Store
from sbus.telemetry.exchange import Exchange

DEFAULT_SERVICE = "sbus"
ENABLE = "OTEL_TRACES_EXPORTER"
# Request span attributes of the telemetry layer (the engine's are in sbus.core.tracing).
AGENT = "sbus.agent"
SESSION = "sbus.session"
OUTCOME = "sbus.outcome"
REQUEST_ID = "sbus.request_id"
# OpenTelemetry's database names of the stores.
DB_SYSTEM = {"postgres": "postgresql", "postgresql": "postgresql", "sqlite": "sqlite"}

_STATE = otel_context.create_key("sbus.request")


def exporters() -> list[type[SpanExporter]]:
    """The exporter classes ``OTEL_TRACES_EXPORTER`` names, found by the SDK (none:
    tracing is off). RuntimeError names what cannot be found."""
    names = _get_exporter_names("traces")
    if not names:
        return []
    found, _, _ = _import_exporters(names, [], [])
    return list(found.values())


def problem() -> str | None:
    """Why the tracing configuration cannot serve, or None."""
    try:
        exporters()
    except (RuntimeError, ImportError, ValueError) as exc:
        return f"{ENABLE}: {exc}"
    return None


def _resource() -> Resource:
    resource = Resource.create({SERVICE_VERSION: __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE}))
    return resource


class _Headers(Getter[list[tuple[bytes, bytes]]]):
    """Reads propagation headers straight from the ASGI header list."""

    def get(self, carrier: list[tuple[bytes, bytes]], key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        found = [value.decode("latin-1") for k, value in carrier if k == name]
        return found or None

    def keys(self, carrier: list[tuple[bytes, bytes]]) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


_HEADERS = _Headers()


@dataclass(slots=True)
class RequestSpan:
    """One request's server span and the context it runs in."""

    span: trace.Span
    context: otel_context.Context
    token: object
    method: str


class Tracing:
    """The app's OpenTelemetry side: its provider and tracer, the request spans, and the
    engine's :class:`sbus.core.tracing.Tracer` port."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("sbus", __version__)

    @classmethod
    def from_environment(cls) -> Tracing | None:
        """The tracing ``OTEL_*`` configures, or None when it is off."""
        found = exporters()
        if not found:
            return None
        return cls.with_processors([BatchSpanProcessor(exporter()) for exporter in found])

    @classmethod
    def with_processors(cls, processors: list[SpanProcessor]) -> Tracing:
        """Tracing into ``processors`` (tests hand in an in-memory exporter's)."""
        provider = TracerProvider(resource=_resource())
        for processor in processors:
            provider.add_span_processor(processor)
        return cls(provider)

    def shutdown(self) -> None:
        """Export what is queued and stop the exporters."""
        self.provider.shutdown()

    # ---- the request span (sbus.telemetry.requests) --------------------------------

    def begin(self, scope: Scope, exchange: Exchange) -> RequestSpan:
        method: str = scope["method"]
        parent = propagate.extract(scope["headers"], getter=_HEADERS)
        span = self.tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": scope["path"],
                "url.scheme": scope.get("scheme", "http"),
                REQUEST_ID: exchange.request_id,
            },
        )
        context = otel_context.set_value(
            _STATE, (span, exchange), trace.set_span_in_context(span, parent)
        )
        return RequestSpan(span, context, otel_context.attach(context), method)

    def end(
        self,
        request: RequestSpan,
        exchange: Exchange,
        template: str,
        status: int,
        failure: BaseException | None,
    ) -> None:
        span = request.span
        try:
            if exchange.done_ns is not None:
                # From the use case's answer to the response's last byte.
                render = self.tracer.start_span(
                    tr.RENDER, context=request.context, start_time=exchange.done_ns
                )
                render.end()
            if template != "unmatched":
                span.update_name(f"{request.method} {template}")
                span.set_attribute("http.route", template)
            span.set_attribute("http.response.status_code", status)
            span.set_attribute(OUTCOME, exchange.result(status))
            if exchange.agent is not None:
                span.set_attribute(AGENT, exchange.agent)
                span.set_attribute(SESSION, exchange.session or "")
            if failure is not None:
                span.record_exception(failure)
            if status >= 500 or failure is not None:
                span.set_status(Status(StatusCode.ERROR, exchange.result(status)))
            span.end()
        finally:
            otel_context.detach(cast(Any, request.token))

    @staticmethod
    def trace_id(request: RequestSpan) -> str:
        return format(request.span.get_span_context().trace_id, "032x")

    # ---- the engine's port (sbus.core.tracing.Tracer) ------------------------------

    @contextmanager
    def phase(self, name: str) -> Iterator[object]:
        with self.tracer.start_as_current_span(
            name, record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                yield span
            except BaseException as exc:
                _failed(span, exc)
                raise

    def annotate(self, attributes: Mapping[str, tr.AttributeValue]) -> None:
        state = otel_context.get_value(_STATE)
        if state is not None:
            span, _ = cast(tuple[trace.Span, Exchange], state)
            span.set_attributes(attributes)

    def finished(self) -> None:
        state = otel_context.get_value(_STATE)
        if state is not None:
            _, exchange = cast(tuple[trace.Span, Exchange], state)
            exchange.done_ns = time.time_ns()

    def traced_store(self, store: Store) -> Store:
        return cast(Store, TracedStore(store, self.tracer))


def _failed(span: trace.Span, exc: BaseException) -> None:
    """A refusal (an error code of the protocol) names its code; anything else, and a
    store outage, also marks the span failed."""
    if isinstance(exc, e.SBusError):
        span.set_attribute("error.type", exc.code)
        if not isinstance(exc, e.StoreUnavailable):
            return
    else:
        span.set_attribute("error.type", type(exc).__qualname__)
        span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, str(exc)))


class TracedStore:
    """A store whose every call made inside a traced request is a ``store.<operation>``
    client span (``db.system.name``, ``db.operation.name``); anything else reaches the
    store unchanged. Installed only while tracing is on."""

    def __init__(self, store: Store, tracer: trace.Tracer) -> None:
        self._store = store
        self._tracer = tracer
        self._system = DB_SYSTEM.get(store.backend, store.backend)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if not inspect.iscoroutinefunction(target):
            return target
        wrapped = self._wrap(name, target)
        setattr(self, name, wrapped)  # found here from now on, without __getattr__
        return wrapped

    def _wrap(
        self, name: str, target: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        span_name = f"store.{name}"
        attributes = {"db.system.name": self._system, "db.operation.name": name}
        tracer = self._tracer

        async def call(*args: Any, **kwargs: Any) -> Any:
            if not trace.get_current_span().is_recording():
                return await target(*args, **kwargs)
            with tracer.start_as_current_span(
                span_name,
                kind=SpanKind.CLIENT,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    return await target(*args, **kwargs)
                except BaseException as exc:
                    _failed(span, exc)
                    raise

        return call
