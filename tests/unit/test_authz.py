"""The engine is the only door: the rights each command type needs (sbus.core.authz), and
the refusal of a command type nobody wrote a rule for, over a real memory store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from sbus.api.problems import STATUS
from sbus.core import commands as c
from sbus.core import errors as e
from sbus.core.authz import ADMIN, ADMIN_ONLY, NOTHING, READABLE, RIGHTS, Needs, needs_of
from sbus.core.engine import Bus
from sbus.core.rights import ALL_RIGHTS, Capabilities, Right, Scope
from sbus.core.types import IdemRef, ReadItem, WriteOp
from sbus.storage.memory import MemoryStore

R, W, C, D = Right.READ, Right.WRITE, Right.CREATE, Right.DELETE


def caller(*scopes: Scope, agent: str = "a", token_bound: bool = True) -> c.Caller:
    return c.Caller(agent, "", Capabilities(scopes), token_bound)


ROOT = caller(Scope("**", ALL_RIGHTS), agent="root")
NOBODY = caller()


async def started_bus() -> Bus:
    store = MemoryStore()
    await store.start()
    bus = Bus(store)
    created = await bus.execute(ROOT, c.CreateShard("k", "v0", "", False, None))
    assert created.status == 201
    return bus


# -- a command type with no rule ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WipeEverything(c.Command[int]):
    """A use case someone wired into the engine but gave no rights rule."""


class ResetEverything(c.ResetAll):
    """A subclass inherits no rule: the table is looked up by exact type."""


async def test_a_command_type_with_no_rights_rule_is_refused_before_it_runs() -> None:
    bus = await started_bus()
    ran: list[Any] = []

    async def wipe(who: c.Caller, command: WipeEverything, needs: Needs) -> int:
        ran.append(command)
        return await bus.store.reset_all()

    bus.add_use_case(WipeEverything, wipe)
    bus.add_use_case(ResetEverything, wipe)
    for command in (WipeEverything(), ResetEverything()):
        # Every right there is, and still refused: no rule says which it needs.
        with pytest.raises(e.CapabilityDenied) as info:
            await bus.execute(ROOT, command)
        assert info.value.code == "CapabilityDenied"
        assert STATUS[type(info.value)] == 403
        assert type(command).__name__ in info.value.detail
    assert ran == []
    shard = await bus.execute(ROOT, c.ReadShard("k", record=False))
    assert (shard.content, shard.version) == ("v0", 0)


async def test_the_same_command_runs_once_it_has_a_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: what refused the command above was the missing rule."""
    bus = await started_bus()

    async def wipe(who: c.Caller, command: WipeEverything, needs: Needs) -> int:
        return await bus.store.reset_all()

    bus.add_use_case(WipeEverything, wipe)
    monkeypatch.setitem(RIGHTS, WipeEverything, lambda cmd: ADMIN)
    with pytest.raises(e.CapabilityDenied) as info:
        await bus.execute(NOBODY, WipeEverything())
    assert info.value.fields == {"key": "**", "right": "admin"}
    assert await bus.execute(ROOT, WipeEverything()) == 1
    with pytest.raises(e.ShardNotFound):
        await bus.execute(ROOT, c.ReadShard("k", record=False))


def test_every_command_has_a_rule_and_a_use_case() -> None:
    bus = Bus(MemoryStore())
    kinds = {
        kind
        for kind in vars(c).values()
        if isinstance(kind, type) and issubclass(kind, c.Command) and kind is not c.Command
    }
    assert len(kinds) == 21
    assert kinds == set(RIGHTS)
    assert kinds == set(bus._handlers)


def test_execute_is_the_only_way_into_the_store() -> None:
    """Bus offers no other call that reaches the store: the counters of /stats, /metrics
    and /admin/health are a command (with the rule that asks nothing) like any other."""
    public = {
        name for name, value in vars(Bus).items() if callable(value) and not name.startswith("_")
    }
    assert public == {"execute", "admit", "attach_signers", "add_use_case"}


# -- the table, per command type ----------------------------------------------------------

IDEM = IdemRef("a", "k1", "f" * 64)
MULTI = c.Submit(
    op="multi",
    writes=(
        WriteOp("b", 1, "commit", "x"),
        WriteOp("a", None, "create", "y"),
        WriteOp("c", 2, "delete"),
    ),
    read_set=(ReadItem("r", 0), ReadItem("b", 1)),
    rationale=None,
    idem=IDEM,
)

