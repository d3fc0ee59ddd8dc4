"""Key patterns of scopes and mandates (SPEC section 5).

``*`` matches any run (possibly empty) of characters other than ``/``; ``**`` matches any
run at all. Every other character is literal (``.``, ``?``, ``[``, ``+`` and ``\\``
included), and a pattern must match the whole key, case-sensitively. So ``plan/*``
matches ``plan/a`` and ``plan/`` -- no valid key -- but not ``plan/a/b``; ``plan/**``
matches both; ``a/**/b`` needs the two slashes (``a/b`` does not match).

Validation refuses the empty pattern, runs of three or more ``*`` (``***`` could only mean
``**``; refusing keeps one spelling per pattern and catches typos), U+0000, lone
surrogates and patterns over :data:`MAX_PATTERN_LENGTH`. A pattern that can never match a
valid key (``a//b``, ``/x``) is accepted: it grants nothing.

Matching must stay cheap for patterns chosen by agents (mandate keys), so no pattern with
more than two wildcards goes to the backtracking ``re`` engine, where ``*a*a*a*b`` against
a 256-character key takes seconds. Those run on a bit-parallel NFA that costs a few integer
operations per key character whatever the pattern.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from sbus.core.keys import text_problem
from sbus.security import InvalidPattern

MAX_PATTERN_LENGTH = 512
# With at most this many wildcards the regex engine backtracks at most O(n^2) steps on a
# key of n <= 256 characters (~0.1 ms worst case); more go to the NFA.
_REGEX_MAX_WILDCARDS = 2

Matcher = Callable[[str], bool]


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid key pattern, or None when it is."""
    if not pattern:
        return "pattern must not be empty"
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"pattern must be at most {MAX_PATTERN_LENGTH} characters"
    if "***" in pattern:
        return "pattern must not contain '***' (use '**')"
    return text_problem(pattern)


def validate_pattern(pattern: str, *, loc: list[str | int] | None = None) -> str:
    """Return ``pattern`` unchanged, or raise :class:`InvalidPattern` (422)."""
    if not isinstance(pattern, str):
        raise InvalidPattern("pattern must be a string", loc=loc)
    problem = pattern_problem(pattern)
    if problem:
        raise InvalidPattern(f"invalid pattern {pattern!r}: {problem}", loc=loc)
    return pattern


def _tokens(pattern: str) -> list[str]:
    """Split into literal characters and the wildcards ``*`` / ``**``."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append("**")
            i += 2
        else:
            out.append(pattern[i])
            i += 1
    return out


def _regex_matcher(tokens: list[str]) -> Matcher:
    parts = [".*" if t == "**" else "[^/]*" if t == "*" else re.escape(t) for t in tokens]
    # DOTALL: ``**`` covers every character; fullmatch anchors both ends.
    compiled = re.compile("".join(parts), re.DOTALL)

    def match(key: str) -> bool:
        return compiled.fullmatch(key) is not None

    return match


def _nfa_matcher(tokens: list[str]) -> Matcher:
    # State j (bit j) = the first j tokens have matched. A wildcard at j loops on j and
    # may be skipped (j -> j+1 without input). Validation forbids adjacent wildcards,
    # so one closure step suffices.
    literal: dict[str, int] = {}
    star = glob = 0
    for j, t in enumerate(tokens):
        if t == "**":
            glob |= 1 << j
        elif t == "*":
            star |= 1 << j
        else:
            literal[t] = literal.get(t, 0) | 1 << j
    wild = star | glob
    loop_any = star | glob
    accept = 1 << len(tokens)
    start = 1 | ((1 & wild) << 1)

    def match(key: str) -> bool:
        state = start
        for ch in key:
            stay = state & (glob if ch == "/" else loop_any)
            state = ((state & literal.get(ch, 0)) << 1) | stay
            if not state:
                return False
            state |= (state & wild) << 1
        return bool(state & accept)

    return match


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> Matcher:
    """A matcher for a valid pattern (raises :class:`InvalidPattern` otherwise); cached,
    so each distinct pattern is compiled once per process."""
    validate_pattern(pattern)
    if pattern == "**":
        return lambda key: True
    tokens = _tokens(pattern)
    wildcards = sum(1 for t in tokens if t in ("*", "**"))
    if wildcards == 0:
        return pattern.__eq__
    if wildcards <= _REGEX_MAX_WILDCARDS:
        return _regex_matcher(tokens)
    return _nfa_matcher(tokens)


def matches(pattern: str, key: str) -> bool:
    """Whether ``key`` matches ``pattern`` (anchored, case-sensitive)."""
    return compile_pattern(pattern)(key)


def _slow_matcher(pattern: str) -> Matcher:
    """The NFA for any pattern: lets tests check both engines against each other."""
    validate_pattern(pattern)
    return _nfa_matcher(_tokens(pattern))
