"""The isolation checker: what must hold of every history the bus produces.

Each check returns the :class:`Violation` s it finds (empty when the history is clean):

- :func:`ww_serial` (WWSerial): no two committed writes install one version of a key; a
  commit that expected version ``e`` installs ``e + 1`` (no lost update); and in the
  real-time form, a write that completed before another was sent has the lower version.
- :func:`aborted_reads` (Adya G1a, and reads of versions nobody wrote): every version an
  operation read was installed by a committed operation (or by an attempt of unknown
  outcome: the version after its guard, or what a replay of its retry showed), or
  predates the history.
- :func:`read_recency`: a GET returns at least every version that had completed before it
  was sent, and no version whose writer was sent only after the GET's answer arrived (the
  bus has one store of truth, whatever replica answers).
- :func:`ori_legal` (ORILegal): no admitted commit rests on a read that a newer committed
  version had overwritten before the commit. Two forms: over a global commit order
  (sequential histories, as in the lockstep model test), and real-time (histories of
  concurrent clients: a newer version that *completed before the commit was sent*).
- :func:`dependency_cycles` (NoWriteSkew): Adya's direct serialization graph over the
  committed operations is acyclic. A cycle is reported with its class: G0 (write
  cycles), G1c (write and read dependencies), G-single (exactly one anti-dependency)
  or G2-item (several).
- :func:`mandate_consume_once` (MandateConsumeOnce): each mandate admits at most one
  commit.

Reads that ORI did not validate (an operation with ``ori`` false) are not part of the
commit's read set here: the bus gives no guarantee for them (docs/isolation.md).
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from tests.history.record import Op


class Violation(NamedTuple):
    check: str
    anomaly: str
    detail: str
    ops: tuple[int, ...]


Pair = tuple[str, int]


def _committed(ops: Iterable[Op]) -> list[Op]:
    return [op for op in ops if op.ok]


def _writers(ops: Iterable[Op]) -> dict[Pair, list[Op]]:
    out: dict[Pair, list[Op]] = defaultdict(list)
    for op in _committed(ops):
        for pair in op.writes:
            out[pair].append(op)
    return out


# --- WWSerial -------------------------------------------------------------------------


def ww_serial(ops: Sequence[Op], *, realtime: bool = True) -> list[Violation]:
    found: list[Violation] = []
    writers = _writers(ops)
    for (key, version), by in sorted(writers.items()):
        if len(by) > 1:
            found.append(
                Violation(
                    "WWSerial",
                    "duplicate-version",
                    f"{key}@{version} was installed by {len(by)} commits",
                    tuple(op.index for op in by),
                )
            )
    for op in _committed(ops):
        installed = dict(op.writes)
        for key, expected in op.guards:
            if expected is not None and installed.get(key) != expected + 1:
                found.append(
                    Violation(
                        "WWSerial",
                        "lost-update",
                        f"op {op.index} expected {key}@{expected} but installed "
                        f"{key}@{installed.get(key)}",
                        (op.index,),
                    )
                )
    if realtime:
        found.extend(_version_order(writers))
    return found


def _version_order(writers: dict[Pair, list[Op]]) -> list[Violation]:
    """A write that completed before another was sent must have the lower version."""
    found: list[Violation] = []
    by_key: dict[str, list[tuple[int, Op]]] = defaultdict(list)
    for (key, version), ops in writers.items():
        by_key[key].extend((version, op) for op in ops)
    for key, entries in sorted(by_key.items()):
        entries.sort(key=lambda e: e[0])
        latest: Op | None = None  # the lower-version write sent last so far
        for version, op in entries:
            if latest is not None and _before(op, latest):
                found.append(
                    Violation(
                        "WWSerial",
                        "version-order",
                        f"{key}@{version} (op {op.index}) completed before op {latest.index} "
                        f"was sent, yet op {latest.index} installed a lower version",
                        (latest.index, op.index),
                    )
                )
            if latest is None or op.invoke_ns > latest.invoke_ns:
                latest = op
    return found


def _before(first: Op, second: Op) -> bool:
    """``first`` completed before ``second`` was sent."""
    return first.complete_ns is not None and first.complete_ns < second.invoke_ns


# --- reads ----------------------------------------------------------------------------


def aborted_reads(ops: Sequence[Op]) -> list[Violation]:
    installed = set(_writers(ops))
    # An attempt of unknown outcome installed what a replay of its retry showed (its
    # writes), or may have installed the version after each guard, or (unguarded) any.
    maybe: set[Pair] = set()
    any_version: set[str] = set()
    for op in ops:
        if op.result != "info" or not op.is_write:
            continue
        maybe.update(op.writes)
        if op.writes:
            continue
        for key, expected in op.guards:
            if expected is None:
                any_version.add(key)
            else:
                maybe.add((key, expected + 1))
    created = {key for op in _committed(ops) if op.op == "create" for key, _ in op.writes}
    lowest: dict[str, int] = {}
    for key, version in installed | maybe:
        lowest[key] = min(version, lowest.get(key, version))
    found: list[Violation] = []
    for op in _committed(ops):
        for key, version in [*op.reads, *((k, v) for k, v in op.guards if v is not None)]:
            if (key, version) in installed or (key, version) in maybe or key in any_version:
                continue
            if key not in created and version < lowest.get(key, version + 1):
                continue  # the state before the history began
            found.append(
                Violation(
                    "G1a",
                    "aborted-read",
                    f"op {op.index} read {key}@{version}, which no committed operation installed",
                    (op.index,),
                )
            )
    return found


class _Completed:
    """Committed writes of one key by completion time, with the running maximum
    version, to answer "the newest version that had completed before t"."""

    def __init__(self, entries: list[tuple[int, int, int]]) -> None:
        entries.sort()
        self.times = [t for t, _, _ in entries]
        self.best: list[tuple[int, int]] = []  # (version, op index), running maximum
        for _, version, index in entries:
            if not self.best or version > self.best[-1][0]:
                self.best.append((version, index))
            else:
                self.best.append(self.best[-1])

    def newest_before(self, t: int) -> tuple[int, int] | None:
        i = bisect.bisect_left(self.times, t)
        return self.best[i - 1] if i else None


def _completed_writes(ops: Sequence[Op]) -> dict[str, _Completed]:
    entries: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for op in _committed(ops):
        if op.complete_ns is None:
            continue
        for key, version in op.writes:
            entries[key].append((op.complete_ns, version, op.index))
    return {key: _Completed(e) for key, e in entries.items()}


def read_recency(ops: Sequence[Op]) -> list[Violation]:
    """A GET returns neither less than every version that completed before it was sent,
    nor a version whose writer had not yet been sent when the GET's answer arrived."""
    completed = _completed_writes(ops)
    writers = _writers(ops)  # a fresh dict: the unknown attempts join it below
    for op in ops:
        if op.result == "info":
            for pair in op.writes:
                writers[pair].append(op)
    found: list[Violation] = []
    for op in _committed(ops):
        if op.op != "get":
            continue
        for key, version in op.reads:
            newest = completed[key].newest_before(op.invoke_ns) if key in completed else None
            if newest is not None and newest[0] > version:
                found.append(
                    Violation(
                        "ReadRecency",
                        "stale-get",
                        f"GET op {op.index} returned {key}@{version} after op {newest[1]} had "
                        f"installed {key}@{newest[0]}",
                        (newest[1], op.index),
                    )
                )
            by = writers.get((key, version), [])
            if by and op.complete_ns is not None and all(w.invoke_ns > op.complete_ns for w in by):
                found.append(
                    Violation(
                        "ReadRecency",
                        "future-read",
                        f"GET op {op.index} returned {key}@{version} before op {by[0].index}, "
                        "which installed it, was sent",
                        (op.index, by[0].index),
                    )
                )
    return found


