"""One batch of store operations, written once for ``batch`` and ``abatch``.

:func:`run_batch` is a generator: it yields the bus requests it needs (:class:`ReadMany`,
:class:`Scan`, :class:`ListKeys`, :class:`CommitMany`) and receives their answers, so
the sync and async stores only carry the requests out (the SDK's own core works the
same way). A batch behaves like LangGraph's reference store: every read of the batch
sees the state before its writes, the last put of a key wins, and then all writes land
together, here as ONE atomic ``POST /commit/multi`` (updates, creates and deletes).

The versions a session has seen (:class:`Memory`) decide how a put is sent: a key read
at version N is written with ``expected_version`` N; a key seen absent is created (a
create that loses the race is refused, never merged); a key never seen is read first
(recorded) or refused, by the store's ``blind_writes`` setting. Gets are recorded reads
(they join the session's read set, so a commit after them is refused if any of them
moved: no write skew), search and list_namespaces are unrecorded (browsing never widens
the read set); an item search returned is remembered only to guard a later put of that
same item.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from langgraph.store.base import (
    GetOp,
    Item,
    ListNamespacesOp,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
)

from sbus_client._models import Committed, Shard
from sbus_client.langgraph._keys import KeyMap, pack, unpack
from sbus_client.langgraph._match import namespace_matches, passes

BlindWrites = Literal["read_first", "reject"]
# The server's default SBUS_MAX_READ_KEYS: the most keys one POST /read may name.
READ_CHUNK = 256


class Absent:
    """The session saw the key missing (never created, or deleted)."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = Absent()
Seen = int | Absent


@dataclass
class Memory:
    """What one (agent, session) has seen: shard key -> version read or written, or
    ABSENT. ``n`` counts the conflicts: the bus session is ``base`` until the first,
    then ``base.1``, ``base.2``, ... each starting with nothing seen. ``agent`` None is
    the bus token's subject."""

    agent: str | None
    base: str
    n: int = 0
    seen: dict[str, Seen] = field(default_factory=dict)

    @property
    def session_id(self) -> str:
        return self.base if self.n == 0 else f"{self.base}.{self.n}"

    def next_session(self) -> str:
        """Leave the current session after a conflict; returns the one left."""
        left = self.session_id
        self.n += 1
        self.seen = {}
        return left


@dataclass(frozen=True)
class ReadMany:
    keys: tuple[str, ...]
    record: bool


@dataclass(frozen=True)
class Scan:
    prefix: str


@dataclass(frozen=True)
class ListKeys:
    prefix: str


@dataclass(frozen=True)
class CommitMany:
    writes: tuple[tuple[str, str, int], ...]
    creates: tuple[tuple[str, str], ...]
    deletes: tuple[tuple[str, int], ...]


Step = ReadMany | Scan | ListKeys | CommitMany
Batch = Generator[Step, Any, list[Result]]


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def _item(shard: Shard, namespace: tuple[str, ...], key: str, value: dict[str, Any]) -> Item:
    return Item(
        value=value,
        key=key,
        namespace=namespace,
        created_at=_time(shard.created_at or shard.updated_at),
        updated_at=_time(shard.updated_at),
    )


def _read_many(keys: Sequence[str], record: bool) -> Generator[Step, Any, dict[str, Shard]]:
    found: dict[str, Shard] = {}
    for start in range(0, len(keys), READ_CHUNK):
        chunk = tuple(keys[start : start + READ_CHUNK])
        found.update((yield ReadMany(chunk, record)))
    return found


def _check_op(op: Op) -> None:
    if isinstance(op, SearchOp) and op.query:
        raise NotImplementedError(
            "SBusStore has no semantic search: pass filter= (and no query=) to search()"
        )
    if isinstance(op, PutOp) and op.ttl is not None:
        raise NotImplementedError("SBusStore does not support TTL: pass ttl=None")
    if not isinstance(op, GetOp | PutOp | SearchOp | ListNamespacesOp):
        raise ValueError(f"unknown store operation: {type(op).__name__}")


