"""W3C trace context on every request (extra ``sbus-client[otel]``): when
``opentelemetry-api`` is importable, each request carries the ``traceparent`` (and
``tracestate``, baggage) of the caller's current span, injected by the propagators the
application configured, so the bus's span of the request joins the caller's trace
(the bus's docs/observability.md). Without the package, or outside any span, the
headers are left as they are."""

from __future__ import annotations

try:
    from opentelemetry import propagate
except ImportError:  # the extra is not installed: nothing to propagate
    propagate = None  # type: ignore[assignment]


Headers = tuple[tuple[str, str], ...]


def with_trace_context(headers: Headers) -> Headers:
    """``headers`` plus the current trace context's headers, if there is one."""
    if propagate is None:
        return headers
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return headers
    return (*headers, *carrier.items())
