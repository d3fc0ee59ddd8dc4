"""Where the Redis store's commands go.

With ``redis://`` that is the one server the URL names, for good. With
``redis+cluster://`` it is the master that owns the namespace's hash slot: every key of
a namespace carries the hash tag ``{sbus:<namespace>}``, so all of them sit in ONE slot
and every command of the store (scripts, MULTI snapshots, plain reads) goes to that one
node. redis-py's cluster client (``redis.asyncio.cluster.RedisCluster``, built from the
startup nodes) reads the cluster's slot map; the store's own connections (a redis-py
pool for plain commands and the script lanes, :mod:`sbus.storage.redis.lanes`) are
opened to the owner it names.

When the owner changes (a failover promoted a replica, or the slot was moved) the old
node refuses connections, or answers MOVED, READONLY or CLUSTERDOWN: the store calls
:meth:`Route.follow`, which reads the slot map again (or takes the node a MOVED
names) and, if the owner is another node, opens connections to it and retires the
old ones. Deciding whether the refused command may be sent again is the caller's
business: only one that surely did not run is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from sbus.storage.redis.lanes import Lanes
from sbus.storage.urls import cluster_nodes, redact_url

log = logging.getLogger("sbus.redis")

MAX_CONNECTIONS = 64  # per process for scripts, and as many for the other commands
POOL_WAIT_S = 10  # for a free connection, then 503 not_applied
CONNECT_S = 5  # one (re)connect, handshake included
RETIRE_AFTER_S = 30  # a retired node's connections still in use are closed after this


@dataclass(eq=False)
class Node:
    """Connections to one Redis server: a pool for plain commands, lanes for scripts."""

    address: str  # host:port, as shown in logs and errors
    pool: BlockingConnectionPool
    client: Redis
    lanes: Lanes

    @classmethod
    def open(cls, url: str, address: str) -> Node:
        pool = BlockingConnectionPool.from_url(
            url,
            decode_responses=True,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_WAIT_S,
            socket_connect_timeout=CONNECT_S,
        )
        lanes = Lanes(pool, MAX_CONNECTIONS, POOL_WAIT_S, CONNECT_S)
        return cls(address, pool, Redis(connection_pool=pool), lanes)

    async def close(self) -> None:
        await self.lanes.close()
        await self.client.aclose()
        await self.pool.disconnect()


class Route:
    """The one server of a ``redis://`` URL. :meth:`follow` has nowhere to go."""

    follows = False  # whether a refused command can be sent again elsewhere

    def __init__(self, url: str) -> None:
        self.url = url
        self.node: Node | None = None

    async def open(self) -> Node:
        if self.node is None:
            self.node = Node.open(self.url, redact_url(self.url))
        return self.node

    async def follow(self, failed: Node, moved_to: str | None = None) -> None:
        """Point :attr:`node` at where the slot now lives (a cluster only)."""

    async def close(self) -> None:
        node, self.node = self.node, None
        if node is not None:
            await node.close()


class ClusterRoute(Route):
    """The master owning the namespace's slot in a Redis Cluster, followed."""

    follows = True

    def __init__(
        self, url: str, tag: str, prepare: Callable[[Redis], Awaitable[None]] | None = None
    ) -> None:
        """``prepare`` readies a new owner before commands go to it (the store loads
        its scripts there: a promoted replica has none cached)."""
        super().__init__(url)
        self._prepare = prepare
        startup, self._userinfo, self._query = cluster_nodes(url)
        self.slot = key_slot(tag.encode())
        self._startup = startup
        self._lock = asyncio.Lock()
        self._retired: dict[Node, asyncio.Task[None]] = {}

    def node_url(self, address: str) -> str:
        return f"redis://{self._userinfo}{address}/0{self._query}"

    def cluster(self) -> RedisCluster:
        """redis-py's cluster client over the startup nodes (its slot map is what this
        route reads; it sends none of the store's commands)."""
        host, port = self._startup[0]
        return RedisCluster.from_url(
            self.node_url(address(host, port)),
            startup_nodes=[ClusterNode(h, p) for h, p in self._startup[1:]],
            decode_responses=True,
            socket_connect_timeout=CONNECT_S,
        )

    async def owner(self) -> str:
        """host:port of the master the cluster's slot map names for the namespace's
        slot, read now. Raises RedisError or OSError when no startup node answers.

        A fresh cluster client each time, closed at once: asking one client to read
        the map again leaves its old node objects to the garbage collector, which logs
        each as unclosed. A read costs one CLUSTER SLOTS, and happens only at start
        and when the slot's node refused a command."""
        cluster = self.cluster()
        try:
            await cluster.initialize()
            node = cluster.nodes_manager.get_node_from_slot(self.slot)
        except RedisClusterException as exc:  # not a RedisError: no slot map at all
            raise RedisError(str(exc)) from exc
        finally:
            await cluster.aclose()
        return address(node.host, int(node.port))

    async def open(self) -> Node:
        if self.node is None:
            address = await self.owner()
            self.node = Node.open(self.node_url(address), address)
        return self.node

    async def follow(self, failed: Node, moved_to: str | None = None) -> None:
        async with self._lock:
            if self.node is not failed:
                return  # another call followed already
            try:
                address = moved_to or await self.owner()
            except (RedisError, OSError) as exc:
                log.warning("Redis Cluster: cannot read the slot map: %s", exc)
                return
            if address == failed.address:
                return  # no new owner yet (a failover in progress): the caller waits
            log.warning(
                "Redis Cluster: slot %d of the namespace moved from %s to %s",
                self.slot,
                failed.address,
                address,
            )
            node = Node.open(self.node_url(address), address)
            if self._prepare is not None:
                try:
                    await self._prepare(node.client)
                except (RedisError, OSError) as exc:  # it is a shortcut, not a must
                    log.warning("Redis Cluster: cannot prepare %s: %s", address, exc)
            self.node = node
            self._retire(failed)

    def _retire(self, node: Node) -> None:
        """Close a node left behind once the calls still on it are surely over (each
        has a deadline); closing at once would break them mid-exchange."""

        async def later() -> None:
            await asyncio.sleep(RETIRE_AFTER_S)
            del self._retired[node]
            await node.close()

        self._retired[node] = asyncio.get_running_loop().create_task(later())

    async def close(self) -> None:
        await super().close()
        retired, self._retired = self._retired, {}
        for node, task in retired.items():
            task.cancel()
            await node.close()


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