def run_batch(ops: Iterable[Op], keys: KeyMap, memory: Memory, blind_writes: BlindWrites) -> Batch:
    ops = list(ops)
    for op in ops:
        _check_op(op)
    results: list[Result] = [None] * len(ops)

    # Reads first: the gets (recorded), plus, with read_first, the keys put but never seen.
    get_keys = {
        i: keys.shard_key(op.namespace, op.key) for i, op in enumerate(ops) if isinstance(op, GetOp)
    }
    puts: dict[str, PutOp] = {}
    for op in ops:
        if isinstance(op, PutOp):
            key = keys.shard_key(op.namespace, op.key)
            puts.pop(key, None)  # the last put of a key wins, in its own place
            puts[key] = op
    wanted = list(dict.fromkeys(get_keys.values()))
    unseen = [k for k in puts if k not in memory.seen and k not in get_keys.values()]
    if unseen and blind_writes == "reject":
        raise ValueError(
            f"blind write refused (blind_writes='reject'): get() {unseen[0]!r} in this "
            "session before putting or deleting it"
        )
    wanted += unseen
    if wanted:
        found = yield from _read_many(wanted, record=True)
        for key in wanted:
            shard = found.get(key)
            memory.seen[key] = ABSENT if shard is None else shard.version
        for i, key in get_keys.items():
            op = ops[i]
            assert isinstance(op, GetOp)
            shard = found.get(key)
            results[i] = None if shard is None else _get_item(shard, op.namespace, op.key)

    scans: dict[str, list[Shard]] = {}
    for i, op in enumerate(ops):
        if isinstance(op, SearchOp):
            prefix = keys.namespace_prefix(op.namespace_prefix)
            if prefix not in scans:
                scans[prefix] = yield Scan(prefix)
            results[i] = _search(op, scans[prefix], keys, memory)
        elif isinstance(op, ListNamespacesOp):
            results[i] = yield from _list_namespaces(op, keys)

    if puts:
        yield from _write(puts, memory)
    return results


def _get_item(shard: Shard, namespace: tuple[str, ...], key: str) -> Item:
    envelope = unpack(shard.content)
    if envelope is None:
        raise ValueError(f"shard {shard.key!r} does not hold an SBusStore item")
    if envelope.namespace != tuple(namespace) or envelope.key != key:
        raise RuntimeError(
            f"shard {shard.key!r} holds item {envelope.namespace!r}/{envelope.key!r}, "
            f"not {tuple(namespace)!r}/{key!r} (a hashed key collided)"
        )
    return _item(shard, envelope.namespace, envelope.key, envelope.value)


def _search(op: SearchOp, shards: list[Shard], keys: KeyMap, memory: Memory) -> list[SearchItem]:
    prefix = tuple(op.namespace_prefix)
    chosen: list[tuple[Shard, Item]] = []
    for shard in shards:
        envelope = unpack(shard.content)
        if envelope is None or envelope.namespace[: len(prefix)] != prefix:
            continue  # not an item of this store (or a label hash collision)
        if passes(envelope.value, op.filter):
            chosen.append((shard, _item(shard, envelope.namespace, envelope.key, envelope.value)))
    page = chosen[op.offset : op.offset + op.limit]
    for shard, _ in page:
        # Seen, not recorded: it guards a later put of this item, nothing else.
        memory.seen.setdefault(shard.key, shard.version)
    return [
        SearchItem(
            namespace=item.namespace,
            key=item.key,
            value=item.value,
            created_at=item.created_at,
            updated_at=item.updated_at,
        )
        for _, item in page
    ]


def _list_namespaces(
    op: ListNamespacesOp, keys: KeyMap
) -> Generator[Step, Any, list[tuple[str, ...]]]:
    conditions = op.match_conditions or ()
    literal: list[str] = []
    for condition in conditions:
        if condition.match_type == "prefix":
            for label in condition.path:
                if label == "*":
                    break
                literal.append(label)
            break
    listed: list[str] = yield ListKeys(keys.namespace_prefix(literal))
    namespaces: set[tuple[str, ...]] = set()
    hashed: dict[tuple[str, ...], str] = {}  # namespace segments -> one of its keys
    for shard_key in listed:
        located = keys.locate(shard_key)
        if located is None:
            continue
        if located.namespace is not None:
            namespaces.add(located.namespace)
        else:
            hashed.setdefault(located.namespace_segments, shard_key)
    if hashed:
        # A hashed label: only an envelope knows it (read unrecorded, one per namespace).
        found = yield from _read_many(list(hashed.values()), record=False)
        for shard in found.values():
            envelope = unpack(shard.content)
            if envelope is not None:
                namespaces.add(envelope.namespace)
    selected = [ns for ns in namespaces if all(namespace_matches(c, ns) for c in conditions)]
    if op.max_depth is not None:
        selected = list({ns[: op.max_depth] for ns in selected})
    return sorted(selected)[op.offset : op.offset + op.limit]


def _write(puts: dict[str, PutOp], memory: Memory) -> Generator[Step, Any, None]:
    writes: list[tuple[str, str, int]] = []
    creates: list[tuple[str, str]] = []
    deletes: list[tuple[str, int]] = []
    for key, op in puts.items():
        seen = memory.seen[key]
        if op.value is None:
            if isinstance(seen, int):
                deletes.append((key, seen))
            # Deleting what the session saw absent changes nothing (as in InMemoryStore).
            continue
        content = pack(op.namespace, op.key, op.value)
        if isinstance(seen, int):
            writes.append((key, content, seen))
        else:
            creates.append((key, content))
    if not (writes or creates or deletes):
        return
    done: dict[str, Committed] = yield CommitMany(tuple(writes), tuple(creates), tuple(deletes))
    for key, _, _ in writes:
        memory.seen[key] = done[key].version
    for key, _ in creates:
        memory.seen[key] = done[key].version
    for key, _ in deletes:
        memory.seen[key] = ABSENT
