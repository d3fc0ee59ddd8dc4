"""``SBusStore``: LangGraph's ``BaseStore`` over the bus, with versions instead of upserts.

Who is writing. Every batch speaks for one agent in one session, the bus's unit of read
tracking (docs/protocol.md 1.5): a view from :meth:`SBusStore.bind` has a fixed agent
and session; the store itself takes them from the graph node it runs in (agent: the node
name; session: thread id, checkpoint namespace and attempt). This is why the store is a
plain ``BaseStore`` and not LangGraph's ``AsyncBatchedBaseStore``, which would merge the
operations of concurrent nodes, i.e. of different agents, into one batch.

Conflicts. When the bus refuses a batch's commit (a version moved, an item read in the
session moved, the session expired, or another writer created the item first), the
store moves the identity to a fresh session (``<session>.<n>``, nothing seen), and
raises the SDK's ``ConflictError``. It never retries by itself: only the caller can redo
the read-decide-write, and LangGraph's ``RetryPolicy`` does exactly that by re-running
the node (its default ``retry_on`` retries a ConflictError).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from langgraph.config import get_config
from langgraph.runtime import get_runtime
from langgraph.store.base import BaseStore, Op, Result

from sbus_client._async import AsyncBus, AsyncSession
from sbus_client._codes import ShardAlreadyExists, ShardDeleted, ShardNotFound
from sbus_client._errors import ConflictError, SBusError
from sbus_client._sync import Bus, Session
from sbus_client._wire import identifier_problem
from sbus_client.langgraph._keys import KeyMap
from sbus_client.langgraph._plan import (
    Batch,
    BlindWrites,
    CommitMany,
    ListKeys,
    Memory,
    ReadMany,
    Scan,
    Step,
    run_batch,
)

# Graph identities are made per node run; keep the memories of this many (the oldest
# run's is forgotten first, long after its node has finished).
MAX_GRAPH_SESSIONS = 1024
# Room kept in a bound session id for the ".<n>" a conflict appends (up to .9999999).
SUFFIX_ROOM = 8
# An identifier derived from a graph travels in a header: printable ASCII, bounded.
_PLAIN_ID = re.compile(r"[\x21-\x7e]{1,200}")


def _identifier(text: str) -> str:
    if _PLAIN_ID.fullmatch(text):
        return text
    return "h-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def _as_conflict(err: SBusError) -> ConflictError | None:
    """A refused commit that re-reading can fix. Besides the SDK's conflicts: another
    writer created an item this session saw absent, or deleted one it saw present."""
    if isinstance(err, ConflictError):
        return err
    if isinstance(err, ShardAlreadyExists | ShardNotFound | ShardDeleted):
        return ConflictError(err.detail, status=err.status, problem=err.problem)
    return None


def _outside_graph() -> RuntimeError:
    return RuntimeError(
        "SBusStore is used outside a LangGraph node, so it has no agent and session to "
        "speak for: use store.bind(agent_id, session_id) and call the view instead"
    )


def _graph_identity() -> tuple[str, str]:
    """(agent, session) of the node running now: agent = node name, session = thread
    id + checkpoint namespace (unique per task) + attempt (a fresh session per retry)."""
    try:
        config = get_config()
    except RuntimeError:
        raise _outside_graph() from None
    node = (config.get("metadata") or {}).get("langgraph_node")
    configurable = config.get("configurable") or {}
    if not isinstance(node, str) or not node:
        raise _outside_graph()
    thread = configurable.get("thread_id")
    namespace = configurable.get("checkpoint_ns") or ""
    attempt = 1
    runtime = get_runtime()
    info = getattr(runtime, "execution_info", None) if runtime is not None else None
    if info is not None:
        attempt = info.node_attempt
    session = f"{thread if thread is not None else '-'}|{namespace}|{attempt}"
    return _identifier(node), _identifier(session)


class _Memories:
    """The memories of graph identities, shared by the store and nothing else."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_identity: OrderedDict[tuple[str | None, str], Memory] = OrderedDict()

    def get(self, agent: str | None, session: str) -> Memory:
        with self._lock:
            memory = self._by_identity.get((agent, session))
            if memory is None:
                memory = self._by_identity[(agent, session)] = Memory(agent, session)
                while len(self._by_identity) > MAX_GRAPH_SESSIONS:
                    self._by_identity.popitem(last=False)
            else:
                self._by_identity.move_to_end((agent, session))
            return memory


