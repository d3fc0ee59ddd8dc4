"""What the SDK promises, as one test class to run against any bus.

Subclass :class:`SDKBehaviour` in a module that provides two fixtures:

- ``make_bus(agent_id="a", **options) -> Bus`` and
- ``make_async_bus(agent_id="a", **options) -> AsyncBus``,

each building clients of ONE fresh, empty bus per test, in open mode with
``SBUS_ADMIN_ENABLED=1`` and ``SBUS_TEST_HOOKS=1`` (the session-expiry test moves the
store clock) and the default ``SBUS_SESSION_TTL``. ``tests/client/test_inprocess.py``
runs it in process; a real ``sbus serve`` over any store can run it as well.
"""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Any, Protocol

import pytest

from sbus_client import (
    AsyncBus,
    AsyncSession,
    Bus,
    Committed,
    ConflictError,
    CrossShardStale,
    KeysPage,
    MandateConsumed,
    MandateRequired,
    RetriesExhausted,
    Session,
    SessionExpired,
    Shard,
    ShardAlreadyExists,
    ShardDeleted,
    ShardNotFound,
    VersionMismatch,
)


class BusFactory(Protocol):
    def __call__(self, agent_id: str | None = "a", **options: Any) -> Bus: ...


class AsyncBusFactory(Protocol):
    def __call__(self, agent_id: str | None = "a", **options: Any) -> AsyncBus: ...


