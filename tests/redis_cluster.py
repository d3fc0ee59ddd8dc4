"""The test Redis Cluster as the tests see it (``scripts/with-services.sh`` starts it):
its nodes and roles read from ``CLUSTER NODES``, a node stopped and resumed, a failover
awaited. Every reading goes to the nodes themselves, not through the store under test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sbus.storage.urls import cluster_nodes
from tests import backends


@dataclass(frozen=True)
class ClusterNode:
    id: str
    address: str  # host:port
    master: bool
    master_id: str  # a replica's master, "" for a master
    slots: tuple[tuple[int, int], ...]
    failed: bool

    def owns(self, slot: int) -> bool:
        return any(low <= slot <= high for low, high in self.slots)


async def command(c: aioredis.Redis, *args: Any) -> Any:
    """One command, its reply as redis-py parses it (its signature is untyped)."""
    return await c.execute_command(*args)  # type: ignore[no-untyped-call]


def client(address: str) -> aioredis.Redis:
    host, _, port = address.rpartition(":")
    return aioredis.Redis(host=host, port=int(port), decode_responses=True)


def startup_addresses() -> list[str]:
    nodes, _, _ = cluster_nodes(backends.REDIS_CLUSTER_URL)
    return [f"{h}:{p}" for h, p in nodes]


async def nodes() -> list[ClusterNode]:
    """``CLUSTER NODES`` as the first node that answers sees it."""
    for address in startup_addresses():
        c = client(address)
        try:
            text = str(await command(c, "CLUSTER", "NODES"))
        except (RedisError, OSError):
            continue
        finally:
            await c.aclose()
        return [_node(line) for line in text.splitlines() if line.strip()]
    raise AssertionError("no node of the test Redis Cluster answers")


def _node(line: str) -> ClusterNode:
    fields = line.split()
    flags = fields[2].split(",")
    slots: list[tuple[int, int]] = []
    for part in fields[8:]:
        if part.startswith("["):
            continue  # a slot being migrated or imported
        low, _, high = part.partition("-")
        slots.append((int(low), int(high or low)))
    return ClusterNode(
        fields[0],
        fields[1].split("@")[0],
        "master" in flags,
        "" if fields[3] == "-" else fields[3],
        tuple(slots),
        "fail" in flags or "fail?" in flags,
    )


async def keyslot(key: str) -> int:
    c = client(startup_addresses()[0])
    try:
        return int(await command(c, "CLUSTER", "KEYSLOT", key))
    finally:
        await c.aclose()


async def owner(slot: int) -> ClusterNode:
    found = [n for n in await nodes() if n.master and not n.failed and n.owns(slot)]
    assert len(found) == 1, f"slot {slot} owned by {found}"
    return found[0]


async def replica_of(master: ClusterNode) -> ClusterNode:
    found = [n for n in await nodes() if n.master_id == master.id and not n.failed]
    assert found, f"{master.address} has no replica"
    return found[0]


async def info(address: str, section: str) -> dict[str, str]:
    c = client(address)
    try:
        found = await c.info(section)
    finally:
        await c.aclose()
    return {str(k): str(v) for k, v in found.items()}


async def cluster_state(address: str) -> str:
    c = client(address)
    try:
        text = str(await command(c, "CLUSTER", "INFO"))
    finally:
        await c.aclose()
    for line in text.splitlines():
        if line.startswith("cluster_state:"):
            return line.split(":", 1)[1].strip()
    return ""


async def pid(address: str) -> int:
    return int((await info(address, "server"))["process_id"])


@contextlib.asynccontextmanager
async def stopped(address: str) -> AsyncIterator[int]:
    """The node's process stopped (SIGSTOP) inside the block, resumed (SIGCONT) after
    it whatever happens; yields its pid (a test may resume it earlier)."""
    process = await pid(address)
    os.kill(process, signal.SIGSTOP)
    try:
        yield process
    finally:
        os.kill(process, signal.SIGCONT)


async def wait_for(what: str, check: object, timeout_s: float = 30.0) -> None:
    """Poll the async predicate ``check`` until it holds; fail naming ``what`` after
    ``timeout_s`` (a bound on a broken cluster, not a timing the test relies on)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(RedisError, OSError):
            if await check():  # type: ignore[operator]
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"the test Redis Cluster never reached: {what}")
        await asyncio.sleep(0.1)


async def healthy() -> bool:
    """Every node reachable and ok, and each master with a replica attached."""
    listed = await nodes()
    for node in listed:
        if node.failed or await cluster_state(node.address) != "ok":
            return False
    masters = [n for n in listed if n.master and n.slots]
    return all(any(r.master_id == m.id for r in listed) for m in masters)
