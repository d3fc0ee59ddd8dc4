"""``sbus serve --workers 2``: once /admin/health says ready, every worker is ready.

The workers share one listening socket, so whichever worker the kernel hands a new
connection to must already have its store: a client told "ready" must never meet a 503
``not_ready``. Each request below opens a fresh connection, so they spread over both
workers. The second worker is held back by ``SBUS_TEST_CONNECT_DELAY_MS`` (a test hook), so
a health check that only asked the worker answering it would say ready seconds too early
(the readiness markers themselves are unit-tested in tests/unit/test_readiness.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.concurrency.conftest import (
    POSTGRES_2,
    REDIS_2,
    ServerStarter,
    Topology,
    prepare_store,
)

pytestmark = pytest.mark.concurrency

FRESH_CONNECTIONS = 60
# The second worker connects this much later (SBUS_TEST_CONNECT_DELAY_MS): long enough
# that a health check answered by the first worker alone would say ready too early.
LAG_MS = 2500


@pytest.mark.parametrize("topology", [POSTGRES_2, REDIS_2], ids=str)
def test_ready_means_every_worker_is_ready(
    topology: Topology, start_sbus: ServerStarter, tmp_path: Path
) -> None:
    store = prepare_store(topology, tmp_path)
    began = time.monotonic()
    env = {"SBUS_TEST_CONNECT_DELAY_MS": str(LAG_MS)}
    server = start_sbus(store, env, workers=2)  # returns once /admin/health answered 200
    assert time.monotonic() - began >= LAG_MS / 1000
    statuses = []
    for _ in range(FRESH_CONNECTIONS):
        with httpx.Client(base_url=server.base_url, trust_env=False, timeout=10) as client:
            statuses.append(client.get("/shards").status_code)
    assert statuses == [200] * FRESH_CONNECTIONS
    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=10) as client:
        health = client.get("/admin/health")
    assert (health.status_code, health.json()["status"]) == (200, "ok")
