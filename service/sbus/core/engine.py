"""The bus engine, the one door to the store: protocol.md section 4 from step 5 on, with
no transport.

The API layer authenticates, parses and validates (steps 1-4) and hands the engine a
:class:`~sbus.core.commands.Caller` and one command (:meth:`Bus.execute`). The engine
derives the rights the command needs from the rights table (``sbus.core.authz``; a type
with no rule is refused before anything runs) and runs the use case in one linear
function: for a state change throttle (5), idempotency (6), limits (7), capabilities (8),
the mandate (9a) and exactly one atomic store call (9); for anything else the rights,
then the store.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from sbus.core import audit, revocation
from sbus.core import commands as c
from sbus.core import errors as e
from sbus.core import tracing as tr
from sbus.core.audit import AuditEntry, AuditEvent, AuditKind
from sbus.core.authz import Needs, admit, check_keys, check_up_front, needs_of
from sbus.core.changes import CursorExpired, conflict_of
from sbus.core.errors import (
    DeltaTooLarge,
    FieldTooLarge,
    RateLimited,
    ReadSetTooLarge,
    TooManyWrites,
)
from sbus.core.idempotency import replay
from sbus.core.patterns import scan_prefixes
from sbus.core.ports import IssuedToken, MandateGrant, MandateSigner, TokenIssuer
from sbus.core.rights import ADMIN_PATTERN, Capabilities, Identity, Right
from sbus.core.store import Store
from sbus.core.tracing import Tracer
from sbus.core.types import (
    CreateOp,
    DLDump,
    HistoryEntry,
    IdemRef,
    MandateRef,
    Outcome,
    RateLimit,
    ReadItem,
    RegisterResult,
    Shard,
    StoreStats,
    Txn,
    TxnOp,
    WriteOp,
)
from sbus.core.watch import Feed, Pulse, split_cursor, valid_cursor_text

T = TypeVar("T")
log = logging.getLogger("sbus")
# A use case: (caller, command, what the rights table says it needs) -> its answer.
Handler = Callable[[c.Caller, Any, Needs], Awaitable[Any]]

# Store pages a filtered GET /shards may scan before answering a short page, and the
# batch it reads on in past them while it has found no readable key.
LIST_SCAN_PAGES = 8
LIST_SEEK_BATCH = 1024


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


def _create_op(cmd: c.CreateShard | c.AdminCreate, agent: str, idem: IdemRef | None) -> CreateOp:
    """The store operation of a create, made once its checks have passed (POST /shard
    and the admin create differ only in the idempotency record)."""
    return CreateOp(
        key=cmd.key,
        content=cmd.content,
        goal_tag=cmd.goal_tag,
        require_mandate=cmd.require_mandate,
        agent_id=agent,
        commit_id=new_commit_id(),
        idem=idem,
    )


def _committer(caller: c.Caller) -> str:
    """The agent a state change is made by: required in every mode."""
    if not caller.agent:
        raise e.ValidationFailed(
            "agent_id is required (body field, query parameter or X-Agent-Id header)",
            loc=["body", "agent_id"],
        )
    return caller.agent


def _submit_txn(caller: c.Caller, agent: str, cmd: c.Submit, mandate: MandateRef | None) -> Txn:
    """The store operation of a submit whose checks before the store have passed."""
    return Txn(
        op=cmd.op,
        agent_id=agent,
        session_id=caller.session,
        writes=cmd.writes,
        read_set=cmd.read_set,
        rationale=cmd.rationale,
        commit_id=new_commit_id(),
        idem=cmd.idem,
        has_mandate=cmd.mandate is not None,
        mandate=mandate,
    )


class Bus:
    def __init__(
        self,
        store: Store,
        limits: EngineLimits | None = None,
        rate: RateLimit | None = None,
        *,
        tokens: TokenIssuer | None = None,
        mandates: MandateSigner | None = None,
    ) -> None:
        self.store = store
        self.limits = limits or EngineLimits()
        # Step 5: a per-agent token bucket in the store (token mode, when configured).
        self.rate = rate
        # The signers of POST /admin/tokens and POST /mandates, which also verifies
        # presented mandates; None until attached (open mode without configured keys
        # signs with the store's secret, known once the store answers).
        self.tokens = tokens
        self.mandates = mandates
        # Wakes this process's change-stream watchers after each state change.
        self.pulse = Pulse()
        # Tracing (sbus.core.tracing): None while it is off, which is all an untraced
        # request checks.
        self.tracer: Tracer | None = None
        self._handlers: dict[type[c.Command[Any]], Handler] = {
            c.CreateShard: self._create,
            c.ReadShard: self._read,
            c.ReadShards: self._read_many,
            c.ListShards: self._list,
            c.Watch: self._watch,
            c.History: self._history,
            c.Submit: self._submit,
            c.ResetSession: self._reset_session,
            c.Register: self._register,
            c.IssueMandate: self._issue_mandate,
            c.IssueToken: self._issue_token,
            c.RevokeToken: self._revoke_token,
            c.ResetAll: self._reset_all,
            c.ReadStats: self._stats,
            c.GetConfig: self._get_config,
            c.SetConfig: self._set_config,
            c.DumpDeliveryLog: self._dump_delivery_log,
            c.InjectStale: self._inject_stale,
            c.AdminCreate: self._admin_create,
            c.AdvanceClock: self._advance_clock,
            c.ReadAudit: self._read_audit,
        }

    @property
    def backend(self) -> str:
        """The store's kind ("memory", "sqlite", ...), for /stats and the log."""
        return self.store.backend

    @property
    def durable(self) -> bool:
        """Whether the store's writes survive a crash (/stats ``wal_enabled``)."""
        return self.store.durable

    def attach_signers(self, tokens: TokenIssuer, mandates: MandateSigner) -> None:
        """Sign and verify with these from now on."""
        self.tokens = tokens
        self.mandates = mandates

    def add_use_case(self, kind: type[c.Command[Any]], handler: Handler) -> None:
        """Serve ``kind`` with ``handler``. It still needs a rule in
        :data:`sbus.core.authz.RIGHTS`: without one every call is refused."""
        self._handlers[kind] = handler

    async def admit(self, caller: c.Caller, command: c.Command[Any] | type[c.Command[Any]]) -> None:
        """Refuse ``caller`` a command (or any command of a type) before the rest of its
        request is parsed (``sbus.core.authz.admit``: an admin-only type without the
        admin right, acting for another agent), a CapabilityDenied counted in the audit
        log. ``execute`` checks everything again."""
        try:
            admit(caller, command)
        except e.CapabilityDenied as refusal:
            await self._note_denial(caller, refusal)
            raise

    def execute(self, caller: c.Caller, command: c.Command[T]) -> Awaitable[T]:
        """Run ``command`` for ``caller``: ``await bus.execute(caller, command)``. The
        rights rule is looked up first: a command type with none is refused (403
        CapabilityDenied) before anything runs. The checks that precede the use case run
        in this call, which then hands back the use case itself to await (one coroutine
        per request, as a router calling the store had)."""
        needs = needs_of(command)
        handler = self._handlers.get(type(command))
        if handler is None:
            raise e.CapabilityDenied(f"{type(command).__name__} is not a use case: refused")
        try:
            check_up_front(caller, needs)
            if not command.changes_state:
                # Reads and the other commands: the rights before the store (protocol.md §4).
                check_keys(caller, needs)
        except e.CapabilityDenied as refusal:
            return self._refuse(caller, refusal)
        if self.tracer is not None:
            return cast(Awaitable[T], self._traced(self.tracer, caller, command, needs, handler))
        return cast(Awaitable[T], handler(caller, command, needs))

    async def _traced(
        self, tracer: Tracer, caller: c.Caller, command: Any, needs: Needs, handler: Handler
    ) -> Any:
        try:
            if isinstance(command, c.Submit):
                return await self._submit_traced(tracer, caller, command, needs)
            return await handler(caller, command, needs)
        finally:
            tracer.finished()

    # ---- the audit log -------------------------------------------------------

    async def _refuse(self, caller: c.Caller, refusal: e.CapabilityDenied) -> Any:
        await self._note_denial(caller, refusal)
        raise refusal

    async def _note_denial(self, caller: c.Caller, refusal: e.CapabilityDenied) -> None:
        """Count a refusal in the audit log (one entry per agent, key and minute). The
        refusal is the answer whatever happens here: a store that cannot count it only
        costs the entry."""
        key, right = refusal.fields.get("key", ""), refusal.fields.get("right", "")
        try:
            await self.store.audit(audit.denied(caller.agent or "", str(key), str(right)))
        except e.StoreUnavailable as exc:
            log.warning("audit entry of a refusal lost: %s", exc.detail)

    async def _audit(self, caller: c.Caller, kind: AuditKind, details: dict[str, Any]) -> None:
        """One entry for an action the caller took (by the token ``via_token``)."""
        if caller.token_id is not None:
            details["via_token"] = caller.token_id
        await self.store.audit(AuditEvent(kind, caller.agent or "", details))

    async def _admin_use(self, caller: c.Caller, op: str) -> None:
        await self.store.audit(audit.admin_use(caller.agent or "", op, caller.token_id))

    async def _check_keys(self, caller: c.Caller, needs: Needs) -> None:
        """Step 8 of a state change, a refusal counted in the audit log."""
        try:
            check_keys(caller, needs)
        except e.CapabilityDenied as refusal:
            await self._note_denial(caller, refusal)
            raise

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

    def _check_create(self, key: str, content: str, goal_tag: str | None) -> None:
        self._check_content(key, content)
        self._check_text("goal_tag", goal_tag, self.limits.max_goal_tag, "SBUS_MAX_GOAL_TAG")

    # ---- state changes: steps 5-9 in order -------------------------------------

    async def _create(self, caller: c.Caller, cmd: c.CreateShard, needs: Needs) -> Outcome:
        agent = caller.agent or ""
        await self._throttle(agent)
        replayed = await self._replay(cmd.idem)
        if replayed is not None:
            return replayed
        self._check_create(cmd.key, cmd.content, cmd.goal_tag)
        await self._check_keys(caller, needs)
        outcome = await self.store.create(_create_op(cmd, agent, cmd.idem))
        self.pulse.fire()
        return outcome

    async def _admin_create(
        self, caller: c.Caller, cmd: c.AdminCreate, needs: Needs
    ) -> Shard | None:
        self._check_create(cmd.key, cmd.content, cmd.goal_tag)
        await self._check_keys(caller, needs)
        created = await self.store.admin_create(_create_op(cmd, caller.agent or "", None))
        await self._admin_use(caller, "admin_create")
        self.pulse.fire()
        return created

    async def _submit(self, caller: c.Caller, cmd: c.Submit, needs: Needs) -> Outcome:
        """Commit, multi-commit, rollback or delete. A presented mandate is verified
        after idempotency, limits and capabilities, as the first part of step 9a; the
        store finishes 9a (expiry on its clock, consume-once). :meth:`_submit_traced`
        runs the same steps, each in its span."""
        agent = _committer(caller)
        await self._throttle(agent)
        if cmd.idem is not None:
            replayed = await self._replay(cmd.idem)
            if replayed is not None:
                return replayed
        self._check_submit(cmd)
        try:
            check_keys(caller, needs)
        except e.CapabilityDenied as refusal:  # inline: no extra coroutine per commit
            await self._note_denial(caller, refusal)
            raise
        mandate = None
        if cmd.mandate is not None:
            mandate = await self._verify_mandate(agent, cmd)
        return await self._apply(_submit_txn(caller, agent, cmd, mandate))

    async def _submit_traced(
        self, tracer: Tracer, caller: c.Caller, cmd: c.Submit, needs: Needs
    ) -> Outcome:
        """:meth:`_submit` with a span per step (``sbus.core.tracing``), and the
        command's keys on the request's span; a stale read set or a version mismatch
        names its keys there too. Only a traced request comes here, so an untraced one
        pays for none of it; tests/telemetry holds both to the same answers."""
        agent = _committer(caller)
        tracer.annotate(
            {
                tr.OP: cmd.op,
                tr.KEYS_WRITTEN: [w.key for w in cmd.writes],
                tr.READ_SET_SIZE: len(cmd.read_set),
            }
        )
        if self.rate is not None:
            with tracer.phase(tr.RATE_LIMIT):
                await self._throttle(agent)
        if cmd.idem is not None:
            with tracer.phase(tr.IDEMPOTENCY):
                replayed = await self._replay(cmd.idem)
            if replayed is not None:
                return replayed
        with tracer.phase(tr.LIMITS):
            self._check_submit(cmd)
        with tracer.phase(tr.CAPABILITIES):
            await self._check_keys(caller, needs)
        mandate = None
        if cmd.mandate is not None:
            with tracer.phase(tr.MANDATE):
                mandate = await self._verify_mandate(agent, cmd)
        with tracer.phase(tr.ATOMIC):
            try:
                return await self._apply(_submit_txn(caller, agent, cmd, mandate))
            except e.CrossShardStale as exc:
                stale = exc.fields.get("stale_keys", [])
                tracer.annotate({tr.STALE_KEYS: [str(item["key"]) for item in stale]})
                raise
            except e.VersionMismatch as exc:
                tracer.annotate({tr.CONFLICT_KEY: str(exc.fields["key"])})
                raise

    def _check_submit(self, cmd: c.Submit) -> None:
        """Step 7: the sizes of a commit's writes, rationale and read set."""
        if len(cmd.writes) > self.limits.max_txn_keys:
            raise TooManyWrites(
                f"{len(cmd.writes)} writes, max {self.limits.max_txn_keys}",
                size=len(cmd.writes),
                max=self.limits.max_txn_keys,
            )
        for write in cmd.writes:
            if write.kind == "commit":
                self._check_content(write.key, write.content)
            elif write.kind == "create":
                # a create inside a multi obeys POST /shard's limits
                self._check_create(write.key, write.content, write.goal_tag)
        if cmd.op in ("commit", "multi"):
            # Only a caller's own rationale: a delete's ("delete") and a rollback's
            # ("rollback to N") are the bus's words, whatever the cap.
            limit = self.limits.max_rationale
            self._check_text("rationale", cmd.rationale, limit, "SBUS_MAX_RATIONALE")
        self._check_read_set(cmd.read_set)

    async def _apply(self, txn: Txn) -> Outcome:
        """Step 9: the one atomic store call; a conflict goes to the store's ring, a
        change wakes this process's watchers."""
        try:
            outcome = await self.store.apply(txn)
        except (e.VersionMismatch, e.CrossShardStale) as refusal:
            await self._note_conflict(txn, refusal)
            raise
        self.pulse.fire()
        return outcome

    async def _note_conflict(self, txn: Txn, refusal: e.SBusError) -> None:
        """Put a conflict in the store's ring (GET /watch?include=conflicts), after the
        refusal: a ring that cannot be written costs the refusal nothing."""
        conflict = conflict_of(txn, refusal)
        if conflict is None or self.store.limits.conflict_ring <= 0:
            return
        try:
            await self.store.record_conflict(conflict)
        except e.StoreUnavailable:
            return
        self.pulse.fire()

    async def _verify_mandate(self, agent: str, cmd: c.Submit) -> MandateRef:
        """Step 9a's checks that need no stored state (404 MandateNotFound, 410
        MandateExpired on the store clock, 403 Holder/Scope/ContextMismatch); the store's
        atomic step re-checks expiry and consumes the mandate."""
        mandates = self.mandates
        if mandates is None:
            raise e.MandateNotFound("this deployment has no signing keys: no mandate verifies")
        now = await self.store.now_ms()
        grant = mandates.verify_mandate(
            cmd.mandate,
            agent=agent,
            written_keys=[w.key for w in cmd.writes],
            context=cmd.context,
            now_ms=now,
        )
        return MandateRef(grant.jti, grant.expires_at_ms, grant.retain_until_ms(mandates.leeway))

    # ---- reads ---------------------------------------------------------------

    async def _read(self, caller: c.Caller, cmd: c.ReadShard, needs: Needs) -> Shard:
        return await self.store.read(cmd.key, caller.agent, caller.session, cmd.record)

    async def _read_many(
        self, caller: c.Caller, cmd: c.ReadShards, needs: Needs
    ) -> dict[str, Shard]:
        return await self.store.read_many(list(cmd.keys), caller.agent, caller.session, cmd.record)

    async def _watch(self, caller: c.Caller, cmd: c.Watch, needs: Needs) -> Feed:
        """A reader from ``cmd.after`` (checked now: a bad cursor is refused before the
        stream starts; one too old opens an ``expired`` feed at the live edge)."""
        store = self.store
        changes: str | None = None
        conflicts: str | None = None
        if cmd.after is not None:
            if not valid_cursor_text(cmd.after):
                raise e.InvalidCursor("Last-Event-ID is not a change-stream cursor")
            changes, conflicts = split_cursor(cmd.after)
        expired = False
        if changes is not None:
            try:
                await store.changes_after(changes, cmd.prefix, 0)
            except CursorExpired:
                expired = True
        if expired or changes is None:
            changes = await store.change_head()
        if cmd.conflicts:
            if conflicts is not None:
                await store.conflicts_after(conflicts, 0)  # InvalidCursor
            else:
                conflicts = await store.conflict_head()
            await self._admin_use(caller, "watch_conflicts")
        else:
            conflicts = None
        caps = caller.capabilities
        return Feed(
            store,
            self.pulse,
            prefix=cmd.prefix,
            readable=lambda key: caps.allows(Right.READ, key),
            changes=changes,
            conflicts=conflicts,
            expired=expired,
        )

    async def _history(self, caller: c.Caller, cmd: c.History, needs: Needs) -> list[HistoryEntry]:
        return await self.store.history(cmd.key, cmd.before, cmd.limit)

    async def _list(self, caller: c.Caller, cmd: c.ListShards, needs: Needs) -> c.Listing:
        assert needs.filter is not None
        keys, next_after = await self._page(caller.capabilities, needs.filter, cmd)
        if not cmd.content:
            return c.Listing(keys, next_after)
        found = await self.store.read_many(keys, None, "", False) if keys else {}
        # A key deleted between the listing and the fetch leaves both lists, which stay
        # parallel; next_after still resumes after everything this page scanned.
        live = [found[k] for k in keys if k in found and not found[k].deleted]
        return c.Listing([shard.key for shard in live], next_after, live)

    async def _page(
        self, caps: Capabilities, right: Right, cmd: c.ListShards
    ) -> tuple[list[str], str | None]:
        """One page of the keys ``caps`` holds ``right`` on: (keys, next_after)."""
        cap = cmd.limit
        if ADMIN_PATTERN in caps.patterns_with(right):
            keys = await self.store.list_keys(cmd.prefix, cmd.after, cap + 1)
            more = len(keys) > cap
            keys = keys[:cap]
            return keys, keys[-1] if more else None
        # Filter page by page, scanning only where the caller's patterns can match
        # (scan_prefixes). The scan is bounded (a caller that may read few keys must
        # not make one request walk its patterns' ranges in pages of `limit`): once the
        # budget runs out, a page that found readable keys ends at the last of them,
        # and paging resumes there. The cursor is never a key the caller may not read
        # (next_after would name it, and an `after` of the caller's choosing would find
        # the others), so a page that found none reads on, in larger batches, to the
        # next readable key or the end.
        readable: list[str] = []
        cursor = cmd.after
        pages = 0
        for start in scan_prefixes(cmd.prefix, caps.patterns_with(right)):
            if cursor is not None and cursor > start and not cursor.startswith(start):
                continue  # every key under start sorts before the cursor
            while True:
                size = cap + 1 if pages < LIST_SCAN_PAGES else max(cap + 1, LIST_SEEK_BATCH)
                batch = await self.store.list_keys(start, cursor, size)
                for key in batch:
                    if caps.allows(right, key):
                        readable.append(key)
                        if len(readable) > cap:
                            keys = readable[:cap]
                            return keys, keys[-1]
                pages += 1
                if len(batch) < size:
                    break
                cursor = batch[-1]
                if pages >= LIST_SCAN_PAGES and readable:
                    return readable, readable[-1]
        return readable, None

    # ---- sessions ------------------------------------------------------------

    async def _reset_session(self, caller: c.Caller, cmd: c.ResetSession, needs: Needs) -> None:
        await self.store.reset_session(cmd.agent, caller.session)
        await self._audit(caller, "session_reset", {"agent": cmd.agent, "session": caller.session})

    async def _register(self, caller: c.Caller, cmd: c.Register, needs: Needs) -> RegisterResult:
        assert needs.filter is not None and caller.agent is not None
        caps, right = caller.capabilities, needs.filter
        keys = cmd.keys
        # A key the caller may not read is reported as if it did not exist: recording it
        # would claim a read the bus never authorized, and a distinct answer would reveal
        # which unreadable keys exist.
        allowed = [k for k in keys if caps.allows(right, k)]
        result = await self.store.register(caller.agent, caller.session, allowed)
        if len(allowed) == len(keys):
            return result
        missing = set(result.skipped_no_shard)
        skipped = [k for k in keys if k in missing or not caps.allows(right, k)]
        return RegisterResult(result.registered, result.skipped_existing, skipped)

    # ---- mandates and tokens -------------------------------------------------

    async def _issue_mandate(
        self, caller: c.Caller, cmd: c.IssueMandate, needs: Needs
    ) -> tuple[str, MandateGrant]:
        if self.mandates is None:
            raise e.StoreUnavailable("the signing keys are not installed yet")
        assert caller.agent is not None
        issuer = Identity(caller.agent, caller.capabilities)
        now = await self.store.now_ms()
        try:
            token, grant = self.mandates.issue_mandate(
                issuer, cmd.holder, cmd.keys, cmd.context, cmd.ttl_s, now_ms=now
            )
        except e.CapabilityDenied as refusal:
            await self._note_denial(caller, refusal)
            raise
        # Written before the mandate is handed out: none exists without its entry.
        details = {
            "mandate_id": grant.jti,
            "holder": cmd.holder,
            "keys": list(cmd.keys),
            "expires_at": grant.expires_at_ms,
        }
        await self._audit(caller, "mandate_issue", details)
        return token, grant

    async def _issue_token(
        self, caller: c.Caller, cmd: c.IssueToken, needs: Needs
    ) -> tuple[str, IssuedToken]:
        if self.tokens is None:
            raise e.StoreUnavailable("the signing keys are not installed yet")
        token, claims = self.tokens.issue(cmd.agent, cmd.scopes, cmd.ttl_s)
        # Written before the token is handed out: none exists without its entry.
        details = {
            "token_id": claims.jti,
            "subject": cmd.agent,
            "scopes": [scope.to_json() for scope in cmd.scopes],
            "expires_at": claims.expires_at * 1000,
        }
        await self._audit(caller, "token_issue", details)
        return token, claims

    async def _revoke_token(self, caller: c.Caller, cmd: c.RevokeToken, needs: Needs) -> int:
        until = await revocation.revoke_token(
            self.store, cmd.jti, cmd.exp, leeway_s=cmd.leeway_s, max_ttl_s=cmd.max_ttl_s
        )
        await self._audit(caller, "token_revoke", {"token_id": cmd.jti, "until": until})
        return until

    # ---- admin ---------------------------------------------------------------

    async def _reset_all(self, caller: c.Caller, cmd: c.ResetAll, needs: Needs) -> int:
        cleared = await self.store.reset_all()
        await self._audit(caller, "reset", {"shards": cleared})
        return cleared

    async def _stats(self, caller: c.Caller, cmd: c.ReadStats, needs: Needs) -> StoreStats:
        return await self.store.stats()

    async def _get_config(self, caller: c.Caller, cmd: c.GetConfig, needs: Needs) -> StoreStats:
        return await self.store.stats()

    async def _set_config(self, caller: c.Caller, cmd: c.SetConfig, needs: Needs) -> StoreStats:
        await self.store.set_ori(cmd.ori_enabled)
        await self._audit(caller, "config", {"ori_enabled": cmd.ori_enabled})
        return await self.store.stats()

    async def _dump_delivery_log(
        self, caller: c.Caller, cmd: c.DumpDeliveryLog, needs: Needs
    ) -> tuple[DLDump, str | None]:
        dump = await self.store.dump_delivery_log(cmd.after, cmd.limit)
        await self._admin_use(caller, "delivery_log")
        return dump

    async def _inject_stale(self, caller: c.Caller, cmd: c.InjectStale, needs: Needs) -> None:
        await self.store.inject_stale(cmd.agent, caller.session, cmd.key, cmd.version)
        await self._admin_use(caller, "inject_stale")

    async def _advance_clock(
        self, caller: c.Caller, cmd: c.AdvanceClock, needs: Needs
    ) -> tuple[int, int]:
        if not cmd.enabled:
            raise e.RouteNotFound("test hooks are disabled; set SBUS_TEST_HOOKS=1")
        offset = await self.store.advance_clock(cmd.ms, cmd.cap_ms)
        await self._admin_use(caller, "advance_clock")
        return offset, await self.store.now_ms()

    async def _read_audit(
        self, caller: c.Caller, cmd: c.ReadAudit, needs: Needs
    ) -> list[AuditEntry]:
        entries = await self.store.audit_log(cmd.after, cmd.limit)
        await self._admin_use(caller, "audit")
        return entries


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
