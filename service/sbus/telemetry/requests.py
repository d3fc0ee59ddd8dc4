"""The one piece every request passes, whichever handler serves it (the lean hot path of
``sbus.api.lean`` or FastAPI's): its id, its latency histogram, its log line and, when
tracing is on, its server span.

- ``X-Request-Id``: the request's own when it sent 1-128 printable ASCII characters,
  else a new one; on every response, refusals included.
- One ``sbus.request`` log line at INFO (``sbus.telemetry.logs``): ``request_id``,
  ``method``, ``route`` (the matched template, never the raw path), ``status``,
  ``outcome`` (an error code, ``committed``, ``replayed`` or ``ok``), ``agent``,
  ``session``, ``duration_ms``, and ``trace_id`` when traced. Built only when the
  logger is enabled for INFO.
- The latency histogram (``sbus.telemetry.metrics``), labelled by route template.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sbus.telemetry.exchange import HEADER, INTERNAL, SCOPE_KEY, Exchange, request_id
from sbus.telemetry.logs import FIELDS, REQUEST_LOGGER, direct_handler
from sbus.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from sbus.telemetry.tracing import Tracing

_HEADER_NAME = HEADER.lower().encode()
_log = logging.getLogger(REQUEST_LOGGER)
_INFO = logging.INFO
UNMATCHED = "unmatched"


class Observe:
    def __init__(self, app: ASGIApp, metrics: Metrics, tracing: Tracing | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        exchange = Exchange(request_id(scope["headers"]))
        scope[SCOPE_KEY] = exchange
        header = (_HEADER_NAME, exchange.request_id.encode("ascii"))
        status = 500

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        tracing = self.tracing
        if tracing is None:
            try:
                await self.app(scope, receive, send_observed)
            except Exception:
                # Answered 500 InternalError from outside this middleware.
                exchange.outcome = INTERNAL
                raise
            finally:
                self._report(scope, exchange, status, time.perf_counter() - started, None)
            return
        span = tracing.begin(scope, exchange)
        failure: BaseException | None = None
        try:
            await self.app(scope, receive, send_observed)
        except BaseException as exc:
            failure = exc
            if isinstance(exc, Exception):
                exchange.outcome = INTERNAL
            raise
        finally:
            template = _template(scope)
            tracing.end(span, exchange, template, status, failure)
            trace_id = tracing.trace_id(span)
            self._report(scope, exchange, status, time.perf_counter() - started, trace_id)

    def _report(
        self,
        scope: Scope,
        exchange: Exchange,
        status: int,
        elapsed: float,
        trace_id: str | None,
    ) -> None:
        template = _template(scope)
        method = scope["method"]
        self.metrics.latency.labels(method, template, str(status)).observe(elapsed)
        if not _log.isEnabledFor(_INFO):
            return
        fields: dict[str, Any] = {
            "request_id": exchange.request_id,
            "method": method,
            "route": template,
            "status": status,
            "outcome": exchange.result(status),
            "agent": exchange.agent,
            "session": exchange.session,
            "duration_ms": round(elapsed * 1000, 3),
        }
        if trace_id is not None:
            fields["trace_id"] = trace_id
        handler = direct_handler(_log)
        if handler is not None:
            handler.write_fields(fields)
        else:
            _log.info("request", extra={FIELDS: fields})


def _template(scope: Scope) -> str:
    return getattr(scope.get("route"), "path", UNMATCHED)