CASES: list[tuple[c.Command[Any], Needs]] = [
    (c.CreateShard("k", "x", "", False, IDEM), Needs((("k", C),))),
    (c.ReadShard("k", record=True), Needs((("k", R),))),
    (c.ReadShards(("a", "b"), record=False), Needs((("a", R), ("b", R)))),
    (c.ListShards("p/", None, 10, content=True), READABLE),
    (c.Watch("p/", None, conflicts=False), READABLE),
    (c.History("k", None, 100), Needs((("k", R),))),
    (
        c.Submit("commit", (WriteOp("k", 3, "commit", "x"),), (ReadItem("r", 1),), None, None),
        Needs((("k", W), ("r", R))),
    ),
    (
        c.Submit("rollback", (WriteOp("k", 3, "rollback", target_version=1),), (), None, None),
        Needs((("k", W),)),
    ),
    (c.Submit("delete", (WriteOp("k", 3, "delete"),), (), "delete", None), Needs((("k", D),))),
    (MULTI, Needs((("b", W), ("a", C), ("c", D), ("r", R), ("b", R)))),
    (c.ResetSession("b"), Needs(act_as="b")),
    (c.Register(("a", "b")), READABLE),
    (c.IssueMandate("b", ("k/*",), None, 60), Needs(somewhere=Right.MANDATE)),
    (c.IssueToken("b", (), 60), ADMIN),
    (c.RevokeToken("j", None, leeway_s=5, max_ttl_s=60), ADMIN),
    (c.ResetAll(), ADMIN),
    (c.ReadStats(), NOTHING),
    (c.GetConfig(), NOTHING),
    (c.SetConfig(ori_enabled=False), ADMIN),
    (c.DumpDeliveryLog(None, 10), ADMIN),
    (c.InjectStale("b", "k", 0), ADMIN),
    (c.AdminCreate("k", "x", "", False), Needs((("k", C),), admin=True)),
    (c.AdvanceClock(1, 10, enabled=True), ADMIN),
    (c.ReadAudit(None, 10), ADMIN),
]


@pytest.mark.parametrize(("command", "needs"), CASES, ids=lambda v: type(v).__name__)
def test_the_rights_each_command_needs(command: c.Command[Any], needs: Needs) -> None:
    assert needs_of(command) == needs


def test_watching_conflicts_needs_admin_too() -> None:
    """Watch is not admin-only: the conflict ring is (GET /watch?include=conflicts)."""
    assert needs_of(c.Watch("p/", "s1", conflicts=True)) == Needs(admin=True, filter=R)
    assert c.Watch not in ADMIN_ONLY


def test_the_cases_cover_every_command_type() -> None:
    assert {type(command) for command, _ in CASES} == set(RIGHTS)


def test_admin_only_lists_exactly_the_types_that_always_need_admin() -> None:
    assert {type(command) for command, needs in CASES if needs.admin} == ADMIN_ONLY


async def test_admit_refuses_on_the_caller_alone() -> None:
    bus = Bus(MemoryStore())
    with pytest.raises(e.CapabilityDenied) as info:
        await bus.admit(caller(Scope.of("**", "read")), c.InjectStale)
    assert info.value.fields == {"key": "**", "right": "admin"}
    with pytest.raises(e.AdminDisabled):
        await bus.admit(caller(token_bound=False), c.ResetAll)
    with pytest.raises(e.CapabilityDenied):
        await bus.admit(ROOT, WipeEverything)
    await bus.admit(caller(Scope.of("**", "admin")), c.AdminCreate)
    await bus.admit(NOBODY, c.GetConfig)
    await bus.admit(NOBODY, c.Submit)
    # Given a command, what it needs up front: here acting for another agent.
    with pytest.raises(e.AgentMismatch):
        await bus.admit(caller(agent="a"), c.ResetSession("b"))
    await bus.admit(caller(agent="a"), c.ResetSession("a"))
    # Each CapabilityDenied is counted in the audit log (agent, key, minute); the other
    # refusals are not capability denials.
    denied = [(x.agent, x.details, x.events) for x in await bus.store.audit_log(None, 10)]
    assert denied == [
        ("a", {"key": "**", "right": "admin"}, 1),
        ("root", {"key": "", "right": "admin"}, 1),
    ]


def test_only_state_changes_check_keys_late() -> None:
    """protocol.md section 4: creates and submissions check their key rights at step 8,
    after throttle, idempotency and limits; every other command before the store."""
    late = {kind for kind in RIGHTS if kind.changes_state}
    assert late == {c.CreateShard, c.Submit, c.AdminCreate}


# -- how the engine applies them ----------------------------------------------------------


async def test_a_state_change_checks_its_rights_after_the_limits() -> None:
    bus = await started_bus()
    bus.limits = type(bus.limits)(max_txn_keys=1)
    two = tuple(WriteOp(k, 0, "commit", "x") for k in ("k", "m"))
    with pytest.raises(e.TooManyWrites):
        await bus.execute(NOBODY, c.Submit("multi", two, (), None, None))
    one = c.Submit("commit", (WriteOp("k", 0, "commit", "x"),), (ReadItem("a", 0),), None, None)
    with pytest.raises(e.CapabilityDenied) as info:
        await bus.execute(caller(Scope.of("k", "write")), one)
    # The first missing (key, right) in sorted order.
    assert info.value.fields == {"key": "a", "right": "read"}
    assert (await bus.execute(ROOT, c.ReadShard("k", record=False))).version == 0


STATE_CHANGES = [case for case in CASES if type(case[0]).changes_state]


