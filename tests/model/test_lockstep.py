"""Model-based lockstep test: all four stores (memory, SQLite, PostgreSQL, Redis), driven
through the HTTP API in-process, against the pure reference model in ``tests.model.model``.

Every request goes to every app; their answers must agree with each other and equal the
model's prediction: statuses, error codes, problem fields, versions, contents, ETags, the
/stats counters (all but ``backend`` and ``wal_enabled``) and the DeliveryLog.

Clocks. Memory and SQLite read the wall clock through ``wall_ms``, which is frozen here,
so their store clock moves only through ``POST /admin/test/advance-clock``: their answers
must be byte-identical, timestamps included (only commit ids and hashes are dropped).
PostgreSQL (``clock_timestamp()``) and Redis (``TIME``) cannot be frozen: their store
clock is the real clock plus the same offset, so an entry served at real time ``s`` and
judged at real time ``t`` has the model's age plus ``t - s``, which lies between 0 and
the real time the Hypothesis example has run so far. Their answers are therefore
compared with every timestamp removed (``created_at``, ``updated_at``,
``committed_at``, ``now_ms``) and ``age_secs`` within that window.

For their TTL decisions to equal the model's, no age the model compares with a TTL edge
may sit just below that edge: a real-clock store sees the same age a little later and
would already call it expired. The edges are ``TTL`` (an entry's liveness) and ``2*TTL``
(the expired-session marker, which is judged from the session's last serve). The TTL is
300 s and the clock only moves by 100 s, TTL, TTL + 1 s or 2.5 TTL, so every age the
model can reach is a sum of those amounts: 0, 100, 200, exactly TTL, 301, 400, 401, 500,
501, exactly 2*TTL, or more. No reachable age is within 99 s below an edge, yet ages
land exactly ON both edges (where the real stores agree, since their age can only be
larger): "exactly TTL is expired" and "exactly two TTLs drops the marker" stay covered
on all four stores. The price: "TTL minus a millisecond is still live" is no longer
exercised (no real-clock store can answer it deterministically). Two checks keep the
argument honest rather than assumed: ``clock_margin_holds`` asserts that no model age is
within ``MARGIN_MS`` below an edge (so a future change to the amounts fails loudly, not
flakily) and that the example has not run for ``MARGIN_MS`` of real time.

PostgreSQL and Redis are shared servers (``scripts/with-services.sh`` starts them):
``tests.backends.require`` fails when one is unreachable (see below), and
``tests.backends.wipe`` empties both at the start of every example.
Histories. Every operation is also recorded, per store and from that store's own answer,
into an ndjson history (``tests.history``): the reads a commit rests on are the model's
effective read set, the versions it installed are the store's. The ``history_is_clean``
invariant runs the isolation checker on each store's history after every step (its
index order is the commit order: the machine sends one request at a time), and the
teardown runs the whole pipeline once per store (ndjson schema, real-time checks, Elle
export); ``SBUS_HISTORY_DIR`` keeps the files.

``SBUS_TEST_MODEL_STORES`` (comma-separated, default all four) narrows the run, e.g. to
``memory,sqlite`` without servers, or to one backend alone against the model; the first
store listed is the one the others are compared with. A store of the list whose server
cannot be reached fails the run; under ``SBUS_TEST_ALLOW_SKIP=1`` the machine runs on the
stores that remain, and ``test_lockstep_store_is_reachable`` for the missing one is
skipped, with its reason, so the gap shows in the report.

Seeds. ``make test`` draws a fresh Hypothesis seed every run (``tests.model.seeding``),
printed in pytest's header and in the falsifying example's notes;
``SBUS_TEST_MODEL_SEED=<n>`` repeats a run. ``test_lockstep`` runs ``EXAMPLES`` examples;
the long profile (``-m slow``) stays opt-in.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, note, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

import sbus.storage.memory
import sbus.storage.sql.sqlite
from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app
from sbus.config import Settings
from tests import backends
from tests.history.check import assert_clean
from tests.history.record import History, Op, OpKind, Result, installed
from tests.history.verify import verify
from tests.model.model import Model, Reply, Write, WriteKind
from tests.model.seeding import SEED, SEED_ENV

# "B" < "a" < "b/x" < "c" in code-point order: checks run in ascending key order.
KEYS = ["a", "b/x", "B", "c"]
GHOST = "ghost"  # never created: a read-set key that never existed
FRESH = "new/1"  # never created but by a multi-commit's create
AGENTS = ["ag1", "ag2"]
SESSIONS = ["", "s1"]
CONTENTS = ["", "x", "hello", "ü€"]
TTL_S = 300
TTL_MS = TTL_S * 1000
# Clock moves (seconds): a third of a TTL, exactly TTL, just past TTL, 2.5 TTLs. See the
# module docstring: sums of these never fall within MARGIN_MS below TTL or 2*TTL.
ADVANCES_S = [100, TTL_S, TTL_S + 1, TTL_S * 5 // 2]
MARGIN_MS = 60_000
MAX_DL = 2  # below the key count, so a session can overflow
FROZEN_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
# SBUS_TEST_MODEL_STORES=memory,sqlite runs without servers; =postgres runs one backend.
LISTED = os.environ.get("SBUS_TEST_MODEL_STORES", "memory,sqlite,postgres,redis").split(",")
# The Redis store on a Redis Cluster runs the same machine against memory, in a run of
# its own with fewer examples: it is the Redis store's scripts again, routed to the
# slot's master, so what it adds is the routing, which every request exercises; the
# full count would double the Redis share of make test's budget.
CLUSTER_LISTED = os.environ.get("SBUS_TEST_MODEL_CLUSTER_STORES", "memory,redis-cluster").split(",")
EXAMPLES = 200  # per make test run, each run on a fresh seed
CLUSTER_EXAMPLES = 25
FROZEN = {"memory", "sqlite", "model"}  # exact timestamps; the others use the real clock
JSON = {"Content-Type": "application/json"}
VOLATILE = frozenset({"commit_id", "hash", "prev_hash"})
TIMESTAMPS = {"created_at", "updated_at", "committed_at", "now_ms"}
PROBLEM_META = {"type", "title", "status", "detail"}
STATS_PER_STORE = {"backend", "wal_enabled"}

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

Answer = tuple[int, Any, str | None]  # status, JSON body (volatile fields dropped), ETag
AgePath = tuple[str | int, ...]


def frozen_wall_ms() -> int:
    return FROZEN_MS


def strip(value: Any, drop: frozenset[str] = VOLATILE) -> Any:
    if isinstance(value, dict):
        return {k: strip(v, drop) for k, v in value.items() if k not in drop}
    if isinstance(value, list):
        return [strip(v, drop) for v in value]
    return value


def untimed(value: Any, ages: dict[AgePath, float], at: AgePath = ()) -> Any:
    """``value`` without timestamps; each ``age_secs`` moves into ``ages`` by path."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k == "age_secs":
                ages[(*at, k)] = v
            elif k not in TIMESTAMPS:
                out[k] = untimed(v, ages, (*at, k))
        return out
    if isinstance(value, list | tuple):
        return [untimed(v, ages, (*at, i)) for i, v in enumerate(value)]
    return value


