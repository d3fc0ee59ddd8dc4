from __future__ import annotations

import time
from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbus.core.errors import ValidationFailed
from sbus.security import InvalidPattern
from sbus.security.patterns import (
    MAX_PATTERN_LENGTH,
    _slow_matcher,
    compile_pattern,
    matches,
    validate_pattern,
)
from sbus.security.rights import (
    ADMIN_PATTERN,
    Capabilities,
    Right,
    Scope,
    open_capabilities,
    parse_allow,
    scopes_from_json,
)

MATCH = [
    ("plan", "plan"),
    ("plan/*", "plan/a"),
    ("plan/*", "plan/a.b:c@d-e_f"),
    ("plan/*", "plan/"),
    ("plan/**", "plan/a"),
    ("plan/**", "plan/a/b/c"),
    ("plan/**", "plan/"),
    ("**", "anything/at/all"),
    ("*", "top"),
    ("*/x", "a/x"),
    ("a/**/b", "a/x/y/b"),
    ("a/**/b", "a//b"),
    ("a*c", "abbbc"),
    ("a*c", "ac"),
    ("code/A/*", "code/A/main.py"),
    ("a.b", "a.b"),
    ("a+b", "a+b"),
    ("(x)|y", "(x)|y"),
    ("[ab]", "[ab]"),
    ("a?", "a?"),
    ("x^$\\", "x^$\\"),
    ("*a*a*a*b", "aaaab"),
    ("*/*/*/*", "a/b/c/d"),
    ("**a**b**c", "xaybzc"),
    ("**/*.md", "docs/x/readme.md"),
    ("**/*.md", "/readme.md"),
]

NO_MATCH = [
    ("plan", "plan/a"),
    ("plan", "Plan"),
    ("plan/*", "plan/a/b"),
    ("plan/*", "plan"),
    ("plan/*", "xplan/a"),
    ("plan/*", "plan/a/"),
    ("Plan/*", "plan/a"),
    ("*", "a/b"),
    ("*/x", "a/b/x"),
    ("a/**/b", "a/b"),
    ("a*c", "a/c"),
    ("a*c", "abcd"),
    ("a.b", "axb"),
    ("a+b", "aab"),
    ("(x)|y", "y"),
    ("[ab]", "a"),
    ("a?", "a"),
    ("a?", "ab"),
    ("*a*a*a*b", "aaaa"),
    ("*/*/*/*", "a/b/c"),
    ("*/*/*/*", "a/b/c/d/e"),
    ("**a**b**c", "xaybz"),
    ("**/*.md", "readme.md"),
    ("**/*.md", "docs/readme.mdx"),
    ("code/a/*", "code/A/x"),
]


@pytest.mark.parametrize(("pattern", "key"), MATCH)
def test_matches(pattern: str, key: str) -> None:
    assert matches(pattern, key) is True
    assert _slow_matcher(pattern)(key) is True


@pytest.mark.parametrize(("pattern", "key"), NO_MATCH)
def test_does_not_match(pattern: str, key: str) -> None:
    assert matches(pattern, key) is False
    assert _slow_matcher(pattern)(key) is False


@pytest.mark.parametrize(
    "pattern", ["", "***", "a/***", "****", "a\x00b", "\ud800", "x" * (MAX_PATTERN_LENGTH + 1)]
)
def test_invalid_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(InvalidPattern) as info:
        validate_pattern(pattern)
    assert info.value.code == "ValidationError"
    with pytest.raises(InvalidPattern):
        compile_pattern(pattern)


