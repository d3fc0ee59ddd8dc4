"""Authorization derived from the command: the rights table (protocol.md sections 4
and 5.2).

:data:`RIGHTS` maps each command type to a function computing what that command needs
from its own fields: written keys need write, create or delete, read keys read, a listing
is filtered by read, admin operations need admin. The engine looks the type up before it
runs anything and refuses a type with no entry (:func:`rule_for`): a new use case is
closed until someone writes its rule here, whatever route reaches it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from sbus.core import commands as c
from sbus.core import errors as e
from sbus.core.rights import ADMIN_PATTERN, Capabilities, Right

Pair = tuple[str, Right]


class Needs(NamedTuple):
    """What one command needs.

    - ``admin``: the admin right, checked before anything runs.
    - ``pairs``: every (key, right); the first missing one in sorted order is refused.
      A state change checks them at step 8, anything else before the store.
    - ``somewhere``: a right held on at least one pattern (issuing a mandate).
    - ``filter``: results are limited to the keys holding this right; nothing is refused.
    - ``act_as``: the command acts for this agent; another agent than a token's own needs
      the admin right.

    A NamedTuple, not a frozen dataclass: one is built per request, and a frozen
    dataclass pays an ``object.__setattr__`` per field.
    """

    pairs: tuple[Pair, ...] = ()
    admin: bool = False
    somewhere: Right | None = None
    filter: Right | None = None
    act_as: str | None = None


NOTHING = Needs()
ADMIN = Needs(admin=True)
READABLE = Needs(filter=Right.READ)

# The right a write of each kind needs: a rollback writes like a commit.
WRITE_RIGHTS = {
    "commit": Right.WRITE,
    "rollback": Right.WRITE,
    "create": Right.CREATE,
    "delete": Right.DELETE,
}


def _submit(cmd: c.Submit) -> Needs:
    pairs = [(w.key, WRITE_RIGHTS[w.kind]) for w in cmd.writes]
    if cmd.read_set:
        pairs += [(r.key, Right.READ) for r in cmd.read_set]
    return Needs(tuple(pairs))


RIGHTS: dict[type[c.Command[Any]], Callable[[Any], Needs]] = {
    c.CreateShard: lambda cmd: Needs(((cmd.key, Right.CREATE),)),
    c.ReadShard: lambda cmd: Needs(((cmd.key, Right.READ),)),
    c.ReadShards: lambda cmd: Needs(tuple((key, Right.READ) for key in cmd.keys)),
    c.ListShards: lambda cmd: READABLE,
    # Only the changes of keys the caller may read; the conflict ring (other agents'
    # refusals) is an admin's.
    c.Watch: lambda cmd: Needs(admin=cmd.conflicts, filter=Right.READ),
    # History reveals every retained version's content.
    c.History: lambda cmd: Needs(((cmd.key, Right.READ),)),
    c.Submit: _submit,
    c.ResetSession: lambda cmd: Needs(act_as=cmd.agent),
    # A key the caller may not read is not recorded (nor told apart from a missing one).
    c.Register: lambda cmd: READABLE,
    c.IssueMandate: lambda cmd: Needs(somewhere=Right.MANDATE),
    c.IssueToken: lambda cmd: ADMIN,
    c.RevokeToken: lambda cmd: ADMIN,
    c.ResetAll: lambda cmd: ADMIN,
    # /stats and /metrics (any valid token) and /admin/health (no token at all).
    c.ReadStats: lambda cmd: NOTHING,
    # The ORI flag and the view counters: any authenticated caller.
    c.GetConfig: lambda cmd: NOTHING,
    c.SetConfig: lambda cmd: ADMIN,
    c.DumpDeliveryLog: lambda cmd: ADMIN,
    c.InjectStale: lambda cmd: ADMIN,
    c.AdminCreate: lambda cmd: Needs(((cmd.key, Right.CREATE),), admin=True),
    c.AdvanceClock: lambda cmd: ADMIN,
    c.ReadAudit: lambda cmd: ADMIN,
}


# The command types whose rule asks for the admin right whatever their fields (the
# /admin/* routes but GET /admin/config): :func:`admit` refuses them on the caller alone,
# so a router can have that done before it validates the request, and a caller without
# the right learns nothing of what the route would accept.
ADMIN_ONLY: frozenset[type[c.Command[Any]]] = frozenset(
    {
        c.IssueToken,
        c.RevokeToken,
        c.ResetAll,
        c.SetConfig,
        c.DumpDeliveryLog,
        c.InjectStale,
        c.AdminCreate,
        c.AdvanceClock,
        c.ReadAudit,
    }
)


def admit(caller: c.Caller, command: c.Command[Any] | type[c.Command[Any]]) -> None:
    """The refusals made before anything runs, as early as a router can ask for them.
    Given a command type, those that need none of its fields: no rights rule (fail
    closed), or the admin right missing for an :data:`ADMIN_ONLY` type. Given a command,
    :func:`check_up_front` of its needs. The full check still runs when the command is
    executed."""
    if not isinstance(command, type):
        check_up_front(caller, needs_of(command))
        return
    kind = command
    if kind not in RIGHTS:
        raise e.CapabilityDenied(
            f"{kind.__name__} has no rights rule: refused", right=Right.ADMIN.value
        )
    if kind in ADMIN_ONLY:
        check_up_front(caller, ADMIN)


def needs_of(command: c.Command[Any]) -> Needs:
    """What ``command`` needs; :class:`CapabilityDenied` for a type with no rule."""
    rule = RIGHTS.get(type(command))
    if rule is None:
        raise e.CapabilityDenied(
            f"{type(command).__name__} has no rights rule: refused", right=Right.ADMIN.value
        )
    return rule(command)


def first_missing(caps: Capabilities, pairs: Iterable[Pair]) -> e.CapabilityDenied | None:
    """The refusal for the first (key, right) in sorted order that ``caps`` lacks."""
    missing = [(key, right) for key, right in pairs if not caps.allows(right, key)]
    if not missing:
        return None
    key, right = min(missing)
    return e.CapabilityDenied(f"no {right.value} right on {key!r}", key=key, right=right.value)


def check_up_front(caller: c.Caller, needs: Needs) -> None:
    """The checks made before anything runs: admin, acting for another agent, a right
    held somewhere. Raises AdminDisabled, CapabilityDenied or AgentMismatch."""
    caps = caller.capabilities
    if needs.admin and not caps.is_admin:
        if not caller.token_bound:
            # Open mode keeps its compat code: the switch is the missing piece.
            raise e.AdminDisabled("admin endpoints are disabled; set SBUS_ADMIN_ENABLED=1")
        raise e.CapabilityDenied(
            "this endpoint needs the admin right", key=ADMIN_PATTERN, right=Right.ADMIN.value
        )
    target = needs.act_as
    if target is not None and caller.token_bound and target != caller.agent and not caps.is_admin:
        raise e.AgentMismatch(
            f"the token is for agent {caller.agent!r}; resetting {target!r}'s session "
            "needs the admin right"
        )
    if needs.somewhere is not None and not caps.patterns_with(needs.somewhere):
        raise e.CapabilityDenied(
            f"agent {caller.agent!r} lacks the {needs.somewhere.value} right",
            right=needs.somewhere.value,
        )


def check_keys(caller: c.Caller, needs: Needs) -> None:
    """Step 8 for a state change, or the read-right check of a read."""
    caps = caller.capabilities
    allows = caps.allows
    for key, right in needs.pairs:
        if not allows(right, key):
            # Something is missing: name the first in sorted order.
            refusal = first_missing(caps, needs.pairs)
            assert refusal is not None
            raise refusal
