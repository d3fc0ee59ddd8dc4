"""Record traces of the real service for TLA+ trace validation (formal/trace/SBusTrace.tla).

A seeded random workload, restricted to what formal/SBus.tla models, runs one request at a
time against an in-process bus: 2-3 agents with one session each (session_id ""), 2-3 keys
created at version 0, recorded GETs (also of tombstones), single commits, multi commits of
two keys, deletes, re-creates of deleted keys (and of live ones: 409), session resets, and
TTL expiry: ``POST /admin/test/advance-clock`` by the session TTL + 1 s expires every
DeliveryLog entry at once (sessions with entries become "expired", and one advance later
"empty"). The client sends, as ``expected_version`` of every key it writes, the version its
own mirror of its DeliveryLog holds (what it last read or wrote), which is exactly the client
SBus.tla's ``Ex(a, W)`` describes; it only writes keys it has read (the API requires an
``expected_version``). The one exception: with its session expired, it may still commit
(or delete) with the versions it remembers from before, and must get 410 SessionExpired.

Every request becomes one :class:`Event` with the service's answer (status, error code and
the versions the answer names) and the state read back right after it: every key's version
and tombstone flag (``GET ?record=false``, which records nothing) and the whole DeliveryLog
(``GET /admin/delivery-log``). Keys are ``k0``, ``k1``, ... on the wire and 0, 1, ... in the
model, so the model's number order is the service's ascending key order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import httpx

Pair = tuple[int, int]


@dataclass(frozen=True)
class Event:
    """One request and what the service answered (see SBusTrace.tla for the fields)."""

    op: str  # read | commit | delete | create | multi | reset | advance
    agent: str
    keys: tuple[int, ...]
    ex: tuple[Pair, ...]  # (key, expected_version) sent
    res: str  # "200", "201", "204" or "<status> <code>"
    out: tuple[tuple[int, ...], ...]
    shards: tuple[tuple[int, int, bool], ...]  # (key, version, deleted) afterwards
    dl: tuple[tuple[str, int, int], ...]  # (agent, key, version) afterwards
    snap: bool = True  # False: the model does not check shards and dl
    creates: tuple[int, ...] = ()  # multi: the keys it creates
    deletes: tuple[int, ...] = ()  # multi: the keys it deletes


@dataclass(frozen=True)
class Trace:
    label: str
    agents: tuple[str, ...]
    nkeys: int
    ori: bool
    events: tuple[Event, ...]

    def without_snapshots(self) -> Trace:
        """The same requests and answers; the model checks the answers only."""
        return replace(self, events=tuple(replace(e, snap=False) for e in self.events))


def wire_key(k: int) -> str:
    return f"k{k}"


def model_key(key: str) -> int:
    assert key.startswith("k"), key
    return int(key[1:])


def _answer(resp: httpx.Response, ok: int) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = resp.json() if resp.content else {}
    if resp.status_code == ok:
        return str(ok), body
    code = body.get("error")
    assert isinstance(code, str), (resp.status_code, body)
    return f"{resp.status_code} {code}", body


def _details(res: str, body: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    """The versions a refusal names (as SBusTrace.Refusal describes them)."""
    if res == "409 CrossShardStale":
        return tuple(
            sorted(
                (model_key(s["key"]), int(s["version_at_read"]), int(s["current_version"]))
                for s in body["stale_keys"]
            )
        )
    if res == "409 VersionMismatch":
        return ((model_key(body["key"]), int(body["expected"]), int(body["found"])),)
    if res == "404 ShardDeleted":
        return ((model_key(body["key"]), int(body["version"])),)
    if res == "409 ShardAlreadyExists":
        return ((model_key(body["key"]),),)
    return ()


class Recorder:
    """Drives one trace against ``client`` (an in-process bus, admin enabled)."""

    def __init__(
        self, client: httpx.AsyncClient, agents: int, keys: int, seed: int, ttl_s: int
    ) -> None:
        self.client = client
        self.agents = tuple(f"a{n + 1}" for n in range(agents))
        self.keys = tuple(range(keys))
        self.rng = random.Random(seed)
        self.ttl_ms = ttl_s * 1000
        assert self.ttl_ms > 0
        # the client's view of its DeliveryLog, and of its session's state (protocol.md §1)
        self.mirror: dict[str, dict[int, int]] = {a: {} for a in self.agents}
        self.session = dict.fromkeys(self.agents, "empty")
        self.memory: dict[str, dict[int, int]] = {a: {} for a in self.agents}  # pre-expiry
        self.state: tuple[tuple[int, int, bool], ...] = ()
        self.events: list[Event] = []

    async def start(self, ori: bool) -> None:
        c = self.client
        assert (await c.post("/admin/reset")).status_code == 200
        r = await c.post("/admin/config", json={"ori_enabled": ori})
        assert r.status_code == 200 and r.json()["ori_enabled"] is ori, r.text
        for k in self.keys:
            r = await c.post("/shard", json={"key": wire_key(k), "content": "c0"})
            assert r.status_code == 201 and r.json()["version"] == 0, r.text
        shards, dl = await self.snapshot()
        # SBus.tla's Init: every key at version 0, live; empty DeliveryLogs
        assert shards == tuple((k, 0, False) for k in self.keys) and dl == (), (shards, dl)
        self.state = shards

    async def snapshot(self) -> tuple[tuple[tuple[int, int, bool], ...], tuple[Any, ...]]:
        shards = []
        for k in self.keys:
            r = await self.client.get(f"/shard/{wire_key(k)}", params={"record": "false"})
            if r.status_code == 200:
                shards.append((k, int(r.json()["version"]), False))
            else:
                assert r.status_code == 404 and r.json()["error"] == "ShardDeleted", r.text
                shards.append((k, int(r.json()["version"]), True))
        r = await self.client.get("/admin/delivery-log")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["next_after"] is None, body
        dl = []
        for agent, sessions in body["sessions"].items():
            assert set(sessions) <= {""}, sessions  # one session per agent
            for key, entry in sessions.get("", {}).items():
                dl.append((agent, model_key(key), int(entry["version"])))
        return tuple(shards), tuple(sorted(dl))

    async def record(
        self,
        op: str,
        agent: str,
        keys: tuple[int, ...],
        ex: tuple[Pair, ...],
        res: str,
        out: tuple[tuple[int, ...], ...],
        creates: tuple[int, ...] = (),
        deletes: tuple[int, ...] = (),
    ) -> None:
        shards, dl = await self.snapshot()
        self.state = shards
        self.events.append(
            Event(op, agent, keys, ex, res, out, shards, dl, creates=creates, deletes=deletes)
        )

    # the operations ------------------------------------------------------------------
    async def read(self, a: str, k: int) -> None:
        r = await self.client.get(f"/shard/{wire_key(k)}", params={"agent_id": a})
        res, body = _answer(r, 200)
        assert res in ("200", "404 ShardDeleted"), (res, body)
        version = int(body["version"])
        self.mirror[a][k] = version  # a tombstone read is recorded too (protocol.md §2)
        self.session[a] = "live"  # an expired or empty session starts afresh
        self.memory[a] = {}
        await self.record("read", a, (k,), (), res, ((k, version),))

    async def commit(self, a: str, keys: tuple[int, ...], known: dict[int, int]) -> None:
        ex = tuple((k, known[k]) for k in keys)
        if len(keys) == 1:
            k, v = ex[0]
            r = await self.client.post(
                "/commit/v2",
                json={"key": wire_key(k), "expected_version": v, "delta": "d", "agent_id": a},
            )
            res, body = _answer(r, 200)
            new: tuple[Pair, ...] = ((k, int(body["new_version"])),) if res == "200" else ()
        else:
            writes = [{"key": wire_key(k), "expected_version": v, "delta": "d"} for k, v in ex]
            r = await self.client.post("/commit/multi", json={"agent_id": a, "writes": writes})
            res, body = _answer(r, 200)
            new = (
                tuple(sorted((model_key(x["key"]), int(x["new_version"])) for x in body["results"]))
                if res == "200"
                else ()
            )
        for k, v in new:
            self.mirror[a][k] = v  # read-your-writes
        if res == "200":
            self.session[a] = "live"
        elif res == "410 SessionExpired":
            assert body["reason"] == "ttl", body
        await self.record("commit", a, keys, ex, res, new if res == "200" else _details(res, body))

    async def delete(self, a: str, k: int, known: dict[int, int]) -> None:
        v = known[k]
        r = await self.client.delete(
            f"/shard/{wire_key(k)}", params={"expected_version": v, "agent_id": a}
        )
        res, body = _answer(r, 204)
        if res == "204":
            self.mirror[a][k] = v + 1  # admitted, so it was at v: the tombstone is v + 1
            self.session[a] = "live"
        await self.record("delete", a, (k,), ((k, v),), res, _details(res, body))

    async def create(self, a: str, k: int) -> None:
        r = await self.client.post("/shard", json={"key": wire_key(k), "content": "c"})
        res, body = _answer(r, 201)
        out = ((k, int(body["version"])),) if res == "201" else ()
        await self.record("create", a, (k,), (), res, out)

    async def multi(
        self,
        a: str,
        known: dict[int, int],
        *,
        commits: tuple[int, ...] = (),
        creates: tuple[int, ...] = (),
        deletes: tuple[int, ...] = (),
    ) -> None:
        """A multi-commit mixing commits, creates and deletes (protocol.md §3.1): the
        commits and deletes expect the client's DL versions, the creates nothing."""
        writes: list[dict[str, Any]] = [
            {"key": wire_key(k), "expected_version": known[k], "delta": "m"} for k in commits
        ]
        writes += [
            {"key": wire_key(k), "delete": True, "expected_version": known[k]} for k in deletes
        ]
        writes += [{"key": wire_key(k), "create": True, "delta": "n"} for k in creates]
        r = await self.client.post("/commit/multi", json={"agent_id": a, "writes": writes})
        res, body = _answer(r, 200)
        ex = tuple(sorted((k, known[k]) for k in commits + deletes))
        new: tuple[Pair, ...] = ()
        if res == "200":
            new = tuple(
                sorted((model_key(x["key"]), int(x["new_version"])) for x in body["results"])
            )
            for k, v in new:
                self.mirror[a][k] = v  # read-your-writes, created and deleted keys too
            self.session[a] = "live"
        keys = tuple(sorted(commits + creates + deletes))
        out = new if res == "200" else _details(res, body)
        await self.record(
            "multi", a, keys, ex, res, out, tuple(sorted(creates)), tuple(sorted(deletes))
        )

    async def reset(self, a: str) -> None:
        r = await self.client.post("/session", json={"agent_id": a})
        res, _ = _answer(r, 200)
        self.mirror[a] = {}
        self.memory[a] = {}
        self.session[a] = "empty"
        await self.record("reset", a, (), (), res, ())

    async def advance(self) -> None:
        """Move the store clock past the TTL: every entry expires."""
        r = await self.client.post("/admin/test/advance-clock", json={"ms": self.ttl_ms + 1000})
        res, _ = _answer(r, 200)
        for a in self.agents:
            if self.mirror[a]:
                self.session[a] = "expired"
                self.memory[a], self.mirror[a] = self.mirror[a], {}
            elif self.session[a] == "expired":  # last served over 2 TTLs ago: marker gone
                self.session[a] = "empty"
                self.memory[a] = {}
        await self.record("advance", self.agents[0], (), (), res, ())

    async def step(self) -> None:
        rng = self.rng
        a = rng.choice(self.agents)
        versions = self.mirror[a]
        if not versions and self.session[a] == "expired" and rng.random() < 0.5:
            versions = self.memory[a]  # what it read before its session expired: 410
        known = sorted(versions)
        deleted = [k for k, _, gone in self.state if gone]
        roll = rng.random()
        if roll < 0.33 or not known:
            await self.read(a, rng.choice(self.keys))
        elif roll < 0.56:
            await self.commit(a, (rng.choice(known),), versions)
        elif roll < 0.73 and len(known) >= 2:
            await self.commit(a, tuple(sorted(rng.sample(known, 2))), versions)
        elif roll < 0.80:
            await self.delete(a, rng.choice(known), versions)
        elif roll < 0.90 and deleted:
            await self.create(a, rng.choice(deleted))
        elif roll < 0.93:
            await self.create(a, rng.choice(self.keys))  # mostly a live key: 409
        elif roll < 0.96:
            await self.reset(a)
        else:
            await self.advance()


