"""Two multi-commits creating one key at the same moment (protocol.md §3.1), against real
``sbus serve`` processes: one over SQLite, two replicas each over PostgreSQL and Redis
(the racers on different replicas).

Each round, two agents released by one barrier send a multi-commit that creates the
round's shared key, creates a key of its own and deletes a key of its own. Exactly one
answers 200 with every result; the other 409 ShardAlreadyExists naming the shared key,
and none of its writes landed: its own key was never created, its own key to delete is
still live at version 0. Every replica sees the same. The test also asserts that the two
requests really were in flight together (each sent before the other's answer came) in
at least one round; a round that did not overlap still has to answer as above.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest

from tests.concurrency.conftest import (
    Bus,
    assert_replicas_agree,
    create_shard,
    expect,
    new_client,
    run_threads,
)
from tests.history.client import Recorder

pytestmark = pytest.mark.concurrency

ROUNDS = 12
RACERS = 2


@dataclass
class Sent:
    status: int
    body: dict[str, Any]
    sent_ns: int
    answered_ns: int


def race_body(rnd: int, slot: int) -> dict[str, Any]:
    return {
        "agent_id": f"agent-{slot}",
        "session_id": f"round-{rnd}",
        "writes": [
            {"key": f"race/{rnd}", "create": True, "delta": f"by {slot}"},
            {"key": f"own/{rnd}/{slot}", "create": True, "delta": "mine"},
            {"key": f"drop/{rnd}/{slot}", "delete": True, "expected_version": 0},
        ],
        "rationale": f"round {rnd}",
    }


def overlapped(a: Sent, b: Sent) -> bool:
    return a.sent_ns < b.answered_ns and b.sent_ns < a.answered_ns


def test_two_multis_create_one_key_exactly_one_wins(bus: Bus, recorder: Recorder) -> None:
    with new_client(bus.url(0)) as setup:
        for rnd in range(ROUNDS):
            for slot in range(RACERS):
                assert create_shard(setup, f"drop/{rnd}/{slot}", "x") == 0
    start_line = threading.Barrier(RACERS, timeout=30)
    answers: list[list[Sent | None]] = [[None] * RACERS for _ in range(ROUNDS)]

    def racer(slot: int) -> None:
        # agent i on replica i % replicas: the two processes race for one store
        with new_client(bus.url(slot)) as client:
            expect(client.get("/admin/health"), [200])  # the connection is open
            for rnd in range(ROUNDS):
                start_line.wait()
                sent = time.monotonic_ns()
                resp = client.post("/commit/multi", json=race_body(rnd, slot))
                answered = time.monotonic_ns()
                expect(resp, [200, 409])
                answers[rnd][slot] = Sent(resp.status_code, resp.json(), sent, answered)

    run_threads(
        [partial(racer, slot) for slot in range(RACERS)], timeout=120, on_error=start_line.abort
    )

    together = 0
    winners: list[int] = []
    for rnd, row in enumerate(answers):
        first, second = row
        assert first is not None and second is not None, rnd
        together += overlapped(first, second)
        statuses = sorted(s.status for s in (first, second))
        assert statuses == [200, 409], (rnd, row)
        winner = 0 if first.status == 200 else 1
        winners.append(winner)
        won, lost = row[winner], row[1 - winner]
        assert won is not None and lost is not None
        assert won.body["results"] == [
            {"key": f"race/{rnd}", "new_version": 0, "op": "create"},
            {"key": f"own/{rnd}/{winner}", "new_version": 0, "op": "create"},
            {"key": f"drop/{rnd}/{winner}", "new_version": 1, "op": "delete"},
        ]
        assert (lost.body["error"], lost.body["key"]) == ("ShardAlreadyExists", f"race/{rnd}")
    assert together >= 1, "the two requests never were in flight together"

    for url in bus.urls:
        with new_client(url) as client:
            for rnd, winner in enumerate(winners):
                loser = 1 - winner
                shard = client.get(f"/shard/race/{rnd}", params={"record": "false"}).json()
                assert (shard["version"], shard["content"]) == (0, f"by {winner}"), (url, rnd)
                entries = client.get(f"/history/race/{rnd}").json()["entries"]
                assert [(e["version"], e["rationale"]) for e in entries] == [(0, "create")]
                expect(client.get(f"/shard/own/{rnd}/{winner}", params={"record": "false"}), [200])
                gone = client.get(f"/shard/own/{rnd}/{loser}", params={"record": "false"})
                assert (gone.status_code, gone.json()["error"]) == (404, "ShardNotFound")
                kept = client.get(f"/shard/drop/{rnd}/{loser}", params={"record": "false"})
                assert (kept.status_code, kept.json()["version"]) == (200, 0)
                dropped = client.get(f"/shard/drop/{rnd}/{winner}", params={"record": "false"})
                assert (dropped.status_code, dropped.json()["version"]) == (404, 1)
    stats = assert_replicas_agree(bus)
    assert (stats["total_commits"], stats["total_conflicts"]) == (ROUNDS, 0)
    # the history holds every race (and is checked when the test ends)
    multis = [op for op in recorder.history if op.op == "multi"]
    assert len(multis) == ROUNDS * RACERS
    assert sum(op.ok for op in multis) == ROUNDS
