"""The per-shard history hash chain (protocol.md §3).

``hash = sha256(prev_hash || u64_be(version) || sha256(canonical_json(meta)) || utf8(content))``
where ``meta = {agent_id, commit_id, committed_at, rationale, deleted}``; the genesis
``prev_hash`` is 32 zero bytes. Canonical JSON is sorted keys, no whitespace, UTF-8.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

GENESIS = "00" * 32


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (non-ASCII not escaped), RFC 8259 escapes."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def entry_hash(
    prev_hash: str,
    version: int,
    *,
    agent_id: str,
    commit_id: str,
    committed_at: str,
    rationale: str | None,
    deleted: bool,
    content: str,
) -> str:
    # Keys inserted in sorted order, so plain orjson output is already canonical
    # (test_keys_and_chain checks it against json.dumps(sort_keys=True)); skipping
    # OPT_SORT_KEYS and hashing one joined buffer saves ~1 us per commit.
    meta = orjson.dumps(
        {
            "agent_id": agent_id,
            "commit_id": commit_id,
            "committed_at": committed_at,
            "deleted": deleted,
            "rationale": rationale,
        }
    )
    return hashlib.sha256(
        b"".join(
            (
                bytes.fromhex(prev_hash),
                version.to_bytes(8, "big"),
                hashlib.sha256(meta).digest(),
                content.encode(),
            )
        )
    ).hexdigest()


def content_id(content: str) -> str:
    """The compat shard ``id``: sha256 hex of the content the shard was created with."""
    return hashlib.sha256(content.encode()).hexdigest()
