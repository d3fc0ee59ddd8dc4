"""The values the client hands back: immutable, with only what a caller acts on."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# Characters of a long string field a repr shows: a shard's content may be 256 KiB, and
# reprs end up in every log line and traceback that mentions the value.
REPR_PREVIEW = 80


def short_repr(value: object) -> str:
    """``Class(field=value, ...)`` as dataclasses write it, with long strings cut to
    REPR_PREVIEW characters plus their length (equality and the fields are unchanged)."""
    parts = []
    for f in fields(value):  # type: ignore[arg-type]
        v = getattr(value, f.name)
        if isinstance(v, str) and len(v) > REPR_PREVIEW:
            parts.append(f"{f.name}={v[:REPR_PREVIEW]!r}...({len(v)} chars)")
        else:
            parts.append(f"{f.name}={v!r}")
    return f"{type(value).__name__}({', '.join(parts)})"


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

    __repr__ = short_repr


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

    __repr__ = short_repr


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

    __repr__ = short_repr


@dataclass(frozen=True)
class KeysPage:
    """One page of ``GET /shards``: ``keys`` in ascending order, and ``next_after`` to
    pass as ``after`` for the next page (None on the last one)."""

    keys: list[str]
    next_after: str | None


@dataclass(frozen=True)
class ServerVersion:
    """What ``GET /version`` reported: the server's release and its HTTP API major."""

    name: str
    version: str
    api: int