def advance(bus: Bus, seconds: int) -> None:
    """Move the store clock (POST /admin/test/advance-clock) through the bus's client."""
    r = bus._http.post(
        bus.base_url + "/admin/test/advance-clock",
        json={"ms": seconds * 1000},
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text


def plus_one(shard: Shard) -> str:
    return str(int(shard.content) + 1)


class SDKBehaviour:
    # -- reads and writes -------------------------------------------------------------

    def test_create_read_commit_versions(self, make_bus: BusFactory) -> None:
        with make_bus().session() as s:
            created = s.create("plan", "v0", goal_tag="g")
            assert (created.key, created.version, created.content, created.etag) == (
                "plan",
                0,
                "v0",
                '"0"',
            )
            assert created.goal_tag == "g"
            shard = s.read("plan")
            assert (shard.version, shard.content, shard.etag) == (0, "v0", '"0"')
            first = s.commit("plan", "v1", expected=shard)
            assert (first.key, first.version, first.replayed) == ("plan", 1, False)
            assert re.fullmatch(r"[0-9a-f]{32}", first.commit_id)
            second = s.commit("plan", "v2", expected=first, rationale="because")
            assert second.version == 2
            assert s.commit("plan", "v3", expected=2).version == 3
            assert s.read("plan", record=False).content == "v3"

    def test_version_mismatch_carries_expected_and_found(self, make_bus: BusFactory) -> None:
        bus = make_bus()
        with bus.session() as s, bus.session() as other:
            shard = s.create("plan", "v0")
            other.commit("plan", "theirs", expected=0)
            with pytest.raises(VersionMismatch) as err:
                s.commit("plan", "mine", expected=shard)
            assert (err.value.key, err.value.expected, err.value.found) == ("plan", 0, 1)
            assert (err.value.status, err.value.code) == (409, "VersionMismatch")
            assert isinstance(err.value, ConflictError)
            assert "re-read 'plan'" in str(err.value)
            assert s.read("plan").content == "theirs"

    def test_cross_shard_stale_lists_every_stale_key(self, make_bus: BusFactory) -> None:
        bus = make_bus()
        with bus.session() as s, bus.session() as other:
            for key in ("a", "b", "c"):
                s.create(key, "0")
            s.read("a")
            s.read("b")
            other.commit("a", "1", expected=0)
            other.commit("b", "1", expected=0)
            with pytest.raises(CrossShardStale) as err:
                s.commit("c", "x", expected=0)
            assert err.value.stale_keys == [
                {"key": "a", "version_at_read": 0, "current_version": 1},
                {"key": "b", "version_at_read": 0, "current_version": 1},
            ]
            assert "stale_keys (a, b)" in str(err.value)
            s.read("a")
            s.read("b")  # re-read as told: the commit goes through
            assert s.commit("c", "x", expected=0).version == 1

    def test_unrecorded_read_does_not_constrain(self, make_bus: BusFactory) -> None:
        bus = make_bus()
        with bus.session() as s, bus.session() as other:
            s.create("a", "0")
            s.create("c", "0")
            assert s.read("a", record=False).version == 0
            other.commit("a", "1", expected=0)
            assert s.commit("c", "x", expected=0).version == 1

    def test_sessions_are_fresh_and_reset_on_exit(self, make_bus: BusFactory) -> None:
        bus = make_bus()
        one, two = bus.session(), bus.session()
        assert one.session_id != two.session_id
        assert re.fullmatch(r"[0-9a-f]{32}", one.session_id)
        with bus.session() as setup:
            setup.create("a", "0")
            setup.create("c", "0")
        with bus.session(session_id="task") as s:
            s.read("a")
        with bus.session() as other:
            other.commit("a", "1", expected=0)
        with bus.session(session_id="task") as s:
            assert s.commit("c", "x", expected=0).version == 1  # the old read was dropped

    def test_keep_leaves_the_session_in_place(self, make_bus: BusFactory) -> None:
        bus = make_bus()
        with bus.session() as setup:
            setup.create("a", "0")
            setup.create("c", "0")
        with bus.session(session_id="task", keep=True) as s:
            s.read("a")
        with bus.session() as other:
            other.commit("a", "1", expected=0)
        with bus.session(session_id="task") as s, pytest.raises(CrossShardStale):
            s.commit("c", "x", expected=0)

    def test_delete_and_create_again(self, make_bus: BusFactory) -> None:
        with make_bus().session() as s:
            s.create("notes/a", "x")
            assert s.delete("notes/a", expected=0) == 1
            with pytest.raises(ShardDeleted) as err:
                s.read("notes/a")
            assert (err.value.key, err.value.version) == ("notes/a", 1)
            assert isinstance(err.value, LookupError)
            assert s.create("notes/a", "y").version == 2
            with pytest.raises(ShardAlreadyExists) as exists:
                s.create("notes/a", "z")
            assert isinstance(exists.value, RuntimeError)
            with pytest.raises(ShardNotFound) as missing:
                s.read("never")
            assert missing.value.key == "never"

    def test_rollback_history_and_list(self, make_bus: BusFactory) -> None:
        with make_bus().session() as s:
            s.create("n/plan", "v0")
            s.commit("n/plan", "v1", expected=0)
            s.commit("n/plan", "v2", expected=1)
            back = s.rollback("n/plan", target_version=0, expected=2)
            assert (back.version, back.content) == (3, "v0")
            entries = s.history("n/plan")
            assert [e.version for e in entries] == [3, 2, 1, 0]
            assert [e.rationale for e in entries] == ["rollback to 0", None, None, "create"]
            assert entries[0].prev_hash == entries[1].hash
            assert [e.version for e in s.history("n/plan", limit=2, before=3)] == [2, 1]
            s.create("n/b", "")
            s.create("m/c", "")
            assert s.list("n/") == ["n/b", "n/plan"]
            assert s.list() == ["m/c", "n/b", "n/plan"]
            first = s.list_page(limit=2)
            assert (first.keys, first.next_after) == (["m/c", "n/b"], "n/b")
            rest = s.list_page(after=first.next_after, limit=2)
            assert (rest.keys, rest.next_after) == (["n/plan"], None)
            assert s.list_page("n/", limit=5) == KeysPage(["n/b", "n/plan"], None)

    def test_state_change_without_agent_is_refused_locally(self, make_bus: BusFactory) -> None:
        bus = make_bus(agent_id=None)
        with bus.session() as s:
            s.create("k", "v")  # a create needs no agent
            assert s.read("k").version == 0  # an unrecorded read
            with pytest.raises(ValueError, match="needs an agent"):
                s.commit("k", "w", expected=0)
        with make_bus(agent_id="b").session() as named:
            assert named.read("k").version == 0  # nothing was changed

    # -- bulk reads and atomic multi-key changes ---------------------------------------

    def test_read_many_records_like_single_reads(self, make_bus: BusFactory) -> None:
        bus = make_bus()
        with bus.session() as s, bus.session() as other:
            for key in ("a", "b", "c", "d"):
                s.create(key, key.upper())
            many = s.read_many(["b", "a"])
            assert list(many) == ["b", "a"]
            assert [(sh.key, sh.version, sh.content, sh.etag) for sh in many.values()] == [
                ("b", 0, "B", '"0"'),
                ("a", 0, "A", '"0"'),
            ]
            assert list(s.read_many(["d"], record=False)) == ["d"]
            other.commit("a", "A1", expected=0)
            other.commit("d", "D1", expected=0)  # read unrecorded: no constraint
            with pytest.raises(CrossShardStale) as err:
                s.commit("c", "x", expected=0)
            assert [k["key"] for k in err.value.stale_keys] == ["a"]

    def test_read_many_missing_keys(self, make_bus: BusFactory) -> None:
        with make_bus().session() as s:
            s.create("a", "A")
            s.create("gone", "x")
            s.delete("gone", expected=0)
            with pytest.raises(ShardNotFound) as missing:
                s.read_many(["a", "never"])
            assert missing.value.key == "never"
            with pytest.raises(ShardDeleted) as deleted:
                s.read_many(["gone", "a"])
            assert (deleted.value.key, deleted.value.version) == ("gone", 1)
            found = s.read_many(["never", "a", "gone"], missing_ok=True)
            assert list(found) == ["a"]
            assert s.read_many([]) == {}

    def test_scan_reads_content_without_recording(self, make_bus: BusFactory) -> None:
        bus = make_bus()
        with bus.session() as s, bus.session() as other:
            for i in range(3):
                s.create(f"n/{i}", f"c{i}")
            s.create("m/x", "")
            s.create("n/gone", "")
            s.delete("n/gone", expected=0)
            scanned = s.scan("n/")
            assert [(sh.key, sh.version, sh.content) for sh in scanned] == [
                ("n/0", 0, "c0"),
                ("n/1", 0, "c1"),
                ("n/2", 0, "c2"),
            ]
            s.create("c", "")
            other.commit("n/0", "changed", expected=0)
            assert s.commit("c", "x", expected=0).version == 1  # the scan recorded nothing

    def test_commit_many_creates_writes_and_deletes_at_once(self, make_bus: BusFactory) -> None:
        with make_bus().session() as s:
            a = s.create("a", "0")
            s.create("d", "old")
            done = s.commit_many([("a", "1", a)], creates=[("c", "new")], deletes=[("d", 0)])
            assert {k: c.version for k, c in done.items()} == {"a": 1, "c": 0, "d": 1}
            assert len({c.commit_id for c in done.values()}) == 1
            assert s.read("c").content == "new"
            with pytest.raises(ShardDeleted):
                s.read("d")
            with pytest.raises(ShardAlreadyExists):
                s.commit_many([("a", "2", 1)], creates=[("c", "again")])
            with pytest.raises(VersionMismatch):
                s.commit_many([("a", "2", 0)], creates=[("e", "x")])
            assert s.read("a").version == 1  # all or nothing
            with pytest.raises(ShardNotFound):
                s.read("e")

    # -- the work loops ------------------------------------------------------------

    def test_update_from_threads_loses_nothing(self, make_bus: BusFactory) -> None:
        bus = make_bus()
        with bus.session() as s:
            s.create("counter", "0")
        results: list[Committed | None] = []

        def worker() -> None:
            with bus.session() as s:
                for _ in range(10):
                    results.append(s.update("counter", plus_one))

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with bus.session() as s:
            assert s.read("counter").content == "60"
        assert sorted(r.version for r in results if r is not None) == list(range(1, 61))

    def test_update_without_change_commits_nothing(self, make_bus: BusFactory) -> None:
        with make_bus().session() as s:
            s.create("k", "same")
            assert s.update("k", lambda sh: None) is None
            assert s.update("k", lambda sh: sh.content) is None
            assert s.read("k").version == 0

    def test_transactional_reruns_on_conflict_in_a_fresh_session(
        self, make_bus: BusFactory
    ) -> None:
        bus = make_bus()
        with bus.session() as s:
            s.create("a", "10")
            s.create("b", "0")
        seen: list[str] = []
        retries: list[tuple[int, str]] = []

        def note(attempt: int, err: ConflictError, wait: float) -> None:
            retries.append((attempt, err.code))

        @bus.transactional(max_retries=3, on_retry=note)
        def move(s: Session, src: str, dst: str, amount: int) -> int:
            seen.append(s.session_id)
            a, b = s.read(src), s.read(dst)
            if len(seen) == 1:  # someone else moves money in between, once
                with bus.session() as other:
                    other.commit(src, str(int(a.content) - 1), expected=a)
            s.commit(src, str(int(a.content) - amount), expected=a)
            s.commit(dst, str(int(b.content) + amount), expected=b)
            return int(a.content) - amount

        assert move("a", "b", 4) == 5
        assert retries == [(1, "VersionMismatch")]
        assert len(seen) == 2 and seen[0] != seen[1]
        with bus.session() as s:
            assert (s.read("a").content, s.read("b").content) == ("5", "4")

    def test_transactional_joins_a_passed_session(self, make_bus: BusFactory) -> None:
        bus = make_bus()
        sessions: list[str] = []

        @bus.transactional()
        def inner(s: Session, key: str) -> int:
            sessions.append(s.session_id)
            return s.create(key, "x").version

        @bus.transactional()
        def outer(s: Session) -> int:
            sessions.append(s.session_id)
            return inner(s, "k1") + inner(s, "k2")

        assert outer() == 0
        assert len(sessions) == 3 and len(set(sessions)) == 1
        assert bus.run(inner, "k3") == 0
        assert bus.run(lambda s, key: s.read(key).version, "k3") == 0

    def test_transactional_gives_up_and_keeps_the_last_conflict(self, make_bus: BusFactory) -> None:
        bus = make_bus()
        with bus.session() as s:
            s.create("k", "0")
        runs: list[int] = []

        @bus.transactional(max_retries=2, base=0.001, cap=0.002)
        def always_stale(s: Session) -> None:
            runs.append(1)
            s.commit("k", "x", expected=99)

        with pytest.raises(RetriesExhausted) as err:
            always_stale()
        assert (err.value.attempts, len(runs)) == (3, 3)
        assert isinstance(err.value.last_error, VersionMismatch)

    def test_transactional_does_not_rerun_other_errors(self, make_bus: BusFactory) -> None:
        bus = make_bus()
        runs: list[int] = []

        @bus.transactional()
        def missing(s: Session) -> None:
            runs.append(1)
            s.read("nope")

        with pytest.raises(ShardNotFound):
            missing()
        assert runs == [1]

    def test_expired_session_is_a_conflict_transactional_recovers(
        self, make_bus: BusFactory
    ) -> None:
        bus = make_bus()
        with bus.session() as s:
            s.create("a", "0")
        with bus.session(session_id="long", keep=True) as s:
            s.read("a")
        advance(bus, 3601)  # past SBUS_SESSION_TTL (default 3600 s)
        with bus.session(session_id="long") as s, pytest.raises(SessionExpired) as err:
            s.commit("a", "1", expected=0)
        assert (err.value.reason, err.value.status, isinstance(err.value, ConflictError)) == (
            "ttl",
            410,
            True,
        )
        assert bus.run(lambda s: s.commit("a", "1", expected=0).version) == 1

    # -- mandates -------------------------------------------------------------------

    def test_mandate_is_issued_used_once(self, make_bus: BusFactory) -> None:
        bus = make_bus()
        with bus.session() as s:
            s.create("pay", "0", require_mandate=True)
            with pytest.raises(MandateRequired) as required:
                s.commit("pay", "1", expected=0)
            assert isinstance(required.value, PermissionError)
            m = bus.issue_mandate("a", ["pay"], {"order": 7}, ttl_s=60)
            assert m.context == {"order": 7} and len(m.context_hash) == 64
            assert s.commit("pay", "1", expected=0, mandate=m).version == 1
            with pytest.raises(MandateConsumed) as consumed:
                s.commit("pay", "2", expected=1, mandate=m)
            assert (consumed.value.jti, isinstance(consumed.value, RuntimeError)) == (m.jti, True)

    # -- asyncio -------------------------------------------------------------------------

    async def test_async_session_mirrors_the_sync_one(
        self, make_async_bus: AsyncBusFactory
    ) -> None:
        bus = make_async_bus()
        async with bus.session() as s, bus.session() as other:
            shard = await s.create("plan", "v0")
            assert (await s.read("plan")).version == 0
            await other.commit("plan", "theirs", expected=0)
            with pytest.raises(VersionMismatch) as err:
                await s.commit("plan", "mine", expected=shard)
            assert (err.value.expected, err.value.found) == (0, 1)
            assert await s.delete("plan", expected=1) == 2
            assert await s.list() == []

    async def test_async_bulk_reads_and_multi(self, make_async_bus: AsyncBusFactory) -> None:
        async with make_async_bus().session() as s:
            await s.create("k/a", "A")
            await s.create("k/b", "B")
            many = await s.read_many(["k/a", "k/b"])
            assert {k: sh.content for k, sh in many.items()} == {"k/a": "A", "k/b": "B"}
            assert [sh.key for sh in await s.scan("k/")] == ["k/a", "k/b"]
            done = await s.commit_many(
                [("k/a", "A1", many["k/a"])], creates=[("k/c", "C")], deletes=[("k/b", 0)]
            )
            assert {k: c.version for k, c in done.items()} == {"k/a": 1, "k/c": 0, "k/b": 1}
            assert await s.list("k/") == ["k/a", "k/c"]
            page = await s.list_page("k/", limit=1)
            assert (page.keys, page.next_after) == (["k/a"], "k/a")

    async def test_async_update_from_tasks_loses_nothing(
        self, make_async_bus: AsyncBusFactory
    ) -> None:
        bus = make_async_bus()
        async with bus.session() as s:
            await s.create("counter", "0")

        async def worker() -> None:
            async with bus.session() as s:
                for _ in range(10):
                    await s.update("counter", plus_one)

        await asyncio.gather(*(worker() for _ in range(6)))
        async with bus.session() as s:
            assert (await s.read("counter")).content == "60"

    async def test_async_transactional_retries_and_joins(
        self, make_async_bus: AsyncBusFactory
    ) -> None:
        bus = make_async_bus()
        async with bus.session() as s:
            await s.create("k", "0")
        sessions: list[str] = []

        @bus.transactional(max_retries=2)
        async def bump(s: AsyncSession) -> int:
            sessions.append(s.session_id)
            shard = await s.read("k")
            if len(sessions) == 1:
                async with bus.session() as other:
                    await other.commit("k", "9", expected=shard)
            return (await s.commit("k", "x", expected=shard)).version

        assert await bump() == 2
        assert len(set(sessions)) == 2

        @bus.transactional()
        async def outer(s: AsyncSession) -> int:
            return await bump(s)  # joins: no new session, no retry of its own

        before = len(sessions)
        assert await outer() == 3
        assert len(sessions) == before + 1
        assert await bus.run(bump) == 4
