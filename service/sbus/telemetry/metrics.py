"""Prometheus metrics: request-latency histograms per route (multiprocess-safe when
``PROMETHEUS_MULTIPROC_DIR`` is set, as ``sbus serve --workers N`` does; observed by
``sbus.telemetry.requests``) and the store's counters rendered at scrape time, so every
replica reports the same numbers."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

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
