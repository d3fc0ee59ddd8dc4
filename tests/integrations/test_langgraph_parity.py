"""SBusStore behaves like LangGraph's own InMemoryStore on every operation it supports.

One test class, :class:`TestStoreParity`, runs against four stores: InMemoryStore and a
bound SBusStore view (over an in-process bus), each through the sync API (``batch``) and
the async one (``abatch``). Orders the two stores do not promise alike (search results,
which InMemoryStore gives in insertion order and SBusStore in key order) are compared
as sets; everything else exactly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import pytest
from langgraph.store.base import (
    BaseStore,
    GetOp,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    MatchCondition,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
)
from langgraph.store.memory import InMemoryStore

from sbus_client.langgraph import SBusStore
from sbus_client.testing import AsyncLocalBus, LocalBus


class Api:
    """One store through one of its APIs, always awaited by the tests."""

    def __init__(self, store: BaseStore, use_async: bool) -> None:
        self.store = store
        self.use_async = use_async

    async def get(self, namespace: tuple[str, ...], key: str) -> Item | None:
        if self.use_async:
            return await self.store.aget(namespace, key)
        return self.store.get(namespace, key)

    async def put(self, namespace: tuple[str, ...], key: str, value: dict[str, Any]) -> None:
        if self.use_async:
            await self.store.aput(namespace, key, value)
        else:
            self.store.put(namespace, key, value)

    async def delete(self, namespace: tuple[str, ...], key: str) -> None:
        if self.use_async:
            await self.store.adelete(namespace, key)
        else:
            self.store.delete(namespace, key)

    async def search(self, prefix: tuple[str, ...], **kwargs: Any) -> list[SearchItem]:
        if self.use_async:
            return await self.store.asearch(prefix, **kwargs)
        return self.store.search(prefix, **kwargs)

    async def list_namespaces(self, **kwargs: Any) -> list[tuple[str, ...]]:
        if self.use_async:
            return await self.store.alist_namespaces(**kwargs)
        return self.store.list_namespaces(**kwargs)

    async def batch(self, ops: list[Any]) -> list[Result]:
        if self.use_async:
            return await self.store.abatch(ops)
        return self.store.batch(ops)


@pytest.fixture
def local_bus() -> Iterator[LocalBus]:
    with LocalBus() as local:
        yield local


@pytest.fixture
async def async_local_bus() -> AsyncIterator[AsyncLocalBus]:
    async with AsyncLocalBus() as local:
        yield local


@pytest.fixture(params=["memory-sync", "sbus-sync", "memory-async", "sbus-async"])
def api(request: pytest.FixtureRequest) -> Api:
    kind, mode = str(request.param).split("-")
    use_async = mode == "async"
    if kind == "memory":
        return Api(InMemoryStore(), use_async)
    if use_async:
        local: AsyncLocalBus = request.getfixturevalue("async_local_bus")
        return Api(SBusStore(abus=local.bus).bind("tester", "parity"), use_async)
    sync_local: LocalBus = request.getfixturevalue("local_bus")
    return Api(SBusStore(sync_local.bus).bind("tester", "parity"), use_async)


def keyset(items: list[SearchItem]) -> set[tuple[tuple[str, ...], str]]:
    return {(item.namespace, item.key) for item in items}


# Labels and keys that stress the key mapping: characters a bus key cannot hold, dots,
# the empty key, an escape look-alike, and parts too long to keep unhashed.
ODD_KEYS = ["", ".", "..", "a/b", "with space", "@2F", "@h00", "ünï©ødé", "k" * 300]
ODD_LABELS = ["a b", "x/y", "@", "ünï", "L" * 60, "é" * 30]


class TestStoreParity:
    async def test_get_of_a_missing_item_is_none(self, api: Api) -> None:
        assert await api.get(("users", "u1"), "prefs") is None

    async def test_put_then_get(self, api: Api) -> None:
        value = {"theme": "dark", "n": 3, "tags": ["a", "b"], "nested": {"x": None}}
        await api.put(("users", "u1"), "prefs", value)
        item = await api.get(("users", "u1"), "prefs")
        assert item is not None
        assert (item.namespace, item.key, item.value) == (("users", "u1"), "prefs", value)
        assert isinstance(item.created_at, datetime) and item.created_at.tzinfo is not None
        assert item.updated_at >= item.created_at

    async def test_put_replaces_the_value(self, api: Api) -> None:
        await api.put(("users",), "k", {"v": 1, "old": True})
        await api.put(("users",), "k", {"v": 2})
        item = await api.get(("users",), "k")
        assert item is not None and item.value == {"v": 2}

    async def test_delete(self, api: Api) -> None:
        await api.put(("users",), "k", {"v": 1})
        await api.delete(("users",), "k")
        assert await api.get(("users",), "k") is None
        await api.delete(("users",), "k")  # deleting what is gone is no error
        await api.delete(("users",), "never")
        await api.put(("users",), "k", {"v": 2})  # and the key can be used again
        item = await api.get(("users",), "k")
        assert item is not None and item.value == {"v": 2}

    @pytest.mark.parametrize("key", ODD_KEYS)
    async def test_any_key_round_trips(self, api: Api, key: str) -> None:
        await api.put(("odd",), key, {"key": key})
        item = await api.get(("odd",), key)
        assert item is not None and (item.key, item.value) == (key, {"key": key})
        assert keyset(await api.search(("odd",))) == {(("odd",), key)}

    async def test_any_label_round_trips(self, api: Api) -> None:
        for label in ODD_LABELS:
            await api.put(("odd", label), "k", {"label": label})
        for label in ODD_LABELS:
            item = await api.get(("odd", label), "k")
            assert item is not None and item.namespace == ("odd", label)
        assert sorted(await api.list_namespaces(prefix=("odd",))) == sorted(
            ("odd", label) for label in ODD_LABELS
        )
        found = await api.search(("odd", "L" * 60))
        assert keyset(found) == {(("odd", "L" * 60), "k")}

    async def test_invalid_namespaces_are_refused(self, api: Api) -> None:
        with pytest.raises(InvalidNamespaceError):
            await api.put((), "k", {})
        with pytest.raises(InvalidNamespaceError):
            await api.put(("a.b",), "k", {})
        with pytest.raises(InvalidNamespaceError):
            await api.put(("langgraph",), "k", {})
        with pytest.raises(InvalidNamespaceError):
            await api.get(("",), "k")

    async def test_search_by_namespace_prefix(self, api: Api) -> None:
        await api.put(("docs",), "root", {"n": 0})
        await api.put(("docs", "a"), "one", {"n": 1})
        await api.put(("docs", "a", "deep"), "two", {"n": 2})
        await api.put(("docs", "ab"), "three", {"n": 3})
        await api.put(("other",), "four", {"n": 4})
        assert keyset(await api.search(("docs", "a"))) == {
            (("docs", "a"), "one"),
            (("docs", "a", "deep"), "two"),
        }
        assert len(await api.search(("docs",))) == 4
        assert len(await api.search(())) == 5
        assert await api.search(("nothing",)) == []
        [hit] = await api.search(("docs", "ab"))
        assert (hit.namespace, hit.key, hit.value, hit.score) == (
            ("docs", "ab"),
            "three",
            {"n": 3},
            None,
        )

    async def test_search_filters(self, api: Api) -> None:
        rows = {
            "a": {"kind": "fact", "score": 1, "meta": {"lang": "en", "v": 1}, "tags": ["x"]},
            "b": {"kind": "fact", "score": 5, "meta": {"lang": "de", "v": 1}, "tags": ["x", "y"]},
            "c": {"kind": "note", "score": 9, "meta": {"lang": "en", "v": 2}},
        }
        for key, value in rows.items():
            await api.put(("mem",), key, value)

        async def keys(filter_: dict[str, Any]) -> set[str]:
            return {item.key for item in await api.search(("mem",), filter=filter_)}

        assert await keys({"kind": "fact"}) == {"a", "b"}
        assert await keys({"kind": "fact", "score": 5}) == {"b"}
        assert await keys({"meta": {"lang": "en"}}) == {"a", "c"}
        assert await keys({"tags": ["x"]}) == {"a"}
        assert await keys({"score": {"$gt": 1}}) == {"b", "c"}
        assert await keys({"score": {"$gte": 5, "$lt": 9}}) == {"b"}
        assert await keys({"score": {"$lte": 5}}) == {"a", "b"}
        assert await keys({"kind": {"$ne": "fact"}}) == {"c"}
        assert await keys({"kind": {"$eq": "note"}}) == {"c"}
        assert await keys({"missing": "x"}) == set()
        assert await keys({}) == {"a", "b", "c"}

    async def test_search_pages(self, api: Api) -> None:
        for i in range(7):
            await api.put(("page",), f"k{i}", {"i": i})
        assert len(await api.search(("page",))) == 7  # the default limit is 10
        pages = [await api.search(("page",), limit=3, offset=o) for o in (0, 3, 6, 9)]
        assert [len(p) for p in pages] == [3, 3, 1, 0]
        seen = [(item.namespace, item.key) for page in pages for item in page]
        assert len(seen) == len(set(seen)) == 7
        assert len(await api.search(("page",), limit=2)) == 2

    async def test_list_namespaces(self, api: Api) -> None:
        for ns in [("a", "b", "c"), ("a", "b", "d"), ("a", "x"), ("z", "b"), ("z",)]:
            await api.put(ns, "k", {})
        everything = [("a", "b", "c"), ("a", "b", "d"), ("a", "x"), ("z",), ("z", "b")]
        assert await api.list_namespaces() == everything
        assert await api.list_namespaces(prefix=("a", "b")) == [("a", "b", "c"), ("a", "b", "d")]
        assert await api.list_namespaces(prefix=("*", "b")) == [
            ("a", "b", "c"),
            ("a", "b", "d"),
            ("z", "b"),
        ]
        assert await api.list_namespaces(suffix=("b",)) == [("z", "b")]
        assert await api.list_namespaces(suffix=("b", "*")) == [("a", "b", "c"), ("a", "b", "d")]
        assert await api.list_namespaces(prefix=("a",), suffix=("d",)) == [("a", "b", "d")]
        assert await api.list_namespaces(max_depth=1) == [("a",), ("z",)]
        assert await api.list_namespaces(max_depth=2) == [
            ("a", "b"),
            ("a", "x"),
            ("z",),
            ("z", "b"),
        ]
        assert await api.list_namespaces(limit=2, offset=1) == everything[1:3]
        assert await api.list_namespaces(prefix=("q",)) == []

    async def test_a_batch_reads_before_it_writes(self, api: Api) -> None:
        await api.put(("b",), "x", {"v": 1})
        results = await api.batch(
            [
                PutOp(("b",), "x", {"v": 2}),
                GetOp(("b",), "x"),
                PutOp(("b",), "y", {"v": 1}),
                SearchOp(("b",)),
                ListNamespacesOp(match_conditions=(MatchCondition("prefix", ("b",)),)),
                PutOp(("b",), "y", {"v": 3}),  # the last put of a key wins
                PutOp(("b",), "x", None),
            ]
        )
        assert len(results) == 7
        got = results[1]
        assert isinstance(got, Item) and got.value == {"v": 1}
        found = results[3]
        assert isinstance(found, list)
        assert [(i.key, i.value) for i in found if isinstance(i, Item)] == [("x", {"v": 1})]
        assert results[4] == [("b",)]
        assert [results[i] for i in (0, 2, 5, 6)] == [None] * 4
        assert await api.get(("b",), "x") is None
        y = await api.get(("b",), "y")
        assert y is not None and y.value == {"v": 3}
        assert await api.batch([]) == []
