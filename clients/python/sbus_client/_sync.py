"""The blocking client: :class:`Bus` and :class:`Session` over ``httpx.Client``.

Everything but sending and sleeping is in ``_core``; this module drives its operations.
"""

from __future__ import annotations

import builtins
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import httpx

from sbus_client._core import (
    Core,
    Create,
    Delete,
    Expected,
    Ident,
    MandateArg,
    Token,
    Write,
)
from sbus_client._models import (
    Committed,
    HistoryEntry,
    KeysPage,
    Mandate,
    ServerVersion,
    Shard,
)
from sbus_client._retry import TransportRetry
from sbus_client._trace import with_trace_context
from sbus_client._transactional import OnRetry, Transactional, TxnPolicy
from sbus_client._watch import WatchEvent, sync_watch
from sbus_client._wire import Op, Reply, Sleep, Step

log = logging.getLogger("sbus_client")
T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_URL = "http://127.0.0.1:7000"


def drive(http: httpx.Client, base_url: str, op: Op[T], first: Step | None = None) -> T:
    """Run one operation: send what it yields, sleep when it asks, return its value.
    ``first`` is the op's first step when the caller has already taken it."""
    reply: Reply = None
    step = first
    while True:
        if step is None:
            try:
                step = op.send(reply)
            except StopIteration as done:
                return cast(T, done.value)
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            reply, step = None, None
            continue
        try:
            reply = http.request(
                step.method,
                base_url + step.target,
                headers=with_trace_context(step.headers),
                content=step.body,
            )
        except httpx.TransportError as exc:
            reply = exc
        step = None


