"""Answers the client never gets, against real ``sbus serve`` processes.

Lost answer: a commit whose answer is lost on the way back (tests/proxy.py closes the
connection after the bus answered): the commit landed, the client cannot know it. Resending
the same request with the same Idempotency-Key replays the recorded answer
(``Idempotent-Replayed: true``, protocol.md section 3.4), so the version moved exactly once;
a resend with a fresh key is refused as stale. Over every topology, raw and through the SDK
(whose transport loop resends by itself); the replay is checked on the other replica where
there are two, since the record lives in the store.

Unknown outcome: the PostgreSQL backend serving a commit is terminated while the message
carrying the commit's effects and its COMMIT waits on a row the test holds; the bus answers
503 ``outcome: unknown`` (protocol.md section 6.1) and the resend with the same key moves the
version exactly once. Raw, then through the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from sbus.storage.sql.postgres import asyncpg_dsn
from sbus_client import AsyncBus
from sbus_client import Bus as SDKBus
from tests import backends
from tests.concurrency.conftest import (
    JSON_HEADERS,
    POSTGRES_2,
    Bus,
    create_shard,
    expect,
    get_stats,
    new_client,
)
from tests.history.client import Recorder
from tests.proxy import LossyProxy

pytestmark = pytest.mark.concurrency

KEY = "lost/answer"


def test_lost_answer_is_replayed_not_reapplied(fresh_bus: Bus) -> None:
    bus = fresh_bus
    with new_client(bus.url(0)) as direct:
        assert create_shard(direct, KEY, "v0") == 0
    body = {"key": KEY, "expected_version": 0, "delta": "v1", "agent_id": "courier"}
    headers = {"Idempotency-Key": "lost-answer-1"}
    with LossyProxy(bus.servers[0].port) as proxy, new_client(proxy.url) as client:
        proxy.lose_next_answer(b"POST /commit ")
        with pytest.raises(httpx.RemoteProtocolError):
            client.post("/commit", json=body, headers=headers)
        assert proxy.lost == 1

        with new_client(bus.url(1)) as other:
            resp = other.get(f"/shard/{KEY}", params={"record": "false"})
            expect(resp, [200])
            assert (resp.json()["version"], resp.json()["content"]) == (1, "v1")

            # The resend, through the same proxy (now passing answers): a replay.
            resp = client.post("/commit", json=body, headers=headers)
            expect(resp, [200])
            assert resp.headers.get("idempotent-replayed") == "true"
            assert resp.json()["new_version"] == 1

            # A resend under a fresh key is a new request: stale now, refused.
            resp = other.post("/commit", json=body, headers={"Idempotency-Key": "lost-answer-2"})
            expect(resp, [409])
            assert (resp.json()["error"], resp.json()["found"]) == ("VersionMismatch", 1)

            resp = other.get(f"/history/{KEY}")
            expect(resp, [200])
            assert [e["version"] for e in resp.json()["entries"]] == [1, 0]
            stats = get_stats(other)
    assert stats["total_commits"] == 1
    assert proxy.lost == 1


def test_sdk_resends_a_lost_answer_and_gets_the_replay(fresh_bus: Bus, recorder: Recorder) -> None:
    """The same through the SDK: ``Session.commit`` sees the dropped connection, resends
    the identical bytes (one Idempotency-Key) and returns the replayed answer."""
    key = "lost/sdk"
    with new_client(fresh_bus.url(0)) as direct:
        assert create_shard(direct, key, "v0") == 0
    sent: list[httpx.Request] = []
    with (
        LossyProxy(fresh_bus.servers[0].port) as proxy,
        recorder.attach(httpx.Client(timeout=30.0, trust_env=False)) as http,
    ):
        http.event_hooks["request"].append(sent.append)
        with SDKBus(proxy.url, agent_id="courier", http_client=http).session() as s:
            shard = s.read(key)
            proxy.lose_next_answer(b"POST /commit")
            done = s.commit(key, "v1", expected=shard)
    assert proxy.lost == 1
    assert (done.key, done.version, done.replayed) == (key, 1, True)
    commits = [r for r in sent if r.url.path.startswith("/commit")]
    assert len(commits) == 2
    assert len({(r.headers["idempotency-key"], r.content) for r in commits}) == 1
    with new_client(fresh_bus.url(1)) as other:
        resp = other.get(f"/history/{key}")
        expect(resp, [200])
        assert [(e["version"], e["content"]) for e in resp.json()["entries"]] == [
            (1, "v1"),
            (0, "v0"),
        ]
        assert get_stats(other)["total_commits"] == 1


# --- unknown outcome: the store connection dies while COMMIT is in flight ----------------

UNKNOWN_KEY = "lost/unknown"
WAIT_S = 20.0


class HistoryRowBlocker:
    """Holds an uncommitted ``sbus_history`` row for (key, version) in its own transaction.
    The bus's commit to that version passes its lock-and-decide step and then blocks in the
    message that writes the effects and COMMITs, on this row's unique index: a backend
    deterministically stuck mid-transaction with its COMMIT already sent."""

    def __init__(self, key: str, version: int) -> None:
        self.key, self.version = key, version
        self.conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> HistoryRowBlocker:
        self.conn = await asyncpg.connect(asyncpg_dsn(backends.POSTGRES_URL))
        await self.conn.execute("BEGIN")
        await self.conn.execute(
            "INSERT INTO sbus_history (key, version, agent_id, committed_ms, content, deleted,"
            " rationale, commit_id, prev_hash, hash, size)"
            " VALUES ($1, $2, 'blocker', 0, '', false, NULL, 'blocker', '', '', 0)",
            self.key,
            self.version,
        )
        return self

    async def blocked_backend(self, other_than: frozenset[int] = frozenset()) -> tuple[int, str]:
        """The pid and query of a backend waiting for this transaction (polls).

        pg_stat_activity's rows are one snapshot taken when the query starts, while
        pg_blocking_pids() looks at the lock table live as each row is read: a backend
        can be caught blocked while its row still shows the statement before. So only a
        row that is itself waiting on a lock counts; anything else is polled again."""
        assert self.conn is not None
        mine = self.conn.get_server_pid()
        deadline = time.monotonic() + WAIT_S
        seen: list[tuple[int, str, str | None]] = []
        while time.monotonic() < deadline:
            async with _admin() as admin:
                rows = await admin.fetch(
                    "SELECT pid, query, wait_event_type FROM pg_stat_activity"
                    " WHERE $1 = ANY(pg_blocking_pids(pid))",
                    mine,
                )
            seen = [(r["pid"], r["query"], r["wait_event_type"]) for r in rows]
            found = [(pid, q) for pid, q, wait in seen if wait == "Lock" and pid not in other_than]
            if found:
                assert len(found) == 1, found
                return found[0]
            await asyncio.sleep(0.02)
        pytest.fail(f"no backend blocked on the {self.key} history row within {WAIT_S}s: {seen}")

    async def release(self) -> None:
        if self.conn is not None:
            await self.conn.execute("ROLLBACK")
            await self.conn.close()
            self.conn = None

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


@contextlib.asynccontextmanager
async def _admin() -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(backends.POSTGRES_URL))
    try:
        yield conn
    finally:
        await conn.close()


async def terminate(pid: int) -> None:
    async with _admin() as admin:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid) is True


@pytest.mark.parametrize("module_bus", [POSTGRES_2], indirect=True, ids=str)
async def test_backend_terminated_mid_commit_is_unknown_then_resent_once(
    fresh_bus: Bus, recorder: Recorder
) -> None:
    bus = fresh_bus
    body = {"key": UNKNOWN_KEY, "expected_version": 0, "delta": "v1", "agent_id": "courier"}
    headers = {"Idempotency-Key": "unknown-1"}
    async with recorder.attach_async(
        httpx.AsyncClient(base_url=bus.url(0), headers=JSON_HEADERS, timeout=30, trust_env=False)
    ) as client:
        resp = await client.post("/shard", json={"key": UNKNOWN_KEY, "content": "v0"})
        assert resp.status_code == 201, resp.text
        async with HistoryRowBlocker(UNKNOWN_KEY, 1) as blocker:
            sending = asyncio.create_task(client.post("/commit", json=body, headers=headers))
            pid, query = await blocker.blocked_backend()
            # The effects and the COMMIT travel in one message (pg_stat_activity shows
            # its first kilobyte): the bus cannot tell whether the COMMIT ran.
            assert query.startswith("SELECT sbus_txn_apply("), query
            await terminate(pid)
            resp = await asyncio.wait_for(sending, WAIT_S)
        assert resp.status_code == 503, resp.text
        assert resp.headers["content-type"] == "application/problem+json"
        assert resp.headers["retry-after"] == "1"
        problem = resp.json()
        assert (problem["error"], problem["outcome"]) == ("StoreUnavailable", "unknown")

        # The terminated transaction rolled back, so the resend (same key) applies it now,
        # on the other replica; a third send replays it. The version moved exactly once.
        async with httpx.AsyncClient(
            base_url=bus.url(1), headers=JSON_HEADERS, timeout=30, trust_env=False
        ) as other:
            recorder.attach_async(other)
            resp = await other.post("/commit", json=body, headers=headers)
            assert resp.status_code == 200, resp.text
            assert resp.json()["new_version"] == 1
            assert "idempotent-replayed" not in resp.headers
            # Unrecorded: the history checker counts a replay of an answered commit as a
            # second write of the same value.
            async with httpx.AsyncClient(
                base_url=bus.url(0), headers=JSON_HEADERS, timeout=30, trust_env=False
            ) as unrecorded:
                resp = await unrecorded.post("/commit", json=body, headers=headers)
            assert resp.status_code == 200, resp.text
            assert resp.headers.get("idempotent-replayed") == "true"
            assert resp.json()["new_version"] == 1
            resp = await other.get(f"/history/{UNKNOWN_KEY}")
            assert [e["version"] for e in resp.json()["entries"]] == [1, 0]
            assert resp.json()["entries"][0]["agent_id"] == "courier"
            resp = await other.get("/stats")
            assert resp.json()["total_commits"] == 1


@pytest.mark.parametrize("module_bus", [POSTGRES_2], indirect=True, ids=str)
async def test_sdk_resends_after_unknown_outcome_and_moves_the_version_once(
    fresh_bus: Bus, recorder: Recorder
) -> None:
    """Through the SDK: the 503 ``unknown`` is resent by the transport loop with the same
    bytes; the resend blocks on the test's row too (a new backend), and once the test lets
    go it lands. The caller sees one Committed; the version moved once."""
    key = "lost/sdk-unknown"
    answers: list[tuple[int, str | None, str, bytes]] = []

    async def seen(response: httpx.Response) -> None:
        await response.aread()
        if response.request.url.path.startswith("/commit"):
            outcome = response.json().get("outcome") if response.status_code == 503 else None
            answers.append(
                (
                    response.status_code,
                    outcome,
                    response.request.headers["idempotency-key"],
                    response.request.content,
                )
            )

    http = recorder.attach_async(httpx.AsyncClient(timeout=30.0, trust_env=False))
    http.event_hooks["response"].append(seen)
    sdk = AsyncBus(fresh_bus.url(0), agent_id="courier", http_client=http)
    async with http, sdk, sdk.session() as s:
        await s.create(key, "v0")
        async with HistoryRowBlocker(key, 1) as blocker:
            sending = asyncio.create_task(s.commit(key, "v1", expected=0))
            first, query = await blocker.blocked_backend()
            assert query.startswith("SELECT sbus_txn_apply("), query
            await terminate(first)
            # The SDK's resend reaches the store on a new connection and waits too.
            _, query = await blocker.blocked_backend(other_than=frozenset({first}))
            assert query.startswith("SELECT sbus_txn_apply("), query
        done = await asyncio.wait_for(sending, WAIT_S)
    assert (done.version, done.replayed) == (1, False)
    assert [(status, outcome) for status, outcome, _, _ in answers] == [
        (503, "unknown"),
        (200, None),
    ]
    assert len({(idem, body) for _, _, idem, body in answers}) == 1  # one request, resent
    with new_client(fresh_bus.url(1)) as other:
        resp = other.get(f"/history/{key}")
        expect(resp, [200])
        assert [e["version"] for e in resp.json()["entries"]] == [1, 0]
        assert get_stats(other)["total_commits"] == 1
