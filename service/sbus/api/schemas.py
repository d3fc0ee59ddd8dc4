"""Response documents, for the OpenAPI description only: handlers render bodies with
orjson directly (the hot path pays no response validation), and the API tests
check that what they render matches these shapes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class PolicyOut(BaseModel):
    require_mandate: bool


class ShardOut(BaseModel):
    key: str
    id: str = Field(description="sha256 hex of the content the shard was created with")
    version: int
    content: str
    owner: None = None
    goal_tag: str
    attempt_count: int
    conflict_count: int
    delta_log_depth: int
    created_at: str
    updated_at: str
    policy: PolicyOut


class RollbackOut(ShardOut):
    commit_id: str


class CommitOut(BaseModel):
    new_version: int
    shard_id: str
    commit_id: str


class MultiResult(BaseModel):
    key: str
    new_version: int = Field(
        description="The version the write installed: a create's 0 (or tombstone + 1), a "
        "delete's tombstone version"
    )
    op: Literal["commit", "create", "delete"] = Field(description="The write's kind")


class MultiOut(BaseModel):
    results: list[MultiResult]
    commit_id: str


class ListOut(BaseModel):
    shards: list[str]
    count: int
    next_after: str | None
    items: list[ShardOut] | None = Field(
        None, description="include=content only: the shards, parallel to shards (unrecorded)"
    )


class MissingOut(BaseModel):
    key: str
    error: Literal["ShardNotFound", "ShardDeleted"]
    version: int | None = Field(None, description="ShardDeleted only: the tombstone's version")


class ReadOut(BaseModel):
    shards: list[ShardOut] = Field(description="the shards found, in request order")
    missing: list[MissingOut] = Field(description="the other keys, in request order")


class HistoryItem(BaseModel):
    version: int
    agent_id: str
    committed_at: str
    content: str
    deleted: bool
    rationale: str | None
    commit_id: str
    prev_hash: str
    hash: str


class HistoryOut(BaseModel):
    key: str
    entries: list[HistoryItem]


class SessionOut(BaseModel):
    agent_id: str
    status: str


class RegisterOut(BaseModel):
    ok: bool
    registered: int
    skipped_existing: list[str]
    skipped_no_shard: list[str]


class DeliveryLogSummary(BaseModel):
    agents: int
    deliveries: int


class StatsOut(BaseModel):
    total_shards: int
    total_commits: int
    total_conflicts: int
    cross_shard_stale: int
    view_divergent_commits: int
    view_checked_commits: int
    view_divergence_rate: float
    ori_enabled: bool
    total_attempts: int
    scr: float
    wal_enabled: bool
    delivery_log: DeliveryLogSummary
    backend: str


class HealthOut(BaseModel):
    status: str
    version: str = Field(description="the server's release (as GET /version)")
    total_shards: int | None = None
    total_commits: int | None = None
    total_conflicts: int | None = None
    delivery_agents: int | None = None
    reason: str | None = None


class VersionOut(BaseModel):
    name: str = Field(description='always "sbus"')
    version: str = Field(description="the server's release")
    api: int = Field(description="the wire protocol's major version")


class ConfigOut(BaseModel):
    ok: bool
    ori_enabled: bool
    view_checked_commits: int
    view_divergent_commits: int


class ResetOut(BaseModel):
    cleared: int


class InjectOut(BaseModel):
    injected: bool


class AlreadyExistsOut(BaseModel):
    status: str


class DeliveryLogOut(BaseModel):
    agents: dict[str, dict[str, Any]]
    sessions: dict[str, dict[str, dict[str, Any]]]
    total_agents: int
    total_deliveries: int
    next_after: str | None


class AuditEntryOut(BaseModel):
    id: int = Field(description="The entry's cursor: ids only grow, in write order")
    at: int = Field(description="Store-clock milliseconds of the (first) event")
    kind: str = Field(
        description="token_issue, token_revoke, mandate_issue, mandate_consume, config, "
        "reset, session_reset, admin or denied"
    )
    agent: str = Field(description="Who acted (empty: no agent named, as in open mode)")
    details: dict[str, Any] = Field(
        description="What the kind records (protocol.md section 2.12); count for an "
        "aggregated entry"
    )


class AuditOut(BaseModel):
    entries: list[AuditEntryOut]
    next_after: int | None = Field(
        description="Pass as after= for the next page; null when this page is the last"
    )


class ClockOut(BaseModel):
    offset_ms: int
    now_ms: int


class Problem(BaseModel):
    """RFC 9457 problem details with the compat ``error`` code; conflict fields vary."""

    model_config = {"extra": "allow"}

    type: str
    title: str
    status: int
    detail: str
    error: str


class ScopeOut(BaseModel):
    pattern: str
    rights: list[str]


class ClaimsOut(BaseModel):
    sub: str
    scopes: list[ScopeOut]
    iat: int
    exp: int
    jti: str
    iss: str
    aud: str


class MandateOut(BaseModel):
    mandate: str = Field(description="The signed mandate: send it as `mandate` on a commit")
    jti: str
    expires_at: str = Field(description="RFC 3339 UTC")
    context_hash: str = Field(description="sha256 hex of the sorted-key compact JSON context")


class RevokeOut(BaseModel):
    revoked: bool
    jti: str
    until: str = Field(description="RFC 3339 UTC: the jti is refused until then")


class TokenOut(BaseModel):
    token: str = Field(description="The JWT, for Authorization: Bearer")
    jti: str
    expires_at: str = Field(description="RFC 3339 UTC")
    claims: ClaimsOut
