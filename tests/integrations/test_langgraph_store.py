"""What SBusStore adds to a LangGraph store: versions, one atomic commit per batch,
sessions that move on after a conflict, blind-write modes, unrecorded browsing, and the
key mapping within the bus's key grammar. In process (sbus_client.testing)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from langgraph.store.base import GetOp, PutOp, SearchOp

from sbus.core.keys import key_problem
from sbus_client import (
    Bus,
    ConflictError,
    CrossShardStale,
    DeltaTooLarge,
    ShardAlreadyExists,
    VersionMismatch,
)
from sbus_client.langgraph import SBusStore
from sbus_client.langgraph._keys import MAX_SEGMENT, KeyMap, decode_part, encode_part
from sbus_client.testing import AsyncLocalBus, LocalBus

SETTINGS = {"max_delta": 4096}


@pytest.fixture
def local() -> Iterator[LocalBus]:
    with LocalBus(**SETTINGS) as bus:
        yield bus


@pytest.fixture
def store(local: LocalBus) -> SBusStore:
    return SBusStore(local.bus)


@pytest.fixture
async def alocal() -> AsyncIterator[AsyncLocalBus]:
    async with AsyncLocalBus(**SETTINGS) as bus:
        yield bus


def history_commit_ids(bus: Bus, key: str) -> list[str]:
    with bus.session("auditor") as s:
        return [entry.commit_id for entry in s.history(key)]


KEYS = KeyMap("lg")


class TestKeyMapping:
    @given(st.text())
    def test_encoding_is_reversible_and_within_the_grammar(self, text: str) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return  # a lone surrogate is no string a bus can hold
        segment = encode_part(text)
        assert decode_part(segment) == text
        assert key_problem("lg/" + segment) is None or len("lg/" + segment) > 256

    @given(
        st.lists(st.text(min_size=1, max_size=70), min_size=1, max_size=4),
        st.text(max_size=300),
        st.lists(st.text(min_size=1, max_size=70), min_size=1, max_size=4),
        st.text(max_size=300),
    )
    def test_distinct_items_get_distinct_valid_keys(
        self, ns1: list[str], k1: str, ns2: list[str], k2: str
    ) -> None:
        try:
            a, b = KEYS.shard_key(ns1, k1), KEYS.shard_key(ns2, k2)
        except UnicodeEncodeError:
            return
        assert key_problem(a) is None and key_problem(b) is None
        assert (a == b) == ((tuple(ns1), k1) == (tuple(ns2), k2))
        assert a.startswith(KEYS.namespace_prefix(ns1))

    def test_long_parts_are_hashed_and_decoded_only_where_plain(self) -> None:
        long_label, long_key = "L" * (MAX_SEGMENT + 1), "k" * 300
        key = KEYS.shard_key(("users", long_label), long_key)
        parts = key.split("/")
        assert parts[:2] == ["lg", "users"]
        assert parts[2].startswith("@h") and len(parts[2]) == 34
        assert parts[3].startswith("@h") and len(parts[3]) == 34
        located = KEYS.locate(key)
        assert located is not None
        assert (located.namespace, located.key) == (None, None)
        fits = KEYS.shard_key(("users", "L" * MAX_SEGMENT), "k" * 198)
        assert key_problem(fits) is None and len(fits) == 256
        located = KEYS.locate(fits)
        assert located is not None
        assert (located.namespace, located.key) == (("users", "L" * MAX_SEGMENT), "k" * 198)
        assert KEYS.shard_key(("users", "L" * MAX_SEGMENT), "k" * 199).split("/")[-1][:2] == "@h"

    def test_keys_it_never_makes_are_not_items(self) -> None:
        for key in ["other/x/y", "lg", "lg/x", "lg/a@2f/k", "lg/a@/k", "lg/@40@/k"]:
            assert KEYS.locate(key) is None, key

    def test_a_namespace_too_long_for_any_key_is_refused(self) -> None:
        with pytest.raises(ValueError, match="too long for a bus key"):
            KEYS.shard_key(["n" * 40] * 6, "k")

    @pytest.mark.parametrize("prefix", ["", "a//b", "/a", "a/", "..", "sp ace", "x" * 49])
    def test_bad_prefixes_are_refused(self, local: LocalBus, prefix: str) -> None:
        with pytest.raises(ValueError, match="prefix"):
            SBusStore(local.bus, prefix=prefix)


class TestConstruction:
    def test_needs_a_bus(self) -> None:
        with pytest.raises(ValueError, match="needs a Bus"):
            SBusStore()

    def test_blind_writes_mode_is_checked(self, local: LocalBus) -> None:
        with pytest.raises(ValueError, match="blind_writes"):
            SBusStore(local.bus, blind_writes="overwrite")  # type: ignore[arg-type]

    def test_each_api_needs_its_bus(self, local: LocalBus) -> None:
        with pytest.raises(RuntimeError, match="no Bus"):
            SBusStore(abus=object()).bind("a").get(("n",), "k")  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="no AsyncBus"):
            import asyncio

            asyncio.run(SBusStore(local.bus).bind("a").aget(("n",), "k"))

    def test_outside_a_graph_an_unbound_store_names_bind(self, store: SBusStore) -> None:
        with pytest.raises(RuntimeError, match=r"store\.bind\(agent_id, session_id\)"):
            store.get(("n",), "k")
        assert (store.agent_id, store.session_id) == (None, None)
        view = store.bind("planner")
        assert view.agent_id == "planner" and view.session_id and len(view.session_id) == 32

    @pytest.mark.parametrize(
        ("agent", "session", "field"),
        [("agent-\u00fc", None, "agent_id"), ("a" * 257, None, "agent_id"),
         ("a", "s\u00e9ance", "session_id"), ("a", "", "session_id"),
         ("a", "s" * 249, "session_id"), ("a", " s", "session_id")],
    )  # fmt: skip
    def test_an_identity_the_bus_cannot_carry_is_refused_by_bind(
        self, store: SBusStore, agent: str, session: str | None, field: str
    ) -> None:
        with pytest.raises(ValueError, match=rf"^bind\(\): {field} "):
            store.bind(agent, session)

    def test_a_long_session_keeps_working_after_conflicts(self, store: SBusStore) -> None:
        # 248 characters leave room for ".<n>": the view moves on and still works.
        view, other = store.bind("me", "s" * 248), store.bind("other")
        assert view.get(("n",), "k") is None
        other.put(("n",), "k", {"v": 1})
        with pytest.raises(ConflictError):
            view.put(("n",), "k", {"v": 2})
        assert view.session_id == "s" * 248 + ".1"
        assert view.get(("n",), "k") is not None
        view.put(("n",), "k", {"v": 2})

    def test_semantic_search_and_ttl_are_not_supported(self, store: SBusStore) -> None:
        view = store.bind("a", "s")
        with pytest.raises(NotImplementedError, match="semantic"):
            view.search(("n",), query="similar to this")
        with pytest.raises(NotImplementedError, match="TTL"):
            view.put(("n",), "k", {}, ttl=5)
        with pytest.raises(NotImplementedError, match="TTL"):
            view.batch([PutOp(("n",), "k", {}, ttl=5.0)])


class TestVersionsAndCommits:
    def test_items_are_versioned_shards_with_their_envelope(
        self, local: LocalBus, store: SBusStore
    ) -> None:
        view = store.bind("writer", "s")
        view.put(("users", "u1"), "prefs", {"theme": "dark"})
        view.put(("users", "u1"), "prefs", {"theme": "light"})
        with local.bus.session("auditor") as s:
            shard = s.read("lg/users/u1/prefs", record=False)
        assert shard.version == 1
        assert json.loads(shard.content) == {
            "ns": ["users", "u1"],
            "key": "prefs",
            "value": {"theme": "light"},
        }

    def test_created_at_is_kept_across_updates(self, local: LocalBus, store: SBusStore) -> None:
        view = store.bind("writer", "s")
        view.put(("t",), "k", {"v": 0})
        local.advance_clock(60)
        view.put(("t",), "k", {"v": 1})
        item = view.get(("t",), "k")
        assert item is not None
        assert (item.updated_at - item.created_at).total_seconds() >= 60

    def test_one_batch_is_one_atomic_multi_commit(self, local: LocalBus, store: SBusStore) -> None:
        view = store.bind("writer", "s")
        view.batch([PutOp(("t",), "a", {"v": 0}), PutOp(("t",), "b", {"v": 0})])
        view.batch(
            [
                GetOp(("t",), "a"),
                PutOp(("t",), "a", {"v": 1}),  # an update
                PutOp(("t",), "c", {"v": 1}),  # a create (read first: absent)
                PutOp(("t",), "b", None),  # a delete
            ]
        )
        ids = {key: history_commit_ids(local.bus, f"lg/t/{key}")[0] for key in "abc"}
        assert ids["a"] == ids["b"] == ids["c"]
        first = {history_commit_ids(local.bus, f"lg/t/{key}")[-1] for key in "ab"}
        assert len(first) == 1 and first != {ids["a"]}

    def test_a_refused_batch_writes_nothing(self, local: LocalBus, store: SBusStore) -> None:
        me, other = store.bind("me", "s"), store.bind("other", "s")
        me.put(("t",), "a", {"v": 0})
        me.put(("t",), "b", {"v": 0})
        other.put(("t",), "b", {"v": "theirs"})  # read first, then committed on top
        with pytest.raises(VersionMismatch) as caught:
            me.batch(
                [
                    PutOp(("t",), "a", {"v": 1}),
                    PutOp(("t",), "b", {"v": 1}),
                    PutOp(("t",), "new", {"v": 1}),
                ]
            )
        assert (caught.value.key, caught.value.expected, caught.value.found) == ("lg/t/b", 0, 1)
        reader = store.bind("reader")
        a, b = reader.get(("t",), "a"), reader.get(("t",), "b")
        assert a is not None and a.value == {"v": 0}
        assert b is not None and b.value == {"v": "theirs"}
        assert reader.get(("t",), "new") is None

    def test_a_conflict_moves_the_view_to_a_fresh_session(self, store: SBusStore) -> None:
        me, other = store.bind("me", "task"), store.bind("other", "x")
        me.put(("t",), "k", {"v": 0})
        other.put(("t",), "k", {"v": 1})
        assert me.session_id == "task"
        with pytest.raises(VersionMismatch):
            me.put(("t",), "k", {"v": 2})
        assert me.session_id == "task.1"
        # Nothing is remembered in the new session: the put reads first and lands.
        me.put(("t",), "k", {"v": 2})
        got = other.get(("t",), "k")
        assert got is not None and got.value == {"v": 2}
        other.put(("t",), "k", {"v": 3})
        with pytest.raises(VersionMismatch):
            me.put(("t",), "k", {"v": 4})
        assert me.session_id == "task.2"

    def test_the_abandoned_session_is_emptied_on_the_bus(self, store: SBusStore) -> None:
        setup = store.bind("setup")
        setup.put(("t",), "k", {"v": 0})
        setup.put(("t",), "other", {"v": 0})
        me = store.bind("me", "task")
        assert me.get(("t",), "k") is not None
        setup.put(("t",), "k", {"v": 1})
        with pytest.raises(VersionMismatch):
            me.put(("t",), "k", {"v": 2})
        # Back in the old session: its stale read of k is gone, so a commit there of
        # another item is not refused (it would be CrossShardStale had it been kept).
        again = store.bind("me", "task")
        again.put(("t",), "other", {"v": 1})
        got = setup.get(("t",), "other")
        assert got is not None and got.value == {"v": 1}

    def test_a_lost_create_race_is_a_conflict(self, store: SBusStore) -> None:
        a, b = store.bind("a", "s"), store.bind("b", "s")
        assert a.get(("t",), "k") is None
        assert b.get(("t",), "k") is None
        a.put(("t",), "k", {"by": "a"})
        with pytest.raises(ConflictError) as caught:
            b.put(("t",), "k", {"by": "b"})
        assert caught.value.code == "ShardAlreadyExists"
        assert isinstance(caught.value.__cause__, ShardAlreadyExists)
        assert b.session_id == "s.1"
        got = b.get(("t",), "k")
        assert got is not None and got.value == {"by": "a"}

    def test_an_item_deleted_under_a_session_is_a_conflict(self, store: SBusStore) -> None:
        a, b = store.bind("a", "s"), store.bind("b", "s")
        a.put(("t",), "k", {"v": 0})
        assert b.get(("t",), "k") is not None
        a.delete(("t",), "k")
        with pytest.raises(ConflictError) as caught:
            b.put(("t",), "k", {"v": 1})
        assert caught.value.code == "ShardDeleted"
        assert a.get(("t",), "k") is None

    def test_cross_item_write_skew_is_refused(self, store: SBusStore) -> None:
        setup = store.bind("setup")
        setup.put(("rota",), "alice", {"on_call": True})
        setup.put(("rota",), "bob", {"on_call": True})
        alice, bob = store.bind("alice", "s"), store.bind("bob", "s")
        for me in (alice, bob):  # both see two doctors on call
            assert [me.get(("rota",), n) is not None for n in ("alice", "bob")] == [True] * 2
        alice.put(("rota",), "alice", {"on_call": False})
        with pytest.raises(CrossShardStale) as caught:
            bob.put(("rota",), "bob", {"on_call": False})
        assert caught.value.stale_keys == [
            {"key": "lg/rota/alice", "version_at_read": 0, "current_version": 1}
        ]
        still = setup.get(("rota",), "bob")
        assert still is not None and still.value == {"on_call": True}

    def test_search_is_unrecorded_but_guards_the_items_it_returned(self, store: SBusStore) -> None:
        setup = store.bind("setup")
        setup.put(("t",), "x", {"v": 0})
        setup.put(("t",), "y", {"v": 0})
        me, other = store.bind("me", "s"), store.bind("other", "s")
        assert len(me.search(("t",))) == 2
        assert me.list_namespaces() == [("t",)]
        other.put(("t",), "x", {"v": 1})
        me.put(("t",), "y", {"v": 1})  # browsing x did not put it in the read set
        with pytest.raises(VersionMismatch) as caught:
            me.put(("t",), "x", {"v": 2})  # but the x it saw is not the x it would replace
        assert (caught.value.expected, caught.value.found) == (0, 1)

    def test_a_get_after_search_guards_with_the_read_version(self, store: SBusStore) -> None:
        setup = store.bind("setup")
        setup.put(("t",), "x", {"v": 0})
        me = store.bind("me", "s")
        me.batch([SearchOp(("t",))])
        setup.put(("t",), "x", {"v": 1})
        got = me.get(("t",), "x")
        assert got is not None and got.value == {"v": 1}
        me.put(("t",), "x", {"v": 2})  # the get's version, not the older search's
        final = setup.get(("t",), "x")
        assert final is not None and final.value == {"v": 2}

    def test_reject_mode_refuses_blind_writes(self, local: LocalBus) -> None:
        store = SBusStore(local.bus, blind_writes="reject")
        view = store.bind("me", "s")
        with pytest.raises(ValueError, match=r"blind write refused.*get\(\) 'lg/t/k'"):
            view.put(("t",), "k", {"v": 0})
        with pytest.raises(ValueError, match="blind write refused"):
            view.delete(("t",), "k")
        assert view.get(("t",), "k") is None
        view.put(("t",), "k", {"v": 0})  # read (absent) first: a create
        view.put(("t",), "k", {"v": 1})  # its own write is known
        view.batch([GetOp(("t",), "j"), PutOp(("t",), "j", {"v": 0})])
        got = store.bind("other").get(("t",), "j")
        assert got is not None and got.value == {"v": 0}

    def test_read_first_overwrites_only_on_the_version_it_read(
        self, local: LocalBus, store: SBusStore
    ) -> None:
        store.bind("setup").put(("t",), "k", {"v": 0})
        view = store.bind("me", "s")
        view.put(("t",), "k", {"v": 1})  # never read: GET (recorded) then commit on it
        with local.bus.session("auditor") as s:
            assert s.history("lg/t/k")[0].agent_id == "me"
            assert s.read("lg/t/k", record=False).version == 1

    def test_values_over_the_delta_limit_are_refused(self, store: SBusStore) -> None:
        view = store.bind("me", "s")
        with pytest.raises(DeltaTooLarge):
            view.put(("t",), "big", {"text": "x" * 5000})
        with pytest.raises(TypeError, match="JSON-serializable"):
            view.put(("t",), "odd", {"when": object()})
        assert view.get(("t",), "big") is None

    def test_shards_that_are_not_items(self, local: LocalBus, store: SBusStore) -> None:
        with local.bus.session("raw") as s:
            s.create("lg/t/raw", "not json")
        view = store.bind("me", "s")
        view.put(("t",), "item", {"v": 0})
        assert [i.key for i in view.search(("t",))] == ["item"]
        with pytest.raises(ValueError, match="does not hold an SBusStore item"):
            view.get(("t",), "raw")


class TestAsync:
    async def test_abatch_conflicts_and_moves_on_like_batch(self, alocal: AsyncLocalBus) -> None:
        store = SBusStore(abus=alocal.bus)
        me, other = store.bind("me", "s"), store.bind("other", "s")
        await me.aput(("t",), "k", {"v": 0})
        await other.aput(("t",), "j", {"v": 0})
        await other.aput(("t",), "k", {"v": 1})
        with pytest.raises(VersionMismatch):
            await me.aput(("t",), "k", {"v": 2})
        assert me.session_id == "s.1"
        # The abandoned session was emptied: its stale entry for k refuses nothing.
        await store.bind("me", "s").aput(("t",), "j", {"v": 1})
        await me.aput(("t",), "k", {"v": 2})
        got = await other.aget(("t",), "k")
        assert got is not None and got.value == {"v": 2}

    async def test_abatch_refuses_write_skew(self, alocal: AsyncLocalBus) -> None:
        store = SBusStore(abus=alocal.bus)
        await store.bind("setup").aput(("rota",), "alice", {"on_call": True})
        await store.bind("setup").aput(("rota",), "bob", {"on_call": True})
        alice, bob = store.bind("alice", "s"), store.bind("bob", "s")
        for me in (alice, bob):
            await me.aget(("rota",), "alice")
            await me.aget(("rota",), "bob")
        await alice.aput(("rota",), "alice", {"on_call": False})
        with pytest.raises(CrossShardStale):
            await bob.aput(("rota",), "bob", {"on_call": False})
