"""``bus.transactional``: re-run a whole read-decide-write function on a conflict.

Each attempt runs in a fresh session passed as the first argument, so no read of a
failed attempt constrains the next one. A call whose first argument already IS a
session joins it: no new session and no retry, since only the outermost function can
redo everything that was read (FoundationDB's rule for nested transactions). Only
ConflictError re-runs; the waits are full jitter (``_retry.Backoff``).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar, overload

from sbus_client._errors import ConflictError, RetriesExhausted
from sbus_client._retry import Backoff

S = TypeVar("S")
S_co = TypeVar("S_co", covariant=True)
P = ParamSpec("P")
R = TypeVar("R")

# on_retry(attempt that failed (1-based), its conflict, seconds until the next attempt)
OnRetry = Callable[[int, ConflictError, float], None]


@dataclass(frozen=True)
class TxnPolicy:
    """The retry budget of ``transactional``: at most ``max_retries`` re-runs (so
    ``max_retries + 1`` attempts) within ``max_elapsed`` seconds, waits of full jitter
    from ``base`` doubling up to ``cap``."""

    max_retries: int = 8
    max_elapsed: float = 60.0
    base: float = 0.02
    cap: float = 2.0
    on_retry: OnRetry | None = None

    def __post_init__(self) -> None:
        # Refused when decorating, not at the first call far away from the mistake.
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, not {self.max_retries}")
        if self.max_elapsed < 0 or self.base < 0 or self.cap < 0:
            raise ValueError("max_elapsed, base and cap must not be negative")

    def budget(self) -> Backoff:
        budget = Backoff(self.base, self.cap, self.max_retries + 1, self.max_elapsed)
        budget.start()
        return budget

    def after_conflict(self, budget: Backoff, err: ConflictError) -> float:
        """The wait before the next attempt; raises RetriesExhausted when spent."""
        wait = budget.delay()
        if wait is None:
            raise RetriesExhausted(budget.attempts, err) from err
        if self.on_retry is not None:
            self.on_retry(budget.attempts, err, wait)
        return wait


class _Opens(Protocol[S_co]):
    def session(self) -> AbstractContextManager[S_co]: ...


class _OpensAsync(Protocol[S_co]):
    def session(self) -> AbstractAsyncContextManager[S_co]: ...


class Transactional(Generic[S, P, R]):
    """``fn(session, *args)`` made callable as ``fn(*args)`` (see the module doc)."""

    __name__: str  # copied from the function, with its other attributes
    __qualname__: str
    __wrapped__: Callable[..., Any]

    def __init__(
        self,
        bus: _Opens[S],
        fn: Callable[Concatenate[S, P], R],
        policy: TxnPolicy,
        session_type: type[S],
    ) -> None:
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"{_name(fn)} is async: decorate it with an AsyncBus's transactional "
                "(a Bus would only create the coroutine, outside any session and retry)"
            )
        if inspect.isgeneratorfunction(fn):
            raise TypeError(
                f"{_name(fn)} is a generator function: its body would run only when "
                "iterated, after the session has closed; return a value instead"
            )
        self._bus = bus
        self._fn = fn
        self._policy = policy
        self._session_type = session_type
        # __name__, __qualname__, __doc__, __module__, __wrapped__: frameworks name
        # nodes and tools after the function (a LangGraph node, an MCP tool).
        functools.update_wrapper(self, fn)

    def on(self, bus: _Opens[S]) -> Transactional[S, P, R]:
        """The same function and policy, run in sessions of ``bus`` (``bus.run``)."""
        return Transactional(bus, self._fn, self._policy, self._session_type)

    @overload
    def __call__(self, session: S, /, *args: P.args, **kwargs: P.kwargs) -> R: ...
    @overload
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...
    def __call__(self, *args: Any, **kwargs: Any) -> R:  # type: ignore[misc]
        if args and isinstance(args[0], self._session_type):
            return self._fn(*args, **kwargs)  # join the caller's session: no retry here
        budget = self._policy.budget()
        while True:
            done, wait = False, 0.0
            with self._bus.session() as session:
                try:
                    result, done = self._fn(session, *args, **kwargs), True
                except ConflictError as err:
                    wait = self._policy.after_conflict(budget, err)
            if done:
                return result
            time.sleep(wait)


class AsyncTransactional(Generic[S, P, R]):
    """The coroutine-function twin of :class:`Transactional`."""

    __name__: str  # copied from the function, with its other attributes
    __qualname__: str
    __wrapped__: Callable[..., Any]

    def __init__(
        self,
        bus: _OpensAsync[S],
        fn: Callable[Concatenate[S, P], Awaitable[R]],
        policy: TxnPolicy,
        session_type: type[S],
    ) -> None:
        # A plain def (seen through functools.wraps) would run, side effects and all,
        # before awaiting its result failed: refuse it before it ever runs.
        inner = inspect.unwrap(fn)
        plain = inspect.isfunction(inner) or inspect.ismethod(inner)
        if inspect.isasyncgenfunction(fn) or (plain and not inspect.iscoroutinefunction(inner)):
            raise TypeError(
                f"{_name(fn)} is not a coroutine function: decorate it with a Bus's "
                "transactional, or make it async def"
            )
        self._bus = bus
        self._fn = fn
        self._policy = policy
        self._session_type = session_type
        # __name__, __qualname__, __doc__, __module__, __wrapped__: frameworks name
        # nodes and tools after the function (a LangGraph node, an MCP tool).
        functools.update_wrapper(self, fn)

    def on(self, bus: _OpensAsync[S]) -> AsyncTransactional[S, P, R]:
        """The same function and policy, run in sessions of ``bus`` (``bus.run``)."""
        return AsyncTransactional(bus, self._fn, self._policy, self._session_type)

    @overload
    async def __call__(self, session: S, /, *args: P.args, **kwargs: P.kwargs) -> R: ...
    @overload
    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...
    async def __call__(self, *args: Any, **kwargs: Any) -> R:  # type: ignore[misc]
        if args and isinstance(args[0], self._session_type):
            return await self._fn(*args, **kwargs)
        budget = self._policy.budget()
        while True:
            done, wait = False, 0.0
            async with self._bus.session() as session:
                try:
                    result, done = await self._fn(session, *args, **kwargs), True
                except ConflictError as err:
                    wait = self._policy.after_conflict(budget, err)
            if done:
                return result
            await asyncio.sleep(wait)


def _name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or repr(fn))
