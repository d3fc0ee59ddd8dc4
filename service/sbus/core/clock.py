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


def offset_cap_ms(token_max_ttl_s: int | None) -> int:
    """The cap on the test offset: :data:`MAX_OFFSET_MS`, and in token mode (given
    ``SBUS_TOKEN_MAX_TTL``) at most that lifetime. Every request's token is refused once
    it is past ``exp`` by the store clock, the admin token that /admin/reset needs
    included, and only /admin/reset clears the offset: a larger offset would lock every
    caller out for good. Within the cap a freshly issued token of maximum lifetime is
    still valid by the store clock."""
    if token_max_ttl_s is None:
        return MAX_OFFSET_MS
    return max(0, min(MAX_OFFSET_MS, token_max_ttl_s * 1000))


def advanced_offset(offset_ms: int, ms: int, cap_ms: int = MAX_OFFSET_MS) -> int:
    """The test offset after moving ``offset_ms`` forward by ``ms``. A store calls this
    inside the atomic step that writes the result, so concurrent advances cannot
    together pass ``cap_ms`` (:func:`offset_cap_ms`); raises :func:`offset_refused`'s
    error."""
    if offset_ms + ms > cap_ms:
        raise offset_refused(offset_ms, ms, cap_ms)
    return offset_ms + ms


def offset_refused(offset_ms: int, ms: int, cap_ms: int = MAX_OFFSET_MS) -> ValidationFailed:
    """The 422 for an advance past the cap; the offset stays ``offset_ms``."""
    why = "10 years" if cap_ms == MAX_OFFSET_MS else "SBUS_TOKEN_MAX_TTL, in token mode"
    return ValidationFailed(
        f"advancing the store clock by {ms} ms would take its test offset to "
        f"{offset_ms + ms} ms, past the cap of {cap_ms} ms ({why}); "
        "POST /admin/reset sets the offset back to 0",
        loc=["body", "ms"],
        offset_ms=offset_ms,
        max_offset_ms=cap_ms,
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