# --- ORILegal -------------------------------------------------------------------------


def ori_legal(ops: Sequence[Op], *, realtime: bool = True) -> list[Violation]:
    """Real-time form by default; ``realtime=False`` takes the history's index order as
    the global commit order (only meaningful when operations did not overlap)."""
    return _ori_realtime(ops) if realtime else _ori_in_order(ops)


def _stale(op: Op, key: str, version: int, newer: int, by: int) -> Violation:
    return Violation(
        "ORILegal",
        "stale-read-admitted",
        f"op {op.index} was admitted resting on {key}@{version}, but op {by} had installed "
        f"{key}@{newer} first",
        (by, op.index),
    )


def _ori_in_order(ops: Sequence[Op]) -> list[Violation]:
    current: dict[str, tuple[int, int]] = {}  # key -> (newest version, op index)
    found: list[Violation] = []
    for op in sorted(_committed(ops), key=lambda o: o.index):
        if op.is_write:
            for key, version in op.validated_reads():
                newest = current.get(key)
                if newest is not None and newest[0] > version:
                    found.append(_stale(op, key, version, *newest))
        for key, version in op.writes:
            if key not in current or version > current[key][0]:
                current[key] = (version, op.index)
    return found


def _ori_realtime(ops: Sequence[Op]) -> list[Violation]:
    completed = _completed_writes(ops)
    found: list[Violation] = []
    for op in _committed(ops):
        if not op.is_write:
            continue
        for key, version in op.validated_reads():
            newest = completed[key].newest_before(op.invoke_ns) if key in completed else None
            if newest is not None and newest[0] > version:
                found.append(_stale(op, key, version, *newest))
    return found


