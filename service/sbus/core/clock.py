"""Wall-clock helpers in integer milliseconds, and RFC 3339 rendering.

Stores add their own test offset (SPEC section 1) on top of :func:`wall_ms`; the
engine never reads the clock itself, so every replica sees the store's idea of now.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import lru_cache


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


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
