"""sbus_client.openai_agents.SBusSession in process: the SDK's Session protocol, the same
answers as the SDK's own SQLiteSession on one script, the key layout, splitting of large
appends and clears, and conflicts (forced, so they always happen) redone on the new head.
Concurrency between real bus processes is in test_openai_agents_concurrency.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from agents.items import TResponseInputItem
from agents.memory import Session, SessionSettings, SQLiteSession

from sbus.core.keys import key_problem
from sbus_client import AsyncBus, RetriesExhausted
from sbus_client.openai_agents import Head, SBusSession, conversation_segment
from sbus_client.testing import AsyncLocalBus

Make = Callable[..., SBusSession]


def msg(role: str, text: str) -> TResponseInputItem:
    return cast(TResponseInputItem, {"role": role, "content": text})


def call(n: int) -> TResponseInputItem:
    item = {
        "type": "function_call",
        "call_id": f"call_{n}",
        "name": "lookup",
        "arguments": json.dumps({"q": f"é😀 {n}", "nested": [1, {"x": None}]}),
    }
    return cast(TResponseInputItem, item)


@pytest.fixture
async def local() -> AsyncIterator[AsyncLocalBus]:
    async with AsyncLocalBus() as bus:
        yield bus


@pytest.fixture
def make(local: AsyncLocalBus) -> Make:
    """``make(conversation, agent="a", **options)``: an SBusSession on its own AsyncBus."""

    def factory(conversation: str = "conv", agent: str = "a", **options: Any) -> SBusSession:
        bus = AsyncBus(local.url, agent_id=agent, http_client=local.http)
        return SBusSession(conversation, bus, **options)

    return factory


async def keys(local: AsyncLocalBus, prefix: str = "oai/") -> list[str]:
    return await AsyncBus(local.url, http_client=local.http).session().list(prefix)


# --- parity with the SDK's SQLiteSession -------------------------------------------------

U1, A1, U2, A2 = msg("user", "hi"), msg("assistant", "hello"), msg("user", "more"), call(1)
U3 = msg("user", "lone \ud800 surrogate and \x00 nul")
LIMITS = [None, 0, 1, 2, 3, 4, 9, -1, -3]


async def script(session: Session, limited: Session) -> list[Any]:
    """Everything a caller can observe, in one list; ``limited`` is a second object on
    the same conversation with ``SessionSettings(limit=2)``."""
    seen: list[Any] = [await session.get_items(), await session.pop_item()]
    await session.add_items([U1, A1])
    await session.add_items([])
    await session.add_items([U2, A2])
    seen += [await session.get_items(limit) for limit in LIMITS]
    seen += [await limited.get_items(), await limited.get_items(3), await limited.get_items(0)]
    seen += [await session.pop_item(), await session.get_items(2), await session.get_items()]
    await session.clear_session()
    seen += [await session.get_items(), await session.get_items(1), await session.pop_item()]
    await session.clear_session()  # clearing an empty conversation is a no-op
    await session.add_items([U3, U1])
    seen += [await session.get_items(), await session.pop_item(), await session.pop_item()]
    seen += [await session.pop_item(), await session.get_items()]
    return seen


async def test_same_observations_as_sqlite_session(make: Make, tmp_path: Path) -> None:
    db = tmp_path / "sessions.db"
    two = SessionSettings(limit=2)
    sqlite = SQLiteSession("conv", db)
    sqlite_limited = SQLiteSession("conv", db, session_settings=two)
    try:
        expected = await script(sqlite, sqlite_limited)
    finally:
        sqlite.close()
        sqlite_limited.close()
    observed = await script(make(), make(agent="b", session_settings=two))
    assert observed == expected
    # The script itself checks something: the SDK's answers, spelled out.
    assert expected[2:11] == [
        [U1, A1, U2, A2],
        [],
        [A2],
        [U2, A2],
        [A1, U2, A2],
        [U1, A1, U2, A2],
        [U1, A1, U2, A2],
        [U1, A1, U2, A2],
        [U1, A1, U2, A2],
    ]
    assert expected[11:14] == [[U2, A2], [A1, U2, A2], []]
    assert expected[14:] == [A2, [A1, U2], [U1, A1, U2], [], [], None, [U3, U1], U1, U3, None, []]


async def test_satisfies_the_runtime_checkable_session_protocol(make: Make) -> None:
    session = make("any conversation")
    assert isinstance(session, Session)
    assert session.session_id == "any conversation"
    assert session.session_settings == SessionSettings()


# --- layout ------------------------------------------------------------------------------


async def test_one_shard_per_item_and_a_head_appends_rewrite_nothing(
    make: Make, local: AsyncLocalBus
) -> None:
    session = make("c1")
    await session.add_items([U1, A1])
    await session.add_items([U2])
    assert await keys(local) == [
        "oai/c1/head",
        "oai/c1/items/0",
        "oai/c1/items/1",
        "oai/c1/items/2",
    ]
    reader = AsyncBus(local.url, http_client=local.http).session()
    items = await reader.read_many([session.item_key(i) for i in range(3)], record=False)
    # Each item was written once (version 0) and holds its own JSON.
    assert [(s.version, json.loads(s.content)) for s in items.values()] == [
        (0, U1),
        (0, A1),
        (0, U2),
    ]
    head = await reader.read(session.head_key, record=False)
    assert (head.version, json.loads(head.content)) == (
        1,
        {"session_id": "c1", "start": 0, "end": 3},
    )
    assert await session.pop_item() == U2
    assert await keys(local) == ["oai/c1/head", "oai/c1/items/0", "oai/c1/items/1"]
    await session.clear_session()
    assert await keys(local) == ["oai/c1/head"]
    head = await reader.read(session.head_key, record=False)
    assert (head.version, json.loads(head.content)) == (
        3,
        {"session_id": "c1", "start": 2, "end": 2},
    )
    # Positions after a clear are new ones; after a pop the popped one is created again.
    await session.add_items([A2])
    assert await keys(local) == ["oai/c1/head", "oai/c1/items/2"]
    assert await session.get_items() == [A2]


@pytest.mark.parametrize(
    ("conversation", "segment"),
    [
        ("plain-id_1.x", "plain-id_1.x"),
        ("a/b", "a@2Fb"),
        ("a@2Fb", "a@402Fb"),
        ("a:b c", "a@3Ab@20c"),
        ("é", "@C3@A9"),
        (".", "@2E"),
        ("..", "@2E@2E"),
        ("@2E", "@402E"),
    ],
)
def test_conversation_ids_map_to_distinct_valid_segments(conversation: str, segment: str) -> None:
    assert conversation_segment(conversation) == segment
    assert key_problem(f"oai/{segment}/items/{2**53}") is None


def test_overlong_ids_are_hashed_within_the_key_limit() -> None:
    long_id = "x" * 129
    segment = conversation_segment(long_id)
    assert segment.startswith("sha256:") and segment != conversation_segment("x" * 130)
    assert conversation_segment("x" * 128) == "x" * 128
    assert key_problem(f"a/prefix/of/some/length/{segment}/items/{2**53}") is None
    with pytest.raises(ValueError, match="must not be empty"):
        conversation_segment("")


async def test_look_alike_ids_are_separate_conversations(make: Make) -> None:
    await make("a/b").add_items([U1])
    await make("a@2Fb").add_items([U2])
    await make("x" * 300).add_items([A1])
    assert await make("a/b").get_items() == [U1]
    assert await make("a@2Fb").get_items() == [U2]
    assert await make("x" * 300).get_items() == [A1]


async def test_a_head_of_another_conversation_is_refused(make: Make, local: AsyncLocalBus) -> None:
    session = make("y" * 200)
    other = AsyncBus(local.url, agent_id="a", http_client=local.http).session()
    await other.create(session.head_key, json.dumps({"session_id": "z", "start": 0, "end": 0}))
    with pytest.raises(ValueError, match="belongs to conversation 'z'"):
        await session.get_items()


def test_constructor_checks_its_arguments(local: AsyncLocalBus) -> None:
    bus = AsyncBus(local.url, agent_id="a", http_client=local.http)
    for prefix in ("", "a//b", "a/../b", "a b", "/a"):
        with pytest.raises(ValueError, match="prefix"):
            SBusSession("c", bus, prefix=prefix)
    with pytest.raises(ValueError, match="max_txn_keys"):
        SBusSession("c", bus, max_txn_keys=1)
    with pytest.raises(ValueError, match="too long"):
        SBusSession("x" * 300, bus, prefix="p" * 162)
    session = SBusSession("x" * 300, bus, prefix="p" * 161)
    assert len(session.item_key(2**53)) == 256
    session = SBusSession("c", bus, prefix="team/memory")
    assert session.head_key == "team/memory/c/head"
    for agent in ("agent-\u00fc", "a" * 257, ""):
        with pytest.raises(ValueError, match=r"^agent_id "):
            SBusSession("c", bus, agent_id=agent)


# --- limits of one multi-commit ----------------------------------------------------------


async def test_large_appends_and_clears_are_split_to_fit_the_bus_limits() -> None:
    async with AsyncLocalBus(max_txn_keys=8, max_body=8192) as local:
        bus = AsyncBus(local.url, agent_id="a", http_client=local.http)
        small = [msg("user", f"m{i}") for i in range(20)]
        big = [msg("user", f"{i}" + "b" * 3000) for i in range(6)]
        session = SBusSession("c", bus, max_txn_keys=8, max_body=8192)
        await session.add_items(small)
        await session.add_items(big)
        assert await session.get_items() == small + big
        reader = bus.session()
        # 20 items at 7 per commit (the head is the 8th), then 2 of ~3 KB per 8 KiB body.
        assert len(await reader.history(session.head_key)) == 3 + 3
        await session.clear_session()
        assert await reader.list("oai/") == ["oai/c/head"]
        assert len(await reader.history(session.head_key)) == 7  # the clear: one head write
        assert await session.get_items() == []

        # The bus really refuses what the session splits (so the split is needed).
        unsplit = SBusSession("d", bus, max_txn_keys=128)
        with pytest.raises(ValueError, match="TooManyWrites"):
            await unsplit.add_items(small)
        assert await unsplit.get_items() == []


# --- conflicts, forced ---------------------------------------------------------------------


def after_first_read(session: SBusSession, action: Callable[[], Awaitable[Any]]) -> list[Head]:
    """Make ``session`` run ``action`` right after its first head read (another writer
    moving in between the read and the commit); returns the heads it read."""
    original = session._read_head
    heads: list[Head] = []

    async def read_head() -> Head:
        head = await original()
        heads.append(head)
        if len(heads) == 1:
            await action()
        return head

    session._read_head = read_head  # type: ignore[method-assign]
    return heads


async def test_an_append_on_a_moved_head_is_redone_on_the_new_one(make: Make) -> None:
    a, b = make(agent="a"), make(agent="b")
    await a.add_items([U1])
    heads = after_first_read(a, lambda: b.add_items([U2]))
    await a.add_items([A1])
    assert [h.end for h in heads] == [1, 2]
    assert (a.conflicts, b.conflicts) == (1, 0)
    assert await b.get_items() == [U1, U2, A1]


async def test_racing_first_appends_both_land(make: Make) -> None:
    a, b = make(agent="a"), make(agent="b")
    heads = after_first_read(a, lambda: b.add_items([U2, A2]))
    await a.add_items([U1])
    assert heads[0].shard is None and heads[1].end == 2  # the create met ShardAlreadyExists
    assert a.conflicts == 1
    assert await a.get_items() == [U2, A2, U1]


async def test_a_pop_on_a_moved_head_pops_the_new_last_item(make: Make) -> None:
    a, b = make(agent="a"), make(agent="b")
    await a.add_items([U1, A1])
    after_first_read(a, lambda: b.add_items([U2]))
    assert await a.pop_item() == U2
    assert a.conflicts == 1
    assert await b.get_items() == [U1, A1]


async def test_a_clear_on_a_moved_head_clears_the_new_items_too(
    make: Make, local: AsyncLocalBus
) -> None:
    a, b = make(agent="a"), make(agent="b")
    await a.add_items([U1])
    after_first_read(a, lambda: b.add_items([U2]))
    await a.clear_session()
    assert a.conflicts == 1
    assert await b.get_items() == []
    assert await keys(local) == ["oai/conv/head"]


async def test_a_read_across_a_change_is_read_again(make: Make) -> None:
    a, b = make(agent="a"), make(agent="b")
    await a.add_items([U1, A1, U2])
    original = a._read_items
    calls = 0

    async def read_items(indexes: range) -> list[Any]:
        nonlocal calls
        calls += 1
        shards = await original(indexes)
        if calls == 1:  # the items are read; now another writer replaces the last one
            assert await b.pop_item() == U2
            await b.add_items([U3])
        return shards

    a._read_items = read_items  # type: ignore[method-assign]
    # Without the second head read this would answer the replaced U2.
    assert await a.get_items() == [U1, A1, U3]
    assert calls == 2
    assert a.conflicts == 0  # reads are not refused writes


async def test_a_conflict_past_the_budget_raises_retries_exhausted(make: Make) -> None:
    a, b = make(agent="a", max_elapsed=0.0), make(agent="b")
    after_first_read(a, lambda: b.add_items([U2]))
    with pytest.raises(RetriesExhausted):
        await a.add_items([U1])
    assert await b.get_items() == [U2]


# --- the internal bus session never blocks a write -------------------------------------
# Every commit records its written keys in the committer's DeliveryLog (protocol.md 1.6),
# and those entries join the read set of its later commits. SBusSession decides on the
# head's version alone, so such entries must never refuse one of its writes.


async def test_an_item_another_writer_popped_does_not_block_this_writer(make: Make) -> None:
    a, b = make(agent="a", max_elapsed=2.0), make(agent="b")
    await a.add_items([U1, A1])  # a's DeliveryLog now holds items/0 and items/1
    assert await b.pop_item() == A1  # items/1 moves on (a tombstone)
    await b.add_items([U2])  # and is created again, at a later version
    await a.add_items([U3])
    assert await a.pop_item() == U3
    assert await a.get_items() == [U1, U2]


async def test_a_writer_idle_past_the_session_ttl_can_still_write() -> None:
    async with AsyncLocalBus(session_ttl=60) as local:
        bus = AsyncBus(local.url, agent_id="a", http_client=local.http)
        session = SBusSession("conv", bus, max_elapsed=2.0)
        await session.add_items([U1])
        await local.advance_clock(61)  # its bus session's entries have expired
        await session.add_items([A1])
        assert await session.pop_item() == A1
        await session.clear_session()
        assert await session.get_items() == []
