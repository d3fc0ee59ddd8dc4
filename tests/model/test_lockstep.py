"""Model-based lockstep test: the memory and SQLite stores, driven through the HTTP API
in-process, against the pure reference model in ``tests.model.model``.

Every request goes to both apps; their answers must be identical (timestamps are
deterministic because the wall clock is frozen, so only commit ids and hashes are
dropped) and must equal the model's prediction. The store clock only moves through
``POST /admin/test/advance-clock``, so TTL boundaries are exact, including the
"exactly TTL" and "exactly two TTLs" edges.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

import sbus.storage.memory
import sbus.storage.sql.sqlite
from sbus.api.app import create_app
from sbus.config import Settings
from tests.model.model import Model, Reply, Write

# "B" < "a" < "b/x" < "c" in code-point order: checks run in ascending key order.
KEYS = ["a", "b/x", "B", "c"]
GHOST = "ghost"  # never created: a read-set key that never existed
AGENTS = ["ag1", "ag2"]
SESSIONS = ["", "s1"]
CONTENTS = ["", "x", "hello", "ü€"]
TTL_S = 10
MAX_DL = 2  # below the key count, so a session can overflow
FROZEN_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
JSON = {"Content-Type": "application/json"}
VOLATILE = {"commit_id", "hash", "prev_hash"}
PROBLEM_META = {"type", "title", "status", "detail"}

keys = st.sampled_from(KEYS)
agents = st.sampled_from(AGENTS)
sessions = st.sampled_from(SESSIONS)
contents = st.sampled_from(CONTENTS)
offsets = st.sampled_from([0, 0, -1, 1])  # expected = current + offset (mostly right)
read_sets = st.none() | st.lists(
    st.tuples(st.sampled_from([*KEYS, *KEYS, GHOST]), st.sampled_from([0, 0, -1])),
    max_size=2,
    unique_by=lambda t: t[0],
)


def frozen_wall_ms() -> int:
    return FROZEN_MS


def strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


class LockstepMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.patch = pytest.MonkeyPatch()
        # Frozen wall clock: the store clock moves only through advance-clock.
        self.patch.setattr(sbus.storage.memory, "wall_ms", frozen_wall_ms)
        self.patch.setattr(sbus.storage.sql.sqlite, "wall_ms", frozen_wall_ms)
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="sbus-model-"))
        self.managers: list[LifespanManager] = []
        self.clients: list[httpx.AsyncClient] = []
        for url in ("memory://", f"sqlite:///{self.tmp / 'x.db'}"):
            self.loop.run_until_complete(self._start(url))
        self.model = Model(ttl_ms=TTL_S * 1000, max_entries=MAX_DL)
        self.high_water: dict[str, int] = {}
        self.etag: str | None = None  # of the last response (equal on both stores)

    async def _start(self, url: str) -> None:
        app = create_app(
            Settings(
                store=url,
                admin_enabled=True,
                test_hooks=True,
                session_ttl=TTL_S,
                max_dl_entries=MAX_DL,
            )
        )
        manager = LifespanManager(app)
        await manager.__aenter__()
        self.managers.append(manager)
        for _ in range(500):
            if app.state.ready:
                break
            await asyncio.sleep(0.01)
        assert app.state.ready, app.state.not_ready_reason
        self.clients.append(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=manager.app),
                base_url="http://localhost",
                headers=JSON,
            )
        )

    def teardown(self) -> None:
        async def stop() -> None:
            for client in self.clients:
                await client.aclose()
            for manager in reversed(self.managers):
                await manager.__aexit__(None, None, None)

        try:
            self.loop.run_until_complete(stop())
        finally:
            self.loop.close()
            self.patch.undo()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # transport ----------------------------------------------------------------------
    def call(
        self,
        method: str,
        url: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Send to every backend; their (status, body) must be identical."""

        async def one(client: httpx.AsyncClient) -> tuple[int, Any, str | None]:
            r = await client.request(method, url, json=body, params=params, headers=headers)
            return r.status_code, strip(r.json()) if r.content else None, r.headers.get("etag")

        async def both() -> list[tuple[int, Any, str | None]]:
            return await asyncio.gather(*(one(c) for c in self.clients))

        memory, sqlite = self.loop.run_until_complete(both())
        assert memory == sqlite, f"{method} {url} {body} {params}: memory {memory} sqlite {sqlite}"
        status, answer, self.etag = memory
        return status, answer

    def expect(self, got: tuple[int, Any], want: Reply, what: str) -> None:
        status, body = got
        assert status == want.status, f"{what}: status {status} {body}, model {want}"
        if want.body is None:
            assert body is None, f"{what}: body {body}"
            return
        assert isinstance(body, dict)
        if "error" in want.body:
            fields = {k: v for k, v in body.items() if k not in PROBLEM_META}
            assert fields == want.body, f"{what}: {fields} != model {want.body}"
        else:
            for key in ("created_at", "updated_at"):
                body.pop(key, None)
            assert body == want.body, f"{what}: {body} != model {want.body}"
            version = body.get("version", body.get("new_version"))
            if version is not None:
                assert self.etag == f'"{version}"', f"{what}: ETag {self.etag}"
        self.observe(body)

    def observe(self, body: dict[str, Any]) -> None:
        """Versions reported as current for a key never go down (no ABA)."""
        pairs: list[tuple[str, int]] = []
        if "key" in body and "version" in body:
            pairs.append((body["key"], body["version"]))
        if "key" in body and "found" in body:
            pairs.append((body["key"], body["found"]))
        for item in body.get("stale_keys", ()):
            pairs.append((item["key"], item["current_version"]))
        for item in body.get("results", ()):
            pairs.append((item["key"], item["new_version"]))
        for key, version in pairs:
            assert version >= self.high_water.get(key, -1), f"{key} went back to {version}"
            self.high_water[key] = version

    def current(self, key: str) -> int:
        shard = self.model.shards.get(key)
        return shard.version if shard is not None else 0

    def resolve(self, read_set: list[tuple[str, int]] | None) -> list[tuple[str, int]] | None:
        if read_set is None:
            return None
        return [(k, max(self.current(k) + off, 0)) for k, off in read_set]

    def check_admission(
        self,
        got: tuple[int, Any],
        agent: str,
        session: str,
        written: list[str],
        before: tuple[dict[str, int], list[tuple[str, int]]],
    ) -> None:
        """A success under ORI had an effective read set that was current at admission,
        and the committer's DL now holds the written keys at their new versions."""
        if got[0] not in (200, 204):
            return
        versions, effective = before
        if self.model.ori:
            for key, version in effective:
                assert versions.get(key) == version, f"admitted with stale {key}@{version}"
        _, dump = self.call("GET", "/admin/delivery-log")
        mine = dump["sessions"].get(agent, {}).get(session, {})
        for key in written:
            assert mine.get(key, {}).get("version") == self.current(key), f"no RYW for {key}"
            assert self.current(key) > versions.get(key, -1)

    def snapshot(
        self, agent: str, session: str, written: list[str], rs: list[tuple[str, int]]
    ) -> tuple[dict[str, int], list[tuple[str, int]]]:
        """Versions and the effective read set before a commit, for check_admission."""
        ops = [Write(k, 0, "commit") for k in written]
        effective = self.model.effective_read_set(agent, session, ops, rs)
        return {k: s.version for k, s in self.model.shards.items()}, effective

    # rules --------------------------------------------------------------------------
    @initialize(created=st.lists(keys, min_size=2, max_size=4, unique=True), content=contents)
    def seed(self, created: list[str], content: str) -> None:
        for key in created:
            self.create(key, content)

    @rule(agent=agents, session=sessions, key=keys)
    def read_recorded(self, agent: str, session: str, key: str) -> None:
        self.read(agent, session, key, True)

    @rule(key=keys, content=contents)
    def create(self, key: str, content: str) -> None:
        got = self.call("POST", "/shard", body={"key": key, "content": content})
        self.expect(got, self.model.create(key, content), f"create {key}")

    @rule(
        agent=agents | st.none(),
        session=sessions,
        key=st.sampled_from([*KEYS, *KEYS, GHOST]),
        record=st.sampled_from([True, True, False]),
    )
    def read(self, agent: str | None, session: str, key: str, record: bool) -> None:
        params: dict[str, Any] = {"session_id": session}
        if agent is not None:
            params["agent_id"] = agent
        if not record:
            params["record"] = "false"
        got = self.call("GET", f"/shard/{key}", params=params)
        self.expect(got, self.model.read(agent, session, key, record), f"read {key}")

    @rule(
        agent=agents,
        session=sessions,
        key=keys,
        offset=offsets,
        content=contents,
        read_set=read_sets,
        route=st.sampled_from(["/commit", "/commit/v2"]),
        alias=st.booleans(),
    )
    def commit(
        self,
        agent: str,
        session: str,
        key: str,
        offset: int,
        content: str,
        read_set: list[tuple[str, int]] | None,
        route: str,
        alias: bool,
    ) -> None:
        expected = max(self.current(key) + offset, 0)
        rs = self.resolve(read_set)
        body: dict[str, Any] = {
            "key": key,
            "expected_ver" if alias else "expected_version": expected,
            "content" if alias else "delta": content,
            "agent_id": agent,
            "session_id": session,
        }
        if rs is not None:
            body["read_set"] = [{"key": k, "version_at_read": v} for k, v in rs]
        before = self.snapshot(agent, session, [key], rs or [])
        got = self.call("POST", route, body=body)
        self.expect(got, self.model.commit(agent, session, key, expected, content, rs or []), route)
        self.check_admission(got, agent, session, [key], before)

    @rule(
        agent=agents,
        session=sessions,
        writes=st.lists(
            st.tuples(keys, offsets, contents), min_size=1, max_size=3, unique_by=lambda t: t[0]
        ),
        read_set=read_sets,
    )
    def multi(
        self,
        agent: str,
        session: str,
        writes: list[tuple[str, int, str]],
        read_set: list[tuple[str, int]] | None,
    ) -> None:
        resolved = [(k, max(self.current(k) + off, 0), c) for k, off, c in writes]
        rs = self.resolve(read_set)
        body: dict[str, Any] = {
            "agent_id": agent,
            "session_id": session,
            "writes": [{"key": k, "expected_version": e, "delta": c} for k, e, c in resolved],
        }
        if rs is not None:
            body["read_set"] = [{"key": k, "version_at_read": v} for k, v in rs]
        written = [k for k, _, _ in resolved]
        before = self.snapshot(agent, session, written, rs or [])
        got = self.call("POST", "/commit/multi", body=body)
        self.expect(got, self.model.multi(agent, session, resolved, rs or []), "multi")
        self.check_admission(got, agent, session, written, before)

    @rule(
        agent=agents,
        session=sessions,
        key=keys,
        which=st.sampled_from(["old", "old", "current", "ahead", "far"]),
        offset=st.none() | offsets,
        read_set=read_sets,
    )
    def rollback(
        self,
        agent: str,
        session: str,
        key: str,
        which: str,
        offset: int | None,
        read_set: list[tuple[str, int]] | None,
    ) -> None:
        cur = self.current(key)
        version = {"old": max(cur - 2, 0), "current": cur, "ahead": cur + 1, "far": 999}[which]
        expected = None if offset is None else max(cur + offset, 0)
        rs = self.resolve(read_set)
        body: dict[str, Any] = {
            "key": key,
            "target_version": version,
            "agent_id": agent,
            "session_id": session,
        }
        if expected is not None:
            body["expected_version"] = expected
        if rs is not None:
            body["read_set"] = [{"key": k, "version_at_read": v} for k, v in rs]
        before = self.snapshot(agent, session, [key], rs or [])
        got = self.call("POST", "/rollback", body=body)
        want = self.model.rollback(agent, session, key, version, expected, rs or [])
        self.expect(got, want, f"rollback {key} to {version}")
        self.check_admission(got, agent, session, [key], before)

    @rule(agent=agents, session=sessions, key=keys, offset=offsets)
    def delete(self, agent: str, session: str, key: str, offset: int) -> None:
        expected = max(self.current(key) + offset, 0)
        params = {"expected_version": expected, "agent_id": agent, "session_id": session}
        before = self.snapshot(agent, session, [key], [])
        got = self.call("DELETE", f"/shard/{key}", params=params)
        self.expect(got, self.model.delete(agent, session, key, expected), f"delete {key}")
        self.check_admission(got, agent, session, [key], before)

    @rule(agent=agents, session=sessions)
    def reset_session(self, agent: str, session: str) -> None:
        got = self.call("POST", "/session", body={"agent_id": agent, "session_id": session})
        self.expect(got, self.model.reset_session(agent, session), "session reset")

    @rule(
        agent=agents,
        session=sessions,
        shards=st.lists(st.sampled_from([*KEYS, *KEYS, GHOST]), min_size=1, max_size=3),
    )
    def register(self, agent: str, session: str, shards: list[str]) -> None:
        # The session comes from the header only; a body session_id is ignored.
        got = self.call(
            "POST",
            "/delivery_log/register",
            body={"agent_id": agent, "shards_used": shards, "session_id": "ignored"},
            headers={"X-SBus-Session-Id": session},
        )
        self.expect(got, self.model.register(agent, session, shards), "register")

    @rule(enabled=st.booleans())
    def ori(self, enabled: bool) -> None:
        got = self.call("POST", "/admin/config", body={"ori_enabled": enabled})
        self.expect(got, self.model.set_ori(enabled), "config")

    @rule(seconds=st.sampled_from([3, 10, 11, 25]))
    def advance_clock(self, seconds: int) -> None:
        got = self.call("POST", "/admin/test/advance-clock", body={"ms": seconds * 1000})
        self.model.advance(seconds * 1000)
        assert got == (
            200,
            {"offset_ms": self.model.now_ms, "now_ms": FROZEN_MS + self.model.now_ms},
        )

    # invariants ---------------------------------------------------------------------
    @invariant()
    def observations_match(self) -> None:
        """/stats counters and the live DeliveryLog equal the model's, on both stores."""

        async def fetch() -> list[Any]:
            urls = ("/stats", "/admin/delivery-log")
            answers = await asyncio.gather(*(c.get(u) for c in self.clients for u in urls))
            return [r.json() for r in answers]

        mem_stats, mem_dl, sql_stats, sql_dl = self.loop.run_until_complete(fetch())
        want = self.model.stats()
        for stats in (mem_stats, sql_stats):
            stats.pop("backend")
            stats.pop("wal_enabled")
            assert stats == want, f"stats {stats} != model {want}"
        want = self.model.delivery_log()
        for dl in (mem_dl, sql_dl):
            assert dl == want, f"DL {dl} != model {want}"

    @invariant()
    def versions_never_go_back(self) -> None:
        for key, shard in self.model.shards.items():
            assert shard.version >= self.high_water.get(key, -1)
            self.high_water[key] = shard.version


LockstepMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_lockstep = LockstepMachine.TestCase


class SlowLockstepMachine(LockstepMachine):
    pass


SlowLockstepMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=50,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_lockstep_long = pytest.mark.slow(SlowLockstepMachine.TestCase)
