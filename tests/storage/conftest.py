"""The store suites (conformance, change log, audit log) run on every backend and on the
Redis store over a Redis Cluster."""

from __future__ import annotations

import pytest

from tests import backends
from tests.conftest import STORES_AND_CLUSTER


@pytest.fixture(params=STORES_AND_CLUSTER)
async def store_kind(request: pytest.FixtureRequest) -> str:
    """Every store backend, and the Redis store on a Redis Cluster; the shared servers
    are wiped before each test."""
    kind: str = request.param
    await backends.require(kind)
    await backends.wipe(kind)
    return kind
