"""The worst interleaving, made deterministic.

Each round, N agent threads first read, then wait at a barrier until every one of them
has read, then write one at a time in agent order (0, 1, ..., N-1). Every write after
the first therefore lands on state its agent did not see: the case that loses updates
in practice, forced on every round instead of hoped for. Because the write order is
fixed too, the counts the demo prints are exact, not probabilistic.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")

# Only a bug (an agent that never says it has read) can make a thread wait this long;
# the timeout turns such a hang into an error instead of a stuck demo.
STUCK_AFTER_S = 60.0

# What an agent calls once its reads are done; it returns when this agent may write.
# Calling it again (a retry re-reading) returns at once: the agent keeps its turn.
ReadsDone = Callable[[], None]


class _Round:
    def __init__(self, agents: int) -> None:
        self._barrier = threading.Barrier(agents, timeout=STUCK_AFTER_S)
        self._turn_changed = threading.Condition()
        self._turn = 0
        self._waited = [False] * agents
        self._aborted = False
        self.cause: BaseException | None = None  # the error that ended the round

    def reads_done(self, agent: int) -> None:
        if self._waited[agent]:
            return
        self._waited[agent] = True
        self._barrier.wait()
        with self._turn_changed:
            if not self._turn_changed.wait_for(
                lambda: self._turn == agent or self._aborted, STUCK_AFTER_S
            ):
                raise TimeoutError(f"agent {agent} never got its turn to write")
            if self._aborted:
                raise RuntimeError("another agent of this round failed")

    def has_read(self, agent: int) -> bool:
        return self._waited[agent]

    def finished(self, agent: int) -> None:
        with self._turn_changed:
            if self._turn == agent:
                self._turn += 1
                self._turn_changed.notify_all()

    def abort(self, cause: BaseException) -> None:
        with self._turn_changed:
            if self.cause is None:
                self.cause = cause
            self._aborted = True
            self._turn_changed.notify_all()
        self._barrier.abort()


def lockstep(agents: int, body: Callable[[int, ReadsDone], T]) -> list[T]:
    """Run ``body(agent, reads_done)`` for agents ``0..agents-1`` in threads, one round:
    each must call ``reads_done()`` after its reads and before its writes. Returns the
    results in agent order. If an agent fails, the others are released (their waits
    fail) and the failing agent's error is raised."""
    round_ = _Round(agents)

    def agent(i: int) -> T:
        try:
            result = body(i, lambda: round_.reads_done(i))
            if not round_.has_read(i):
                raise RuntimeError(f"agent {i} finished without calling reads_done()")
            return result
        except BaseException as exc:
            round_.abort(exc)
            raise
        finally:
            round_.finished(i)

    with ThreadPoolExecutor(agents, thread_name_prefix="agent") as pool:
        futures = [pool.submit(agent, i) for i in range(agents)]
        wait(futures)
    if round_.cause is not None:
        raise round_.cause
    return [future.result() for future in futures]
