"""The state errors (and the idempotency refusal) word their own detail from their
fields: every store raises them with fields only, so the wire ``detail`` of one refusal
is the same on all four stores."""

from __future__ import annotations

from typing import Any

import pytest

from sbus.core.errors import (
    CrossShardStale,
    IdempotencyKeyReused,
    MandateConsumed,
    MandateExpired,
    MandateNotFound,
    MandateRequired,
    SBusError,
    SessionExpired,
    ShardAlreadyExists,
    ShardDeleted,
    ShardNotFound,
    ValidationFailed,
    VersionMismatch,
    VersionNotFound,
)


@pytest.mark.parametrize(
    ("error", "detail", "fields"),
    [
        (ShardNotFound("a/b"), "shard not found: key=a/b", {"key": "a/b"}),
        (ShardDeleted("a/b", 3), "shard deleted: key=a/b", {"key": "a/b", "version": 3}),
        (ShardAlreadyExists("a/b"), "shard already exists: key=a/b", {"key": "a/b"}),
        (
            VersionNotFound("a/b", 2),
            "version 2 of 'a/b' is not retained",
            {"key": "a/b", "target_version": 2},
        ),
        (
            VersionMismatch("a/b", 1, 4),
            "version mismatch on key=a/b: expected=1 found=4",
            {"key": "a/b", "expected": 1, "found": 4},
        ),
        (
            SessionExpired("agent-1", "ttl"),
            "session expired for agent 'agent-1' (ttl)",
            {"reason": "ttl", "agent_id": "agent-1"},
        ),
        (MandateRequired("a/b"), "shard 'a/b' requires a mandate", {"key": "a/b"}),
        (MandateExpired("j1"), "mandate expired", {"jti": "j1"}),
        (MandateConsumed("j1"), "mandate already consumed", {"jti": "j1"}),
        (MandateNotFound.unrecognised(), "mandate not recognised by this deployment", {}),
        (
            ValidationFailed.past_current_version("a/b", 3),
            "stale_version must be between 0 and 3",
            {
                "key": "a/b",
                "errors": [
                    {
                        "loc": [],
                        "msg": "stale_version must be between 0 and 3",
                        "type": "value_error",
                    }
                ],
            },
        ),
        (
            CrossShardStale.of([("a", 0, 2), ("b", 1, 3)]),
            "cross-shard stale read: key=a version_at_read=0 current_version=2; re-read the "
            "keys listed in stale_keys and retry, or start a new session with POST /session",
            {
                "key": "a",
                "version_at_read": 0,
                "current_version": 2,
                "stale_keys": [
                    {"key": "a", "version_at_read": 0, "current_version": 2},
                    {"key": "b", "version_at_read": 1, "current_version": 3},
                ],
            },
        ),
        (IdempotencyKeyReused(), "Idempotency-Key was used for a different request", {}),
    ],
)
def test_a_state_error_words_its_detail(
    error: SBusError, detail: str, fields: dict[str, Any]
) -> None:
    assert error.detail == detail
    assert str(error) == detail
    # The order of the fields is the order of the problem document's members.
    assert list(error.fields.items()) == list(fields.items())