@pytest.mark.parametrize("pattern", ["a//b", "/x", "a b", "x" * MAX_PATTERN_LENGTH, "*/**"])
def test_never_matching_or_odd_patterns_are_accepted(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


def test_compile_is_cached() -> None:
    assert compile_pattern("cache/*/x") is compile_pattern("cache/*/x")


@pytest.mark.parametrize("pattern", ["*a*a*a*a*a*a*a*a*b", "**a**a**a**a**a**a**b", "*a**a*a**b"])
def test_pathological_patterns_stay_linear(pattern: str) -> None:
    # The backtracking regex engine needs minutes for these on a 256-character key.
    key = "a" * 256
    start = time.perf_counter()
    assert matches(pattern, key) is False
    assert time.perf_counter() - start < 0.1


@cache
def _reference(pattern: str, key: str) -> bool:
    """The definition, by structural recursion."""
    if not pattern:
        return not key
    if pattern.startswith("**"):
        return any(_reference(pattern[2:], key[i:]) for i in range(len(key) + 1))
    if pattern[0] == "*":
        for i in range(len(key) + 1):
            if _reference(pattern[1:], key[i:]):
                return True
            if i < len(key) and key[i] == "/":
                break
        return False
    return bool(key) and key[0] == pattern[0] and _reference(pattern[1:], key[1:])


_pattern_chars = st.sampled_from(["a", "b", "/", "*", "**", "."])


@given(
    st.lists(_pattern_chars, min_size=1, max_size=10).map("".join).filter(lambda p: "***" not in p),
    st.text(alphabet="ab/.", max_size=12),
)
def test_both_engines_agree_with_the_definition(pattern: str, key: str) -> None:
    expected = _reference(pattern, key)
    assert matches(pattern, key) is expected
    assert _slow_matcher(pattern)(key) is expected


# -- rights -------------------------------------------------------------------------------


def test_parse_allow() -> None:
    assert parse_allow("read:plan/*") == Scope("plan/*", frozenset({Right.READ}))
    assert parse_allow("write,create:code/A/*") == Scope(
        "code/A/*", frozenset({Right.WRITE, Right.CREATE})
    )
    # only the first colon separates: keys may contain ':'
    assert parse_allow("read:ns:a/*").pattern == "ns:a/*"
    assert parse_allow(" read , delete :x").rights == {Right.READ, Right.DELETE}
    assert parse_allow("admin:**").rights == {Right.ADMIN}


@pytest.mark.parametrize(
    "spec",
    ["plan/*", "read:", ":plan/*", "reed:plan/*", "read,,write:x", "admin:plan/*", "read:***"],
)
def test_parse_allow_refuses(spec: str) -> None:
    with pytest.raises(ValidationFailed):
        parse_allow(spec)


def test_capabilities_allow_by_right_and_pattern() -> None:
    caps = Capabilities((parse_allow("read:plan/*"), parse_allow("write,create:code/A/*")))
    assert caps.allows(Right.READ, "plan/x")
    assert not caps.allows(Right.WRITE, "plan/x")
    assert not caps.allows(Right.READ, "plan/x/y")
    assert caps.allows(Right.WRITE, "code/A/m") and caps.allows(Right.CREATE, "code/A/m")
    assert not caps.allows(Right.DELETE, "code/A/m")
    assert not caps.allows(Right.WRITE, "code/B/m")
    assert not caps.is_admin
    assert caps.patterns_with(Right.WRITE) == ("code/A/*",)


def test_open_capabilities() -> None:
    closed = open_capabilities(admin_enabled=False)
    assert not closed.is_admin
    for right in Right:
        assert closed.allows(right, "any/key") is (right is not Right.ADMIN)
    opened = open_capabilities(admin_enabled=True)
    assert opened.is_admin and opened.allows(Right.ADMIN, "x")
    assert opened.scopes[0].pattern == ADMIN_PATTERN


def test_scopes_json_round_trip_and_strictness() -> None:
    scopes = (parse_allow("create,read:a/*"), parse_allow("admin:**"))
    wire = [s.to_json() for s in scopes]
    assert wire[0] == {"pattern": "a/*", "rights": ["read", "create"]}
    assert scopes_from_json(wire) == scopes
    for bad in (
        {"pattern": "a"},
        [{"pattern": "a", "rights": []}],
        [{"pattern": "a", "rights": ["fly"]}],
        [{"pattern": "a", "rights": "read"}],
        [{"pattern": 1, "rights": ["read"]}],
        [{"pattern": "a", "rights": ["read"], "extra": 1}],
        [{"pattern": "a", "rights": ["admin"]}],
        [{"pattern": "", "rights": ["read"]}],
        [["a", ["read"]]],
    ):
        with pytest.raises(ValidationFailed):
            scopes_from_json(bad)
