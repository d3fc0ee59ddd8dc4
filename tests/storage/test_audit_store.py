"""The audit log's part of the Store Protocol on every backend, through the Protocol alone:
ids that only grow (also past a purge of everything), aggregation per group and
store-clock minute, paging, retention by age and rows, and a log that /admin/reset keeps."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sbus.core import audit
from sbus.core.audit import AuditEvent
from sbus.core.store import Store
from sbus.core.types import Limits
from sbus.storage.factory import open_store
from tests.conftest import store_url

LIMITS = Limits(audit_ttl_ms=600_000, audit_max_rows=5)


@pytest.fixture
async def store(store_kind: str, tmp_path: Path) -> AsyncIterator[Store]:
    s = open_store(store_url(store_kind, tmp_path), LIMITS)
    await s.start()
    yield s
    await s.close()


async def at_the_start_of_a_minute(store: Store) -> None:
    await store.advance_clock(60_000 - await store.now_ms() % 60_000 + 1)


async def test_entries_page_in_id_order_and_aggregate_per_minute(store: Store) -> None:
    await at_the_start_of_a_minute(store)
    before = await store.now_ms()
    await store.audit(AuditEvent("config", "a", {"ori_enabled": False, "n": [1, "x"]}))
    for _ in range(3):
        await store.audit(audit.denied("b", "k", "write"))
    await store.audit(audit.denied("b", "other", "write"))
    await store.audit(audit.denied("c", "k", "write"))
    found = await store.audit_log(None, 10)
    assert [(e.kind, e.agent, e.details, e.events) for e in found] == [
        ("config", "a", {"ori_enabled": False, "n": [1, "x"]}, 1),
        ("denied", "b", {"key": "k", "right": "write"}, 3),
        ("denied", "b", {"key": "other", "right": "write"}, 1),
        ("denied", "c", {"key": "k", "right": "write"}, 1),
    ]
    ids = [e.id for e in found]
    assert ids == sorted(set(ids))
    assert all(before <= e.at <= before + 60_000 for e in found)
    assert [e.id for e in await store.audit_log(ids[1], 2)] == ids[2:4]
    assert await store.audit_log(ids[-1], 10) == []
    # the next minute: a new entry for the same group
    await store.advance_clock(60_000)
    await store.audit(audit.denied("b", "k", "write"))
    last = (await store.audit_log(ids[-1], 10))[0]
    assert (last.kind, last.agent, last.events) == ("denied", "b", 1)
    assert last.at >= found[1].at + 60_000


async def test_reset_keeps_the_log_and_ids_keep_growing_past_a_purge(store: Store) -> None:
    for i in range(7):
        await store.audit(AuditEvent("reset", "a", {"shards": i}))
    await store.reset_all()
    await store.purge()  # the row cap keeps the newest five
    kept = await store.audit_log(None, 10)
    assert [e.details["shards"] for e in kept] == [2, 3, 4, 5, 6]
    await store.advance_clock(600_001)  # all five past SBUS_AUDIT_TTL
    await store.purge()
    assert await store.audit_log(None, 10) == []
    await store.audit(AuditEvent("reset", "a", {"shards": 7}))
    fresh = await store.audit_log(None, 10)
    assert [e.details["shards"] for e in fresh] == [7]
    # a cursor taken before the purge still finds what came after it
    assert fresh[0].id > kept[-1].id
    assert await store.audit_log(kept[-1].id, 10) == fresh