def wire_write(w: Write) -> dict[str, Any]:
    """One write of a /commit/multi body, of its kind's shape (protocol.md §3.1)."""
    if w.kind == "create":
        return {"key": w.key, "create": True, "delta": w.content, "goal_tag": w.goal_tag}
    if w.kind == "delete":
        return {"key": w.key, "delete": True, "expected_version": w.expected}
    return {"key": w.key, "expected_version": w.expected, "delta": w.content}


def usable_stores(listed: list[str]) -> list[str]:
    """The listed stores this run can drive: an unreachable one fails the test, or, under
    SBUS_TEST_ALLOW_SKIP=1, is left out (its own test below skips, visibly)."""
    usable: list[str] = []
    loop = asyncio.new_event_loop()
    try:
        for kind in listed:
            reason = loop.run_until_complete(backends.unavailable(kind))
            if reason is None:
                usable.append(kind)
            elif not backends.ALLOW_SKIP:
                backends.missing(f"lockstep model: {reason}")
    finally:
        loop.close()
    assert usable, f"no store of {listed} is reachable"
    return usable


_reachable: dict[tuple[str, ...], list[str]] = {}


def reachable_stores(listed: list[str] = LISTED) -> list[str]:
    """``usable_stores(listed)``, worked out once per run."""
    if tuple(listed) not in _reachable:
        _reachable[tuple(listed)] = usable_stores(listed)
    return _reachable[tuple(listed)]


