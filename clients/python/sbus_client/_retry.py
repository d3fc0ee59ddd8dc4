"""Retry decisions, pure: which answers a transport retry resends, and the backoff clocks.

Two loops use them and never mix (docs/sdk.md):

- the *transport* loop resends one request, byte for byte with its Idempotency-Key,
  when the answer says nothing was decided or the outcome is unknown (a replay is then
  exact: the bus answers ``Idempotent-Replayed`` if the first attempt had landed);
- the *work* loops (``Session.update``, ``bus.transactional``) re-run the caller's
  read-decide-write on a conflict, which is a new request with new versions.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

PROBLEM_JSON = "application/problem+json"
# A proxy's 502/503/504 (no problem document from the bus behind it): the request may
# or may not have reached the bus, so it is an unknown outcome, resent with its key.
PROXY_STATUSES = frozenset({502, 503, 504})
RESENDABLE_OUTCOMES = frozenset({"not_applied", "unknown"})


@dataclass(frozen=True)
class TransportRetry:
    """How a request is resent after a failure that decided nothing (or maybe something).

    ``attempts`` counts every send, the first included; ``max_elapsed`` bounds the whole
    exchange in seconds. Between sends the client waits for ``Retry-After`` when the bus
    sent one, else a full-jitter backoff from ``base`` doubling up to ``cap``. A
    ``Retry-After`` that would pass ``max_elapsed`` is not waited for: the last answer
    is raised instead.
    """

    attempts: int = 5
    base: float = 0.05
    cap: float = 2.0
    max_elapsed: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.base < 0 or self.cap < 0 or self.max_elapsed < 0:
            raise ValueError("base, cap and max_elapsed must not be negative")


NO_RETRY = TransportRetry(attempts=1)


def full_jitter(retry: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """AWS's "full jitter": uniform in [0, min(cap, base * 2**retry)] for the retry-th
    wait (0-based). Spreads contending clients apart instead of in lockstep."""
    ceiling = cap if retry >= 64 else min(cap, base * (2**retry))
    return rand() * ceiling


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), None when absent or
    unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def is_problem(response: httpx.Response) -> bool:
    media = response.headers.get("content-type", "").split(";")[0].strip().lower()
    return bool(media == PROBLEM_JSON)


def problem_outcome(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    outcome = body.get("outcome") if isinstance(body, dict) else None
    return outcome if isinstance(outcome, str) else None


def resendable(reply: httpx.Response | httpx.TransportError) -> bool:
    """Whether the transport loop may resend the same bytes after ``reply``."""
    if isinstance(reply, httpx.TransportError):
        return True  # refused, reset, timed out: sent or not, the key makes a resend safe
    status = reply.status_code
    if status == 429:
        return True  # rate limited before anything was decided
    if status in PROXY_STATUSES and not is_problem(reply):
        return True
    if status == 503:
        # The bus's own 503: only a store failure names an outcome; SigningUnavailable
        # (no outcome) cannot be helped by asking this replica again.
        return problem_outcome(reply) in RESENDABLE_OUTCOMES
    return False


@dataclass
class Backoff:
    """The waits of one retry loop: full jitter from ``base`` to ``cap``, at most
    ``max_attempts`` runs (None: no cap) and ``max_elapsed`` seconds in all.

    ``delay()`` is asked after a failed run and answers how long to wait before the
    next one, or None when the budget is spent. ``clock`` and ``rand`` are injectable
    so tests need no real time.
    """

    base: float
    cap: float
    max_attempts: int | None
    max_elapsed: float
    clock: Callable[[], float] = time.monotonic
    rand: Callable[[], float] = random.random
    attempts: int = 0
    started: float = field(default=math.nan)

    def start(self) -> None:
        self.started = self.clock()

    def delay(self, at_least: float = 0.0) -> float | None:
        """Count one finished run; the wait before the next, or None to give up."""
        self.attempts += 1
        if math.isnan(self.started):
            self.start()
        if self.max_attempts is not None and self.attempts >= self.max_attempts:
            return None
        remaining = self.max_elapsed - (self.clock() - self.started)
        if remaining <= 0 or at_least > remaining:
            return None
        wait = max(at_least, full_jitter(self.attempts - 1, self.base, self.cap, self.rand))
        return min(wait, remaining)
