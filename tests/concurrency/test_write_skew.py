"""Cross-shard write-skew ring: three agents, three shards, simultaneous commits.

Agent i reads k_i and k_(i+1 mod 3) (the DeliveryLog records both), then all three commit
their own shard k_i at the same moment, with no explicit read_set. Agent i's effective read
set is {k_(i+1): version read} (its written key is guarded by expected_version instead).

Why three successes would be write skew: each commit invalidates the read of its left
neighbour (agent i writes k_i, which agent i-1 read). If all three commits were admitted,
every agent's commit would rest on a read that another admitted commit of the same round
overwrote, so every agent must be ordered before its right neighbour (i before i+1, because
i read k_(i+1) before i+1 wrote it): 0 < 1 < 2 < 0, a cycle, so no serial order of the
three commits can produce that outcome. That is exactly what validating siblings and
writing under separate locks (the reference server) admits.

What an atomic validate-and-write must give instead: whichever commit is applied first
succeeds (the shards are untouched since the reads); it then makes the read of its left
neighbour stale, so that one fails with CrossShardStale; the third reads the failed
agent's shard, which did not change, so it succeeds. Exactly two successes every round;
one success would mean a commit whose checks all held was rejected (a false conflict).

Sizes per topology: sqlite-1 runs 200 rounds against one process; postgres-2 and redis-2
run 100 rounds over two replicas. There agent i reads through replica (i + round) % 2 and
commits through the other one, so every commit is validated by a process that did not
record the reads it rests on, and the three simultaneous commits arrive at both processes
(two on one, one on the other, alternating every round).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial

import httpx
import pytest

from tests.concurrency.conftest import (
    COMMIT_STATUSES,
    JSON_HEADERS,
    Bus,
    assert_replicas_agree,
    create_shard,
    expect,
    new_client,
    run_threads,
)
from tests.history.check import assert_clean, check, dependency_cycles
from tests.history.client import Recorder

pytestmark = pytest.mark.concurrency

RING = 3
ROUNDS = {"sqlite-1": 200, "postgres-2": 100, "redis-2": 100}
KEYS = [f"k{i}" for i in range(RING)]
BARRIER_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Outcome:
    agent: int
    status: int
    read_own: int
    read_next: int
    body: dict[str, object]


def run_ring(bus: Bus, rounds: int) -> tuple[list[list[Outcome | None]], float]:
    """Create the ring's shards, run ``rounds`` rounds; the outcomes and the seconds."""
    with new_client(bus.url(0)) as admin:
        for key in KEYS:
            assert create_shard(admin, key, "init") == 0
    # Three phases per round: everybody has finished the previous round's commit, every
    # agent has read (then they fire together), and the round ends.
    before_reads = threading.Barrier(RING, timeout=BARRIER_TIMEOUT_S)
    before_commits = threading.Barrier(RING, timeout=BARRIER_TIMEOUT_S)
    results: list[list[Outcome | None]] = [[None] * RING for _ in range(rounds)]

    def agent(i: int) -> None:
        name = f"agent{i}"
        own, nxt = KEYS[i], KEYS[(i + 1) % RING]
        clients = [new_client(url) for url in bus.urls]
        try:
            for rnd in range(rounds):
                session = f"r{rnd}"
                # Read through one replica, commit through the next (the same one when
                # there is only one).
                reader = clients[(i + rnd) % len(clients)]
                committer = clients[(i + rnd + 1) % len(clients)]
                before_reads.wait()
                read: dict[str, int] = {}
                for key in (own, nxt):
                    resp = reader.get(
                        f"/shard/{key}", params={"agent_id": name, "session_id": session}
                    )
                    expect(resp, [200])
                    read[key] = resp.json()["version"]
                payload = {
                    "key": own,
                    "expected_version": read[own],
                    "delta": f"{name}:{rnd}",
                    "agent_id": name,
                    "session_id": session,
                }
                before_commits.wait()
                resp = committer.post("/commit/v2", json=payload)
                status = expect(resp, COMMIT_STATUSES)
                results[rnd][i] = Outcome(i, status, read[own], read[nxt], resp.json())
        finally:
            for client in clients:
                client.close()

    def abort() -> None:
        before_reads.abort()
        before_commits.abort()

    began = time.monotonic()
    run_threads([partial(agent, i) for i in range(RING)], timeout=80.0, on_error=abort)
    return results, time.monotonic() - began


