from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbus.core.chain import GENESIS, canonical_json, content_id, entry_hash
from sbus.core.clock import rfc3339
from sbus.core.keys import json_problem, key_problem, path_text, text_problem


@pytest.mark.parametrize(
    "key", ["a", "plan", "code/A/main.py", "x:y@z-1_2.3", "a" * 256, "A/b/C", "..a", "a..b"]
)
def test_valid_keys(key: str) -> None:
    assert key_problem(key) is None


@pytest.mark.parametrize(
    "key",
    ["", "a" * 257, "/a", "a/", "a//b", "./a", "a/.", "a/../b", "..", "a b", "ä", "a?b", "a%2F"],
)
def test_invalid_keys(key: str) -> None:
    assert key_problem(key) is not None


def test_text_hygiene() -> None:
    assert text_problem("ok ✓") is None
    assert text_problem("nul\x00") is not None
    assert text_problem("lone \ud800") is not None


def test_rfc3339_millisecond_utc() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"
    assert rfc3339(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"  # cached path
    assert rfc3339(1_700_000_001_005) == "2023-11-14T22:13:21.005Z"


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": "é", "c": None}) == '{"a":"é","b":1,"c":null}'.encode()


def test_entry_hash_matches_the_spec_formula() -> None:
    meta = {
        "agent_id": "A",
        "commit_id": "c1",
        "committed_at": "2026-01-01T00:00:00.000Z",
        "rationale": None,
        "deleted": False,
    }
    expected = hashlib.sha256(
        bytes(32)
        + (7).to_bytes(8, "big")
        + hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()).digest()
        + "body ✓".encode()
    ).hexdigest()
    got = entry_hash(
        GENESIS,
        7,
        agent_id="A",
        commit_id="c1",
        committed_at="2026-01-01T00:00:00.000Z",
        rationale=None,
        deleted=False,
        content="body ✓",
    )
    assert got == expected


def test_content_id_is_sha256_hex() -> None:
    assert content_id("x") == hashlib.sha256(b"x").hexdigest()


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"n": 2**53 - 1, "z": 0, "f": 0.5, "t": True, "x": None, "s": "\u00e9\U0001f600"},
        {"l": [[], [{}], [1, "x"]]},
        _nested(32),
    ],
)
def test_json_within_the_input_rules(value: Any) -> None:
    assert json_problem(value) is None


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"a": [1, {"b": -1}]}, "a[1].b: numbers must be finite and within 0..2^53-1"),
        ({"n": 2**53}, "n: numbers must be finite and within 0..2^53-1"),
        ({"n": float("nan")}, "n: numbers must be finite and within 0..2^53-1"),
        ({"n": float("-inf")}, "n: numbers must be finite and within 0..2^53-1"),
        ({"s": "a\x00"}, "s: strings must not contain U+0000"),
        ({"k y": "\ud800"}, '["k y"]: strings must be valid Unicode (no lone surrogates)'),
        (
            {"\ud800": 1},
            '["\\ud800"]: object key: strings must be valid Unicode (no lone surrogates)',
        ),
        (_nested(33), ".".join("a" * 32) + ": nesting deeper than 32 levels"),
        ({"b": b"x"}, "b: not a JSON value"),
    ],
)
def test_json_outside_the_input_rules(value: Any, problem: str) -> None:
    assert json_problem(value) == problem


def test_path_text_is_safe_in_a_header() -> None:
    assert path_text(["writes", 0, "foo"]) == "writes[0].foo"
    assert path_text(["a,b", "\r\n", "x" * 70]) == (
        '["a\\u002cb"]["\\r\\n"]["' + "x" * 64 + '..."]'
    )


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(st.characters(codec=None, exclude_categories=()), max_size=4)
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.text(st.characters(codec=None, exclude_categories=()), max_size=3), inner, max_size=3
        )
    ),
    max_leaves=12,
)


@given(_JSON)
def test_accepted_json_always_encodes_canonically(value: Any) -> None:
    """What the validator accepts, canonical JSON encodes without error and decodes to
    the same value: fingerprints and context hashes cannot fail or collide."""
    if json_problem(value) is None:
        assert orjson.loads(canonical_json(value)) == value
