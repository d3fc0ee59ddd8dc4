"""examples/contention: the lockstep really forces read-all-then-write-in-order, and the
demo's counts are exactly what that order implies, in every mode."""

from __future__ import annotations

import threading

import pytest

from examples.contention import Row, render, run
from examples.contention.lockstep import ReadsDone, lockstep


def test_lockstep_reads_all_then_writes_in_agent_order() -> None:
    events: list[tuple[str, int]] = []
    lock = threading.Lock()

    def body(i: int, reads_done: ReadsDone) -> int:
        with lock:
            events.append(("read", i))
        reads_done()
        reads_done()  # a retry's second call keeps the turn
        with lock:
            events.append(("write", i))
        return i * 10

    for _ in range(20):
        events.clear()
        assert lockstep(6, body) == [0, 10, 20, 30, 40, 50]
        assert sorted(events[:6]) == [("read", i) for i in range(6)]
        assert events[6:] == [("write", i) for i in range(6)]


def test_lockstep_raises_the_failing_agents_error_without_hanging() -> None:
    def body(i: int, reads_done: ReadsDone) -> None:
        if i == 2:
            raise KeyError("agent 2 broke")
        reads_done()

    with pytest.raises(KeyError, match="agent 2 broke"):
        lockstep(4, body)

    def forgetful(i: int, reads_done: ReadsDone) -> None:
        if i != 1:
            reads_done()

    with pytest.raises(RuntimeError, match="agent 1 finished without calling reads_done"):
        lockstep(3, forgetful)


@pytest.mark.parametrize(("agents", "rounds"), [(4, 5), (2, 1), (5, 2)])
def test_exact_counts_in_every_mode(agents: int, rounds: int) -> None:
    """N agents x R rounds on the board, 2 doctors x R rounds on the rota. Per round:
    the file keeps only the last save (N - 1 appends lost; the second doctor's save
    undoes the first's); CAS refuses each of the N - 1 later appends once and the retry
    lands, but lets both doctors off (one violation); the bus refuses the second
    doctor's commit (CrossShardStale) and the retry sees the first off call."""
    n, r = agents, rounds
    file, cas, bus = run(agents, rounds)
    assert (file.mode, cas.mode, bus.mode) == ("file", "cas", "bus")

    assert file.board == Row(n * r, n * r, n * r - r, 0, 0, 0, {})
    assert file.rota == Row(2 * r, 2 * r, r, 0, 0, 0, {})

    stale = {"VersionMismatch": (n - 1) * r}
    assert cas.board == Row(n * r, n * r, 0, 0, (n - 1) * r, (n - 1) * r, stale)
    assert cas.rota == Row(2 * r, 2 * r, 0, r, 0, 0, {})

    assert bus.board == Row(n * r, n * r, 0, 0, (n - 1) * r, (n - 1) * r, stale)
    assert bus.rota == Row(2 * r, r, 0, 0, r, r, {"CrossShardStale": r})


def test_render_names_only_the_bus_as_clean() -> None:
    text = render(run(2, 1), 2, 1)
    assert text.endswith("zero lost and zero violations: bus")
    assert text.count("A shared board (2 agents)") == 3
    with pytest.raises(ValueError, match="at least 2 agents"):
        run(1, 1)
