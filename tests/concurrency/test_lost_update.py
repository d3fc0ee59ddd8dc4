"""Hotspot lost-update sweep: many agents, one shard, read-then-commit with retries.

Every successful commit must take the shard from exactly the version its agent read to the
next one: the successes' expected_versions are start..final-1, each exactly once, so no
commit overwrote another (a lost update shows up as a duplicated expected_version, a gap,
or a final version short of the number of successes).

The first attempt is an arranged collision: every agent reads, then waits at a barrier
until all have read, then all commit on the same version. Exactly one wins, so the bus
counts at least agents - 1 VersionMismatch refusals whatever the machine's speed, and
the retries that follow really race.

Sizes per topology: sqlite-1 runs 16 agents x 25 steps (400 commits) against one process;
postgres-2 and redis-2 run 8 agents x 20 steps (160 commits) with agent i on replica i % 2,
so the two processes race for the same row or key of the shared store. Every replica must
then report the same /stats, shard and history.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import partial

import pytest

from tests.concurrency.conftest import (
    COMMIT_STATUSES,
    Bus,
    assert_replicas_agree,
    create_shard,
    expect,
    new_client,
    run_threads,
)
from tests.history.check import assert_clean
from tests.history.client import Recorder

pytestmark = pytest.mark.concurrency

# (agents, steps) per topology; the replicated runs are smaller to fit the suite's budget.
SIZES = {"sqlite-1": (16, 25), "postgres-2": (8, 20), "redis-2": (8, 20)}
KEY = "hot"
MAX_ATTEMPTS_PER_STEP = 2000
DEADLINE_S = 60.0


@dataclass(frozen=True)
class Success:
    agent: str
    step: int
    expected_version: int
    new_version: int
    delta: str


@dataclass
class AgentTally:
    successes: list[Success]
    version_mismatches: int = 0
    session_resets: int = 0
    reads: int = 0


def test_hotspot_has_no_lost_update(bus: Bus, recorder: Recorder) -> None:
    agents, steps = SIZES[bus.topology.name]
    with new_client(bus.url(0)) as admin:
        start = create_shard(admin, KEY, "genesis")
    start_line = threading.Barrier(agents, timeout=30)
    all_read = threading.Barrier(agents, timeout=30)  # the arranged first collision
    stop = threading.Event()
    tallies = {f"agent{i:02d}": AgentTally(successes=[]) for i in range(agents)}
    began = time.monotonic()

    def agent(index: int, name: str) -> None:
        tally = tallies[name]
        with new_client(bus.url(index)) as client:
            start_line.wait()
            last_seen = -1
            for step in range(steps):
                delta = f"{name}:{step}"
                for _ in range(MAX_ATTEMPTS_PER_STEP):
                    if stop.is_set() or time.monotonic() - began > DEADLINE_S:
                        pytest.fail(f"{name} gave up at step {step}", pytrace=False)
                    resp = client.get(f"/shard/{KEY}", params={"agent_id": name})
                    expect(resp, [200])
                    tally.reads += 1
                    version: int = resp.json()["version"]
                    # One store, however many replicas: a client never reads a version
                    # older than one it has already seen.
                    assert version >= last_seen, (name, version, last_seen)
                    last_seen = version
                    if tally.reads == 1:
                        all_read.wait()
                    resp = client.post(
                        "/commit/v2",
                        json={
                            "key": KEY,
                            "expected_version": version,
                            "delta": delta,
                            "agent_id": name,
                        },
                    )
                    status = expect(resp, COMMIT_STATUSES)
                    body = resp.json()
                    if status == 200:
                        assert body["new_version"] == version + 1, body
                        tally.successes.append(Success(name, step, version, version + 1, delta))
                        last_seen = version + 1
                        break
                    if status == 409:
                        assert body["error"] == "VersionMismatch", body
                        assert body["key"] == KEY and body["expected"] == version, body
                        assert body["found"] > version, body
                        tally.version_mismatches += 1
                    else:
                        # 410: the session expired or overflowed; start it afresh and retry.
                        tally.session_resets += 1
                        resp = client.post("/session", json={"agent_id": name})
                        expect(resp, [200])
                else:
                    pytest.fail(f"{name} step {step}: no success in {MAX_ATTEMPTS_PER_STEP}")

    def abort() -> None:
        stop.set()
        start_line.abort()
        all_read.abort()

    run_threads(
        [partial(agent, i, name) for i, name in enumerate(tallies)],
        timeout=DEADLINE_S + 30,
        on_error=abort,
    )
    elapsed = time.monotonic() - began

    successes = [s for t in tallies.values() for s in t.successes]
    mismatches = sum(t.version_mismatches for t in tallies.values())
    views = []
    for url in bus.urls:
        with new_client(url) as client:
            resp = client.get(f"/shard/{KEY}", params={"record": "false"})
            expect(resp, [200])
            final = resp.json()
            resp = client.get(f"/history/{KEY}", params={"limit": 1000})
            expect(resp, [200])
            history = resp.json()["entries"]
            views.append((final, history))
    stats = assert_replicas_agree(bus)
    for url, view in zip(bus.urls, views, strict=True):
        assert view == views[0], f"{url} serves another shard or history than {bus.urls[0]}"
    final, history = views[0]
    print(
        f"\nlost-update sweep [{bus.topology}]: {len(successes)} commits, {mismatches} "
        f"VersionMismatch retries, {sum(t.reads for t in tallies.values())} reads in "
        f"{elapsed:.1f}s; successes per agent {sorted(len(t.successes) for t in tallies.values())}"
    )

    assert len(successes) == agents * steps
    assert sorted(s.expected_version for s in successes) == list(range(start, final["version"]))
    assert final["version"] == start + len(successes) == agents * steps
    last = max(successes, key=lambda s: s.new_version)
    assert final["content"] == last.delta
    assert stats["total_commits"] == len(successes)
    assert stats["total_conflicts"] == mismatches
    # They collided: the first round alone refuses all agents but one.
    assert mismatches >= agents - 1, mismatches
    assert stats["cross_shard_stale"] == 0
    # The recorded history (checked in full at teardown) saw every one of those commits.
    summary = assert_clean(recorder.history.ops)
    assert summary.committed_writes == len(successes) + 1  # and the create
    assert summary.refused_writes == mismatches

    # The history agrees with what each client was told: version v+1 was written by the
    # commit that expected v, with that commit's delta.
    by_version = {s.new_version: s for s in successes}
    written = {e["version"]: e for e in history if e["version"] > start}
    assert sorted(written) == sorted(by_version)
    for version, entry in written.items():
        assert (entry["agent_id"], entry["content"]) == (
            by_version[version].agent,
            by_version[version].delta,
        ), version