@pytest.mark.parametrize(("command", "needs"), STATE_CHANGES, ids=lambda v: type(v).__name__)
async def test_every_state_change_checks_its_key_rights(
    command: c.Command[Any], needs: Needs
) -> None:
    """A state change checks its key rights late (step 8), inside its own use case, not
    in ``execute``: every such command type (a new one must join CASES) is refused to a
    caller without them, naming the first missing pair, and changes nothing."""
    bus = await started_bus()
    before = await bus.execute(ROOT, c.ReadStats())
    holder = caller(Scope.of("**", "admin")) if needs.admin else NOBODY
    with pytest.raises(e.CapabilityDenied) as info:
        await bus.execute(holder, command)
    key, right = min(needs.pairs)
    assert info.value.fields == {"key": key, "right": right.value}
    assert await bus.execute(ROOT, c.ReadStats()) == before
    assert (await bus.execute(ROOT, c.ReadShard("k", record=False))).version == 0


async def test_a_refused_read_records_nothing() -> None:
    bus = await started_bus()
    with pytest.raises(e.CapabilityDenied) as info:
        await bus.execute(NOBODY, c.ReadShard("k", record=True))
    assert info.value.fields == {"key": "k", "right": "read"}
    dump, _ = await bus.execute(ROOT, c.DumpDeliveryLog(None, 10))
    assert dump == {}


async def test_listing_and_register_are_filtered_by_the_read_right() -> None:
    bus = await started_bus()
    await bus.execute(ROOT, c.CreateShard("m", "", "", False, None))
    reader = caller(Scope.of("m", "read"), agent="b")
    page = await bus.execute(reader, c.ListShards("", None, 10, content=True))
    assert (page.keys, page.next_after) == (["m"], None)
    assert [s.key for s in page.shards or ()] == ["m"]
    result = await bus.execute(reader, c.Register(("k", "m", "gone")))
    assert (result.registered, result.skipped_no_shard) == (1, ["k", "gone"])
    dump, _ = await bus.execute(ROOT, c.DumpDeliveryLog(None, 10))
    assert set(dump["b"][""]) == {"m"}


async def test_listing_scans_only_where_the_read_patterns_can_match() -> None:
    """Keys no read pattern can match are never scanned (so never named, never paid
    for), however many there are; the pages still hold every readable key once."""
    bus = await started_bus()
    for i in range(300):
        await bus.execute(ROOT, c.CreateShard(f"m/{i:03}", "", "", False, None))
    for key in ("plan/a", "plan/b", "plan/a/deep", "x"):
        await bus.execute(ROOT, c.CreateShard(key, "", "", False, None))
    scanned: list[str] = []
    list_keys = bus.store.list_keys

    async def counting(prefix: str, after: str | None, limit: int) -> list[str]:
        found = await list_keys(prefix, after, limit)
        scanned.extend(found)
        return found

    bus.store.list_keys = counting  # type: ignore[method-assign]
    reader = caller(Scope.of("plan/*", "read"), Scope.of("x", "read"), agent="b")
    page = await bus.execute(reader, c.ListShards("", None, 1, content=False))
    assert (page.keys, page.next_after) == (["plan/a"], "plan/a")
    page = await bus.execute(reader, c.ListShards("", "plan/a", 1, content=False))
    assert (page.keys, page.next_after) == (["plan/b"], "plan/b")
    page = await bus.execute(reader, c.ListShards("", "plan/b", 1, content=False))
    assert (page.keys, page.next_after) == (["x"], None)
    assert not [key for key in scanned if key.startswith("m/")]


async def test_who_may_reset_another_agents_session() -> None:
    bus = await started_bus()
    with pytest.raises(e.AgentMismatch) as info:
        await bus.execute(caller(agent="a"), c.ResetSession("b"))
    assert info.value.detail == (
        "the token is for agent 'a'; resetting 'b''s session needs the admin right"
    )
    await bus.execute(caller(agent="a"), c.ResetSession("a"))
    await bus.execute(caller(Scope.of("**", "admin"), agent="a"), c.ResetSession("b"))
    # Open mode: the request names the agent it acts as.
    await bus.execute(caller(agent="b", token_bound=False), c.ResetSession("b"))


async def test_admin_refusals_by_mode() -> None:
    bus = await started_bus()
    with pytest.raises(e.AdminDisabled):
        await bus.execute(caller(Scope.of("**", "read"), token_bound=False), c.ResetAll())
    with pytest.raises(e.CapabilityDenied) as info:
        await bus.execute(caller(Scope.of("**", "read")), c.ResetAll())
    assert info.value.fields == {"key": "**", "right": "admin"}
    # Admin alone is not the create right: POST /admin/shard needs both.
    with pytest.raises(e.CapabilityDenied) as info:
        await bus.execute(caller(Scope.of("**", "admin")), c.AdminCreate("n", "", "", False))
    assert info.value.fields == {"key": "n", "right": "create"}


async def test_issuing_a_mandate_needs_the_mandate_right_somewhere() -> None:
    bus = await started_bus()
    with pytest.raises(e.CapabilityDenied) as info:
        await bus.execute(caller(Scope.of("**", "write")), c.IssueMandate("b", ("k",), None, 60))
    assert info.value.fields == {"right": "mandate"}
    assert info.value.detail == "agent 'a' lacks the mandate right"
