"""Counting the work a call does in bytecodes, so a cost bound holds on any machine, and
the worst case of key-pattern matching that the pattern bounds allow."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from sbus.core.patterns import MAX_PATTERN_CHARS

# The worst request: a /commit/multi of SBUS_MAX_TXN_KEYS keys of the longest length,
# checked against two pattern lists at their bounds, patterns chosen so that every NFA
# bit stays alive to the end of every key and only the last pattern matches.
WORST_KEYS = 128


def worst_keys() -> list[str]:
    segment = "a" * 15
    return [("/".join([segment] * 16))[:250] + f"/z{i:03d}" for i in range(WORST_KEYS)]


def worst_patterns() -> tuple[str, ...]:
    size = MAX_PATTERN_CHARS // 16
    body = ("**a*a" * size)[: size - 8]
    patterns = [f"{body}b{i:03d}**" for i in range(15)]
    return (*patterns, "**/z*")


@dataclass
class Work:
    result: object
    bytecodes: int


class TooMuchWork(Exception):
    pass


def bytecodes(call: Callable[[], object], *, limit: int) -> Work:
    """Run ``call`` counting the bytecodes it executes; TooMuchWork past ``limit``."""
    count = 0

    def local(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        if event == "opcode":
            count += 1
            if count > limit:
                raise TooMuchWork(f"more than {limit} bytecodes")
        return local

    def on_call(frame: FrameType, event: str, arg: object) -> Any:
        frame.f_trace_opcodes = True
        return local

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        result = call()
    finally:
        sys.settrace(previous)
    return Work(result, count)
