"""Wrong traces: a real trace with one answer (or one observed state) changed.

Each mutation changes the FIRST event it applies to and nothing else, so the trace up to
that event is a real one, and TLC must reject the mutated trace exactly at that event (it
consumes ``index`` steps, the events before it). Answer mutations switch the state
snapshots off for the whole trace (``snap = FALSE``) so that the rejection can only come
from the answer itself, not from a snapshot the changed answer no longer fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from tests.trace.driver import Event, Trace


@dataclass(frozen=True)
class Mutant:
    name: str
    trace: Trace
    index: int  # the mutated event (0-based) = the steps TLC must consume


Rule = Callable[[Event], Event | None]


def _read_version(e: Event) -> Event | None:
    """A GET answers a version the shard never had (the served version + 1)."""
    if e.op != "read" or e.res != "200":
        return None
    ((k, v),) = e.out
    return replace(e, out=((k, v + 1),))


def _admitted_refused(e: Event) -> Event | None:
    """A commit the service admitted is reported as 409 VersionMismatch."""
    if e.op != "commit" or e.res != "200":
        return None
    k, v = e.ex[0]
    return replace(e, res="409 VersionMismatch", out=((k, v, v),))


def _stale_admitted(e: Event) -> Event | None:
    """A commit refused with 409 CrossShardStale is reported admitted (a stale commit)."""
    if e.op != "commit" or e.res != "409 CrossShardStale":
        return None
    return replace(e, res="200", out=tuple((k, v + 1) for k, v in e.ex))


def _new_version_skips(e: Event) -> Event | None:
    """A commit installs expected_version + 2 (skips a version)."""
    if e.op != "commit" or e.res != "200":
        return None
    return replace(e, out=tuple((k, v + 2) for k, v in e.ex))


def _wrong_code(e: Event) -> Event | None:
    """A 409 CrossShardStale is reported as 409 VersionMismatch (right status, wrong code)."""
    if e.op != "commit" or e.res != "409 CrossShardStale":
        return None
    return replace(e, res="409 VersionMismatch")


def _stale_keys_wrong(e: Event) -> Event | None:
    """A 409 CrossShardStale names a wrong current version in its stale_keys."""
    if e.res != "409 CrossShardStale":
        return None
    (k, read, cur), *rest = e.out
    return replace(e, out=((k, read, cur + 1), *rest))


def _tombstone_read_live(e: Event) -> Event | None:
    """A GET of a deleted key answers 200 (a tombstone served as a live shard)."""
    if e.op != "read" or e.res != "404 ShardDeleted":
        return None
    return replace(e, res="200")


def _delete_refused_code(e: Event) -> Event | None:
    """A delete the service refused with 404 ShardDeleted says 409 VersionMismatch."""
    if e.op != "delete" or e.res != "404 ShardDeleted":
        return None
    ((k, v),) = e.out
    return replace(e, res="409 VersionMismatch", out=((k, e.ex[0][1], v),))


def _expired_admitted(e: Event) -> Event | None:
    """A commit on an expired session (410 SessionExpired) is reported admitted."""
    if e.op != "commit" or e.res != "410 SessionExpired":
        return None
    return replace(e, res="200", out=tuple((k, v + 1) for k, v in e.ex))


def _live_create_admitted(e: Event) -> Event | None:
    """A multi-commit refused for creating a live key (409 ShardAlreadyExists) is
    reported admitted, every written key one version on."""
    if e.op != "multi" or e.res != "409 ShardAlreadyExists":
        return None
    known = dict(e.ex)
    return replace(e, res="200", out=tuple((k, known.get(k, -1) + 1) for k in e.keys))


def _create_conflict_code(e: Event) -> Event | None:
    """A multi-commit's stale write (409 VersionMismatch) is reported as the create's
    409 ShardAlreadyExists: right status, a later key's code."""
    if e.op != "multi" or e.res != "409 VersionMismatch" or not e.creates:
        return None
    return replace(e, res="409 ShardAlreadyExists", out=((e.creates[0],),))


# mutations of the observed state (snapshots stay on)
def _no_read_your_writes(e: Event) -> Event | None:
    """After an admitted commit the committer's DL keeps the version it had read."""
    if e.op != "commit" or e.res != "200":
        return None
    old = dict(e.ex)
    dl = tuple((a, k, old[k]) if a == e.agent and k in old else (a, k, v) for a, k, v in e.dl)
    return replace(e, dl=dl)


def _read_not_recorded(e: Event) -> Event | None:
    """A GET is served but not recorded in the DeliveryLog."""
    if e.op != "read" or e.res != "200":
        return None
    ((k, v),) = e.out
    return replace(e, dl=tuple(x for x in e.dl if x != (e.agent, k, v)))


def _multi_create_from_zero(e: Event) -> Event | None:
    """A multi-commit re-creates a key over its tombstone at version 0 (the ABA bug on
    the multi path)."""
    if e.op != "multi" or e.res != "200" or not e.creates:
        return None
    k = e.creates[0]
    return replace(
        e,
        out=tuple((j, 0 if j == k else v) for j, v in e.out),
        shards=tuple((j, 0 if j == k else v, d) for j, v, d in e.shards),
    )


def _version_reused(e: Event) -> Event | None:
    """A create over a tombstone restarts at version 0 (the ABA bug)."""
    if e.op != "create" or e.res != "201":
        return None
    ((k, _),) = e.out
    return replace(
        e,
        out=((k, 0),),
        shards=tuple((j, 0 if j == k else v, d) for j, v, d in e.shards),
    )


ANSWERS: dict[str, Rule] = {
    "read_version": _read_version,
    "admitted_refused": _admitted_refused,
    "stale_admitted": _stale_admitted,
    "new_version_skips": _new_version_skips,
    "wrong_code": _wrong_code,
    "stale_keys_wrong": _stale_keys_wrong,
    "tombstone_read_live": _tombstone_read_live,
    "delete_refused_code": _delete_refused_code,
    "expired_admitted": _expired_admitted,
    "live_create_admitted": _live_create_admitted,
    "create_conflict_code": _create_conflict_code,
}
STATES: dict[str, Rule] = {
    "no_read_your_writes": _no_read_your_writes,
    "read_not_recorded": _read_not_recorded,
    "version_reused": _version_reused,
    "multi_create_from_zero": _multi_create_from_zero,
}


def mutate(trace: Trace, name: str) -> Mutant | None:
    """``trace`` with its first event ``name`` applies to changed; None if there is none."""
    rule = ANSWERS.get(name) or STATES[name]
    base = trace.without_snapshots() if name in ANSWERS else trace
    for n, e in enumerate(base.events):
        changed = rule(e)
        if changed is not None and changed != e:
            events = (*base.events[:n], changed, *base.events[n + 1 :])
            return Mutant(name, replace(base, label=f"{trace.label}/{name}", events=events), n)
    return None


def mutants(traces: list[Trace]) -> list[Mutant]:
    """Every mutation, each applied to the first trace that has an event for it."""
    found = []
    for name in (*ANSWERS, *STATES):
        for tr in traces:
            m = mutate(tr, name)
            if m is not None:
                found.append(m)
                break
        else:
            raise AssertionError(f"no recorded trace has an event for mutation {name}")
    return found
