"""The bus engine: protocol.md §4 steps 6 to 9 over a Store, with no transport.

The API layer authenticates, parses and validates (steps 1-5) and hands the engine
typed commands; the engine applies idempotency, limits and capabilities, then makes
exactly one atomic store call.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sbus.core.errors import (
    DeltaTooLarge,
    FieldTooLarge,
    RateLimited,
    ReadSetTooLarge,
    SBusError,
    TooManyWrites,
)
from sbus.core.idempotency import replay
from sbus.core.store import Store
from sbus.core.types import (
    CreateOp,
    IdemRef,
    MandateRef,
    Outcome,
    RateLimit,
    ReadItem,
    Shard,
    StoreStats,
    Txn,
    TxnOp,
    WriteOp,
)


@dataclass(frozen=True, slots=True)
class EngineLimits:
    max_delta: int = 262_144  # 0 = unlimited
    max_rationale: int = 4096  # UTF-8 bytes; 0 = unlimited
    max_goal_tag: int = 4096
    max_read_set: int = 1024
    max_txn_keys: int = 128


_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count()


def _reseed_commit_ids() -> None:
    # A forked child inherits the prefix and the counter, so parent and child would
    # hand out the same ids. `sbus serve --workers N` spawns its workers, but a pre-fork
    # server (gunicorn) or an embedding application may fork after importing this.
    global _ID_PREFIX
    _ID_PREFIX = os.urandom(8).hex()


os.register_at_fork(after_in_child=_reseed_commit_ids)


def new_commit_id() -> str:
    """32 hex digits: 64 random bits drawn once per process (again in a forked child),
    then a 64-bit counter. Unique across replicas without coordination (a prefix
    collision needs ~2^32 processes), and cheaper than a uuid4 or os.urandom call per
    commit."""
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


class Bus:
    def __init__(
        self,
        store: Store,
        limits: EngineLimits | None = None,
        refusal: SBusError | None = None,
        rate: RateLimit | None = None,
    ) -> None:
        self.store = store
        self.limits = limits or EngineLimits()
        # Step 5: a per-agent token bucket in the store (token mode, when configured).
        self.rate = rate
        # Step 8 (capabilities) is decided by the caller, which knows the principal,
        # but must answer after idempotency (6) and limits (7): a refused request
        # carries its refusal here and the engine raises it just before the store.
        self.refusal = refusal

    @property
    def backend(self) -> str:
        """The store's kind ("memory", "sqlite", ...), for /stats and the log."""
        return self.store.backend

    @property
    def durable(self) -> bool:
        """Whether the store's writes survive a crash (/stats ``wal_enabled``)."""
        return self.store.durable

    async def stats(self) -> StoreStats:
        """The store's counters (/stats, /metrics, /admin/health): public, no rights."""
        return await self.store.stats()

    def refusing(self, refusal: SBusError | None) -> Bus:
        """This bus for one request whose capability check failed (or self)."""
        return self if refusal is None else Bus(self.store, self.limits, refusal, self.rate)

    async def _throttle(self, agent_id: str) -> None:
        """Step 5: 429 RateLimited with Retry-After when the agent's bucket is empty."""
        if self.rate is None:
            return
        wait_ms = await self.store.take_token(agent_id, self.rate)
        if wait_ms:
            retry_after = max(1, -(-wait_ms // 1000))
            raise RateLimited(
                f"agent {agent_id!r} is over its rate limit; retry in {retry_after} s",
                retry_after=retry_after,
            )

    async def _replay(self, idem: IdemRef | None) -> Outcome | None:
        """Step 6: a recorded outcome for this (agent, key) replays or refuses."""
        if idem is None:
            return None
        return replay(await self.store.idempotent(idem.agent_id, idem.key), idem.fingerprint)

    def _check_content(self, key: str, content: str) -> None:
        cap = self.limits.max_delta
        # len(str) <= bytes, so the encode is only paid near the cap.
        if cap and len(content) * 4 > cap and len(content.encode()) > cap:
            raise DeltaTooLarge(
                f"delta too large: key={key} len={len(content.encode())} max={cap}",
                key=key,
                size=len(content.encode()),
                max=cap,
            )

    @staticmethod
    def _check_text(field: str, text: str | None, cap: int, setting: str) -> None:
        # A free-text field is retained in every history entry (rationale) or the shard
        # row (goal_tag); without a cap only SBUS_MAX_BODY would bound it.
        if text is None or not cap or len(text) * 4 <= cap:
            return
        size = len(text.encode())
        if size > cap:
            raise FieldTooLarge(
                f"{field} too large: {size} bytes, max {cap} ({setting})",
                field=field,
                size=size,
                max=cap,
            )

    def _check_read_set(self, read_set: tuple[ReadItem, ...]) -> None:
        if len(read_set) > self.limits.max_read_set:
            raise ReadSetTooLarge(
                f"read set has {len(read_set)} entries, max {self.limits.max_read_set}",
                size=len(read_set),
                max=self.limits.max_read_set,
            )

    async def create(self, op: CreateOp) -> Outcome:
        await self._throttle(op.agent_id)
        replay = await self._replay(op.idem)
        if replay is not None:
            return replay
        self._check_content(op.key, op.content)
        self._check_text("goal_tag", op.goal_tag, self.limits.max_goal_tag, "SBUS_MAX_GOAL_TAG")
        if self.refusal is not None:
            raise self.refusal
        return await self.store.create(op)

    async def admin_create(self, op: CreateOp) -> Shard | None:
        self._check_content(op.key, op.content)
        self._check_text("goal_tag", op.goal_tag, self.limits.max_goal_tag, "SBUS_MAX_GOAL_TAG")
        if self.refusal is not None:
            raise self.refusal
        return await self.store.admin_create(op)

    async def submit(
        self, txn: Txn, verify_mandate: Callable[[], Awaitable[MandateRef]] | None = None
    ) -> Outcome:
        """Commit, multi-commit, rollback or delete. ``verify_mandate`` (when the request
        carries a mandate) runs after idempotency, limits and capabilities, as the first
        part of step 9a; the store finishes 9a (expiry on its clock, consume-once)."""
        await self._throttle(txn.agent_id)
        if txn.idem is not None:
            replay = await self._replay(txn.idem)
            if replay is not None:
                return replay
        if len(txn.writes) > self.limits.max_txn_keys:
            raise TooManyWrites(
                f"{len(txn.writes)} writes, max {self.limits.max_txn_keys}",
                size=len(txn.writes),
                max=self.limits.max_txn_keys,
            )
        for write in txn.writes:
            if write.kind == "commit":
                self._check_content(write.key, write.content)
            elif write.kind == "create":
                # a create inside a multi obeys POST /shard's limits
                self._check_content(write.key, write.content)
                cap = self.limits.max_goal_tag
                self._check_text("goal_tag", write.goal_tag, cap, "SBUS_MAX_GOAL_TAG")
        if txn.op in ("commit", "multi"):
            # Only a caller's own rationale: a delete's ("delete") and a rollback's
            # ("rollback to N") are the bus's words, whatever the cap.
            limit = self.limits.max_rationale
            self._check_text("rationale", txn.rationale, limit, "SBUS_MAX_RATIONALE")
        self._check_read_set(txn.read_set)
        if self.refusal is not None:
            raise self.refusal
        if verify_mandate is not None:
            txn = txn._replace(mandate=await verify_mandate())
        return await self.store.apply(txn)


def commit_txn(
    *,
    op: TxnOp,
    agent_id: str,
    session_id: str,
    writes: list[WriteOp],
    read_set: list[ReadItem],
    rationale: str | None,
    idem: IdemRef | None,
    has_mandate: bool = False,
    mandate: MandateRef | None = None,
) -> Txn:
    return Txn(
        op=op,
        agent_id=agent_id,
        session_id=session_id,
        writes=tuple(writes),
        read_set=tuple(read_set),
        rationale=rationale,
        commit_id=new_commit_id(),
        idem=idem,
        has_mandate=has_mandate or mandate is not None,
        mandate=mandate,
    )