def test_ring_admits_no_write_skew(bus: Bus, recorder: Recorder) -> None:
    rounds = ROUNDS[bus.topology.name]
    results, elapsed = run_ring(bus, rounds)
    # The recorded history (checked again at teardown) has every commit's read of its
    # neighbour as a validated read, and the graph has edges to find cycles in.
    summary = assert_clean(recorder.history.ops)
    # Two admitted commits per round, each resting on its neighbour and its own guard.
    assert summary.validated_reads == 2 * 2 * rounds
    assert summary.committed_writes == RING + 2 * rounds

    per_round: list[int] = []
    skew_rounds: list[int] = []
    stale = 0
    expected_versions = [0] * RING
    for rnd, row in enumerate(results):
        outcomes = [o for o in row if o is not None]
        assert len(outcomes) == RING, (rnd, row)
        winners = {o.agent for o in outcomes if o.status == 200}
        per_round.append(len(winners))
        if len(winners) == RING:
            skew_rounds.append(rnd)
        for o in outcomes:
            # Every round starts from the state the previous round left: the barriers
            # order all of round r-1's commits before any read of round r.
            assert o.read_own == expected_versions[o.agent], (rnd, o)
            assert o.read_next == expected_versions[(o.agent + 1) % RING], (rnd, o)
            if o.status == 200:
                assert o.body["new_version"] == o.read_own + 1, (rnd, o)
            elif o.status == 409:
                # The only admissible reason to lose: the right neighbour (whose shard
                # this agent read) committed first.
                nxt = KEYS[(o.agent + 1) % RING]
                assert o.body["error"] == "CrossShardStale", (rnd, o)
                assert (o.body["key"], o.body["version_at_read"]) == (nxt, o.read_next), o
                assert o.body["current_version"] == o.read_next + 1, (rnd, o)
                assert (o.agent + 1) % RING in winners, (rnd, o)
                stale += 1
            else:
                pytest.fail(f"round {rnd}: unexpected {o.status} (fresh session): {o}")
        for agent_index in winners:
            expected_versions[agent_index] += 1

    distribution = dict(sorted(Counter(per_round).items()))
    stats = assert_replicas_agree(bus)
    for url in bus.urls:
        with new_client(url) as client:
            finals = []
            for key in KEYS:
                resp = client.get(f"/shard/{key}", params={"record": "false"})
                expect(resp, [200])
                finals.append(resp.json()["version"])
        assert finals == expected_versions, (url, finals, expected_versions)
    print(
        f"\nwrite-skew ring [{bus.topology}]: {rounds} rounds in {elapsed:.1f}s; successes per "
        f"round {distribution}; wins per agent {expected_versions}; {stale} CrossShardStale"
    )

    assert not skew_rounds, (
        f"write skew: all {RING} commits admitted in rounds {skew_rounds[:20]} "
        f"({len(skew_rounds)} of {rounds}); distribution {distribution}"
    )
    assert all(n >= 1 for n in per_round), f"a round with no winner (livelock): {distribution}"
    assert distribution == {2: rounds}, f"false conflicts: {distribution}"
    # They collided: every round (its reads all taken before any commit) refused one.
    assert stale == rounds > 0, (stale, rounds)
    assert stats["total_commits"] == sum(per_round)
    assert stats["cross_shard_stale"] == stale
    assert stats["total_conflicts"] == 0
    assert stats["view_checked_commits"] == RING * rounds
    assert stats["view_divergent_commits"] == stale


ORI_OFF_ROUNDS = 20


def test_ring_with_ori_off_shows_write_skew_to_the_checker(bus: Bus, recorder: Recorder) -> None:
    """The checker is not vacuous on real histories. With ORI off (protocol.md §4: the DeliveryLog
    is then observed, not enforced) all three commits of every round are admitted, which
    is write skew. The history records those reads as unvalidated, so it is clean as the
    bus documents it; taken as if ORI had validated them, the checker must find exactly
    one G2-item cycle per round, made of that round's three commits."""
    recorder.checked_by_test = True
    with httpx.Client(base_url=bus.url(0), headers=JSON_HEADERS, trust_env=False) as admin:
        resp = admin.post("/admin/config", json={"ori_enabled": False})
        assert (resp.status_code, resp.json()["ori_enabled"]) == (200, False)
    recorder.ori = False  # the admin client above is not recorded
    results, _ = run_ring(bus, ORI_OFF_ROUNDS)
    assert [sorted(o.status for o in row if o is not None) for row in results] == [
        [200] * RING
    ] * ORI_OFF_ROUNDS

    ops = recorder.history.ops
    commits = [op for op in ops if op.op == "commit"]
    assert len(commits) == RING * ORI_OFF_ROUNDS
    assert all(not op.ori and len(op.reads) == 1 for op in commits)
    assert check(ops) == []

    as_if_validated = [dataclasses.replace(op, ori=True) for op in ops]
    cycles = dependency_cycles(as_if_validated)
    assert {(v.check, v.anomaly) for v in cycles} == {("NoWriteSkew", "G2-item")}
    assert len(cycles) == ORI_OFF_ROUNDS
    by_round = sorted(sorted(v.ops) for v in cycles)
    commit_rounds = sorted(
        sorted(op.index for op in commits if op.session == f"r{rnd}")
        for rnd in range(ORI_OFF_ROUNDS)
    )
    assert by_round == commit_rounds
