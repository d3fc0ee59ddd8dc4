"""Redis-specific behaviour of the Redis store: what the shared conformance suite
cannot see. Runs against the server named by ``SBUS_TEST_REDIS_URL`` (default
``redis://127.0.0.1:56379/0``); unreachable, it FAILS (``tests/backends.py``). Each
test works in a namespace of its own and removes its keys afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from sbus.core import errors as e
from sbus.core.chain import GENESIS, entry_hash
from sbus.core.clock import rfc3339
from sbus.core.engine import commit_txn, new_commit_id
from sbus.core.types import CreateOp, IdemRef, Limits, MandateRef, ReadItem, Txn, WriteOp
from sbus.storage.factory import open_store
from sbus.storage.redis import RedisStore
from sbus.storage.redis.lanes import Lanes
from tests import backends

REDIS_URL = os.environ.get("SBUS_TEST_REDIS_URL", "redis://127.0.0.1:56379/0")
LIMITS = Limits(session_ttl_ms=10_000, max_dl_entries=3, history_depth=5, history_max_bytes=4096)


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    await backends.require("redis")
    client = aioredis.from_url(REDIS_URL, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def make_store(raw: aioredis.Redis) -> AsyncIterator[Callable[..., Awaitable[RedisStore]]]:
    """Stores over one fresh namespace (several share it, like replicas)."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    stores: list[RedisStore] = []

    async def build(limits: Limits = LIMITS) -> RedisStore:
        store = RedisStore(REDIS_URL, limits, namespace=namespace)
        await store.start()
        stores.append(store)
        return store

    yield build
    for store in stores:
        await store.close()
    keys = [k async for k in raw.scan_iter(match=f"{{sbus:{namespace}}}*")]
    if keys:
        await raw.delete(*keys)


@pytest.fixture
async def store(make_store: Callable[..., Awaitable[RedisStore]]) -> RedisStore:
    return await make_store()