async def record_trace(
    client: httpx.AsyncClient,
    *,
    label: str,
    seed: int,
    agents: int,
    keys: int,
    steps: int,
    ori: bool = True,
    ttl_s: int = 3600,
) -> Trace:
    """Reset the bus and record one trace of ``steps`` requests (``ttl_s``: the bus's
    SBUS_SESSION_TTL)."""
    rec = Recorder(client, agents, keys, seed, ttl_s)
    await rec.start(ori)
    for _ in range(steps):
        await rec.step()
    return Trace(label, rec.agents, keys, ori, tuple(rec.events))


# the answers SCENARIO must get (protocol.md §2 and protocol.md §4 step 9f), one per request
SCENARIO_ANSWERS = (
    *("200",) * 4,
    "200",
    "204",
    "409 VersionMismatch",
    "404 ShardDeleted",
    "200",
    "201",
    "409 CrossShardStale",
    "200",
    "200",
)


# the answers MIXED_SCENARIO must get (protocol.md §3.1), one per request
MIXED_ANSWERS = (
    "200",
    "200",
    "200",
    "200",
    "200",
    "409 CrossShardStale",
    "200",
    "409 ShardAlreadyExists",
    "200",
    "200",
    "200",
    "200",
    "409 VersionMismatch",
)


async def record_mixed_scenario(
    client: httpx.AsyncClient, label: str = "mixed", ttl_s: int = 3600
) -> Trace:
    """A fixed trace (3 agents, 2 keys, ORI on) of multi-commits that also create and
    delete (protocol.md §3.1), checked against SBus.tla's MixedCommit:

    - step 2: a1 deletes k1 and commits k0 in one step (k0@1, k1@1 a tombstone);
    - step 4: a2, which never read k1, re-creates it beside a commit of k0 (k0@2, k1@2);
    - step 5: a1's create of the live k1 is refused for its stale read of k0 first (9e);
    - step 7: once k0 is re-read, the same request is 409 ShardAlreadyExists on k1 (9f);
    - step 11: a3, whose read of k1@2 went stale when a2 deleted k1 (step 9), re-creates
      it: a created key leaves the read set, its guard is the key not being live;
    - step 12: a stale delete of k0 beside a create of the live k1: 409 VersionMismatch on
      k0, the first failing key in ascending order.
    """
    rec = Recorder(client, 3, 2, 0, ttl_s)
    await rec.start(True)
    await rec.read("a1", 0)
    await rec.read("a1", 1)
    await rec.multi("a1", rec.mirror["a1"], commits=(0,), deletes=(1,))
    await rec.read("a2", 0)
    await rec.multi("a2", rec.mirror["a2"], commits=(0,), creates=(1,))
    await rec.multi("a1", rec.mirror["a1"], creates=(1,))
    await rec.read("a1", 0)
    await rec.multi("a1", rec.mirror["a1"], commits=(0,), creates=(1,))
    await rec.read("a3", 1)
    await rec.multi("a2", rec.mirror["a2"], deletes=(1,))
    await rec.read("a3", 0)
    await rec.multi("a3", rec.mirror["a3"], commits=(0,), creates=(1,))
    await rec.multi("a1", {0: 2}, deletes=(0,), creates=(1,))
    return Trace(label, rec.agents, 2, True, tuple(rec.events))