@pytest.mark.parametrize("allow_skip", [False, True])
def test_one_missing_store_does_not_drop_the_others(
    monkeypatch: pytest.MonkeyPatch, allow_skip: bool
) -> None:
    async def redis_down(kind: str) -> str | None:
        return "Redis at redis://nowhere unreachable" if kind == "redis" else None

    monkeypatch.setattr(backends, "unavailable", redis_down)
    monkeypatch.setattr(backends, "ALLOW_SKIP", allow_skip)
    listed = ["memory", "sqlite", "postgres", "redis"]
    if allow_skip:
        assert usable_stores(listed) == ["memory", "sqlite", "postgres"]
    else:
        with pytest.raises(pytest.fail.Exception, match="lockstep model: Redis at redis://"):
            usable_stores(listed)


@pytest.mark.parametrize("kind", sorted({*LISTED, *CLUSTER_LISTED}))
async def test_lockstep_store_is_reachable(kind: str) -> None:
    """One line per store in the report: a store the machine had to leave out (only
    under SBUS_TEST_ALLOW_SKIP=1) shows as a skip here, never as silence."""
    await backends.require(kind)


class Fleet:
    """One app per store, started once per test run and reset before every example.

    Building and starting four apps per example cost more than the example itself; a
    reset through the API gives the same fresh state: ``POST /admin/reset`` empties the
    store (shards, tombstones, history, DeliveryLog, counters, idempotency records, clock
    offset; protocol.md section 2.9) and ``POST /admin/config`` puts ORI back on. What
    the reset leaves behind would show as a disagreement with the model. The memory and
    SQLite clocks stay frozen for the fleet's life."""

    def __init__(self, stores: list[str]) -> None:
        self.patch = pytest.MonkeyPatch()
        # Frozen wall clock: the memory and SQLite clocks move only through advance-clock.
        self.patch.setattr(sbus.storage.memory, "wall_ms", frozen_wall_ms)
        self.patch.setattr(sbus.storage.sql.sqlite, "wall_ms", frozen_wall_ms)
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="sbus-model-"))
        self.managers: list[LifespanManager] = []
        self.clients: dict[str, httpx.AsyncClient] = {}
        try:
            for kind in stores:
                self.loop.run_until_complete(backends.wipe(kind))
                self.loop.run_until_complete(self._start(kind))
        except BaseException:
            self.close()
            raise

    async def _start(self, kind: str) -> None:
        url = {
            "memory": "memory://",
            "sqlite": f"sqlite:///{self.tmp / 'x.db'}",
            "postgres": backends.POSTGRES_URL,
            "redis": backends.REDIS_URL,
            "redis-cluster": backends.REDIS_CLUSTER_URL,
        }[kind]
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
            if runtime_of(app).ready:
                break
            await asyncio.sleep(0.01)
        assert runtime_of(app).ready, f"{kind}: {runtime_of(app).not_ready_reason}"
        self.clients[kind] = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app),
            base_url="http://localhost",
            headers=JSON,
        )

    def reset(self) -> None:
        async def one(kind: str, client: httpx.AsyncClient) -> None:
            cleared = await client.post("/admin/reset")
            assert cleared.status_code == 200, f"{kind}: reset {cleared.text}"
            ori = await client.post("/admin/config", json={"ori_enabled": True})
            assert ori.status_code == 200, f"{kind}: config {ori.text}"

        async def every() -> None:
            await asyncio.gather(*(one(k, c) for k, c in self.clients.items()))

        self.loop.run_until_complete(every())

    def close(self) -> None:
        async def stop() -> None:
            for client in self.clients.values():
                await client.aclose()
            for manager in reversed(self.managers):
                await manager.__aexit__(None, None, None)

        try:
            self.loop.run_until_complete(stop())
        finally:
            self.loop.close()
            self.patch.undo()
            shutil.rmtree(self.tmp, ignore_errors=True)