# --- NoWriteSkew: Adya's direct serialization graph -----------------------------------

Graph = dict[int, dict[int, set[str]]]  # from op -> to op -> edge labels (ww, wr, rw)


def dependency_graph(ops: Sequence[Op]) -> Graph:
    """Nodes are committed operations. For each key the version order is the order of
    version numbers (the bus assigns them). ww: the writer of a version to the writer of
    the next; wr: the writer of a version to each reader of it; rw (anti-dependency):
    each reader of a version to the writer of the next one."""
    committed = _committed(ops)
    writer: dict[Pair, int] = {}
    versions: dict[str, list[int]] = defaultdict(list)
    for op in committed:
        for key, version in op.writes:
            writer[(key, version)] = op.index
            versions[key].append(version)
    for vs in versions.values():
        vs.sort()
    graph: Graph = {op.index: {} for op in committed}

    def edge(a: int | None, b: int | None, label: str) -> None:
        if a is not None and b is not None and a != b:
            graph[a].setdefault(b, set()).add(label)

    def next_writer(key: str, version: int) -> int | None:
        vs = versions.get(key, [])
        i = bisect.bisect_right(vs, version)
        return writer[(key, vs[i])] if i < len(vs) else None

    for op in committed:
        for key, version in op.writes:
            vs = versions[key]
            i = bisect.bisect_left(vs, version)
            if i:
                edge(writer[(key, vs[i - 1])], op.index, "ww")
        for key, version in op.validated_reads():
            edge(writer.get((key, version)), op.index, "wr")
            edge(op.index, next_writer(key, version), "rw")
    return graph


