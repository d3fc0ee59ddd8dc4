from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbus.core.errors import InvalidPattern, ValidationFailed
from sbus.core.patterns import (
    MAX_PATTERN_CHARS,
    MAX_PATTERN_LENGTH,
    MAX_PATTERNS,
    compile_pattern,
    matches,
    pattern_set,
    scan_prefixes,
    validate_pattern,
    validate_patterns,
)
from sbus.core.rights import (
    ADMIN_PATTERN,
    Capabilities,
    Right,
    Scope,
    check_scopes,
    open_capabilities,
    parse_allow,
    scopes_from_json,
)
from tests.unit.work import bytecodes, worst_keys, worst_patterns

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
    assert pattern_set(("zz", "zz/**", "*zz*", pattern, "z*/z"))(key) is True


@pytest.mark.parametrize(("pattern", "key"), NO_MATCH)
def test_does_not_match(pattern: str, key: str) -> None:
    assert matches(pattern, key) is False
    assert pattern_set(("zz", "zz/**", "*zz*", pattern, "z*/z"))(key) is False


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
    assert pattern_set(("a/*", "b/**")) is pattern_set(("a/*", "b/**"))


@pytest.mark.parametrize("pattern", ["*a*a*a*a*a*a*a*a*b", "**a**a**a**a**a**a**b", "*a**a*a**b"])
def test_pathological_patterns_stay_linear(pattern: str) -> None:
    # A backtracking regex engine needs minutes for these on a 256-character key.
    key = "a" * 256
    work = bytecodes(lambda: matches(pattern, key), limit=100 * len(key))
    assert work.result is False


def test_list_bounds() -> None:
    at_limit = ["p" * (MAX_PATTERN_CHARS // MAX_PATTERNS)] * MAX_PATTERNS
    assert validate_patterns(at_limit, what="keys") == tuple(at_limit)
    for bad, words in (
        (["p"] * (MAX_PATTERNS + 1), f"at most {MAX_PATTERNS}"),
        ([*at_limit[:-1], at_limit[-1] + "x"], f"at most {MAX_PATTERN_CHARS} allowed"),
        ([], "non-empty list"),
        ("p", "non-empty list"),
        (["ok", 5], "must be a string"),
    ):
        with pytest.raises(ValidationFailed) as info:
            validate_patterns(bad, what="keys")
        assert words in info.value.detail
        assert info.value.fields["errors"][0]["loc"][0] == "keys"
    scopes = [{"pattern": p, "rights": ["read"]} for p in at_limit]
    assert len(scopes_from_json(scopes)) == MAX_PATTERNS
    scopes[0] = {"pattern": at_limit[0] + "x", "rights": ["read"]}
    with pytest.raises(ValidationFailed, match=f"at most {MAX_PATTERN_CHARS}"):
        scopes_from_json(scopes)
    with pytest.raises(ValidationFailed, match=f"at most {MAX_PATTERN_CHARS}"):
        check_scopes(Scope(str(s["pattern"]), frozenset({Right.READ})) for s in scopes)


def test_worst_case_work_is_linear_in_the_keys() -> None:
    """Matching does a fixed amount of interpreter work per key character, whatever the
    patterns (their size only widens the integers the NFA shifts, and the list bounds
    cap that width). Counted in bytecodes, not seconds, so the bound holds on any
    machine; the per-pattern engine this replaced needed ~16x this work here."""
    keys, patterns = worst_keys(), worst_patterns()
    assert sum(map(len, patterns)) <= MAX_PATTERN_CHARS
    matcher = pattern_set(patterns)
    per_char = 40
    limit = per_char * sum(map(len, keys))
    work = bytecodes(lambda: all(matcher(key) for key in keys), limit=limit)
    assert work.result is True
    assert all(not pattern_set(patterns[:-1])(key) for key in keys)


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


@given(
    st.lists(
        st.lists(_pattern_chars, min_size=1, max_size=8)
        .map("".join)
        .filter(lambda p: "***" not in p),
        min_size=1,
        max_size=5,
    ),
    st.text(alphabet="ab/.", max_size=12),
)
def test_a_set_matches_when_one_of_its_patterns_does(patterns: list[str], key: str) -> None:
    expected = any(_reference(p, key) for p in patterns)
    assert pattern_set(tuple(patterns))(key) is expected


def test_scan_prefixes() -> None:
    patterns = ["plan/*", "code/A/*", "code/**", "k", "plan/x/**"]
    assert scan_prefixes("", patterns) == ["code/", "k", "plan/"]
    assert scan_prefixes("pl", ["plan/*", "x*"]) == ["plan/"]
    assert scan_prefixes("plan/a/", ["plan/*"]) == ["plan/a/"]
    assert scan_prefixes("", ["*/x", "a"]) == [""]
    assert scan_prefixes("z", ["a*", "b"]) == []


@given(
    st.lists(
        st.lists(_pattern_chars, min_size=1, max_size=8)
        .map("".join)
        .filter(lambda p: "***" not in p),
        min_size=1,
        max_size=5,
    ),
    st.text(alphabet="ab/.", max_size=3),
    st.text(alphabet="ab/.", max_size=12),
)
def test_scan_prefixes_hold_every_key_a_pattern_matches(
    patterns: list[str], prefix: str, key: str
) -> None:
    starts = scan_prefixes(prefix, patterns)
    assert starts == sorted(starts)
    assert not any(b.startswith(a) for a in starts for b in starts if a != b)
    if key.startswith(prefix) and any(_reference(p, key) for p in patterns):
        assert any(key.startswith(start) for start in starts)


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