_COMMAND = re.compile(rb"\*\d+\r\n\$\d+\r\n([A-Za-z]+)\r\n")


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The first command of every write to a Redis connection in this process, one per
    round trip (a MULTI pipeline is one write, named MULTI)."""
    writes: list[str] = []
    original = AbstractConnection.send_packed_command

    async def recording(
        self: AbstractConnection, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        data = command.encode() if isinstance(command, str) else command
        head = data if isinstance(data, bytes) else b"".join(data)
        match = _COMMAND.match(head)
        writes.append(match.group(1).decode().upper() if match else "?")
        await original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", recording)
    return writes


def create(key: str, content: str = "v0") -> CreateOp:
    return CreateOp(key, content, "", False, "", new_commit_id())


def commit(key: str, expected: int | None, content: str = "x", agent: str = "A", **kw: Any) -> Txn:
    kind = kw.pop("kind", "commit")
    target = kw.pop("target", 0)
    return commit_txn(
        op=kw.pop("op", "commit"),
        agent_id=agent,
        session_id=kw.pop("session", ""),
        writes=[WriteOp(key, expected, kind, content, target)],
        read_set=kw.pop("read_set", []),
        rationale=None,
        idem=kw.pop("idem", None),
    )


def mandated(key: str, expected: int, ref: MandateRef) -> Txn:
    return commit_txn(
        op="commit",
        agent_id="A",
        session_id="",
        writes=[WriteOp(key, expected, "commit", "mandated")],
        read_set=[],
        rationale=None,
        idem=None,
        has_mandate=True,
        mandate=ref,
    )


async def assert_chain(store: RedisStore, key: str) -> None:
    """Every retained entry hashes to its recorded hash and links to its predecessor."""
    entries = list(reversed(await store.history(key, None, 1000)))
    assert entries
    for before, entry in zip([None, *entries], entries, strict=False):
        if before is not None:
            assert entry.prev_hash == before.hash
            assert entry.committed_ms >= before.committed_ms, (before, entry)
        elif entry.version == 0:
            assert entry.prev_hash == GENESIS
        digest = entry_hash(
            entry.prev_hash,
            entry.version,
            agent_id=entry.agent_id,
            commit_id=entry.commit_id,
            committed_at=rfc3339(entry.committed_ms),
            rationale=entry.rationale,
            deleted=entry.deleted,
            content=entry.content,
        )
        assert digest == entry.hash, entry
    shard = await store.read(key, None, "", False) if not entries[-1].deleted else None
    if shard is not None:
        assert shard.head_hash == entries[-1].hash


class TestStartup:
    async def test_refuses_eviction_policy(self, raw: aioredis.Redis) -> None:
        old = str((await raw.config_get("maxmemory-policy"))["maxmemory-policy"])
        await raw.config_set("maxmemory-policy", "allkeys-lru")
        try:
            store = RedisStore(REDIS_URL, LIMITS, namespace="refuse")
            with pytest.raises(e.StoreUnavailable) as info:
                await store.start()
            assert "noeviction" in info.value.detail
            assert "allkeys-lru" in info.value.detail
            with pytest.raises(e.StoreUnavailable):
                await store.ping()  # not started
        finally:
            await raw.config_set("maxmemory-policy", old)

    async def test_unreachable_is_not_applied(self) -> None:
        store = RedisStore("redis://127.0.0.1:1/0", LIMITS)
        with pytest.raises(e.StoreUnavailable) as info:
            await store.start()
        assert info.value.fields["outcome"] == "not_applied"
        assert "cannot reach Redis" in info.value.detail

    async def test_durable_only_with_fsync_always(
        self, raw: aioredis.Redis, make_store: Callable[..., Awaitable[RedisStore]]
    ) -> None:
        config = await raw.config_get("append*")
        if config.get("appendonly") == "yes" and config.get("appendfsync") == "always":
            assert (await make_store()).durable
            return
        assert not (await make_store()).durable
        await raw.config_set("appendfsync", "always")
        await raw.config_set("appendonly", "yes")
        try:
            assert (await make_store()).durable
        finally:
            await raw.config_set("appendonly", str(config["appendonly"]))
            await raw.config_set("appendfsync", str(config["appendfsync"]))

    def test_factory_and_namespace(self) -> None:
        store = open_store("redis://127.0.0.1:6379/3?namespace=blue", LIMITS)
        assert isinstance(store, RedisStore)
        assert store.tag == "{sbus:blue}" and store.url == "redis://127.0.0.1:6379/3"
        with pytest.raises(ValueError):
            RedisStore("redis://127.0.0.1:6379/0", LIMITS, namespace="a}b")


class TestDriver:
    async def test_replies_are_parsed_by_hiredis(self, store: RedisStore) -> None:
        """hiredis is a dependency so redis-py parses replies in C: the store's own
        connections must carry its parser, not the pure-Python RESP one (which parses
        ~50 reply lines per cycle in Python)."""
        import hiredis  # the dependency itself; missing, this fails here
        from redis._parsers import _AsyncHiredisParser

        assert hiredis.__version__
        await store.create(create("k"))
        node = store.node()
        conn = await node.lanes.take()  # what every script runs on
        try:
            assert type(conn._parser) is _AsyncHiredisParser
        finally:
            node.lanes.give_back(conn)
        other = await node.pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await other.connect()  # the rest: pipelines, HMGET, CONFIG
            assert type(other._parser) is _AsyncHiredisParser
        finally:
            await node.pool.release(other)


class TestLayout:
    async def test_every_key_shares_one_hash_tag(
        self, store: RedisStore, raw: aioredis.Redis
    ) -> None:
        await store.set_ori(True)
        await store.create(create("plan/a"))
        await store.create(create("plan/b"))
        await store.read("plan/a", "agent-1", "s1", True)
        await store.apply(
            commit("plan/b", 0, agent="agent-1", session="s1", idem=IdemRef("agent-1", "i1", "f"))
        )
        await store.apply(commit("plan/a", 0, agent="B", kind="delete", op="delete"))
        keys = [k async for k in raw.scan_iter(match=f"{store.tag}*")]
        assert {key_slot(k.encode()) for k in keys} == {key_slot(store.tag.encode())}
        expected = {
            store.k_meta,
            store.k_counters,
            store.k_live,
            store.k_all,
            store.k_sessions,
            store.k_idem_index,
            store.k_shard("plan/a"),
            store.k_shard("plan/b"),
            store.k_hist("plan/a"),
            store.k_hist("plan/b"),
            *store.k_dl("agent-1", "s1"),
            *store.k_dl("B", ""),
            store.k_idem("agent-1", "i1"),
            store.k_changes,  # the change log (one stream entry per version)
        }
        assert set(keys) == expected
        # the idempotency record expires on its own (PEXPIREAT), the rest does not
        assert await raw.pttl(store.k_idem("agent-1", "i1")) > 0
        assert await raw.pttl(store.k_shard("plan/b")) == -1

    async def test_namespaces_are_isolated(
        self,
        store: RedisStore,
        make_store: Callable[..., Awaitable[RedisStore]],
        raw: aioredis.Redis,
    ) -> None:
        other = RedisStore(REDIS_URL, LIMITS, namespace=store.namespace + "x")
        await other.start()
        try:
            await store.create(create("k"))
            assert await other.list_keys("", None, 10) == []
            await other.create(create("k"))
            assert (await other.stats()).total_shards == 1
        finally:
            await other.reset_all()
            await raw.delete(other.k_meta)
            await other.close()
        assert await store.list_keys("", None, 10) == ["k"]


class TestScripts:
    async def test_reload_after_script_flush(self, store: RedisStore, raw: aioredis.Redis) -> None:
        await store.create(create("k"))
        await raw.script_flush()
        out = await store.apply(commit("k", 0, "after flush"))
        assert out.body is not None and out.body["new_version"] == 1
        await store.read("k", "A", "", True)  # another script, also reloaded
        assert (await store.stats()).counters.total_commits == 1
        from sbus.storage.redis.scripts import SCRIPTS

        loaded = await raw.script_exists(*(s.sha for s in SCRIPTS.values()))
        assert loaded[list(SCRIPTS).index("commit")]

    async def test_broken_connection_after_send_is_unknown(
        self, store: RedisStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        await store.create(create("k"))
        lanes = store.node().lanes
        original = lanes.take

        async def broken() -> Any:
            """A connection that delivers EVALSHA, then breaks before the reply."""
            conn = await original()
            send, read = conn.send_packed_command, conn.read_response
            sent: list[bytes] = []

            async def send_packed_command(command: bytes, *a: Any, **kw: Any) -> Any:
                sent.append(command)
                return await send(command, *a, **kw)

            async def read_response(*a: Any, **kw: Any) -> Any:
                reply = await read(*a, **kw)
                if sent and b"EVALSHA" in sent[-1][:32]:
                    raise RedisConnectionError("Connection reset by peer")
                return reply

            monkeypatch.setattr(conn, "send_packed_command", send_packed_command)
            monkeypatch.setattr(conn, "read_response", read_response)
            return conn

        monkeypatch.setattr(lanes, "take", broken)
        with pytest.raises(e.StoreUnavailable) as info:
            await store.apply(commit("k", 0, "maybe"))
        assert info.value.fields["outcome"] == "unknown"
        monkeypatch.setattr(lanes, "take", original)
        # the command did reach Redis: the commit landed; an idempotent retry finds out
        assert (await store.read("k", None, "", False)).version == 1

    async def test_a_script_redis_refuses_before_running_is_not_applied(
        self, store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """OOM (like READONLY, LOADING, CLUSTERDOWN): Redis ran nothing. redis-py keeps
        the code off the message, so it is read from the error's class."""
        await store.create(create("k"))
        await raw.config_set("maxmemory", "1")
        try:
            with pytest.raises(e.StoreUnavailable) as info:
                await store.apply(commit("k", 0, "no room"))
        finally:
            await raw.config_set("maxmemory", "0")
        assert info.value.fields["outcome"] == "not_applied"
        assert "Redis refused commit: OOM" in info.value.detail
        assert (await store.read("k", None, "", False)).version == 0

    async def test_connection_refused_before_send_is_not_applied(
        self, store: RedisStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        await store.create(create("k"))

        async def refused(*_: Any, **__: Any) -> Any:
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1. Connection refused.")

        monkeypatch.setattr(store.node().lanes, "take", refused)
        with pytest.raises(e.StoreUnavailable) as info:
            await store.apply(commit("k", 0, "no"))
        assert info.value.fields["outcome"] == "not_applied"

    async def test_a_script_past_its_deadline_is_unknown_and_its_connection_dropped(
        self, store: RedisStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """One deadline covers send and reply (the connections carry no socket timeout
        of their own): past it, a writing script's outcome is unknown, and the
        connection, whose reply may still come, is not used again."""
        await store.create(create("k"))
        lanes = store.node().lanes
        original = lanes.take
        taken: list[Any] = []

        async def stalled() -> Any:
            conn = await original()
            taken.append(conn)

            async def read_response(*_: Any, **__: Any) -> Any:
                await asyncio.sleep(3600)  # a reply that never comes

            monkeypatch.setattr(conn, "read_response", read_response)
            return conn

        monkeypatch.setattr(lanes, "take", stalled)
        monkeypatch.setattr("sbus.storage.redis.store.SCRIPT_TIMEOUT_S", 0.05)
        with pytest.raises(e.StoreUnavailable) as info:
            await store.apply(commit("k", 0, "late"))
        assert info.value.fields["outcome"] == "unknown"
        assert not taken[0].is_connected
        monkeypatch.undo()
        assert (await store.read("k", "A", "", True)).version == 1  # it did land

    async def test_all_connections_busy_is_not_applied(
        self, store: RedisStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        lanes = Lanes(store.node().pool, 1, 0.05, 5)
        monkeypatch.setattr(store.node(), "lanes", lanes)
        held = await lanes.take()
        try:
            with pytest.raises(e.StoreUnavailable) as info:
                await store.create(create("k"))
            assert info.value.fields["outcome"] == "not_applied"
            assert "busy" in info.value.detail
        finally:
            lanes.give_back(held)
        assert (await store.create(create("k"))).status == 201
        await lanes.close()


class TestConcurrency:
    async def test_many_concurrent_applies_one_winner(
        self, make_store: Callable[..., Awaitable[RedisStore]]
    ) -> None:
        replicas = [await make_store() for _ in range(3)]
        await replicas[0].create(create("k"))
        results = await asyncio.gather(
            *(replicas[i % 3].apply(commit("k", 0, f"c{i}", agent=f"A{i}")) for i in range(60)),
            return_exceptions=True,
        )
        wins = [r for r in results if not isinstance(r, BaseException)]
        losses = [r for r in results if isinstance(r, e.VersionMismatch)]
        assert (len(wins), len(losses)) == (1, 59)
        shard = await replicas[1].read("k", None, "", False)
        assert (shard.version, shard.attempt_count, shard.conflict_count) == (1, 60, 59)
        stats = await replicas[2].stats()
        assert (stats.counters.total_commits, stats.counters.total_conflicts) == (1, 59)
        await assert_chain(replicas[0], "k")

    async def test_no_write_skew_across_replicas(
        self, make_store: Callable[..., Awaitable[RedisStore]]
    ) -> None:
        """Two agents each read both keys and write the other: exactly one wins."""
        a, b = await make_store(), await make_store()
        await a.create(create("x"))
        await a.create(create("y"))
        for round_ in range(10):
            for agent in ("P", "Q"):
                await a.reset_session(agent, "")
                await a.read("x", agent, "", True)
                await b.read("y", agent, "", True)
            vx = (await a.read("x", None, "", False)).version
            vy = (await a.read("y", None, "", False)).version
            results = await asyncio.gather(
                a.apply(commit("x", vx, f"P{round_}", agent="P")),
                b.apply(commit("y", vy, f"Q{round_}", agent="Q")),
                return_exceptions=True,
            )
            wins = [r for r in results if not isinstance(r, BaseException)]
            stale = [r for r in results if isinstance(r, e.CrossShardStale)]
            assert (len(wins), len(stale)) == (1, 1), results

    async def test_commits_chain_under_contention(
        self, make_store: Callable[..., Awaitable[RedisStore]]
    ) -> None:
        """Unconditional rollbacks racing commits: every one is hashed against the head
        it lands on (the RETRY path), so the chain verifies."""
        deep = Limits(history_depth=1000)
        a, b = await make_store(deep), await make_store(deep)
        await a.create(create("k", "zero"))

        async def committer(store: RedisStore, n: int) -> None:
            for i in range(n):
                version = (await store.read("k", None, "", False)).version
                with contextlib.suppress(e.VersionMismatch):
                    await store.apply(commit("k", version, f"c{i}", agent="C"))

        async def roller(store: RedisStore, n: int) -> None:
            # A session per rollback: its read of k (the last rollback's RYW entry) would
            # otherwise be checked, and these must stay blind to race the commits.
            for i in range(n):
                await store.apply(
                    commit(
                        "k",
                        None,
                        agent="R",
                        kind="rollback",
                        op="rollback",
                        target=0,
                        session=f"{id(store)}-{i}",
                    )
                )

        await asyncio.gather(committer(a, 25), roller(b, 25), committer(b, 25), roller(a, 25))
        await assert_chain(a, "k")


class TestHeadMoved:
    async def _race(
        self,
        store: RedisStore,
        monkeypatch: pytest.MonkeyPatch,
        txn: Txn,
        interlude: Callable[[], Awaitable[Any]],
    ) -> tuple[Any, int]:
        """Apply ``txn`` on ``store``, running ``interlude`` once between hashing the
        new entries and sending the commit script; returns (outcome or error, commit
        scripts sent)."""
        original = store._eval
        calls = 0

        async def racing(name: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
            nonlocal calls
            if name == "commit":
                calls += 1
                if calls == 1:
                    await interlude()
            return await original(name, keys, args)

        monkeypatch.setattr(store, "_eval", racing)
        try:
            return await store.apply(txn), calls
        except e.SBusError as exc:
            return exc, calls
        finally:
            monkeypatch.setattr(store, "_eval", original)

    @staticmethod
    def interloper(other: RedisStore) -> Callable[[], Awaitable[Any]]:
        async def commit_k() -> None:
            version = (await other.read("k", None, "", False)).version
            await other.apply(commit("k", version, "interloper", agent="I"))

        return commit_k

    async def test_admitted_commit_retries_and_rehashes(
        self,
        make_store: Callable[..., Awaitable[RedisStore]],
        monkeypatch: pytest.MonkeyPatch,
        sent: list[str],
    ) -> None:
        store, other = await make_store(), await make_store()
        await store.create(create("k", "zero"))
        await store.apply(commit("k", 0, "one"))
        rollback = commit("k", None, agent="R", kind="rollback", op="rollback", target=0)
        sent.clear()
        out, calls = await self._race(store, monkeypatch, rollback, self.interloper(other))
        assert calls == 2  # the head moved: rehashed against the new head and retried
        # a rollback reads its source entry with the heads, on every attempt
        assert sent.count("MULTI") == 2 + 1  # + the interloper's own
        assert out.status == 200 and out.body["version"] == 3 and out.body["content"] == "zero"
        assert out.body["attempt_count"] == 3
        await assert_chain(store, "k")
        history = await store.history("k", None, 10)
        assert [(h.version, h.agent_id) for h in history] == [(3, "R"), (2, "I"), (1, "A"), (0, "")]

    async def test_moved_head_with_stale_expectation_is_a_mismatch(
        self, make_store: Callable[..., Awaitable[RedisStore]], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        store, other = await make_store(), await make_store()
        await store.create(create("k"))
        out, calls = await self._race(
            store, monkeypatch, commit("k", 0, "mine"), self.interloper(other)
        )
        assert calls == 1  # decided at once: no retry needed to reject
        assert isinstance(out, e.VersionMismatch)
        assert out.fields == {"key": "k", "expected": 0, "found": 1}
        await assert_chain(store, "k")

    async def test_moved_head_retries_on_the_rows_the_script_answers(
        self,
        make_store: Callable[..., Awaitable[RedisStore]],
        monkeypatch: pytest.MonkeyPatch,
        sent: list[str],
    ) -> None:
        """A commit without an expected version whose head moved after it was hashed:
        the RETRY answer carries the current row and clock, so the second attempt is
        hashed against them without reading them first."""
        store, other = await make_store(), await make_store()
        await store.create(create("k"))
        await store.read("k", "A", "", True)
        sent.clear()
        blind = commit("k", None, "blind", agent="B", session="b")
        out, calls = await self._race(store, monkeypatch, blind, self.interloper(other))
        assert calls == 2
        assert out.status == 200 and out.body["new_version"] == 2
        assert "MULTI" not in sent[sent.index("EVALSHA", 2) :]  # after the interloper's commit
        await assert_chain(store, "k")

    async def test_clock_skew_retries(
        self, store: RedisStore, monkeypatch: pytest.MonkeyPatch, sent: list[str]
    ) -> None:
        """advance-clock between the hashing and the script: the entry is rehashed
        with the store time the script answers, so committed_at never lies."""
        await store.create(create("k"))
        await store.read("k", "A", "", True)
        sent.clear()
        out, calls = await self._race(
            store, monkeypatch, commit("k", 0, "later"), lambda: store.advance_clock(60_000)
        )
        assert calls == 2 and out.status == 200
        assert sent == ["EVALSHA", "EVALSHA", "EVALSHA"]  # advance, commit, commit again
        entry = (await store.history("k", None, 1))[0]
        assert abs(entry.committed_ms - await store.now_ms()) < 5_000
        await assert_chain(store, "k")

    async def test_idempotent_rollback_replay_patches_counters(self, store: RedisStore) -> None:
        await store.create(create("k", "zero"))
        await store.apply(commit("k", 0, "one"))
        ref = IdemRef("R", "idem-1", "fp")
        first = await store.apply(
            commit("k", None, agent="R", kind="rollback", op="rollback", target=0, idem=ref)
        )
        with pytest.raises(e.VersionMismatch):
            await store.apply(commit("k", 0, "late"))  # bumps attempts after the fact
        again = await store.apply(
            commit("k", None, agent="R", kind="rollback", op="rollback", target=0, idem=ref)
        )
        assert again.replayed and again.body == first.body and again.etag == first.etag
        record = await store.idempotent("R", "idem-1")
        assert record is not None and record.body == first.body


class TestRoundTrips:
    """One script call per request: a commit hashes its entries against the heads and
    the store clock that the previous script replies showed this process."""

    async def test_read_then_commit_is_one_round_trip_each(
        self, store: RedisStore, sent: list[str]
    ) -> None:
        await store.create(create("k"))
        sent.clear()
        shard = await store.read("k", "A", "s", True)
        out = await store.apply(commit("k", shard.version, "one", agent="A", session="s"))
        assert out.body is not None and out.body["new_version"] == 1
        again = await store.read("k", "A", "s", True)
        await store.apply(
            commit("k", again.version, "two", agent="A", session="s", idem=IdemRef("A", "i", "f"))
        )
        assert sent == ["EVALSHA"] * 4
        await assert_chain(store, "k")
        record = await store.idempotent("A", "i")
        assert record is not None and record.body is not None
        assert record.body["new_version"] == 2

    async def test_bulk_read_then_multi_commit_is_one_round_trip_each(
        self, store: RedisStore, sent: list[str]
    ) -> None:
        await store.create(create("a"))
        await store.create(create("b"))
        sent.clear()
        rows = await store.read_many(["a", "b"], "A", "s", True)
        txn = commit_txn(
            op="multi",
            agent_id="A",
            session_id="s",
            writes=[
                WriteOp("a", rows["a"].version, "commit", "A1", 0),
                WriteOp("b", rows["b"].version, "delete", "", 0),
            ],
            read_set=[],
            rationale=None,
            idem=None,
        )
        out = await store.apply(txn)
        assert out.body is not None
        assert [r["new_version"] for r in out.body["results"]] == [1, 1]
        assert sent == ["EVALSHA", "EVALSHA"]
        await assert_chain(store, "a")
        await assert_chain(store, "b")

    async def test_a_head_never_seen_is_read_first(
        self, make_store: Callable[..., Awaitable[RedisStore]], sent: list[str]
    ) -> None:
        store, fresh = await make_store(), await make_store()
        await store.create(create("k"))
        await fresh.now_ms()  # its script connection is open (a handshake is not the commit's)
        sent.clear()
        out = await fresh.apply(commit("k", 0, "one"))
        assert out.body is not None and out.body["new_version"] == 1
        assert sent == ["MULTI", "EVALSHA"]
        await assert_chain(store, "k")

    async def test_a_stale_head_costs_one_retry_not_a_read(
        self, make_store: Callable[..., Awaitable[RedisStore]], sent: list[str]
    ) -> None:
        """Another replica moved the head this one remembers: the script answers RETRY
        with the current row, and the second attempt lands."""
        store, other = await make_store(), await make_store()
        await store.create(create("k"))
        await store.read("k", "A", "", True)
        await other.apply(commit("k", 0, "elsewhere", agent="O"))
        sent.clear()
        out = await store.apply(commit("k", 1, "here", agent="B"))
        assert out.body is not None and out.body["new_version"] == 2
        assert sent == ["EVALSHA", "EVALSHA"]
        await assert_chain(store, "k")

    async def test_a_reset_namespace_is_not_a_stale_head_forever(
        self, make_store: Callable[..., Awaitable[RedisStore]]
    ) -> None:
        """Versions start again after another replica's reset: the head remembered here
        is newer than the store's, and must still give way to it."""
        store, other = await make_store(), await make_store()
        await store.create(create("k"))
        await store.apply(commit("k", 0, "one"))
        await store.apply(commit("k", 1, "two"))
        await other.reset_all()
        await other.create(create("k", "again"))
        out = await store.apply(commit("k", 0, "after reset"))
        assert out.body is not None and out.body["new_version"] == 1
        await assert_chain(store, "k")

    async def test_committed_at_never_precedes_the_head(
        self, make_store: Callable[..., Awaitable[RedisStore]]
    ) -> None:
        """A process whose clock estimate trails another's still stamps its entry no
        earlier than the head it follows."""
        store, other = await make_store(), await make_store()
        await store.create(create("k"))
        await store.read("k", "A", "", True)
        await other.advance_clock(2_000)  # other's entries are 2 s ahead of store's estimate
        await other.apply(commit("k", 0, "ahead", agent="O"))
        await store.read("k", None, "", False)  # the head, but no new clock reading
        await store.apply(commit("k", 1, "behind", agent="B"))
        newest, older = await store.history("k", None, 2)
        assert newest.version == 2 and newest.committed_ms >= older.committed_ms
        await assert_chain(store, "k")

    async def test_a_head_from_a_clock_since_stepped_back_does_not_block_commits(
        self, store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """The store clock went back a minute (an NTP step) after the head was written:
        the commit is stamped with the clock, not the head's future time, which the
        script would refuse as skewed on every retry."""
        await store.create(create("k"))
        ahead = await store.now_ms() + 60_000
        await raw.hset(store.k_shard("k"), "updated", str(ahead))
        await store.read("k", "A", "", True)  # remembers the head, future time included
        out = await store.apply(commit("k", 0, "after the step"))
        assert out.body is not None and out.body["new_version"] == 1
        entry = (await store.history("k", None, 1))[0]
        assert abs(entry.committed_ms - await store.now_ms()) < 5_000


class TestTimeRulesOnTheStoreClock:
    """The clock estimate a commit is hashed with may trail or lead the store clock by
    up to the skew allowed; mandate expiry and session TTL are still judged on the
    clock the script reads, as on every other store."""

    async def test_a_mandate_expired_by_another_replicas_clock_advance_is_refused(
        self, make_store: Callable[..., Awaitable[RedisStore]]
    ) -> None:
        store, other = await make_store(), await make_store()
        await store.create(CreateOp("pay", "v0", "", True, "", new_commit_id()))
        await store.read("pay", "A", "", True)  # the head and a clock reading remembered
        before = await store.now_ms()
        await other.advance_clock(4_000)  # inside the skew: store's estimate trails by 4 s
        ref = MandateRef("m-late", before + 2_000, before + 30_000)
        with pytest.raises(e.MandateExpired) as info:
            await store.apply(mandated("pay", 0, ref))
        assert (info.value.detail, info.value.fields) == (
            e.MandateExpired("m-late").detail,
            e.MandateExpired("m-late").fields,
        )
        assert (await store.read("pay", None, "", False)).version == 0

    async def test_a_mandate_is_not_expired_by_an_estimate_ahead_of_the_store_clock(
        self, store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """A head stamped 2 s ahead (another replica's estimate) moves committed_at
        ahead; the mandate, still valid on the store clock, is accepted."""
        await store.create(CreateOp("pay", "v0", "", True, "", new_commit_id()))
        now = await store.now_ms()
        await raw.hset(store.k_shard("pay"), "updated", str(now + 2_000))
        await store.read("pay", "A", "", True)
        out = await store.apply(mandated("pay", 0, MandateRef("m-ok", now + 1_000, now + 30_000)))
        assert out.body is not None and out.body["new_version"] == 1

    async def test_a_session_expired_by_another_replicas_clock_advance_is_refused(
        self, make_store: Callable[..., Awaitable[RedisStore]]
    ) -> None:
        short = Limits(session_ttl_ms=3_000, max_dl_entries=3, history_depth=5)
        store, other = await make_store(short), await make_store(short)
        await store.create(create("k"))
        await store.read("k", "A", "s", True)
        await other.advance_clock(4_000)  # past the TTL, inside the skew
        with pytest.raises(e.SessionExpired) as info:
            await store.apply(commit("k", 0, "late", agent="A", session="s"))
        want = e.SessionExpired("A", "ttl")
        assert (info.value.detail, info.value.fields) == (want.detail, want.fields)
        assert (await store.read("k", None, "", False)).version == 0


class TestSessions:
    async def test_dl_entries_are_a_sorted_set_by_served_time(
        self, store: RedisStore, raw: aioredis.Redis
    ) -> None:
        await store.create(create("a"))
        await store.create(create("b"))
        await store.read("a", "A", "s", True)
        await store.advance_clock(6_000)
        await store.read("b", "A", "s", True)
        dlt, dlv = store.k_dl("A", "s")
        served_a, served_b = await raw.zscore(dlt, "a"), await raw.zscore(dlt, "b")
        assert served_a is not None and served_b is not None
        assert served_b - served_a >= 6_000
        assert await raw.hget(dlv, "a") == "0"
        await store.advance_clock(5_000)  # a expired, b live
        await store.purge()
        assert await raw.zrange(dlt, 0, -1) == ["b"]
        assert await raw.hget(dlv, "a") is None
        dump, _ = await store.dump_delivery_log(None, 10)
        assert list(dump["A"]["s"]) == ["b"]

    async def test_read_set_checks_in_byte_order(self, store: RedisStore) -> None:
        """Lua compares strings by locale; the store must order stale keys by bytes."""
        for key in ("B", "a", "_", "Z9"):
            await store.create(create(key))
        await store.create(create("w"))
        for key in ("B", "a", "_", "Z9"):
            await store.apply(commit(key, 0, "moved", agent="other"))
        with pytest.raises(e.CrossShardStale) as info:
            await store.apply(
                commit("w", 0, agent="A", read_set=[ReadItem(k, 0) for k in ("a", "_", "Z9", "B")])
            )
        assert [s["key"] for s in info.value.fields["stale_keys"]] == ["B", "Z9", "_", "a"]

    async def test_same_check_from_read_set_and_dl_counts_once(self, store: RedisStore) -> None:
        await store.create(create("a"))
        await store.create(create("w"))
        await store.read("a", "A", "", True)
        await store.apply(commit("a", 0, "moved", agent="other"))
        with pytest.raises(e.CrossShardStale) as info:
            await store.apply(commit("w", 0, agent="A", read_set=[ReadItem("a", 0)]))
        assert info.value.fields["stale_keys"] == [
            {"key": "a", "version_at_read": 0, "current_version": 1}
        ]


class TestResetInBatches:
    async def test_a_namespace_larger_than_a_batch_is_cleared_completely(
        self, store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """reset_all clears a namespace of many times its batch in several scripts: every
        shard, history, session and idempotency record goes, the counters too, and the
        ORI flag and revocations stay (as with a single script)."""
        store.reset_batch = 3
        for i in range(10):
            await store.create(create(f"k{i:02d}"))
        for i in range(7):
            await store.read(f"k{i:02d}", f"agent{i}", "", True)
        for i in range(5):
            idem = IdemRef(f"agent{i}", f"key-{i}", "fp")
            await store.apply(commit(f"k{i:02d}", 0, agent=f"agent{i}", idem=idem))
        await store.set_ori(False)
        await store.revoke("jti-1", int(time.time() * 1000) + 3_600_000)
        assert (await store.stats()).total_shards == 10
        calls: list[str] = []
        real_eval = store._eval

        async def counting(name: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
            calls.append(name)
            return await real_eval(name, keys, args)

        store._eval = counting  # type: ignore[method-assign]
        assert await store.reset_all() == 10
        assert calls == ["reset_all"] * 4  # 10 shards, 3 per script
        stats = await store.stats()
        assert (stats.total_shards, stats.counters.total_commits, stats.dl_agents) == (0, 0, 0)
        assert await store.list_keys("", None, 100) == []
        leftovers = [k async for k in raw.scan_iter(match=store.tag + "*")]
        # the change log is kept, as on every store (protocol.md section 3.11)
        kept = [store.k_meta, f"{store.tag}:rv:jti-1", store.k_changes]
        assert sorted(leftovers) == sorted(kept), leftovers
        assert (await store.revocation("jti-1")).revoked
        assert (await store.create(create("k00"))).body["version"] == 0  # type: ignore[index]

    async def test_an_interrupted_reset_says_unknown(self, store: RedisStore) -> None:
        """A failure before the first batch changed nothing (the store's own outcome); one
        after it leaves the namespace half reset: ``unknown``, and a second reset
        finishes the job."""
        store.reset_batch = 2
        for i in range(5):
            await store.create(create(f"k{i}"))
        real_eval = store._eval
        calls = 0

        async def failing_second(name: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise e.StoreUnavailable("Redis went away", outcome="not_applied")
            return await real_eval(name, keys, args)

        store._eval = failing_second  # type: ignore[method-assign]
        with pytest.raises(e.StoreUnavailable) as info:
            await store.reset_all()
        assert info.value.fields["outcome"] == "unknown"
        assert "repeating it is safe" in info.value.detail
        store._eval = real_eval  # type: ignore[method-assign]
        assert len(await store.list_keys("", None, 10)) == 3
        assert await store.reset_all() == 3
        assert await store.list_keys("", None, 10) == []
