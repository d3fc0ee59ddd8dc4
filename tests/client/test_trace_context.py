"""The SDK sends the caller's W3C trace context (``sbus_client._trace``, extra
``sbus-client[otel]``): inside a span every request carries its ``traceparent``, and a
traced bus makes its server span a child of it; outside any span nothing is added."""

from __future__ import annotations

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from sbus.telemetry.tracing import Tracing
from sbus_client import AsyncBus, Bus, _trace
from sbus_client.testing import LocalBus
from tests.telemetry.helpers import build, serve

# The caller's own tracer: not the global provider, which a test must not set.
CALLER = TracerProvider().get_tracer("agent")


def _parent(span: object) -> str:
    context = span.get_span_context()  # type: ignore[attr-defined]
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


class Recording(httpx.BaseTransport):
    """Forwards to the in-process bus and keeps each request's traceparent."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.seen: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request.headers.get("traceparent"))
        return self.inner.handle_request(request)


def test_the_sync_client_sends_the_current_span_and_nothing_outside_one() -> None:
    with LocalBus() as local:
        recording = Recording(local.http._transport)
        http = httpx.Client(transport=recording)
        bus = Bus(local.url, agent_id="A", http_client=http)
        with bus.session() as s:
            s.create("k", "0")
            recording.seen.clear()
            with CALLER.start_as_current_span("agent step") as span:
                s.read("k")
                s.commit("k", "1", expected=0)
            inside = list(recording.seen)
            recording.seen.clear()
            s.read("k")
    assert inside == [_parent(span)] * 2
    assert recording.seen and set(recording.seen) == {None}  # (the session's close too)


async def test_the_async_client_joins_the_bus_trace() -> None:
    exporter = InMemorySpanExporter()
    app = build("lean", tracing=Tracing.with_processors([SimpleSpanProcessor(exporter)]))
    async with serve(app) as client:
        bus = AsyncBus("http://localhost", agent_id="A", http_client=client)
        async with bus.session() as s:
            await s.create("k", "0")
            exporter.clear()
            with CALLER.start_as_current_span("agent step") as span:
                await s.read("k")
    servers = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    [server] = [s for s in servers if s.name == "GET /shard/{key:path}"]
    assert server.parent is not None
    mine = span.get_span_context()
    assert (server.context.trace_id, server.parent.span_id) == (mine.trace_id, mine.span_id)


def test_without_opentelemetry_the_headers_are_untouched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    headers = (("X-Agent-Id", "A"),)
    with CALLER.start_as_current_span("agent step"):
        assert dict(_trace.with_trace_context(headers))["traceparent"]
        monkeypatch.setattr(_trace, "propagate", None)
        assert _trace.with_trace_context(headers) is headers
