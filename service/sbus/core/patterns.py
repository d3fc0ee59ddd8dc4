"""Key patterns of scopes and mandates (docs/protocol.md section 5.3).

``*`` matches any run (possibly empty) of characters other than ``/``; ``**`` matches any
run at all. Every other character is literal (``.``, ``?``, ``[``, ``+`` and ``\\``
included), and a pattern must match the whole key, case-sensitively. So ``plan/*``
matches ``plan/a`` and ``plan/`` -- no valid key -- but not ``plan/a/b``; ``plan/**``
matches both; ``a/**/b`` needs the two slashes (``a/b`` does not match).

Validation refuses the empty pattern, runs of three or more ``*`` (``***`` could only mean
``**``; refusing keeps one spelling per pattern and catches typos), U+0000, lone
surrogates and patterns over :data:`MAX_PATTERN_LENGTH`. A pattern that can never match a
valid key (``a//b``, ``/x``) is accepted: it grants nothing. A list of patterns (a token's
scopes, a mandate's keys) holds at most :data:`MAX_PATTERNS` of them and
:data:`MAX_PATTERN_CHARS` characters in all (:func:`validate_patterns`).

Matching must stay cheap for patterns chosen by agents (mandate keys), and a request may
check 128 keys against two such lists. A :class:`PatternSet` matches a key against a
whole list at once: literal patterns by a set lookup, ``prefix**`` patterns by one
``str.startswith``, and every other pattern in one bit-parallel NFA (a Shift-And
simulation of the matching DP) whose state has one bit per pattern token. Each key
character costs a handful of integer operations on that state, so a match costs
O(len(key) * total pattern length / word size) whatever the patterns are: no backtracking,
and no per-pattern loop in Python. The list bounds keep the state a few thousand bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

from sbus.core.errors import InvalidPattern, ValidationFailed
from sbus.core.keys import text_problem

MAX_PATTERN_LENGTH = 512
# Per list (a token's scopes, a mandate's keys or grantor_scopes). The character total is
# what bounds matching work (the NFA state has one bit per character); the count bounds
# everything else done per pattern.
MAX_PATTERNS = 256
MAX_PATTERN_CHARS = 4096

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


def check_pattern_budget(patterns: Sequence[str], *, what: str, loc: list[str | int]) -> None:
    """The list bounds: at most :data:`MAX_PATTERNS` patterns of at most
    :data:`MAX_PATTERN_CHARS` characters in all; :class:`ValidationFailed` (422)."""
    if len(patterns) > MAX_PATTERNS:
        raise ValidationFailed(
            f"{what}: {len(patterns)} patterns, at most {MAX_PATTERNS} allowed", loc=loc
        )
    total = sum(len(p) for p in patterns)
    if total > MAX_PATTERN_CHARS:
        raise ValidationFailed(
            f"{what}: patterns of {total} characters in all, at most {MAX_PATTERN_CHARS} "
            "allowed; use fewer or broader patterns",
            loc=loc,
        )


def validate_patterns(value: object, *, what: str) -> tuple[str, ...]:
    """A non-empty list of valid patterns within the list bounds (``what`` names the
    field, for messages and ``loc``); :class:`ValidationFailed` otherwise."""
    if not isinstance(value, list | tuple) or not value:
        raise ValidationFailed(f"{what} must be a non-empty list of patterns", loc=[what])
    check_pattern_budget([p if isinstance(p, str) else "" for p in value], what=what, loc=[what])
    return tuple(validate_pattern(p, loc=[what, i]) for i, p in enumerate(value))


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


class PatternSet:
    """Whether a key matches any of some valid patterns; build it with
    :func:`pattern_set`, which validates and caches."""

    __slots__ = (
        "_accept",
        "_everything",
        "_glob",
        "_literal",
        "_literals",
        "_prefixes",
        "_start",
        "_wild",
    )

    def __init__(self, patterns: Iterable[str]) -> None:
        literals: set[str] = set()
        prefixes: list[str] = []
        literal: dict[str, int] = {}
        star = glob = starts = accept = 0
        offset = 0
        self._everything = False
        for pattern in patterns:
            if "*" not in pattern:
                literals.add(pattern)
                continue
            head = pattern[:-2]
            if pattern.endswith("**") and "*" not in head:
                if not head:
                    self._everything = True
                prefixes.append(head)
                continue
            # Bit offset + j: the pattern's first j tokens have matched. A wildcard token
            # loops on its bit and may be skipped (bit j -> j+1 on no input); validation
            # forbids adjacent wildcards, so one closure step suffices. The bit after the
            # last token accepts; nothing shifts out of it, so patterns never interfere.
            tokens = _tokens(pattern)
            starts |= 1 << offset
            for j, token in enumerate(tokens):
                bit = 1 << (offset + j)
                if token == "**":
                    glob |= bit
                elif token == "*":
                    star |= bit
                else:
                    literal[token] = literal.get(token, 0) | bit
            accept |= 1 << (offset + len(tokens))
            offset += len(tokens) + 1
        self._literals = frozenset(literals)
        self._prefixes = tuple(prefixes)
        self._literal = literal
        self._glob = glob
        self._wild = star | glob
        self._start = starts | ((starts & self._wild) << 1)
        self._accept = accept

    def __call__(self, key: str) -> bool:
        if self._everything or key in self._literals or key.startswith(self._prefixes):
            return True
        state = self._start
        if not state:
            return False
        literal, glob, wild = self._literal, self._glob, self._wild
        for ch in key:
            stay = state & (glob if ch == "/" else wild)
            state = ((state & literal.get(ch, 0)) << 1) | stay
            if not state:
                return False
            state |= (state & wild) << 1
        return bool(state & self._accept)


@lru_cache(maxsize=1024)
def pattern_set(patterns: tuple[str, ...]) -> PatternSet:
    """A matcher for valid patterns (raises :class:`InvalidPattern` otherwise); cached,
    so each distinct list is compiled once per process."""
    for pattern in patterns:
        validate_pattern(pattern)
    return PatternSet(patterns)


def compile_pattern(pattern: str) -> Matcher:
    """A matcher for one valid pattern (raises :class:`InvalidPattern` otherwise)."""
    return pattern_set((pattern,))


def matches(pattern: str, key: str) -> bool:
    """Whether ``key`` matches ``pattern`` (anchored, case-sensitive)."""
    return compile_pattern(pattern)(key)


def scan_prefixes(prefix: str, patterns: Iterable[str]) -> list[str]:
    """The key prefixes that hold every key under ``prefix`` that one of ``patterns``
    matches, in key order, none inside another: each pattern's literal start (up to its
    first ``*``; every key it matches begins so), narrowed to ``prefix``. A listing
    filtered by the patterns scans only these, never the keys no pattern can match."""
    found: set[str] = set()
    for pattern in patterns:
        literal = pattern.split("*", 1)[0]
        if literal.startswith(prefix):
            found.add(literal)
        elif prefix.startswith(literal):
            found.add(prefix)
    kept: list[str] = []
    # Sorted, the starts a kept one holds follow it before any start it does not hold.
    for start in sorted(found):
        if not kept or not start.startswith(kept[-1]):
            kept.append(start)
    return kept
