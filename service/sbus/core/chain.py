"""The per-shard history hash chain (SPEC section 3).

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
    meta = {
        "agent_id": agent_id,
        "commit_id": commit_id,
        "committed_at": committed_at,
        "deleted": deleted,
        "rationale": rationale,
    }
    digest = hashlib.sha256()
    digest.update(bytes.fromhex(prev_hash))
    digest.update(version.to_bytes(8, "big"))
    digest.update(hashlib.sha256(canonical_json(meta)).digest())
    digest.update(content.encode())
    return digest.hexdigest()


def content_id(content: str) -> str:
    """The compat shard ``id``: sha256 hex of the content the shard was created with."""
    return hashlib.sha256(content.encode()).hexdigest()
