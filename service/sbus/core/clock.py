"""Wall-clock helpers in integer milliseconds, RFC 3339 rendering, and the bound on
the store clock's test offset.

Stores add their own test offset (protocol.md §1) on top of :func:`wall_ms`; the
engine never reads the clock itself, so every replica sees the store's idea of now.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import lru_cache

from sbus.core.errors import ValidationFailed

# The most the test offset (POST /admin/test/advance-clock) may add up to: ten years.
# Unbounded, it pushed the store clock past year 9999, where timestamps have no RFC 3339
# form and every write failed until the offset was reset by hand.
MAX_OFFSET_MS = 10 * 365 * 86_400_000


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def advanced_offset(offset_ms: int, ms: int) -> int:
    """The test offset after moving ``offset_ms`` forward by ``ms``. A store calls this
    inside the atomic step that writes the result, so concurrent advances cannot
    together pass :data:`MAX_OFFSET_MS`; raises :func:`offset_refused`'s error."""
    if offset_ms + ms > MAX_OFFSET_MS:
        raise offset_refused(offset_ms, ms)
    return offset_ms + ms


def offset_refused(offset_ms: int, ms: int) -> ValidationFailed:
    """The 422 for an advance past the cap; the offset stays ``offset_ms``."""
    return ValidationFailed(
        f"advancing the store clock by {ms} ms would take its test offset to "
        f"{offset_ms + ms} ms, past the cap of {MAX_OFFSET_MS} ms (10 years); "
        "POST /admin/reset sets the offset back to 0",
        loc=["body", "ms"],
        offset_ms=offset_ms,
        max_offset_ms=MAX_OFFSET_MS,
    )


@lru_cache(maxsize=4096)
def _second_prefix(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


# (ms, text) of the previous call, replaced as one tuple so that a reader on another
# thread (the SQLite writer) never pairs one call's ms with another's text.
_last: tuple[int, str] = (-1, "")


def rfc3339(ms: int) -> str:
    """``2026-01-02T03:04:05.678Z``: UTC, millisecond precision, on every store.
    Formatting a datetime costs microseconds; commits within one millisecond (or one
    second) reuse the previous text (or prefix)."""
    global _last
    last = _last
    if last[0] == ms:
        return last[1]
    seconds, millis = divmod(ms, 1000)
    text = f"{_second_prefix(seconds)}.{millis:03d}Z"
    _last = (ms, text)
    return text