async def record_scenario(
    client: httpx.AsyncClient, label: str = "scenario", ttl_s: int = 3600
) -> Trace:
    """A fixed trace (3 agents, 2 keys, ORI on) through the two places where the service,
    following protocol.md, was found finer than SBus.tla (formal/README.md, "Trace
    validation"; the first is now in SBus.tla):

    - step 6: a1's multi commit of k0 (stale: it read k0@0, k0 is at 1) and k1 (deleted)
      answers 409 VersionMismatch on k0, the first failing key in ascending order (protocol.md §4
      step 9f), where SBus.tla's Outcome says 404 ShardDeleted;
    - step 7: a3's GET of the deleted k1 answers 404 ShardDeleted and records k1@1 (the
      tombstone version, protocol.md §2), which SBus.tla's Read once did not; so after k1 is created
      again (k1@2) a3's commit of k0 is 409 CrossShardStale on k1 (step 10).
    """
    rec = Recorder(client, 3, 2, 0, ttl_s)
    await rec.start(True)
    await rec.read("a1", 0)
    await rec.read("a1", 1)
    await rec.read("a2", 0)
    await rec.commit("a2", (0,), rec.mirror["a2"])  # k0@1
    await rec.read("a2", 1)
    await rec.delete("a2", 1, rec.mirror["a2"])  # k1@1, a tombstone
    await rec.commit("a1", (0, 1), rec.mirror["a1"])  # 409 VersionMismatch k0
    await rec.read("a3", 1)  # 404 ShardDeleted, records k1@1
    await rec.read("a3", 0)
    await rec.create("a2", 1)  # k1@2
    await rec.commit("a3", (0,), rec.mirror["a3"])  # 409 CrossShardStale k1: 1 -> 2
    await rec.read("a3", 1)
    await rec.commit("a3", (0,), rec.mirror["a3"])  # k0@2
    return Trace(label, rec.agents, 2, True, tuple(rec.events))