def _sccs(graph: Graph, labels: frozenset[str]) -> list[list[int]]:
    """Strongly connected components (iterative Tarjan) over edges with a label in
    ``labels``; only components of two or more nodes."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[int] = []
    out: list[list[int]] = []
    counter = 0

    def successors(node: int) -> list[int]:
        return [n for n, ls in graph.get(node, {}).items() if ls & labels]

    for root in graph:
        if root in index:
            continue
        work: list[tuple[int, int]] = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            succ = successors(node)
            if i < len(succ):
                work.append((node, i + 1))
                nxt = succ[i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component: list[int] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return out


def _path(
    graph: Graph, start: int, goal: int, labels: frozenset[str], within: set[int]
) -> list[int] | None:
    """Shortest path start -> goal over edges labelled in ``labels``, inside ``within``."""
    previous: dict[int, int] = {start: start}
    frontier = [start]
    while frontier:
        nxt: list[int] = []
        for node in frontier:
            for succ, ls in graph.get(node, {}).items():
                if succ in within and succ not in previous and ls & labels:
                    previous[succ] = node
                    if succ == goal:
                        path = [goal]
                        while path[-1] != start:
                            path.append(previous[path[-1]])
                        return path[::-1]
                    nxt.append(succ)
        frontier = nxt
    return None


WW = frozenset({"ww"})
WWR = frozenset({"ww", "wr"})
ALL = frozenset({"ww", "wr", "rw"})


def _describe(graph: Graph, cycle: list[int]) -> str:
    hops = []
    for a, b in itertools.pairwise(cycle):
        hops.append(f"{a} -{'/'.join(sorted(graph[a][b]))}-> ")
    return "".join(hops) + str(cycle[-1])


def _cycle_through(graph: Graph, node: int, labels: frozenset[str], within: set[int]) -> list[int]:
    """A cycle from ``node`` back to itself over ``labels`` inside ``within`` (which is
    strongly connected over those labels, so one exists)."""
    for succ, ls in graph[node].items():
        if succ in within and ls & labels:
            back = _path(graph, succ, node, labels, within)
            if back is not None:
                return [node, *back]
    raise AssertionError(f"no cycle through {node}")


def _classify(graph: Graph, component: list[int]) -> tuple[str, list[int]]:
    """The strongest anomaly class in one strongly connected component, and a cycle."""
    members = set(component)
    sub_graph = {n: graph[n] for n in component}
    for name, labels in (("G0", WW), ("G1c", WWR)):
        for sub in _sccs(sub_graph, labels):
            return name, _cycle_through(graph, sub[0], labels, set(sub))
    rw_edges = [
        (a, b) for a in component for b, ls in graph[a].items() if b in members and "rw" in ls
    ]
    for a, b in rw_edges:
        back = _path(graph, b, a, WWR, members)
        if back is not None:
            return "G-single", [a, *back]
    a, b = rw_edges[0]
    return "G2-item", [a, *(_path(graph, b, a, ALL, members) or [])]


def dependency_cycles(ops: Sequence[Op]) -> list[Violation]:
    graph = dependency_graph(ops)
    found: list[Violation] = []
    for component in _sccs(graph, ALL):
        anomaly, cycle = _classify(graph, component)
        found.append(
            Violation(
                "NoWriteSkew",
                anomaly,
                f"{len(component)} committed operations form a dependency cycle, e.g. "
                + _describe(graph, cycle),
                tuple(component),
            )
        )
    return found


# --- MandateConsumeOnce ---------------------------------------------------------------


def mandate_consume_once(ops: Sequence[Op]) -> list[Violation]:
    uses: dict[str, list[int]] = defaultdict(list)
    for op in _committed(ops):
        if op.mandate is not None:
            uses[op.mandate].append(op.index)
    return [
        Violation(
            "MandateConsumeOnce", "reused", f"mandate {jti} admitted {len(by)} commits", tuple(by)
        )
        for jti, by in sorted(uses.items())
        if len(by) > 1
    ]


# --- all of it ------------------------------------------------------------------------


def check(ops: Sequence[Op], *, realtime: bool = True) -> list[Violation]:
    """Every check. ``realtime=False`` for sequential histories whose index order is the
    commit order (the lockstep model test): ORILegal then uses that order."""
    found = [
        *ww_serial(ops, realtime=realtime),
        *aborted_reads(ops),
        *ori_legal(ops, realtime=realtime),
        *dependency_cycles(ops),
        *mandate_consume_once(ops),
    ]
    if realtime:
        found.extend(read_recency(ops))
    return found


class Summary(NamedTuple):
    """How much a history exercised: a clean verdict on an empty history proves nothing."""

    operations: int
    committed_writes: int
    refused_writes: int
    validated_reads: int
    edges: int


def summarize(ops: Sequence[Op]) -> Summary:
    graph = dependency_graph(ops)
    return Summary(
        operations=len(ops),
        committed_writes=sum(1 for op in ops if op.ok and op.is_write),
        refused_writes=sum(1 for op in ops if op.result == "fail" and op.is_write),
        validated_reads=sum(len(op.validated_reads()) for op in ops if op.ok and op.is_write),
        edges=sum(len(succ) for succ in graph.values()),
    )


def assert_clean(ops: Sequence[Op], *, realtime: bool = True, label: str = "history") -> Summary:
    """Fail with the first violations and the operations they name; else the summary."""
    found = check(ops, realtime=realtime)
    if found:
        by_index = {op.index: op for op in ops}
        lines = [f"{label}: {len(found)} isolation violation(s)"]
        for v in found[:10]:
            lines.append(f"- {v.check} [{v.anomaly}]: {v.detail}")
            for i in v.ops[:6]:
                lines.append("    " + json.dumps(by_index[i].to_json()))
        raise AssertionError("\n".join(lines))
    return summarize(ops)
