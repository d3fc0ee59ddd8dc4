"""Run both workloads in the three modes and render the tables."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from examples.contention.modes import BusMode, CasMode, FileMode, Mode
from examples.contention.workloads import Row, on_call, shared_board
from sbus_client.testing import LocalBus

AGENTS = 4
ROUNDS = 5
COLUMNS = ("attempted", "committed", "lost", "violations", "409s", "retries")
LEGEND = (
    "committed: writes the agent was told succeeded; lost: of those, the ones missing from\n"
    "the final state; violations: rounds that ended with nobody on call; 409s: conflict\n"
    "answers from the bus; retries: times an agent re-read and tried again."
)
# What each mode's numbers mean; true for every agents/rounds the demo accepts, since
# the lockstep makes the counts exact (tests/examples/test_contention.py).
MORAL = {
    "file": "Every save succeeds and overwrites the others of its round: all but one append\n"
    "per round is lost, and the second doctor's save undoes the first's.",
    "cas": "A stale write is refused (VersionMismatch), re-read and retried: no append is\n"
    "lost. But each doctor's commit checks only the key it writes, so both go off call.",
    "bus": "The bus also checks what each session read: the second doctor's commit is\n"
    "refused (CrossShardStale); retried, that doctor sees the first off call and stays on.",
}


@dataclass(frozen=True)
class Result:
    mode: str  # "file", "cas" or "bus"
    title: str
    board: Row
    rota: Row


@contextlib.contextmanager
def _mode(name: str) -> Iterator[Mode]:
    if name == "file":
        with tempfile.TemporaryDirectory(prefix="sbus-demo-") as directory:
            yield FileMode(Path(directory))
        return
    with LocalBus() as local:  # a fresh in-process bus over the memory store
        yield CasMode(local) if name == "cas" else BusMode(local)


def run(agents: int = AGENTS, rounds: int = ROUNDS) -> list[Result]:
    if agents < 2 or rounds < 1:
        raise ValueError("the demo needs at least 2 agents and 1 round")
    results = []
    for name in ("file", "cas", "bus"):
        with _mode(name) as mode:
            board = shared_board(mode, agents, rounds)
            rota = on_call(mode, rounds)
            results.append(Result(name, mode.title, board, rota))
    return results


def render(results: list[Result], agents: int, rounds: int) -> str:
    labels = (f"A shared board ({agents} agents)", "B on-call rota (2 doctors)")
    width = max(len(label) for label in labels)
    header = "  " + " " * width + "".join(f"{c:>11}" for c in COLUMNS)
    lines = [
        f"{agents} agents, {rounds} rounds. Each round every agent reads, waits at a barrier",
        "until all have read, then writes; the writes go one at a time, in agent order.",
        "",
        LEGEND,
    ]
    for result in results:
        lines += ["", result.title, header]
        for label, row in zip(labels, (result.board, result.rota), strict=True):
            cells = (
                row.attempted,
                row.committed,
                row.lost,
                row.violations,
                row.conflicts,
                row.retries,
            )
            lines.append(f"  {label:<{width}}" + "".join(f"{c:>11}" for c in cells))
        lines.append(MORAL[result.mode])
    clean = [r.mode for r in results if not (r.board.lost or r.rota.lost or r.rota.violations)]
    lines += ["", f"zero lost and zero violations: {', '.join(clean) or 'none'}"]
    return "\n".join(lines)