class Bus:
    """A handle on one bus. Thread-safe: share one per process.

    ``agent_id`` is the default agent of :meth:`session`; ``token`` a bearer token or a
    callable returning one (called per request, and once more after a 401);
    ``http_client`` replaces the client this Bus would create (its own base URL is not
    used: requests go to ``base_url``); ``retry`` bounds the transport retries.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        agent_id: str | None = None,
        token: Token = None,
        timeout: float = 10.0,
        http_client: httpx.Client | None = None,
        retry: TransportRetry | None = None,
    ) -> None:
        self._core = Core(base_url, agent_id=agent_id, token=token, retry=retry or TransportRetry())
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)
        self._version_lock = threading.Lock()
        self._version_checked = False
        self._server_version: ServerVersion | None = None

    @property
    def base_url(self) -> str:
        return self._core.base_url

    @property
    def agent_id(self) -> str | None:
        return self._core.agent_id

    @property
    def has_token(self) -> bool:
        """Whether requests carry a bearer token (in token mode its subject is the agent)."""
        return self._core.token is not None

    def _run(self, op: Op[T]) -> T:
        # The op runs up to its first request before the version is asked, so what it
        # checks without the server (a missing agent, expected= of another key) fails
        # before any request is sent.
        try:
            first = op.send(None)
        except StopIteration as done:
            return cast(T, done.value)
        self._check_version()
        return drive(self._http, self._core.base_url, op, first)

    def _check_version(self) -> None:
        if self._version_checked:
            return
        with self._version_lock:
            if self._version_checked:
                return
            try:
                self._server_version = drive(self._http, self._core.base_url, self._core.version())
            except httpx.TimeoutException:
                # A server that accepts but does not answer: asking again before every
                # call would add a whole timeout to each. The check only warns; skip it.
                self._version_checked = True
                return
            except httpx.TransportError:
                return  # not reachable yet: the operation itself will say so; ask again later
            self._version_checked = True

    def server_version(self) -> ServerVersion | None:
        """What GET /version reported (asked once per Bus), None if the bus is older."""
        self._check_version()
        return self._server_version

    def watch(
        self, prefix: str, *, after: str | None = None, conflicts: bool = False
    ) -> Iterator[WatchEvent]:
        """The versions committed to keys starting with ``prefix``, as they commit
        (``GET /watch``): from now, or after the cursor ``after`` (an event's
        ``cursor``). Reconnects by itself and resumes where it stopped; raises
        :class:`~sbus_client.WatchReset` when the bus no longer holds what came after
        the cursor. ``conflicts=True`` (admin) adds refused commits (``op ==
        "conflict"``). Iterate in a thread of its own: it blocks until the next event."""
        return sync_watch(
            self._http,
            self._core.base_url,
            self._core._bearer,
            prefix,
            after=after,
            conflicts=conflicts,
            attempts=self._core.retry.attempts,
            sleep=time.sleep,
        )

    def session(
        self, agent_id: str | None = None, session_id: str | None = None, *, keep: bool = False
    ) -> Session:
        """A session for one task; use it in ``with``. A fresh random session id unless
        ``session_id`` is given; on exit its DeliveryLog is emptied unless ``keep``."""
        return Session(
            self, agent_id if agent_id is not None else self._core.agent_id, session_id, keep=keep
        )

    def issue_mandate(
        self,
        holder: str,
        keys: Sequence[str],
        context: Mapping[str, Any] | None = None,
        ttl_s: int = 300,
        *,
        agent_id: str | None = None,
    ) -> Mandate:
        """Let ``holder`` make one commit on ``keys`` for ``context`` (issued as this
        Bus's agent, which needs the mandate right)."""
        ident = Ident(agent_id if agent_id is not None else self._core.agent_id)
        return self._run(self._core.issue_mandate(ident, holder, keys, context, ttl_s))

    def transactional(
        self,
        *,
        max_retries: int = 8,
        max_elapsed: float = 60.0,
        base: float = 0.02,
        cap: float = 2.0,
        on_retry: OnRetry | None = None,
    ) -> Callable[[Callable[Concatenate[Session, P], R]], Transactional[Session, P, R]]:
        """Decorate ``fn(session, *args)`` so that calling it with ``*args`` runs it in a
        fresh session and re-runs it on ConflictError (docs/sdk.md, "Retry loops")."""
        policy = TxnPolicy(max_retries, max_elapsed, base, cap, on_retry)

        def wrap(f: Callable[Concatenate[Session, P], R]) -> Transactional[Session, P, R]:
            return Transactional(self, f, policy, Session)

        return wrap

    def run(
        self, fn: Callable[Concatenate[Session, P], R], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """``fn(session, *args)`` under ``transactional``'s defaults (or ``fn``'s own
        policy when it is already decorated)."""
        if isinstance(fn, Transactional):
            return cast(R, fn.on(self)(*args, **kwargs))  # its policy, this bus
        return Transactional(self, fn, TxnPolicy(), Session)(*args, **kwargs)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session:
    """One task's view of the bus: its own session id, so its reads constrain only its
    own commits. Belongs to one thread; make one per task (``bus.session()``)."""

    def __init__(
        self, bus: Bus, agent_id: str | None, session_id: str | None, *, keep: bool = False
    ) -> None:
        self.bus = bus
        self.agent_id = agent_id
        self.session_id = session_id if session_id is not None else uuid.uuid4().hex
        self.keep = keep
        self._ident = Ident(agent_id, self.session_id)
        self._core = bus._core

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.keep or (self.agent_id is None and self._core.token is None):
            return  # nothing was recorded without an agent
        if exc is not None and not isinstance(exc, Exception):
            return  # interrupted (Ctrl-C, cancelled): do not wait on the bus now
        try:
            self.reset()
        except Exception as failed:  # noqa: BLE001 (best effort, logged)
            # Emptying the session is hygiene: its TTL does it otherwise, and every
            # `with` has its own session id. Raising would hide the block's own error, or,
            # after a block whose commits have landed, make the caller redo them.
            log.warning("could not empty session %s: %s", self.session_id, failed)

    def reset(self) -> None:
        """Empty this session's DeliveryLog (POST /session)."""
        self.bus._run(self._core.reset_session(self._ident))

    def read(self, key: str, *, record: bool = True) -> Shard:
        """The current version; recorded (it will be checked at this session's commits)
        unless ``record=False``, for browsing that must not widen the read set."""
        return self.bus._run(self._core.read(self._ident, key, record))

    def read_many(
        self, keys: Iterable[str], *, record: bool = True, missing_ok: bool = False
    ) -> dict[str, Shard]:
        """Several keys in one request (POST /read), recorded like single reads. A
        missing key raises its LookupError unless ``missing_ok``; then it is absent."""
        return self.bus._run(self._core.read_many(self._ident, keys, record, missing_ok))

    def commit(
        self,
        key: str,
        content: str,
        *,
        expected: Expected,
        mandate: MandateArg = None,
        context: Mapping[str, Any] | None = None,
        rationale: str | None = None,
    ) -> Committed:
        """Write ``content`` if ``key`` is still at ``expected`` (a Shard, Committed or
        version) and nothing else this session read has moved on."""
        return self.bus._run(
            self._core.commit(
                self._ident,
                key,
                content,
                expected,
                mandate=mandate,
                context=context,
                rationale=rationale,
            )
        )

    def create(
        self, key: str, content: str = "", *, goal_tag: str = "", require_mandate: bool = False
    ) -> Shard:
        """A new shard at version 0 (or, over a tombstone, at its version + 1)."""
        return self.bus._run(
            self._core.create(self._ident, key, content, goal_tag, require_mandate)
        )

    def delete(
        self,
        key: str,
        *,
        expected: Expected,
        mandate: MandateArg = None,
        context: Mapping[str, Any] | None = None,
    ) -> int:
        """Delete ``key`` at ``expected``; returns the tombstone's version."""
        return self.bus._run(
            self._core.delete(self._ident, key, expected, mandate=mandate, context=context)
        )

    def commit_many(
        self,
        writes: Iterable[Write] = (),
        *,
        creates: Iterable[Create] = (),
        deletes: Iterable[Delete] = (),
        mandate: MandateArg = None,
        context: Mapping[str, Any] | None = None,
        rationale: str | None = None,
    ) -> dict[str, Committed]:
        """All or nothing, in one atomic step (POST /commit/multi): ``writes`` as
        (key, content, expected), ``creates`` as (key, content), ``deletes`` as (key,
        expected). Returns each key's new version (a delete's is its tombstone)."""
        return self.bus._run(
            self._core.commit_many(
                self._ident,
                writes,
                creates,
                deletes,
                mandate=mandate,
                context=context,
                rationale=rationale,
            )
        )

    def rollback(
        self,
        key: str,
        target_version: int,
        *,
        expected: Expected | None = None,
        mandate: MandateArg = None,
        context: Mapping[str, Any] | None = None,
    ) -> Shard:
        """Commit the content of a retained version as a new version."""
        return self.bus._run(
            self._core.rollback(
                self._ident, key, target_version, expected, mandate=mandate, context=context
            )
        )

    def history(
        self, key: str, *, limit: int | None = None, before: int | None = None
    ) -> list[HistoryEntry]:
        """Retained versions, newest first (unrecorded)."""
        return self.bus._run(self._core.history(self._ident, key, limit, before))

    def list(self, prefix: str = "") -> list[str]:
        """Every live key under ``prefix`` the caller may read (all pages)."""
        return self.bus._run(self._core.list_keys(self._ident, prefix))

    def list_page(
        self, prefix: str = "", *, after: str | None = None, limit: int | None = None
    ) -> KeysPage:
        """One page of live keys under ``prefix`` the caller may read, after ``after``:
        at most ``limit`` (the bus's page size when None). Unrecorded."""
        return self.bus._run(self._core.list_page(self._ident, prefix, after, limit))

    def scan(self, prefix: str = "") -> builtins.list[Shard]:
        """Every live shard under ``prefix`` with its content, unrecorded (all pages)."""
        return self.bus._run(self._core.scan(self._ident, prefix))

    def update(
        self,
        key: str,
        fn: Callable[[Shard], str | None],
        *,
        max_attempts: int | None = None,
        max_elapsed: float = 30.0,
    ) -> Committed | None:
        """Apply the pure merge ``fn`` to the current content and commit, re-reading and
        re-applying on VersionMismatch (only). ``None`` or unchanged content: no commit,
        returns None. Budget spent: RetriesExhausted."""
        return self.bus._run(self._core.update(self._ident, key, fn, max_attempts, max_elapsed))