class SBusStore(BaseStore):
    """A LangGraph store whose items are bus shards (docs/integrations/langgraph.md).

    ``bus`` serves ``batch`` (and the sync methods), ``abus`` serves ``abatch`` (the
    async ones); pass the one(s) your graph uses. ``prefix`` is the key prefix of every
    item. ``blind_writes`` says what a put or delete of an item the session never read
    does: ``"read_first"`` reads it (recorded) and writes on that version, creating it
    when absent; ``"reject"`` raises ValueError.
    """

    supports_ttl = False

    def __init__(
        self,
        bus: Bus | None = None,
        *,
        abus: AsyncBus | None = None,
        prefix: str = "lg",
        blind_writes: BlindWrites = "read_first",
    ) -> None:
        if bus is None and abus is None:
            raise ValueError("SBusStore needs a Bus (bus=) or an AsyncBus (abus=), or both")
        if blind_writes not in ("read_first", "reject"):
            raise ValueError(f"blind_writes must be 'read_first' or 'reject': {blind_writes!r}")
        self.bus = bus
        self.abus = abus
        self.prefix = prefix
        self.blind_writes: BlindWrites = blind_writes
        self._keys = KeyMap(prefix)
        self._graph = _Memories()
        self._bound: Memory | None = None

    def bind(self, agent_id: str, session_id: str | None = None) -> SBusStore:
        """A view of this store that always speaks for ``agent_id``, starting in session
        ``session_id`` (a fresh random one if None). After a conflict the view moves to
        ``<session_id>.<n>``; :attr:`session_id` is the current one."""
        if not isinstance(agent_id, str) or not agent_id:
            raise ValueError("bind() needs a non-empty agent_id")
        # Both travel in headers; checked here, or a bad one fails every call (and a
        # session with no room for the ".<n>" suffix fails every call after a conflict).
        for name, value, room in (
            ("agent_id", agent_id, 0),
            ("session_id", session_id, SUFFIX_ROOM),
        ):
            problem = None if value is None else identifier_problem(value, room=room)
            if problem:
                raise ValueError(f"bind(): {name} {value!r} {problem}")
        view = SBusStore(
            self.bus, abus=self.abus, prefix=self.prefix, blind_writes=self.blind_writes
        )
        view._graph = self._graph
        view._bound = Memory(agent_id, session_id if session_id is not None else uuid.uuid4().hex)
        return view

    @property
    def agent_id(self) -> str | None:
        """The view's agent; None for the unbound store (it takes the node's)."""
        return self._bound.agent if self._bound is not None else None

    @property
    def session_id(self) -> str | None:
        """The view's current session; None for the unbound store."""
        return self._bound.session_id if self._bound is not None else None

    def _memory(self, token: bool) -> Memory:
        if self._bound is not None:
            return self._bound
        node, session = _graph_identity()
        # A token names one agent, and naming any other is refused (AgentMismatch): with a
        # token every node speaks as its subject, each node run still in its own session
        # (which is what keeps one branch's reads from being refreshed by another's writes).
        return self._graph.get(None if token else node, session)

    def _plan(self, ops: Iterable[Op], memory: Memory) -> Batch:
        return run_batch(ops, self._keys, memory, self.blind_writes)

    # -- sync ----------------------------------------------------------------------

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        if self.bus is None:
            raise RuntimeError("this SBusStore has no Bus: pass bus= (or use the async API)")
        memory = self._memory(self.bus.has_token)
        session = self.bus.session(memory.agent, memory.session_id, keep=True)
        plan = self._plan(ops, memory)
        answer: Any = None
        while True:
            try:
                step = plan.send(answer)
            except StopIteration as done:
                results: list[Result] = done.value
                return results
            answer = self._run(step, session, memory)

    def _run(self, step: Step, session: Session, memory: Memory) -> Any:
        if isinstance(step, ReadMany):
            return session.read_many(step.keys, record=step.record, missing_ok=True)
        if isinstance(step, Scan):
            return session.scan(step.prefix)
        if isinstance(step, ListKeys):
            return session.list(step.prefix)
        assert isinstance(step, CommitMany)
        try:
            return session.commit_many(step.writes, creates=step.creates, deletes=step.deletes)
        except SBusError as err:
            conflict = _as_conflict(err)
            if conflict is None:
                raise
            memory.next_session()
            # Free what the abandoned session holds on the bus; if that fails it
            # expires by TTL, and the conflict is what the caller must hear about.
            with contextlib.suppress(SBusError):
                session.reset()
            if conflict is err:
                raise
            raise conflict from err

    # -- async ---------------------------------------------------------------------

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        if self.abus is None:
            raise RuntimeError("this SBusStore has no AsyncBus: pass abus= (or use the sync API)")
        memory = self._memory(self.abus.has_token)
        session = self.abus.session(memory.agent, memory.session_id, keep=True)
        plan = self._plan(ops, memory)
        answer: Any = None
        while True:
            try:
                step = plan.send(answer)
            except StopIteration as done:
                results: list[Result] = done.value
                return results
            answer = await self._arun(step, session, memory)

    async def _arun(self, step: Step, session: AsyncSession, memory: Memory) -> Any:
        if isinstance(step, ReadMany):
            return await session.read_many(step.keys, record=step.record, missing_ok=True)
        if isinstance(step, Scan):
            return await session.scan(step.prefix)
        if isinstance(step, ListKeys):
            return await session.list(step.prefix)
        assert isinstance(step, CommitMany)
        try:
            return await session.commit_many(
                step.writes, creates=step.creates, deletes=step.deletes
            )
        except SBusError as err:
            conflict = _as_conflict(err)
            if conflict is None:
                raise
            memory.next_session()
            with contextlib.suppress(SBusError):
                await session.reset()
            if conflict is err:
                raise
            raise conflict from err
