"""The two workloads, measured the same way in every mode.

A, the shared board: N agents each append one item per round, R rounds. An append is
lost when its agent was told it succeeded and the final board does not hold it.

B, the on-call rota (write skew): two doctors, both on call; each goes off call only if
the other is still on, so that at least one is always on call. Each round starts from
both on. A violation is a round that ends with nobody on call; a lost update is a
doctor told she went off call whom the rota still shows on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from examples.contention.lockstep import ReadsDone, lockstep
from examples.contention.modes import DOCTORS, OFF, Attempt, Mode


@dataclass(frozen=True)
class Row:
    attempted: int
    committed: int
    lost: int
    violations: int
    conflicts: int  # 409 answers
    retries: int
    codes: dict[str, int]  # the 409s by problem code


def _since(mode: Mode, before: Counter[str]) -> dict[str, int]:
    return dict(mode.conflicts() - before)


def shared_board(mode: Mode, agents: int, rounds: int) -> Row:
    mode.start_board()
    conflicts_before = mode.conflicts()
    accepted: list[str] = []
    retries = 0
    for r in range(rounds):
        items = [f"agent{i}-round{r}" for i in range(agents)]

        def append(i: int, reads_done: ReadsDone, items: list[str] = items) -> Attempt:
            return mode.append(i, items[i], reads_done)

        attempts = lockstep(agents, append)
        accepted += [item for item, a in zip(items, attempts, strict=True) if a.committed]
        retries += sum(a.retries for a in attempts)
    board = mode.board()
    codes = _since(mode, conflicts_before)
    return Row(
        attempted=agents * rounds,
        committed=len(accepted),
        lost=len(set(accepted) - set(board)),
        violations=0,  # no invariant beyond "keep every append", counted as lost
        conflicts=sum(codes.values()),
        retries=retries,
        codes=codes,
    )


def on_call(mode: Mode, rounds: int) -> Row:
    conflicts_before = mode.conflicts()
    committed = lost = violations = retries = 0
    for _ in range(rounds):
        mode.start_rota()

        def go_off(i: int, reads_done: ReadsDone) -> Attempt:
            return mode.go_off_call(DOCTORS[i], DOCTORS[1 - i], reads_done)

        attempts = lockstep(len(DOCTORS), go_off)
        rota = mode.rota()
        for doctor, attempt in zip(DOCTORS, attempts, strict=True):
            committed += attempt.committed
            lost += attempt.committed and rota[doctor] != OFF
            retries += attempt.retries
        violations += all(rota[d] == OFF for d in DOCTORS)
    codes = _since(mode, conflicts_before)
    return Row(
        attempted=len(DOCTORS) * rounds,
        committed=committed,
        lost=lost,
        violations=violations,
        conflicts=sum(codes.values()),
        retries=retries,
        codes=codes,
    )
