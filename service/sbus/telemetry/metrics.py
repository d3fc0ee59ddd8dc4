"""Prometheus metrics: request-latency histograms per route (multiprocess-safe when
``PROMETHEUS_MULTIPROC_DIR`` is set, as ``sbus serve --workers N`` does) and the
store's counters rendered at scrape time, so every replica reports the same numbers."""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sbus.core.types import StoreStats

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "sbus_request_duration_seconds",
            "HTTP request latency by method, route template and status",
            ["method", "route", "status"],
            buckets=BUCKETS,
            registry=self.registry,
        )

    def exposition(self, stats: StoreStats) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            histograms = generate_latest(registry)
        else:
            histograms = generate_latest(self.registry)
        c = stats.counters
        lines = [
            (
                "sbus_commits_total",
                "counter",
                "Successful commits, rollbacks and deletes",
                c.total_commits,
            ),
            (
                "sbus_conflicts_total",
                "counter",
                "409 VersionMismatch rejections",
                c.total_conflicts,
            ),
            (
                "sbus_cross_stale_total",
                "counter",
                "409 CrossShardStale rejections",
                c.cross_shard_stale,
            ),
            ("sbus_shards_total", "gauge", "Live shards", stats.total_shards),
        ]
        text = "".join(
            f"# HELP {name} {help_}\n# TYPE {name} {kind}\n{name} {value}\n"
            for name, kind, help_, value in lines
        )
        return text.encode() + histograms


class Timing:
    """Observes request latency; the route label is the matched template, never the
    raw path, so label cardinality stays bounded."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.metrics.latency.labels(scope["method"], template, str(status)).observe(
                time.perf_counter() - started
            )
