"""Histories of bus operations as their clients saw them, and their ndjson form.

One :class:`Op` per request that reads or writes shard state: when it was sent and when
its answer arrived (one monotonic clock, shared by every thread of the test process),
which client ("process") and agent sent it, what it read, what it wrote, and how it
ended. The format is documented in docs/isolation.md and described by
``schemas/history.schema.json``.

- ``reads``: the (key, version) pairs the operation's admission rests on. For a GET,
  the version it returned. For a commit, its effective read set: the DeliveryLog
  entries of its session plus its explicit ``read_set``, without the written keys that
  a guard protects or that a multi-commit creates (a create's guard is that the key is
  not live; an unconditional rollback keeps its read of its own key).
- ``guards``: for each written key, the version the commit expected to replace (its
  ``expected_version`` or ``If-Match``); None for an unconditional rollback and for a
  create.
- ``writes``: the versions an ``ok`` operation installed (empty otherwise: the bus
  assigns versions, so a commit that failed never had any).
- ``result``: ``ok`` (2xx), ``fail`` (an answer that says nothing was applied) or
  ``info`` (no answer, or one that says the outcome is unknown).
- ``ori``: whether ORI validated ``reads`` (with ORI off only the guards are checked).
- ``replay``: an idempotent replay of an earlier answer (it installs nothing).
- ``idempotency_key``: the request's ``Idempotency-Key``. When a retry is answered by a
  replay, an earlier ``info`` attempt with the same agent and key is given the replayed
  writes: the replay proves that attempt installed them (it stays ``info``: its own
  answer never came).
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Result = Literal["ok", "fail", "info"]
OpKind = Literal["get", "create", "commit", "multi", "rollback", "delete"]
WRITE_KINDS = frozenset({"create", "commit", "multi", "rollback", "delete"})


@dataclass
class Op:
    index: int
    process: int
    agent: str | None
    session: str
    op: OpKind
    invoke_ns: int
    complete_ns: int | None = None
    reads: list[tuple[str, int]] = field(default_factory=list)
    guards: list[tuple[str, int | None]] = field(default_factory=list)
    writes: list[tuple[str, int]] = field(default_factory=list)
    result: Result = "info"
    status: int | None = None
    error: str | None = None
    ori: bool = True
    mandate: str | None = None
    replay: bool = False
    idem: str | None = None

    @property
    def ok(self) -> bool:
        return self.result == "ok" and not self.replay

    @property
    def is_write(self) -> bool:
        return self.op in WRITE_KINDS

    def validated_reads(self) -> list[tuple[str, int]]:
        """What the bus checked before admitting this operation: the reads when ORI was
        on (a GET's version is what it read), plus every guard with a known version."""
        reads = list(self.reads) if (self.ori or self.op == "get") else []
        reads.extend((k, v) for k, v in self.guards if v is not None)
        return reads

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "process": self.process,
            "agent": self.agent,
            "session": self.session,
            "op": self.op,
            "invoke_ns": self.invoke_ns,
            "complete_ns": self.complete_ns,
            "reads": [list(p) for p in self.reads],
            "guards": [list(p) for p in self.guards],
            "writes": [list(p) for p in self.writes],
            "result": self.result,
            "status": self.status,
            "error": self.error,
            "ori": self.ori,
            "mandate": self.mandate,
            "replay": self.replay,
            "idempotency_key": self.idem,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Op:
        return cls(
            index=data["index"],
            process=data["process"],
            agent=data["agent"],
            session=data["session"],
            op=data["op"],
            invoke_ns=data["invoke_ns"],
            complete_ns=data["complete_ns"],
            reads=[(k, v) for k, v in data["reads"]],
            guards=[(k, v) for k, v in data["guards"]],
            writes=[(k, v) for k, v in data["writes"]],
            result=data["result"],
            status=data["status"],
            error=data["error"],
            ori=data["ori"],
            mandate=data["mandate"],
            replay=data["replay"],
            idem=data["idempotency_key"],
        )


class History:
    """A thread-safe, append-only list of operations. :meth:`begin` stamps the invoke
    time and index; :meth:`end` the completion. Operations never ended are ``info``."""

    def __init__(self, label: str = "", origin_ns: int | None = None) -> None:
        """``origin_ns`` (a ``time.monotonic_ns()`` reading) lets several histories share
        one time origin; default: now."""
        self.label = label
        self._ops: list[Op] = []
        self._lock = threading.Lock()
        self._origin = time.monotonic_ns() if origin_ns is None else origin_ns

    def now_ns(self) -> int:
        return time.monotonic_ns() - self._origin

    def begin(
        self, process: int, agent: str | None, session: str, op: OpKind, *, ori: bool = True
    ) -> Op:
        with self._lock:
            entry = Op(len(self._ops), process, agent, session, op, self.now_ns(), ori=ori)
            self._ops.append(entry)
        return entry

    def append(self, entry: Op) -> Op:
        """Add an operation built elsewhere (times from :meth:`now_ns`); sets its index."""
        with self._lock:
            entry.index = len(self._ops)
            self._ops.append(entry)
        return entry

    def end(self, entry: Op, result: Result, status: int | None, error: str | None) -> None:
        entry.result = result
        entry.status = status
        entry.error = error
        entry.complete_ns = self.now_ns()

    def resolve_retry(self, replay: Op) -> None:
        """A replay proves that the earlier attempt with its agent and idempotency key,
        if that attempt's outcome is unknown, installed the replayed writes."""
        if replay.idem is None:
            return
        with self._lock:
            for op in self._ops:
                if (
                    op is not replay
                    and op.result == "info"
                    and not op.writes
                    and (op.agent, op.idem) == (replay.agent, replay.idem)
                ):
                    op.writes = list(replay.writes)
                    return

    @property
    def ops(self) -> list[Op]:
        with self._lock:
            return list(self._ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def dumps(self) -> str:
        return dumps(self.ops)

    def dump(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.dumps())


def installed(op: Op, answer: dict[str, Any], etag: str | None) -> list[tuple[str, int]]:
    """The versions a 2xx answer to ``op`` (its guards set) says were installed: a
    commit's ``new_version``, a multi commit's ``results``, a 204 delete's ``ETag``, the
    shard a create or rollback answers."""
    key = op.guards[0][0] if op.guards else ""
    if op.op == "multi":
        return [(r["key"], r["new_version"]) for r in answer.get("results", [])]
    if op.op == "commit":
        return [(key, answer["new_version"])]
    if op.op == "delete":
        tag = (etag or "").strip('"')
        return [(key, int(tag))] if tag.isdigit() else []
    if "version" not in answer:
        return []
    return [(key, answer["version"])]


def dumps(ops: Iterable[Op]) -> str:
    out = io.StringIO()
    for op in ops:
        out.write(json.dumps(op.to_json(), separators=(",", ":"), ensure_ascii=False))
        out.write("\n")
    return out.getvalue()


def loads(text: str) -> list[Op]:
    return [Op.from_json(json.loads(line)) for line in text.splitlines() if line.strip()]


def load(path: Path) -> list[Op]:
    return loads(path.read_text())
