"""The Redis store on a Redis Cluster (``redis+cluster://``, docs/redis.md): the URL,
routing by the namespace's hash slot, following the slot when it moves (ASK, MOVED) or
its master fails over, and replica acknowledgement (``SBUS_REDIS_WAIT_REPLICAS``,
also on a plain ``redis://``). Runs on the cluster ``scripts/with-services.sh`` starts
(``SBUS_TEST_REDIS_CLUSTER_URL``); unreachable, it FAILS (``tests/backends.py``)."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from pydantic import ValidationError
from redis.crc import key_slot

from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app
from sbus.config import Settings
from sbus.core import errors as e
from sbus.core.engine import commit_txn, new_commit_id
from sbus.core.types import CreateOp, Limits, Txn, WriteOp
from sbus.storage.factory import UnknownStore, open_store
from sbus.storage.redis import RedisStore
from sbus.storage.urls import redact_url
from sbus_client import AsyncBus
from sbus_client._retry import TransportRetry
from tests import backends
from tests import redis_cluster as rc

LIMITS = Limits(session_ttl_ms=10_000, max_dl_entries=3, history_depth=5, history_max_bytes=4096)
URL = backends.REDIS_CLUSTER_URL
StoreFactory = Callable[..., Awaitable[RedisStore]]


def create(key: str, content: str = "v0") -> CreateOp:
    return CreateOp(key, content, "", False, "", new_commit_id())


def commit(key: str, expected: int, content: str) -> Txn:
    return commit_txn(
        op="commit",
        agent_id="A",
        session_id="",
        writes=[WriteOp(key, expected, "commit", content)],
        read_set=[],
        rationale=None,
        idem=None,
    )


@pytest.fixture
async def make_store() -> AsyncIterator[StoreFactory]:
    """Cluster stores, each in a namespace of its own unless told; the cluster is
    emptied first."""
    await backends.require("redis-cluster")
    await backends.wipe("redis-cluster")
    stores: list[RedisStore] = []

    async def build(namespace: str | None = None, **options: Any) -> RedisStore:
        store = RedisStore(URL, LIMITS, namespace or f"t{uuid.uuid4().hex[:10]}", **options)
        await store.start()
        stores.append(store)
        return store

    yield build
    for store in stores:
        await store.close()


class TestURL:
    def test_the_factory_opens_a_cluster_store(self) -> None:
        store = open_store("redis+cluster://h1:7001,[::1]:7002/0?namespace=blue", LIMITS)
        assert isinstance(store, RedisStore) and store.cluster
        assert store.tag == "{sbus:blue}"
        assert store.backend == "redis"  # the Redis store, routed by slot
        assert not RedisStore("redis://h:1/0", LIMITS).cluster

    @pytest.mark.parametrize(
        ("url", "message"),
        [
            ("redis+cluster://h1:7001/2", "Redis Cluster has only database 0, not /2"),
            ("redis+cluster://h1:7001,h2", "Redis Cluster node 'h2' is not HOST:PORT"),
            ("redis+cluster://", "Redis Cluster node '' is not HOST:PORT"),
            ("redis+cluster://h1:99999", "Redis Cluster node 'h1:99999' is not HOST:PORT"),
        ],
        ids=["database-2", "no-port", "no-node", "port-out-of-range"],
    )
    def test_a_bad_cluster_url_is_refused_at_once(self, url: str, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            open_store(url, LIMITS)

    async def test_every_script_call_names_a_key(self) -> None:
        """A cluster routes a script by its keys: a call naming none is a bug, refused
        before anything is sent (every call of the store names one; the conformance
        suite runs all of them on the cluster)."""
        with pytest.raises(ValueError, match="script now named no key"):
            await RedisStore(URL, LIMITS)._eval("now", [], [])

    def test_other_schemes_are_not_cluster_urls(self) -> None:
        with pytest.raises(UnknownStore, match=r"redis\+cluster://HOST:PORT,HOST:PORT"):
            open_store("redis-cluster://h1:7001", LIMITS)

    def test_the_password_is_redacted(self) -> None:
        url = "redis+cluster://u:secret@h1:1,h2:2/0?password=other&namespace=n"
        assert redact_url(url) == "redis+cluster://u:***@h1:1,h2:2/0?password=***&namespace=n"

    @pytest.mark.parametrize(
        ("name", "value"),
        [("SBUS_REDIS_WAIT_REPLICAS", "-1"), ("SBUS_REDIS_WAIT_TIMEOUT_MS", "0")],
    )
    def test_bad_wait_settings_are_refused(
        self, monkeypatch: pytest.MonkeyPatch, name: str, value: str
    ) -> None:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError, match=name.removeprefix("SBUS_").lower()):
            Settings()

    def test_wait_settings_reach_the_store(self) -> None:
        settings = Settings(store=URL, redis_wait_replicas=1, redis_wait_timeout_ms=250)
        store = open_store(settings.store, LIMITS, redis_wait=settings.redis_wait())
        assert isinstance(store, RedisStore)
        assert (store.wait_replicas, store.wait_timeout_ms) == (1, 250)
        assert Settings().redis_wait() == (0, 1000)


class TestRouting:
    async def test_namespaces_spread_over_the_masters(self, make_store: StoreFactory) -> None:
        """Each namespace is one slot on one master; several land on several masters,
        and every key of one lives on its own master only."""
        stores = [await make_store(f"fleet{i}") for i in range(8)]
        listed = await rc.nodes()
        masters = {n.address: n for n in listed if n.master and not n.failed}
        used: set[str] = set()
        for store in stores:
            await store.create(create("plan"))
            await store.apply(commit("plan", 0, "v1"))
            slot = await rc.keyslot(store.tag)
            assert slot == key_slot(store.tag.encode())
            address = store.node().address
            assert masters[address].owns(slot), f"{store.tag} sent to {address}"
            used.add(address)
            for other in masters:
                node = rc.client(other)
                try:
                    held = await rc.command(node, "CLUSTER", "COUNTKEYSINSLOT", slot)
                finally:
                    await node.aclose()
                assert (int(held) > 0) == (other == address)
        assert len(used) >= 2, used

    async def test_a_migrating_slot_is_followed_by_ask_then_moved(
        self, make_store: StoreFactory
    ) -> None:
        """Resharding the namespace's slot live. While it migrates, the old owner answers
        ASK for keys it no longer holds: a script whose keys all moved runs on the
        importing node after ASKING; one that also names absent keys (a commit names
        its DeliveryLog and idempotency keys) is answered TRYAGAIN there, and is tried
        again until the slot is assigned. Then the old owner answers MOVED, and the
        store goes to the new one for good."""
        store = await make_store()
        await store.create(create("k"))
        slot = key_slot(store.tag.encode())
        source = await rc.owner(slot)
        target = next(n for n in await rc.nodes() if n.master and n.address != source.address)
        to, frm = rc.client(target.address), rc.client(source.address)
        try:
            await rc.command(to, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.id)
            await rc.command(frm, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.id)
            keys = await rc.command(frm, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
            host, _, port = target.address.rpartition(":")
            await rc.command(frm, "MIGRATE", host, port, "", 0, 5000, "KEYS", *keys)
            # every key of the history script moved: ASK, then ASKING on the target
            assert [h.version for h in await store.history("k", None, 10)] == [0]
            assert store.node().address == source.address  # ASK moves one command only
            pending = asyncio.create_task(store.apply(commit("k", 0, "during")))
            await asyncio.sleep(0.2)  # (it may or may not have been tried by now)
            for node in (to, frm):
                await rc.command(node, "CLUSTER", "SETSLOT", slot, "NODE", target.id)
            out = await pending
        finally:
            await to.aclose()
            await frm.aclose()
        assert out.body is not None and out.body["new_version"] == 1
        out = await store.apply(commit("k", 1, "after"))
        assert out.body is not None and out.body["new_version"] == 2
        assert store.node().address == target.address  # the old owner answered MOVED
        assert (await store.read("k", None, "", False)).content == "after"
        assert [h.version for h in await store.history("k", None, 10)] == [2, 1, 0]

    async def test_a_failover_is_followed(self, make_store: StoreFactory) -> None:
        """The slot's replica takes over (CLUSTER FAILOVER): the old master turns
        replica and answers MOVED; the store finds the new master and carries on."""
        store = await make_store()
        await store.create(create("k"))
        slot = key_slot(store.tag.encode())
        old = await rc.owner(slot)
        replica = await rc.replica_of(old)
        assert store.node().address == old.address
        promoted = rc.client(replica.address)
        try:
            await rc.command(promoted, "CLUSTER", "FAILOVER")
        finally:
            await promoted.aclose()

        async def took_over() -> bool:
            return (await rc.owner(slot)).address == replica.address

        await rc.wait_for("the replica owns the slot", took_over)
        out = await store.apply(commit("k", 0, "after failover"))
        assert out.body is not None and out.body["new_version"] == 1
        assert store.node().address == replica.address
        assert (await store.read("k", "A", "", True)).version == 1
        await rc.wait_for("every master has a replica", rc.healthy)


class TestReplicaAcknowledgement:
    async def test_an_acknowledged_commit_is_on_the_replica(self, make_store: StoreFactory) -> None:
        store = await make_store(wait_replicas=1, wait_timeout_ms=5000)
        await store.create(create("k"))
        await store.apply(commit("k", 0, "acknowledged"))
        replica = rc.client(
            (await rc.replica_of(await rc.owner(key_slot(store.tag.encode())))).address
        )
        try:
            await rc.command(replica, "READONLY")
            row = await replica.hmget(store.k_shard("k"), ["version", "content"])
        finally:
            await replica.aclose()
        assert row == ["1", "acknowledged"]

    async def test_a_stopped_replica_makes_a_commit_unknown(self, make_store: StoreFactory) -> None:
        """Fewer acknowledgements than required in time: 503 unknown (the commit is on
        the master). A refusal is still answered as one: it changed nothing."""
        store = await make_store(wait_replicas=1, wait_timeout_ms=200)
        await store.create(create("k"))
        replica = await rc.replica_of(await rc.owner(key_slot(store.tag.encode())))
        async with rc.stopped(replica.address):
            with pytest.raises(e.StoreUnavailable) as info:
                await store.apply(commit("k", 0, "unacknowledged"))
            assert info.value.fields["outcome"] == "unknown"
            assert "0 of 1 Redis replicas acknowledged commit" in info.value.detail
            with pytest.raises(e.VersionMismatch):
                await store.apply(commit("k", 0, "stale"))
        assert (await store.read("k", None, "", False)).version == 1  # on the master

    async def test_plain_redis_waits_too(self) -> None:
        """The same on a single server (``redis://``): the test server has no replica,
        so a write waiting for one is unknown; without waiting it is acknowledged."""
        await backends.require("redis")
        namespace = f"t{uuid.uuid4().hex[:10]}"
        waiting = RedisStore(
            backends.REDIS_URL, LIMITS, namespace, wait_replicas=1, wait_timeout_ms=50
        )
        plain = RedisStore(backends.REDIS_URL, LIMITS, namespace)
        await waiting.start()
        await plain.start()
        try:
            with pytest.raises(e.StoreUnavailable) as info:
                await waiting.create(create("k"))
            assert info.value.fields["outcome"] == "unknown"
            out = await plain.create(create("j"))
            assert out.status == 201
        finally:
            await plain.reset_all()
            await waiting.close()
            await plain.close()


async def _app(namespace: str, **settings: Any) -> tuple[LifespanManager, FastAPI]:
    app = create_app(Settings(store=f"{URL}?namespace={namespace}", admin_enabled=True, **settings))
    manager = LifespanManager(app)
    await manager.__aenter__()
    for _ in range(500):
        if runtime_of(app).ready:
            break
        await asyncio.sleep(0.01)
    assert runtime_of(app).ready, runtime_of(app).not_ready_reason
    return manager, app


@pytest.fixture
async def apps() -> AsyncIterator[Callable[..., Awaitable[httpx.AsyncClient]]]:
    """Bus apps over the cluster with replica acknowledgement (1 replica, 200 ms), all
    in one namespace (like replicas behind a load balancer)."""
    await backends.require("redis-cluster")
    await backends.wipe("redis-cluster")
    namespace = f"t{uuid.uuid4().hex[:10]}"
    managers: list[LifespanManager] = []
    clients: list[httpx.AsyncClient] = []

    async def build(**options: Any) -> httpx.AsyncClient:
        manager, _ = await _app(
            namespace, redis_wait_replicas=1, redis_wait_timeout_ms=200, **options
        )
        managers.append(manager)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://localhost"
        )
        client.namespace = namespace  # type: ignore[attr-defined]
        clients.append(client)
        return client

    yield build
    for client in clients:
        await client.aclose()
    for manager in reversed(managers):
        await manager.__aexit__(None, None, None)


def _slot(client: httpx.AsyncClient) -> int:
    return key_slot(("{sbus:" + client.namespace + "}").encode())  # type: ignore[attr-defined]


class TestAcknowledgementOverHTTP:
    async def test_the_sdk_resend_after_the_replica_resumes_applies_once(
        self, apps: Callable[..., Awaitable[httpx.AsyncClient]]
    ) -> None:
        """The first send answers 503 unknown (the replica is stopped); the SDK resends
        with the same Idempotency-Key once the replica is back, and gets the original
        result, replayed: the commit applied once."""
        http = await apps()
        assert (await http.post("/shard", json={"key": "k", "content": "v0"})).status_code == 201
        replica = await rc.replica_of(await rc.owner(_slot(http)))
        seen: list[tuple[int, str | None, str | None]] = []
        process = await rc.pid(replica.address)

        async def on_response(response: httpx.Response) -> None:
            if not response.request.url.path.startswith("/commit"):
                return  # the SDK's version check, the session's reset
            await response.aread()
            outcome = None
            if response.status_code == 503:
                outcome = response.json().get("outcome")
                os.kill(process, signal.SIGCONT)  # the replica catches up before the resend
            seen.append(
                (response.status_code, outcome, response.headers.get("idempotent-replayed"))
            )

        sdk_http = httpx.AsyncClient(
            transport=http._transport,
            base_url="http://localhost",
            event_hooks={"response": [on_response]},
        )
        bus = AsyncBus(
            "http://localhost", agent_id="a", http_client=sdk_http, retry=TransportRetry(attempts=3)
        )
        async with rc.stopped(replica.address), bus.session() as session:
            done = await session.commit("k", "once", expected=0)
        await sdk_http.aclose()
        assert (done.version, done.replayed) == (1, True)
        assert seen == [(503, "unknown", None), (200, None, "true")]
        history = (await http.get("/history/k")).json()
        assert [h["version"] for h in history["entries"]] == [1, 0]

    async def test_a_replay_on_another_bus_waits_for_the_replica(
        self, apps: Callable[..., Awaitable[httpx.AsyncClient]]
    ) -> None:
        """A replay writes nothing of its own, so WAIT on its connection would return at
        once: the bus writes first, so that the replay is acknowledged only once the
        replica has the record it replays."""
        first, second = await apps(), await apps()
        assert (await first.post("/shard", json={"key": "k", "content": "v0"})).status_code == 201
        body = {"key": "k", "expected_version": 0, "delta": "x", "agent_id": "a"}
        key = {"Idempotency-Key": "once"}
        replica = await rc.replica_of(await rc.owner(_slot(first)))
        async with rc.stopped(replica.address):
            sent = await first.post("/commit", json=body, headers=key)
            assert (sent.status_code, sent.json()["outcome"]) == (503, "unknown")
            again = await second.post("/commit", json=body, headers=key)
            assert (again.status_code, again.json()["outcome"]) == (503, "unknown")
        replayed = await second.post("/commit", json=body, headers=key)
        assert replayed.status_code == 200
        assert replayed.headers["idempotent-replayed"] == "true"
        assert replayed.json()["new_version"] == 1
        assert (await second.get("/shard/k?record=false")).json()["version"] == 1
