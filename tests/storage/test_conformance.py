"""One conformance class for the Store Protocol, run against every backend: the
semantics of each atomic operation, observed through the Protocol alone."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sbus.core import errors as e
from sbus.core import rules
from sbus.core.chain import GENESIS, content_id
from sbus.core.engine import commit_txn, new_commit_id
from sbus.core.store import Store
from sbus.core.types import (
    Counters,
    CreateOp,
    IdemRecord,
    IdemRef,
    Limits,
    MandateRef,
    RateLimit,
    ReadItem,
    Shard,
    StoreStats,
    Txn,
    WriteOp,
)
from sbus.storage.factory import open_store
from tests.conftest import store_url

LIMITS = Limits(session_ttl_ms=10_000, max_dl_entries=3, history_depth=3, history_max_bytes=1024)


@pytest.fixture
async def store(store_kind: str, tmp_path: Path) -> AsyncIterator[Store]:
    s = open_store(store_url(store_kind, tmp_path), LIMITS)
    await s.start()
    yield s
    await s.close()


def create(key: str, content: str = "v0", agent: str = "") -> CreateOp:
    return CreateOp(key, content, "", False, agent, new_commit_id())


def commit(
    key: str,
    expected: int,
    content: str,
    agent: str = "A",
    session: str = "",
    read_set: list[ReadItem] | None = None,
    idem: IdemRef | None = None,
) -> Txn:
    return commit_txn(
        op="commit",
        agent_id=agent,
        session_id=session,
        writes=[WriteOp(key, expected, "commit", content)],
        read_set=read_set or [],
        rationale=None,
        idem=idem,
    )


class TestStoreConformance:
    async def test_create_then_duplicate(self, store: Store) -> None:
        out = await store.create(create("k"))
        assert (out.status, out.body and out.body["version"]) == (201, 0)
        with pytest.raises(e.ShardAlreadyExists):
            await store.create(create("k"))

    async def test_read_records_and_commit_checks(self, store: Store) -> None:
        await store.create(create("a"))
        await store.create(create("b"))
        shard = await store.read("a", "A", "", True)
        assert shard.version == 0
        assert (await store.apply(commit("a", 0, "a1", agent="B"))).body["new_version"] == 1  # type: ignore[index]
        with pytest.raises(e.CrossShardStale) as info:
            await store.apply(commit("b", 0, "b1", agent="A"))
        assert info.value.fields["stale_keys"] == [
            {"key": "a", "version_at_read": 0, "current_version": 1}
        ]
        stats = await store.stats()
        assert stats.counters.cross_shard_stale == 1
        assert stats.counters.view_checked_commits == 1
        assert stats.counters.view_divergent_commits == 1
        assert stats.counters.total_commits == 1

    async def test_unrecorded_read(self, store: Store) -> None:
        await store.create(create("a"))
        await store.create(create("b"))
        await store.read("a", "A", "", False)
        await store.apply(commit("a", 0, "a1", agent="B"))
        out = await store.apply(commit("b", 0, "b1", agent="A"))
        assert out.body is not None and out.body["new_version"] == 1

    async def test_read_many_serves_rows_and_tombstones_in_key_order(self, store: Store) -> None:
        for k in "abc":
            await store.create(create(k, f"{k}0"))
        await store.apply(delete_txn("c", 0))
        found = await store.read_many(["c", "ghost", "b", "a"], None, "", False)
        assert list(found) == ["c", "b", "a"]
        assert (found["c"].deleted, found["c"].version) == (True, 1)
        assert (found["b"].content, found["a"].content) == ("b0", "a0")
        assert found["a"] == await store.read("a", None, "", False)
        assert set((await store.dump_delivery_log(None, 10))[0]) == {"D"}  # the deleter only

    async def test_read_many_records_as_single_reads_would(self, store: Store) -> None:
        """Same keys into two sessions: one bulk read, then the same reads one by one.
        LIMITS allows 3 entries, so the session overflows at the fourth key."""
        for k in "abcde":
            await store.create(create(k))
        await store.apply(delete_txn("e", 0))
        keys = ["e", "ghost", "a", "b", "c", "d"]
        await store.read_many(keys, "A", "bulk", True)
        for key in keys:
            with contextlib.suppress(e.ShardNotFound, e.ShardDeleted):
                await store.read(key, "A", "one", True)
        dumped, _ = await store.dump_delivery_log(None, 10)
        bulk, one = dumped["A"]["bulk"], dumped["A"]["one"]
        assert {k: v["version"] for k, v in bulk.items()} == {"e": 1, "a": 0, "b": 0}
        assert {k: v["version"] for k, v in one.items()} == {"e": 1, "a": 0, "b": 0}
        for session in ("bulk", "one"):
            with pytest.raises(e.SessionExpired) as info:
                await store.apply(commit("a", 0, "x", session=session))
            assert info.value.fields["reason"] == "overflow"

    async def test_read_many_recorded_read_is_checked_by_commit(self, store: Store) -> None:
        await store.create(create("a"))
        await store.create(create("b"))
        await store.read_many(["a", "b"], "A", "s", True)
        await store.apply(commit("b", 0, "b1", agent="B"))
        with pytest.raises(e.CrossShardStale) as info:
            await store.apply(commit("a", 0, "a1", session="s"))
        assert info.value.fields["stale_keys"] == [
            {"key": "b", "version_at_read": 0, "current_version": 1}
        ]
        await store.read_many(["a", "b"], "A", "t", False)
        out = await store.apply(commit("a", 0, "a1", session="t"))
        assert out.body is not None and out.body["new_version"] == 1

    async def test_read_many_restarts_an_expired_session(self, store: Store) -> None:
        await store.create(create("a"))
        await store.create(create("b"))
        await store.read("a", "A", "", True)
        await store.advance_clock(10_000)  # exactly TTL: expired
        await store.read_many(["b"], "A", "", True)
        dumped, _ = await store.dump_delivery_log(None, 10)
        assert {k: v["version"] for k, v in dumped["A"][""].items()} == {"b": 0}
        out = await store.apply(commit("b", 0, "x"))
        assert out.body is not None and out.body["new_version"] == 1

    async def test_version_mismatch_counts_conflicts(self, store: Store) -> None:
        await store.create(create("k"))
        with pytest.raises(e.VersionMismatch) as info:
            await store.apply(commit("k", 5, "x"))
        assert info.value.fields == {"key": "k", "expected": 5, "found": 0}
        shard = await store.read("k", None, "", False)
        assert (shard.attempt_count, shard.conflict_count) == (1, 1)
        assert (await store.stats()).counters.total_conflicts == 1

    async def test_overflow_is_sticky_until_reset(self, store: Store) -> None:
        for k in "abcd":
            await store.create(create(k))
        for k in "abcd":
            await store.read(k, "A", "s", True)
        with pytest.raises(e.SessionExpired) as info:
            await store.apply(commit("a", 0, "x", session="s"))
        assert info.value.fields["reason"] == "overflow"
        await store.reset_session("A", "s")
        out = await store.apply(commit("a", 0, "x", session="s"))
        assert out.body is not None and out.body["new_version"] == 1

    async def test_ttl_expiry_and_marker(self, store: Store) -> None:
        await store.create(create("a"))
        await store.read("a", "A", "", True)
        await store.advance_clock(10_001)
        with pytest.raises(e.SessionExpired) as info:
            await store.apply(commit("a", 0, "x"))
        assert info.value.fields["reason"] == "ttl"
        await store.advance_clock(10_000)  # one more TTL: the marker is gone
        out = await store.apply(commit("a", 0, "x"))
        assert out.body is not None and out.body["new_version"] == 1

    async def test_register_restarts_an_expired_session_even_recording_nothing(
        self, store: Store
    ) -> None:
        await store.create(create("a"))
        await store.create(create("b"))
        await store.read("a", "A", "", True)
        await store.advance_clock(10_000)  # exactly TTL: expired
        result = await store.register("A", "", ["ghost"])
        assert (result.registered, result.skipped_no_shard) == (0, ["ghost"])
        out = await store.apply(commit("b", 0, "x"))
        assert out.body is not None and out.body["new_version"] == 1

    async def test_history_retention_by_depth_and_bytes(self, store: Store) -> None:
        await store.create(create("k", "0"))
        for v in range(5):
            await store.apply(commit("k", v, str(v + 1)))
        versions = [h.version for h in await store.history("k", None, 100)]
        assert versions == [5, 4, 3]
        await store.apply(commit("k", 5, "x" * 900))
        versions = [h.version for h in await store.history("k", None, 100)]
        assert versions == [6]  # 900 bytes plus any older entry exceed the 1024-byte cap
        assert (await store.read("k", None, "", False)).history_depth == 1

    async def test_history_bytes_count_every_field(self, store: Store) -> None:
        """Retention counts rules.entry_bytes: rationale, ids and hashes as well as content.
        Each commit here is 480 bytes with one byte of content: two fit in 1024, three do
        not."""
        await store.create(create("k", "0"))
        for v in range(4):
            txn = commit_txn(
                op="commit",
                agent_id="A",
                session_id="",
                writes=[WriteOp("k", v, "commit", "c")],
                read_set=[],
                rationale="r" * 300,
                idem=None,
            )
            await store.apply(txn)
        kept = await store.history("k", None, 100)
        assert [h.version for h in kept] == [4, 3]
        assert [rules.entry_bytes(h) for h in kept] == [480, 480]
        assert (await store.read("k", None, "", False)).history_depth == 2

    async def test_idempotent_apply_replays(self, store: Store) -> None:
        await store.create(create("k"))
        ref = IdemRef("A", "key-1", "f1")
        first = await store.apply(commit("k", 0, "x", idem=ref))
        again = await store.apply(commit("k", 0, "x", idem=ref))
        assert again.replayed and again.body == first.body and again.status == 200
        assert (await store.stats()).counters.total_commits == 1
        with pytest.raises(e.IdempotencyKeyReused):
            await store.apply(commit("k", 0, "x", idem=IdemRef("A", "key-1", "other")))

    async def test_concurrent_commits_one_winner(self, store: Store) -> None:
        await store.create(create("k"))
        results = await asyncio.gather(
            *(store.apply(commit("k", 0, f"c{i}", agent=f"A{i}")) for i in range(20)),
            return_exceptions=True,
        )
        wins = [r for r in results if not isinstance(r, BaseException)]
        losses = [r for r in results if isinstance(r, e.VersionMismatch)]
        assert (len(wins), len(losses)) == (1, 19)
        assert (await store.read("k", None, "", False)).version == 1

    async def test_purge_keeps_live_state(self, store: Store) -> None:
        await store.create(create("a"))
        await store.read("a", "A", "", True)
        await store.purge()
        assert (await store.stats()).dl_deliveries == 1
        await store.advance_clock(25_000)
        await store.purge()
        assert (await store.stats()).dl_deliveries == 0

    async def test_reset_all_keeps_ori(self, store: Store) -> None:
        await store.create(create("a"))
        await store.set_ori(False)
        assert await store.reset_all() == 1
        stats = await store.stats()
        assert (stats.total_shards, stats.ori_enabled) == (0, False)


class TestStoreConcurrency:
    """Concurrent calls into one store object: the atomic step must serialize them."""

    async def test_concurrent_idempotent_retries_commit_once(self, store: Store) -> None:
        await store.create(create("k"))
        ref = IdemRef("A", "same-key", "fp")
        outcomes = await asyncio.gather(
            *(store.apply(commit("k", 0, "x", idem=ref)) for _ in range(12))
        )
        assert [o.replayed for o in outcomes].count(False) == 1
        assert {o.body["new_version"] for o in outcomes if o.body} == {1}
        assert len({o.body["commit_id"] for o in outcomes if o.body}) == 1
        assert (await store.stats()).counters.total_commits == 1

    async def test_concurrent_bulk_reads_keep_the_entry_bound(self, store: Store) -> None:
        """Bulk reads of one session racing each other: LIMITS allows 3 entries, every
        call brings 2 new keys, so at most 3 are ever recorded and the session ends
        overflowed; a store that loaded the session unlocked would record them all."""
        keys = [f"k{i}" for i in range(12)]
        for k in keys:
            await store.create(create(k))
        pairs = [keys[i : i + 2] for i in range(0, len(keys), 2)]
        await asyncio.gather(*(store.read_many(p, "A", "s", True) for p in pairs))
        dumped, _ = await store.dump_delivery_log(None, 10)
        assert 2 <= len(dumped["A"]["s"]) <= 3, dumped
        with pytest.raises(e.SessionExpired) as info:
            await store.apply(commit("k0", 0, "x", session="s"))
        assert info.value.fields["reason"] == "overflow"

    async def test_write_skew_ring_never_all_succeed(self, store: Store) -> None:
        keys = ["k0", "k1", "k2"]
        for k in keys:
            await store.create(create(k))
        for round_ in range(15):
            versions = {k: (await store.read(k, None, "", False)).version for k in keys}
            txns = [
                commit(
                    keys[i],
                    versions[keys[i]],
                    f"r{round_}",
                    agent=f"A{i}",
                    session=f"r{round_}",
                    read_set=[ReadItem(keys[(i + 1) % 3], versions[keys[(i + 1) % 3]])],
                )
                for i in range(3)
            ]
            results = await asyncio.gather(*(store.apply(t) for t in txns), return_exceptions=True)
            wins = [r for r in results if not isinstance(r, BaseException)]
            errors = [r for r in results if isinstance(r, BaseException)]
            assert all(isinstance(err, e.CrossShardStale) for err in errors), errors
            assert len(wins) == 2, (round_, results)  # the first wins, its reader loses


def delete_txn(key: str, expected: int, agent: str = "D") -> Txn:
    return commit_txn(
        op="delete",
        agent_id=agent,
        session_id="",
        writes=[WriteOp(key, expected, "delete")],
        read_set=[],
        rationale="delete",
        idem=None,
    )


def mandated(key: str, expected: int, ref: MandateRef | None, agent: str = "A") -> Txn:
    return commit_txn(
        op="commit",
        agent_id=agent,
        session_id="",
        writes=[WriteOp(key, expected, "commit", f"by {agent}")],
        read_set=[],
        rationale=None,
        idem=None,
        has_mandate=True,
        mandate=ref,
    )


class TestMandatesAndRevocations:
    """The store's half of protocol.md §5: consume-once in the atomic step, expiry on
    the store clock, policy shards, and the revocation list."""

    async def test_required_mandate(self, store: Store) -> None:
        await store.create(CreateOp("pay", "v0", "", True, "", new_commit_id()))
        with pytest.raises(e.MandateRequired) as info:
            await store.apply(commit("pay", 0, "x"))
        assert info.value.fields == {"key": "pay"}
        with pytest.raises(e.MandateNotFound):
            await store.apply(mandated("pay", 0, None))
        assert (await store.read("pay", None, "", False)).version == 0
        assert (await store.stats()).counters == Counters()

    async def test_consumed_once_then_409(self, store: Store) -> None:
        await store.create(CreateOp("pay", "v0", "", True, "", new_commit_id()))
        now = await store.now_ms()
        ref = MandateRef("m-1", now + 60_000, now + 90_000)
        out = await store.apply(mandated("pay", 0, ref))
        assert out.body is not None and out.body["new_version"] == 1
        with pytest.raises(e.MandateConsumed):
            await store.apply(mandated("pay", 1, ref))
        assert (await store.read("pay", None, "", False)).version == 1

    async def test_concurrent_commits_with_one_mandate(self, store: Store) -> None:
        for i in range(8):
            await store.create(CreateOp(f"pay/{i}", "v0", "", True, "", new_commit_id()))
        now = await store.now_ms()
        ref = MandateRef("m-race", now + 60_000, now + 90_000)
        results = await asyncio.gather(
            *(store.apply(mandated(f"pay/{i}", 0, ref, agent=f"A{i}")) for i in range(8)),
            return_exceptions=True,
        )
        wins = [r for r in results if not isinstance(r, BaseException)]
        assert len(wins) == 1, results
        assert all(isinstance(r, e.MandateConsumed) for r in results if r not in wins)

    async def test_expiry_on_the_store_clock(self, store: Store) -> None:
        await store.create(CreateOp("pay", "v0", "", True, "", new_commit_id()))
        now = await store.now_ms()
        ref = MandateRef("m-old", now + 5_000, now + 35_000)
        await store.advance_clock(6_000)
        with pytest.raises(e.MandateExpired):
            await store.apply(mandated("pay", 0, ref))

    async def test_reset_clears_consumed_mandates_keeps_revocations(self, store: Store) -> None:
        await store.create(CreateOp("pay", "v0", "", True, "", new_commit_id()))
        now = await store.now_ms()
        ref = MandateRef("m-2", now + 60_000, now + 90_000)
        await store.apply(mandated("pay", 0, ref))
        await store.revoke("tok-1", now + 60_000)
        assert (await store.revocation("tok-1")).revoked is True
        assert (await store.revocation("tok-2")).revoked is False
        await store.reset_all()
        await store.create(CreateOp("pay", "v0", "", True, "", new_commit_id()))
        out = await store.apply(mandated("pay", 0, ref))
        assert out.body is not None and out.body["new_version"] == 1
        assert (await store.revocation("tok-1")).revoked is True


class TestRateBuckets:
    async def test_bucket_takes_burst_then_waits_then_refills(self, store: Store) -> None:
        rate = RateLimit(per_ms=1 / 1000, burst=3)  # 1 token a second, burst 3
        assert [await store.take_token("A", rate) for _ in range(3)] == [0, 0, 0]
        wait = await store.take_token("A", rate)
        assert 900 <= wait <= 1000, wait
        assert await store.take_token("B", rate) == 0  # per agent
        await store.advance_clock(2_000)
        assert [await store.take_token("A", rate) for _ in range(2)] == [0, 0]
        assert await store.take_token("A", rate) > 0
        await store.reset_all()  # buckets go with a reset
        assert await store.take_token("A", rate) == 0

    async def test_concurrent_takes_never_exceed_the_burst(self, store: Store) -> None:
        rate = RateLimit(per_ms=1 / 3_600_000, burst=5)  # effectively no refill
        await store.take_token("C", rate)  # the bucket exists: the race is on one row
        waits = await asyncio.gather(*(store.take_token("C", rate) for _ in range(20)))
        assert sum(1 for w in waits if w == 0) == 4


class TestRevocations:
    async def test_deadline_on_the_store_clock(self, store: Store) -> None:
        now = await store.now_ms()
        never = await store.revocation("never")
        assert (never.until_ms, never.revoked) == (None, False)
        assert never.now_ms >= now
        await store.revoke("t", now + 10_000)
        first = await store.revocation("t")
        assert (first.until_ms, first.revoked) == (now + 10_000, True)
        assert first.now_ms >= now
        await store.revoke("t", now + 5_000)  # an earlier deadline never shortens one
        assert (await store.revocation("t")).until_ms == now + 10_000
        await store.advance_clock(10_000)
        later = await store.revocation("t")
        assert later.now_ms >= now + 10_000
        assert not later.revoked
        await store.purge()
        assert not (await store.revocation("t")).revoked


class TestOpenModeSecret:
    """The open-mode signing secret: the first one offered is kept, every later caller
    (on any replica over the store) gets it back, and a reset keeps it."""

    async def test_the_first_candidate_is_kept(
        self, store: Store, store_kind: str, tmp_path: Path
    ) -> None:
        a, b = b"a" * 32, b"b" * 32
        first, second = await asyncio.gather(store.open_mode_secret(a), store.open_mode_secret(b))
        assert first == second
        assert first in (a, b)
        await store.reset_all()
        assert await store.open_mode_secret(b"c" * 32) == first
        replica = open_store(store_url(store_kind, tmp_path), LIMITS)
        await replica.start()
        try:
            kept = await replica.open_mode_secret(b"d" * 32)
        finally:
            await replica.close()
        # memory:// is one process's store: another one keeps its own.
        assert kept == (b"d" * 32 if store_kind == "memory" else first)


def multi(
    *writes: WriteOp,
    agent: str = "A",
    session: str = "",
    read_set: list[ReadItem] | None = None,
    idem: IdemRef | None = None,
    mandate: MandateRef | None = None,
) -> Txn:
    return commit_txn(
        op="multi",
        agent_id=agent,
        session_id=session,
        writes=list(writes),
        read_set=read_set or [],
        rationale="why",
        idem=idem,
        has_mandate=mandate is not None,
        mandate=mandate,
    )


def new(key: str, content: str, goal: str = "", mandate: bool = False) -> WriteOp:
    return WriteOp(key, None, "create", content, goal_tag=goal, require_mandate=mandate)


def gone(key: str, expected: int) -> WriteOp:
    return WriteOp(key, expected, "delete")


def put(key: str, expected: int, content: str) -> WriteOp:
    return WriteOp(key, expected, "commit", content)


class TestMultiCreatesAndDeletes:
    """protocol.md §3.1: creates and deletes inside one multi-commit, in the same atomic
    step as its commits, decided by the same rules on every store."""

    async def _snapshot(self, store: Store, *keys: str) -> dict[str, object]:
        """Everything a refused multi must leave as it was."""
        seen: dict[str, object] = {}
        for key in keys:
            try:
                seen[key] = await store.read(key, None, "", False)
            except (e.ShardNotFound, e.ShardDeleted) as err:
                seen[key] = (err.code, err.fields)
            try:
                seen[f"history:{key}"] = await store.history(key, None, 100)
            except e.ShardNotFound:
                seen[f"history:{key}"] = None
        seen["stats"] = await store.stats()
        dl, _ = await store.dump_delivery_log(None, 100)
        seen["dl"] = {
            (agent, session, key): entry["version"]
            for agent, sessions in dl.items()
            for session, entries in sessions.items()
            for key, entry in entries.items()
        }
        seen["live"] = await store.list_keys("", None, 100)
        return seen

    async def test_create_delete_and_commit_in_one_step(self, store: Store) -> None:
        await store.create(create("a", "a0"))
        await store.create(create("d", "d0"))
        out = await store.apply(multi(new("n", "n0", goal="g"), gone("d", 0), put("a", 0, "a1")))
        assert out.status == 200 and out.body is not None
        assert out.body["results"] == [
            {"key": "n", "new_version": 0, "op": "create"},
            {"key": "d", "new_version": 1, "op": "delete"},
            {"key": "a", "new_version": 1, "op": "commit"},
        ]
        commit_id = out.body["commit_id"]
        n = await store.read("n", None, "", False)
        assert (n.version, n.content, n.goal_tag, n.id) == (0, "n0", "g", content_id("n0"))
        assert (n.attempt_count, n.conflict_count, n.history_depth, n.require_mandate) == (
            0,
            0,
            0,
            False,
        )
        with pytest.raises(e.ShardDeleted) as info:
            await store.read("d", None, "", False)
        assert info.value.fields == {"key": "d", "version": 1}
        a = await store.read("a", None, "", False)
        assert (a.version, a.content, a.attempt_count) == (1, "a1", 1)
        assert await store.list_keys("", None, 10) == ["a", "n"]
        # one history entry per key, one commit id; the bus's words for create and delete
        (hn,) = await store.history("n", None, 10)
        assert (hn.version, hn.rationale, hn.deleted, hn.prev_hash) == (0, "create", False, GENESIS)
        hd = (await store.history("d", None, 10))[0]
        assert (hd.version, hd.rationale, hd.deleted, hd.content) == (1, "delete", True, "")
        ha = (await store.history("a", None, 10))[0]
        assert (ha.version, ha.rationale, ha.content) == (1, "why", "a1")
        assert {hn.commit_id, hd.commit_id, ha.commit_id} == {commit_id}
        assert hn.hash == n.head_hash
        stats = await store.stats()
        assert (stats.counters.total_commits, stats.total_shards) == (1, 2)
        # read-your-writes: the committer's DL holds every written key at its new version
        dl, _ = await store.dump_delivery_log(None, 10)
        assert {k: v["version"] for k, v in dl["A"][""].items()} == {"a": 1, "d": 1, "n": 0}

    async def test_recreate_over_a_tombstone_continues_the_chain_and_keeps_the_policy(
        self, store: Store
    ) -> None:
        await store.create(CreateOp("pay", "v0", "", True, "", new_commit_id()))
        now = await store.now_ms()
        ref = MandateRef("m-del", now + 60_000, now + 90_000)
        await store.apply(multi(gone("pay", 0), mandate=ref))
        tomb = (await store.history("pay", None, 10))[0]
        # a create needs no mandate (as POST /shard), and asks for none here...
        out = await store.apply(multi(new("pay", "again")))
        assert out.body is not None
        assert out.body["results"] == [{"key": "pay", "new_version": 2, "op": "create"}]
        shard = await store.read("pay", None, "", False)
        assert (shard.version, shard.content, shard.require_mandate) == (2, "again", True)
        assert (shard.history_depth, shard.attempt_count) == (2, 0)
        entry = (await store.history("pay", None, 10))[0]
        assert (entry.version, entry.prev_hash, entry.rationale) == (2, tomb.hash, "create")
        # ...but the re-created shard keeps the tombstone's requirement
        with pytest.raises(e.MandateRequired):
            await store.apply(multi(put("pay", 2, "x")))
        with pytest.raises(e.MandateRequired):
            await store.apply(multi(gone("pay", 2)))

    async def test_a_create_may_ask_for_a_mandate_policy(self, store: Store) -> None:
        await store.apply(multi(new("pay", "v0", mandate=True)))
        assert (await store.read("pay", None, "", False)).require_mandate is True
        with pytest.raises(e.MandateRequired):
            await store.apply(commit("pay", 0, "x"))

    async def test_create_of_a_live_key_changes_nothing(self, store: Store) -> None:
        await store.create(create("a"))
        await store.create(create("b"))
        await store.create(create("d"))
        before = await self._snapshot(store, "a", "b", "c", "d")
        # ascending order: a (commit, checked), b (create of a live key: refused); c and
        # d would have been created and deleted
        txn = multi(gone("d", 0), new("c", "c0"), new("b", "b0"), put("a", 0, "a1"))
        with pytest.raises(e.ShardAlreadyExists) as info:
            await store.apply(txn)
        assert info.value.fields == {"key": "b"}
        after = await self._snapshot(store, "a", "b", "c", "d")
        # only a's attempt was counted (protocol.md §6.2); nothing else moved
        a_before, a_after = before.pop("a"), after.pop("a")
        assert isinstance(a_before, Shard) and isinstance(a_after, Shard)
        assert a_after == a_before._replace(attempt_count=1)
        assert after == before
        assert (await store.stats()).counters == Counters()

    async def test_delete_with_a_stale_version_changes_nothing(self, store: Store) -> None:
        await store.create(create("a"))
        await store.apply(commit("a", 0, "a1", agent="B"))
        before = await self._snapshot(store, "a", "n")
        with pytest.raises(e.VersionMismatch) as info:
            await store.apply(multi(new("n", "n0"), gone("a", 0)))
        assert info.value.fields == {"key": "a", "expected": 0, "found": 1}
        after = await self._snapshot(store, "a", "n")
        a_before, a_after = before.pop("a"), after.pop("a")
        assert isinstance(a_before, Shard) and isinstance(a_after, Shard)
        assert a_after == a_before._replace(attempt_count=2, conflict_count=1)
        stats_before, stats_after = before.pop("stats"), after.pop("stats")
        assert isinstance(stats_before, StoreStats) and isinstance(stats_after, StoreStats)
        assert stats_after.counters.total_conflicts == stats_before.counters.total_conflicts + 1
        assert after == before

    async def test_delete_of_a_missing_or_deleted_key(self, store: Store) -> None:
        await store.create(create("t"))
        await store.apply(multi(gone("t", 0)))
        with pytest.raises(e.ShardDeleted) as deleted:
            await store.apply(multi(new("n", "n0"), gone("t", 1)))
        assert deleted.value.fields == {"key": "t", "version": 1}
        with pytest.raises(e.ShardNotFound) as missing:
            await store.apply(multi(new("n", "n0"), gone("zz", 0)))
        assert missing.value.fields == {"key": "zz"}
        with pytest.raises(e.ShardNotFound):
            await store.read("n", None, "", False)

    async def test_conflicts_are_reported_in_protocol_order(self, store: Store) -> None:
        """9e (a stale read) before 9f; within 9f the first failing key in ascending
        order, whatever its kind."""
        for key in ("a", "b", "o"):
            await store.create(create(key))
        await store.apply(commit("a", 0, "a1", agent="B"))
        await store.apply(commit("b", 0, "b1", agent="B"))
        # create of live a (first in order) and a delete of b at a stale version
        with pytest.raises(e.ShardAlreadyExists) as first:
            await store.apply(multi(new("a", "x"), gone("b", 0)))
        assert first.value.fields == {"key": "a"}
        # a stale delete of a comes before the create of live b
        with pytest.raises(e.VersionMismatch) as second:
            await store.apply(multi(gone("a", 0), new("b", "x")))
        assert second.value.fields == {"key": "a", "expected": 0, "found": 1}
        # a stale read comes before both
        await store.read("o", "A", "s", True)
        await store.apply(commit("o", 0, "o1", agent="B"))
        with pytest.raises(e.CrossShardStale) as third:
            await store.apply(multi(gone("a", 0), new("b", "x"), session="s"))
        assert third.value.fields["stale_keys"] == [
            {"key": "o", "version_at_read": 0, "current_version": 1}
        ]

    async def test_a_created_key_is_guarded_by_its_absence_not_by_an_old_read(
        self, store: Store
    ) -> None:
        """A create's precondition (the key is not live) takes the place of the caller's
        read of that key, as an expected version does (protocol.md §1.7)."""
        await store.create(create("t"))
        await store.read("t", "A", "s", True)  # A read t at 0
        await store.apply(commit("t", 0, "t1", agent="B"))
        await store.apply(multi(gone("t", 1), agent="B"))  # t is a tombstone at 2
        out = await store.apply(multi(new("t", "back"), session="s"))
        assert out.body is not None and out.body["results"][0]["new_version"] == 3
        # the same read stays in the set for the other keys' sake: now current (RYW)
        dl, _ = await store.dump_delivery_log(None, 10)
        assert dl["A"]["s"]["t"]["version"] == 3

    async def test_idempotent_multi_with_create_and_delete_replays(self, store: Store) -> None:
        await store.create(create("d"))
        ref = IdemRef("A", "idem-multi", "fp")
        first = await store.apply(multi(new("n", "n0"), gone("d", 0), idem=ref))
        again = await store.apply(multi(new("n", "n0"), gone("d", 0), idem=ref))
        assert (again.replayed, again.status, again.body) == (True, 200, first.body)
        assert len(await store.history("n", None, 10)) == 1
        assert (await store.stats()).counters.total_commits == 1
        with pytest.raises(e.IdempotencyKeyReused):
            await store.apply(multi(new("n", "n0"), idem=IdemRef("A", "idem-multi", "other")))

    async def test_concurrent_creates_of_one_key_one_winner(self, store: Store) -> None:
        """Each multi creates the shared key plus a key of its own: exactly one lands,
        whole; the others change nothing (no own key, no second history entry). Several
        rounds, so a store without the serialization fails for sure."""
        for round_ in range(5):
            key = f"k{round_}"
            results = await asyncio.gather(
                *(
                    store.apply(
                        multi(new(key, f"by {i}"), new(f"own/{key}/{i}", "x"), agent=f"A{i}")
                    )
                    for i in range(12)
                ),
                return_exceptions=True,
            )
            wins = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
            assert len(wins) == 1, results
            assert all(
                isinstance(r, e.ShardAlreadyExists) for i, r in enumerate(results) if i != wins[0]
            ), results
            (entry,) = await store.history(key, None, 10)
            assert entry.content == f"by {wins[0]}"
            assert await store.list_keys(f"own/{key}/", None, 100) == [f"own/{key}/{wins[0]}"]


def rollback_txn(key: str, target: int) -> Txn:
    return commit_txn(
        op="rollback",
        agent_id="A",
        session_id="",
        writes=[WriteOp(key, None, "rollback", target_version=target)],
        read_set=[],
        rationale=None,
        idem=None,
    )


def same_error(got: e.SBusError, want: e.SBusError) -> None:
    assert (type(got), got.detail, got.fields) == (type(want), want.detail, want.fields)


class TestOneReplayRuleAndOneWording:
    """The replay rule (sbus.core.idempotency.replay) and the wording of every refusal
    (each error class words its own detail from its fields) hold on every store: the
    Redis store decides both in Python from what its script answers."""

    async def test_idempotent_create_replays_and_refuses_reuse(self, store: Store) -> None:
        ref = IdemRef("A", "key-c", "f1")
        first = await store.create(CreateOp("k", "v0", "", False, "A", new_commit_id(), ref))
        again = await store.create(CreateOp("k", "v0", "", False, "A", new_commit_id(), ref))
        assert again == first._replace(replayed=True)
        # what the engine's pre-check reads is the record the store's re-check replayed
        assert await store.idempotent("A", "key-c") == IdemRecord("f1", 201, first.body, 0)
        other = IdemRef("A", "key-c", "f2")
        with pytest.raises(e.IdempotencyKeyReused):
            await store.create(CreateOp("k2", "v0", "", False, "A", new_commit_id(), other))
        with pytest.raises(e.ShardNotFound):
            await store.read("k2", None, "", False)
        assert len(await store.history("k", None, 10)) == 1

    async def test_reused_key_writes_nothing(self, store: Store) -> None:
        await store.create(create("k"))
        ref = IdemRef("A", "key-1", "f1")
        first = await store.apply(commit("k", 0, "x", idem=ref))
        with pytest.raises(e.IdempotencyKeyReused):
            await store.apply(commit("k", 1, "y", idem=IdemRef("A", "key-1", "f2")))
        assert (await store.read("k", None, "", False)).content == "x"
        assert (await store.stats()).counters.total_commits == 1
        record = await store.idempotent("A", "key-1")
        assert record == IdemRecord("f1", 200, first.body, 1)

    async def test_every_commit_refusal_is_worded_by_its_error(self, store: Store) -> None:
        async def refusal(txn: Txn) -> e.SBusError:
            with pytest.raises(e.SBusError) as info:
                await store.apply(txn)
            return info.value

        await store.create(create("k"))
        await store.create(create("o"))
        await store.create(create("z"))
        await store.create(CreateOp("pay", "v0", "", True, "", new_commit_id()))
        same_error(await refusal(commit("ghost", 0, "x")), e.ShardNotFound("ghost"))
        same_error(await refusal(commit("k", 5, "x")), e.VersionMismatch("k", 5, 0))
        same_error(await refusal(rollback_txn("k", 7)), e.VersionNotFound("k", 7))
        same_error(await refusal(multi(new("k", "again"))), e.ShardAlreadyExists("k"))
        same_error(await refusal(commit("pay", 0, "x")), e.MandateRequired("pay"))
        same_error(await refusal(mandated("pay", 0, None)), e.MandateNotFound.unrecognised())
        now = await store.now_ms()
        old = MandateRef("m-old", now - 1, now + 30_000)
        same_error(await refusal(mandated("pay", 0, old)), e.MandateExpired("m-old"))
        ref = MandateRef("m-1", now + 60_000, now + 90_000)
        await store.apply(mandated("pay", 0, ref))
        same_error(await refusal(mandated("pay", 1, ref)), e.MandateConsumed("m-1"))
        await store.read("k", "A", "s", True)
        await store.read("o", "A", "s", True)
        await store.apply(commit("k", 0, "k1", agent="B"))
        await store.apply(commit("o", 0, "o1", agent="B"))
        stale = await refusal(commit("z", 0, "x", agent="A", session="s"))
        same_error(stale, e.CrossShardStale.of([("k", 0, 1), ("o", 0, 1)]))
        await store.apply(delete_txn("o", 1))
        same_error(await refusal(commit("o", 2, "x")), e.ShardDeleted("o", 2))
        await store.advance_clock(15_000)  # past LIMITS' TTL, inside its expired marker
        expired = await refusal(commit("k", 1, "x", agent="A", session="s"))
        same_error(expired, e.SessionExpired("A", "ttl"))

    async def test_inject_stale_past_the_current_version_is_worded_once(self, store: Store) -> None:
        await store.create(create("k"))
        with pytest.raises(e.ValidationFailed) as info:
            await store.inject_stale("A", "s", "k", 1)
        same_error(info.value, e.ValidationFailed.past_current_version("k", 0))
        assert (await store.dump_delivery_log(None, 10))[0] == {}