_fleet: dict[tuple[str, ...], Fleet] = {}


def fleet(stores: list[str]) -> Fleet:
    if tuple(stores) not in _fleet:
        _fleet[tuple(stores)] = Fleet(stores)
    return _fleet[tuple(stores)]


@pytest.fixture(autouse=True, scope="module")
def _close_fleet() -> Iterator[None]:
    """The apps live from the first example to the end of this module's tests."""
    yield
    while _fleet:
        _fleet.popitem()[1].close()


class LockstepMachine(RuleBasedStateMachine):
    examples = 0
    listed = LISTED

    def __init__(self) -> None:
        super().__init__()
        note(f"lockstep seed {SEED} ({SEED_ENV}={SEED} repeats this run)")
        self.stores = reachable_stores(self.listed)
        self.fleet = fleet(self.stores)
        self.loop = self.fleet.loop
        self.clients = self.fleet.clients
        self.fleet.reset()
        # Real-clock ages count from here: every serve happens after the reset.
        self.started = time.monotonic()
        self.model = Model(ttl_ms=TTL_MS, max_entries=MAX_DL)
        self.high_water: dict[str, int] = {}
        self.etag: str | None = None  # of the last response (equal on every store)
        self.answers: dict[str, Answer] = {}  # of the last request, by store
        origin = time.monotonic_ns()  # one time origin for every store's history
        self.histories = {kind: History(kind, origin) for kind in self.stores}
        self.examples = getattr(LockstepMachine, "examples", 0) + 1
        LockstepMachine.examples = self.examples

    def teardown(self) -> None:
        for kind, history in self.histories.items():
            label = f"model-{kind}-{self.examples}"
            verify(history.ops, realtime=True, label=label)

    # transport ----------------------------------------------------------------------
    def call_all(
        self,
        method: str,
        url: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        drop: frozenset[str] = frozenset(),
    ) -> dict[str, Answer]:
        """Send to every store at once; answers by store, ``VOLATILE`` and ``drop``
        fields removed, not yet compared."""

        async def one(client: httpx.AsyncClient) -> Answer:
            r = await client.request(method, url, json=body, params=params, headers=headers)
            answer = strip(r.json(), VOLATILE | drop) if r.content else None
            return r.status_code, answer, r.headers.get("etag")

        async def every() -> list[Answer]:
            return await asyncio.gather(*(one(c) for c in self.clients.values()))

        return dict(zip(self.clients, self.loop.run_until_complete(every()), strict=True))

    def call(
        self,
        method: str,
        url: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        drop: frozenset[str] = frozenset(),
    ) -> tuple[int, Any]:
        """Send to every store; they must agree (``agree``). Returns the first store's
        answer (memory's, unless SBUS_TEST_MODEL_STORES says otherwise)."""
        answers = self.call_all(method, url, body=body, params=params, headers=headers, drop=drop)
        self.answers = answers
        ref = self.stores[0]
        for kind, answer in answers.items():
            self.agree(ref, answers[ref], kind, answer, f"{method} {url} {body} {params}")
        status, answer, self.etag = answers[ref]
        return status, answer

    def agree(self, ref: str, want: Any, kind: str, got: Any, what: str) -> None:
        """Two frozen clocks (memory, SQLite, the model) agree exactly. Otherwise the
        answers agree without timestamps, and each ``age_secs`` of a real-clock side may
        exceed the other's by at most the real time since the wipe: that is the longest
        any entry can have aged on the real clock and not on the frozen one."""
        if ref in FROZEN and kind in FROZEN:
            assert got == want, f"{what}: {ref} {want} {kind} {got}"
            return
        want_ages: dict[AgePath, float] = {}
        got_ages: dict[AgePath, float] = {}
        assert untimed(got, got_ages) == untimed(want, want_ages), (
            f"{what}: {ref} {want} {kind} {got}"
        )
        assert got_ages.keys() == want_ages.keys(), f"{what}: {kind} ages {got_ages}"
        slack = time.monotonic() - self.started + 0.01
        low = -0.001 if ref in FROZEN else -slack
        high = 0.001 if kind in FROZEN else slack
        for path, age in got_ages.items():
            assert low <= age - want_ages[path] <= high, (
                f"{what}: {kind} age_secs {age} at {path}, {ref} says {want_ages[path]}, "
                f"real time since the wipe {slack:.3f} s"
            )

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
        self,
        agent: str,
        session: str,
        written: list[str],
        rs: list[tuple[str, int]],
        expected: int | None = 0,
    ) -> tuple[dict[str, int], list[tuple[str, int]]]:
        """Versions and the effective read set before a commit, for check_admission
        (``expected`` None: the writes are unguarded, as an unconditional rollback)."""
        ops = [Write(k, expected, "commit") for k in written]
        effective = self.model.effective_read_set(agent, session, ops, rs)
        return {k: s.version for k, s in self.model.shards.items()}, effective

    # histories ----------------------------------------------------------------------
    def record(
        self,
        op: OpKind,
        agent: str | None,
        session: str,
        invoked: int,
        *,
        reads: list[tuple[str, int]] | None = None,
        guards: list[tuple[str, int | None]] | None = None,
        ori: bool = True,
    ) -> None:
        """One operation into each store's history, from that store's own answer to the
        request just sent (``invoked``: the history clock when it was sent)."""
        for kind, (status, body, etag) in self.answers.items():
            history = self.histories[kind]
            entry = Op(
                index=0,
                process=AGENTS.index(agent) if agent in AGENTS else len(AGENTS),
                agent=agent,
                session=session,
                op=op,
                invoke_ns=invoked,
                complete_ns=history.now_ns(),
                reads=list(reads or []),
                guards=list(guards or []),
                status=status,
                error=body.get("error") if isinstance(body, dict) and status >= 400 else None,
                ori=ori,
            )
            result: Result = "ok" if status < 300 else "fail"
            if op == "get":
                # A tombstone's 404 still read a version; a bulk read read each version
                # it answered, tombstones included.
                if isinstance(body, dict) and "version" in body:
                    entry.reads, result = [(body["key"], body["version"])], "ok"
                elif isinstance(body, dict) and "shards" in body:
                    found = [*body["shards"], *(m for m in body["missing"] if "version" in m)]
                    entry.reads = [(item["key"], item["version"]) for item in found]
            elif result == "ok":
                entry.writes = installed(entry, body, etag)
            entry.result = result
            history.append(entry)

    def clock(self) -> int:
        return self.histories[self.stores[0]].now_ns()

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
        invoked = self.clock()
        got = self.call("POST", "/shard", body={"key": key, "content": content})
        self.record("create", None, "", invoked, guards=[(key, None)])
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
        invoked = self.clock()
        got = self.call("GET", f"/shard/{key}", params=params)
        self.record("get", agent, session, invoked)
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
        invoked, ori = self.clock(), self.model.ori
        got = self.call("POST", route, body=body)
        self.record(
            "commit", agent, session, invoked, reads=before[1], guards=[(key, expected)], ori=ori
        )
        self.expect(got, self.model.commit(agent, session, key, expected, content, rs or []), route)
        self.check_admission(got, agent, session, [key], before)

    @rule(
        agent=agents,
        session=sessions,
        writes=st.lists(
            st.tuples(
                st.sampled_from([*KEYS, *KEYS, FRESH]),
                st.sampled_from(["commit", "commit", "create", "delete"]),
                offsets,
                contents,
            ),
            min_size=1,
            max_size=3,
            unique_by=lambda t: t[0],
        ),
        read_set=read_sets,
    )
    def multi(
        self,
        agent: str,
        session: str,
        writes: list[tuple[str, WriteKind, int, str]],
        read_set: list[tuple[str, int]] | None,
    ) -> None:
        """Commits, creates and deletes in one request (protocol.md §3.1)."""
        resolved = [
            Write(k, None, kind, c, goal_tag=c[:1])
            if kind == "create"
            else Write(k, max(self.current(k) + off, 0), kind, "" if kind == "delete" else c)
            for k, kind, off, c in writes
        ]
        rs = self.resolve(read_set)
        body: dict[str, Any] = {
            "agent_id": agent,
            "session_id": session,
            "writes": [wire_write(w) for w in resolved],
        }
        if rs is not None:
            body["read_set"] = [{"key": k, "version_at_read": v} for k, v in rs]
        written = [w.key for w in resolved]
        before = self.snapshot(agent, session, written, rs or [])
        invoked, ori = self.clock(), self.model.ori
        got = self.call("POST", "/commit/multi", body=body)
        guards: list[tuple[str, int | None]] = [(w.key, w.expected) for w in resolved]
        self.record("multi", agent, session, invoked, reads=before[1], guards=guards, ori=ori)
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
        before = self.snapshot(agent, session, [key], rs or [], expected)
        invoked, ori = self.clock(), self.model.ori
        got = self.call("POST", "/rollback", body=body)
        self.record(
            "rollback", agent, session, invoked, reads=before[1], guards=[(key, expected)], ori=ori
        )
        want = self.model.rollback(agent, session, key, version, expected, rs or [])
        self.expect(got, want, f"rollback {key} to {version}")
        self.check_admission(got, agent, session, [key], before)

    @rule(agent=agents, session=sessions, key=keys, offset=offsets)
    def delete(self, agent: str, session: str, key: str, offset: int) -> None:
        expected = max(self.current(key) + offset, 0)
        params = {"expected_version": expected, "agent_id": agent, "session_id": session}
        before = self.snapshot(agent, session, [key], [])
        invoked, ori = self.clock(), self.model.ori
        got = self.call("DELETE", f"/shard/{key}", params=params)
        self.record(
            "delete", agent, session, invoked, reads=before[1], guards=[(key, expected)], ori=ori
        )
        self.expect(got, self.model.delete(agent, session, key, expected), f"delete {key}")
        self.check_admission(got, agent, session, [key], before)

    @rule(agent=agents, session=sessions)
    def reset_session(self, agent: str, session: str) -> None:
        got = self.call("POST", "/session", body={"agent_id": agent, "session_id": session})
        self.expect(got, self.model.reset_session(agent, session), "session reset")

    @rule(
        agent=agents | st.none(),
        session=sessions,
        picked=st.lists(st.sampled_from([*KEYS, GHOST]), min_size=1, max_size=4, unique=True),
        record=st.sampled_from([True, True, False]),
    )
    def read_many(self, agent: str | None, session: str, picked: list[str], record: bool) -> None:
        body: dict[str, Any] = {"keys": picked, "session_id": session, "record": record}
        if agent is not None:
            body["agent_id"] = agent
        invoked = self.clock()
        # Timestamps inside the shards go: the model predicts none (as for single reads).
        got = self.call("POST", "/read", body=body, drop=frozenset(TIMESTAMPS))
        self.record("get", agent, session, invoked)
        want = self.model.read_many(agent, session, picked, record)
        self.expect(got, want, f"read_many {picked}")

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

    @rule(seconds=st.sampled_from(ADVANCES_S))
    def advance_clock(self, seconds: int) -> None:
        answers = self.call_all("POST", "/admin/test/advance-clock", body={"ms": seconds * 1000})
        self.model.advance(seconds * 1000)
        offset = self.model.now_ms
        for kind, (status, body, _) in answers.items():
            assert status == 200, f"advance-clock on {kind}: {status} {body}"
            if kind in FROZEN:
                assert body == {"offset_ms": offset, "now_ms": FROZEN_MS + offset}, kind
            else:
                # Real clock plus the offset: PostgreSQL and Redis run on this machine.
                assert body["offset_ms"] == offset, f"{kind}: {body}"
                drift = body["now_ms"] - offset - time.time() * 1000
                assert abs(drift) < 5_000, f"{kind}: now_ms {body['now_ms']} drifts {drift} ms"

    # invariants ---------------------------------------------------------------------
    @invariant()
    def observations_match(self) -> None:
        """/stats counters and the live DeliveryLog equal the model's, on every store."""
        status, stats = self.call("GET", "/stats", drop=frozenset(STATS_PER_STORE))
        want = self.model.stats()
        assert (status, stats) == (200, want), f"stats {stats} != model {want}"
        status, dl = self.call("GET", "/admin/delivery-log")
        assert status == 200, dl
        self.agree("model", self.model.delivery_log(), self.stores[0], dl, "DL vs model")

    @invariant()
    def history_is_clean(self) -> None:
        """Each store's history so far passes the checker, with its index order as the
        global commit order (one request at a time)."""
        for kind, history in self.histories.items():
            assert_clean(history.ops, realtime=False, label=f"model history of {kind}")

    @invariant()
    def clock_margin_holds(self) -> None:
        """The premise of the real-clock comparison (module docstring): no age the model
        judges against an edge is within MARGIN_MS below it, and the example has not yet
        run for MARGIN_MS of real time."""
        now = self.model.now_ms
        for (agent, session), s in self.model.sessions.items():
            judged: list[tuple[int, tuple[int, ...]]] = [
                (served, (TTL_MS,)) for _, served in s.entries.values()
            ]
            if s.last_served_ms is not None:
                judged.append((s.last_served_ms, (TTL_MS, 2 * TTL_MS)))
            for served, edges in judged:
                for edge in edges:
                    age = now - served
                    assert not edge - MARGIN_MS < age < edge, (
                        f"{agent}/{session}: age {age} ms is just below the edge {edge} ms"
                    )
        elapsed = time.monotonic() - self.started
        assert elapsed < MARGIN_MS / 1000, f"example ran {elapsed:.1f} s: raise MARGIN_MS"

    @invariant()
    def versions_never_go_back(self) -> None:
        for key, shard in self.model.shards.items():
            assert shard.version >= self.high_water.get(key, -1)
            self.high_water[key] = shard.version


# The run's seed (printed in pytest's header); the example database still replays a
# failure found earlier on this machine first.
seed(SEED)(LockstepMachine)
LockstepMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_lockstep = LockstepMachine.TestCase


class SlowLockstepMachine(LockstepMachine):
    pass


seed(SEED)(SlowLockstepMachine)
SlowLockstepMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_lockstep_long = pytest.mark.slow(SlowLockstepMachine.TestCase)


class ClusterLockstepMachine(LockstepMachine):
    listed = CLUSTER_LISTED


seed(SEED)(ClusterLockstepMachine)
ClusterLockstepMachine.TestCase.settings = settings(
    max_examples=CLUSTER_EXAMPLES,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_lockstep_redis_cluster = ClusterLockstepMachine.TestCase
