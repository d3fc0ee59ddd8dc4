from __future__ import annotations

import hashlib
import json

import pytest

from sbus.core.chain import GENESIS, canonical_json, content_id, entry_hash
from sbus.core.clock import rfc3339
from sbus.core.keys import key_problem, text_problem


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
