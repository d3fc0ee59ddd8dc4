"""Who calls, and what they ask: the engine's input (protocol.md section 4).

The API layer turns a request into a :class:`Caller` (the authenticated principal and
the identity the request names, resolved: protocol.md section 2.2) and one command, a
frozen value per use case carrying only what the use case needs. Nothing here knows
HTTP. The rights a command needs are not written on it: ``sbus.core.authz`` derives them
from the command's type and fields, and the engine refuses a type with no rule there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from sbus.core.audit import AuditEntry
from sbus.core.ports import IssuedToken, MandateGrant
from sbus.core.rights import Capabilities, Scope
from sbus.core.types import (
    DLDump,
    HistoryEntry,
    IdemRef,
    Outcome,
    ReadItem,
    RegisterResult,
    Shard,
    StoreStats,
    TxnOp,
    WriteOp,
)
from sbus.core.watch import Feed

R = TypeVar("R", covariant=True)


@dataclass(frozen=True, slots=True)
class Caller:
    """The principal of one request. ``agent`` is the one agent the request acts as
    (None: it named none, which some reads allow); ``session`` the resolved session id
    ("" for the default session). ``token_bound``: the agent is the token's subject
    (token mode), not a name the request chose (open mode). ``token_id``: the jti of the
    request's token (token mode), which the audit log names."""

    agent: str | None
    session: str
    capabilities: Capabilities
    token_bound: bool
    token_id: str | None = None


@dataclass(frozen=True, slots=True)
class Listing:
    """One page of GET /shards: the keys, where the next page starts (None: the last
    page), and with ``content`` the live shards of the page, parallel to ``keys``."""

    keys: list[str]
    next_after: str | None
    shards: list[Shard] | None = None


class Command(Generic[R]):
    """A use case. ``R`` is what the engine answers for it. ``changes_state`` selects the
    order of protocol.md section 4: a state change checks its key rights at step 8,
    after throttle, idempotency and limits; anything else before it touches the store."""

    __slots__ = ()
    changes_state: ClassVar[bool] = False


# ---- shards ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateShard(Command[Outcome]):
    """POST /shard."""

    changes_state: ClassVar[bool] = True
    key: str
    content: str
    goal_tag: str
    require_mandate: bool
    idem: IdemRef | None


@dataclass(frozen=True, slots=True)
class ReadShard(Command[Shard]):
    """GET /shard/{key}: served, and recorded in the caller's DeliveryLog if ``record``
    and the caller named an agent."""

    key: str
    record: bool


@dataclass(frozen=True, slots=True)
class ReadShards(Command[dict[str, Shard]]):
    """POST /read: ``keys`` distinct, in request order."""

    keys: tuple[str, ...]
    record: bool


@dataclass(frozen=True, slots=True)
class ListShards(Command[Listing]):
    """GET /shards: one page of at most ``limit`` live keys the caller may read, after
    ``after``; with ``content`` the shards themselves too (unrecorded)."""

    prefix: str
    after: str | None
    limit: int
    content: bool


@dataclass(frozen=True, slots=True)
class History(Command[list[HistoryEntry]]):
    """GET /history/{key}: records nothing."""

    key: str
    before: int | None
    limit: int


@dataclass(frozen=True, slots=True)
class Submit(Command[Outcome]):
    """A commit, multi-commit, rollback or delete by the caller, in the caller's session.
    ``mandate`` is the presented mandate token, verified at step 9a against the written
    keys and ``context``."""

    changes_state: ClassVar[bool] = True
    op: TxnOp
    writes: tuple[WriteOp, ...]
    read_set: tuple[ReadItem, ...]
    rationale: str | None
    idem: IdemRef | None
    mandate: str | None = None
    context: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Watch(Command[Feed]):
    """GET /watch: a reader of the changes of keys under ``prefix`` the caller may read,
    after ``after`` (a stream cursor; None: from now). ``conflicts`` adds the conflict
    ring and needs the admin right."""

    prefix: str
    after: str | None
    conflicts: bool


# ---- sessions --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResetSession(Command[None]):
    """POST /session: empty ``agent``'s DeliveryLog for the caller's session. Another
    agent than the token's own needs the admin right."""

    agent: str


@dataclass(frozen=True, slots=True)
class Register(Command[RegisterResult]):
    """POST /delivery_log/register: ``keys`` distinct, in request order."""

    keys: tuple[str, ...]


# ---- mandates and tokens ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IssueMandate(Command[tuple[str, MandateGrant]]):
    """POST /mandates: signed for the caller, who must hold the mandate right."""

    holder: str
    keys: tuple[str, ...]
    context: Mapping[str, Any] | None
    ttl_s: int


@dataclass(frozen=True, slots=True)
class IssueToken(Command[tuple[str, IssuedToken]]):
    """POST /admin/tokens."""

    agent: str
    scopes: tuple[Scope, ...]
    ttl_s: int


@dataclass(frozen=True, slots=True)
class RevokeToken(Command[int]):
    """POST /admin/tokens/revoke: answers until when (store-clock ms) it is kept."""

    jti: str
    exp: int | None
    leeway_s: int
    max_ttl_s: int


# ---- admin -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResetAll(Command[int]):
    """POST /admin/reset: answers the number of shards removed."""


@dataclass(frozen=True, slots=True)
class ReadStats(Command[StoreStats]):
    """The store's counters for GET /stats, GET /metrics and GET /admin/health: public
    (the health probe answers without a token, so its caller may hold nothing)."""


@dataclass(frozen=True, slots=True)
class GetConfig(Command[StoreStats]):
    """GET /admin/config: any authenticated caller."""


@dataclass(frozen=True, slots=True)
class SetConfig(Command[StoreStats]):
    """POST /admin/config."""

    ori_enabled: bool


@dataclass(frozen=True, slots=True)
class DumpDeliveryLog(Command[tuple[DLDump, str | None]]):
    """GET /admin/delivery-log."""

    after: str | None
    limit: int


@dataclass(frozen=True, slots=True)
class InjectStale(Command[None]):
    """POST /admin/inject-stale, in the caller's session."""

    agent: str
    key: str
    version: int


@dataclass(frozen=True, slots=True)
class AdminCreate(Command[Shard | None]):
    """POST /admin/shard: create unless live (None then). Needs admin, then the create
    right after the limits, as POST /shard."""

    changes_state: ClassVar[bool] = True
    key: str
    content: str
    goal_tag: str
    require_mandate: bool


@dataclass(frozen=True, slots=True)
class ReadAudit(Command[list[AuditEntry]]):
    """GET /admin/audit: up to ``limit`` entries after the id ``after``, oldest first."""

    after: int | None
    limit: int


@dataclass(frozen=True, slots=True)
class AdvanceClock(Command[tuple[int, int]]):
    """POST /admin/test/advance-clock: (new offset, store now). ``enabled`` is
    SBUS_TEST_HOOKS; ``cap_ms`` the offset bound (sbus.core.clock.offset_cap_ms)."""

    ms: int
    cap_ms: int
    enabled: bool
