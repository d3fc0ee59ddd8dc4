"""The values the client hands back: immutable, with only what a caller acts on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Shard:
    """One version of a shard as the bus served it.

    Pass it back as ``expected=`` to commit on top of exactly this version; ``etag`` is
    the strong ETag (``"<version>"``) of that version.
    """

    key: str
    version: int
    content: str
    updated_at: str
    etag: str
    created_at: str = ""
    goal_tag: str = ""
    require_mandate: bool = False


@dataclass(frozen=True)
class Committed:
    """A successful write: ``version`` is the key's new version.

    ``replayed`` is true when the bus answered from its idempotency record, i.e. an
    earlier attempt of this very request had already landed (a transport retry)."""

    key: str
    version: int
    commit_id: str
    replayed: bool = field(default=False, compare=False)

    @property
    def etag(self) -> str:
        return f'"{self.version}"'


@dataclass(frozen=True)
class HistoryEntry:
    """One retained version of a key (docs/protocol.md section 3.3)."""

    version: int
    agent_id: str
    committed_at: str
    content: str
    deleted: bool
    rationale: str | None
    commit_id: str
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class Mandate:
    """A consume-once authorization (docs/protocol.md section 5.5).

    Keeps the ``context`` it was issued for, so ``commit(..., mandate=m)`` can send the
    matching context without the caller repeating it."""

    token: str
    jti: str
    expires_at: str
    context_hash: str
    context: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ServerVersion:
    """What ``GET /version`` reported: the server's release and its HTTP API major."""

    name: str
    version: str
    api: int
