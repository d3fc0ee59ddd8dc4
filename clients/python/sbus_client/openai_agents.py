"""Conversation memory for the OpenAI Agents SDK on the bus (docs/integrations/openai-agents.md).

``SBusSession`` satisfies the SDK's ``agents.memory.Session`` protocol, so a ``Runner``
keeps its conversation on the bus: ``Runner.run(agent, text, session=SBusSession(conv,
bus))``. Any number of processes may hold a session object on one conversation; every
change is an atomic ``/commit/multi`` conditioned on the conversation's head, so
concurrent writers lose nothing and each writer's items stay in its own order.

Layout, under ``<prefix>/<conversation>/``: ``head`` holds ``{"start": s, "end": e}``
(and the real conversation id), ``items/<n>`` one item each (its JSON) for ``s <= n <
e``. An append creates ``items/e..`` and moves ``end`` in one step, so it rewrites
nothing and a conversation can grow past SBUS_MAX_DELTA (only one item must fit);
``pop_item`` deletes the last item and moves ``end`` back; ``clear_session`` moves
``start`` up to ``end`` and deletes the items. Every change also writes the head, so its
version orders all of them: a change prepared against an older head is refused
(VersionMismatch, or ShardAlreadyExists for a racing first append) and redone on the
new head after a full-jitter backoff.

Needs the ``openai-agents`` extra: ``pip install 'sbus-client[openai-agents]'``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sbus_client._extras import needs_extra

with needs_extra("openai-agents", "sbus_client.openai_agents"):
    from agents.items import TResponseInputItem
    from agents.memory import SessionSettings
    from agents.memory.session_settings import resolve_session_limit

from sbus_client._async import AsyncBus, AsyncSession
from sbus_client._codes import (
    CrossShardStale,
    SessionExpired,
    ShardAlreadyExists,
    ShardDeleted,
    ShardNotFound,
)
from sbus_client._core import Create, Delete, Write
from sbus_client._errors import ConflictError, RetriesExhausted
from sbus_client._models import Shard
from sbus_client._retry import Backoff
from sbus_client._wire import dumps, identifier_problem

__all__ = ["SBusSession"]

# The bus's defaults for SBUS_MAX_TXN_KEYS, SBUS_MAX_BODY and SBUS_MAX_READ_KEYS.
DEFAULT_MAX_TXN_KEYS = 128
DEFAULT_MAX_BODY = 1_048_576
DEFAULT_MAX_READ_KEYS = 256
# Room in a request body for what surrounds the entries (braces, rationale, ...).
BODY_MARGIN = 1024
# A conversation id longer than this (once escaped) is replaced by its SHA-256 in the
# keys, so that the longest item key stays within the 256 characters of a shard key.
MAX_ENCODED_ID = 128
MAX_KEY_LENGTH = 256  # of a shard key (docs/protocol.md section 1.2)
_PLAIN = re.compile(r"[A-Za-z0-9._-]")
_PREFIX = re.compile(r"[A-Za-z0-9._:@-]+(/[A-Za-z0-9._:@-]+)*")
# The errors that mean "another writer changed the conversation since the head was
# read": redo the change on the new head. (A head or item that vanished without a head
# change cannot happen through this class; it is retried too, within the budget.)
RETRIED = (ConflictError, ShardAlreadyExists, ShardDeleted, ShardNotFound)


def conversation_segment(session_id: str) -> str:
    """The key segment of a conversation id: reversible and collision-free.

    Characters other than ``A-Z a-z 0-9 . _ -`` become ``@XX`` per UTF-8 byte (``@``
    itself included), and an id of dots only has its dots escaped (``.`` and ``..``
    are not key segments). An escaped id over :data:`MAX_ENCODED_ID` characters becomes
    ``sha256:<hex>`` (``:`` never survives escaping, so the two forms cannot meet); the
    head keeps the real id, which every read checks."""
    if not session_id:
        raise ValueError("session_id must not be empty")
    if set(session_id) == {"."}:
        return "@2E" * len(session_id)
    out = []
    for char in session_id:
        if _PLAIN.fullmatch(char):
            out.append(char)
        else:
            out.extend(f"@{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    encoded = "".join(out)
    if len(encoded) > MAX_ENCODED_ID:
        digest = hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()
        return f"sha256:{digest}"
    return encoded


@dataclass(frozen=True)
class Head:
    """The conversation's bounds as read: live items are ``start <= n < end``;
    ``shard`` is None when the conversation has never been written."""

    start: int
    end: int
    shard: Shard | None


class SBusSession:
    """An ``agents.memory.Session`` whose items live on the bus.

    ``session_id`` is the conversation id (any non-empty string); ``bus`` an
    :class:`~sbus_client.AsyncBus` (its agent writes unless ``agent_id`` is given; a
    bus in token mode needs read, write, create and delete rights on ``<prefix>/``).
    ``prefix`` is the key folder of all conversations. ``session_settings`` as in the
    SDK (``limit``: the default of :meth:`get_items`). ``max_txn_keys`` and ``max_body``
    must not exceed the bus's SBUS_MAX_TXN_KEYS and SBUS_MAX_BODY: an ``add_items``
    larger than one multi-commit allows is split into consecutive ones (each atomic, in
    order; another writer's items may fall between them). ``max_elapsed`` bounds each
    operation's conflict retries in seconds (then RetriesExhausted).

    The bus session that carries the requests is internal (a fresh id per object);
    reads are unrecorded, every write names the head version it was prepared on, and
    the DeliveryLog entries of its own writes never refuse one (:meth:`_commit`).
    """

    def __init__(
        self,
        session_id: str,
        bus: AsyncBus,
        *,
        prefix: str = "oai",
        agent_id: str | None = None,
        session_settings: SessionSettings | None = None,
        max_txn_keys: int = DEFAULT_MAX_TXN_KEYS,
        max_body: int = DEFAULT_MAX_BODY,
        max_read_keys: int = DEFAULT_MAX_READ_KEYS,
        max_elapsed: float = 60.0,
    ) -> None:
        if not _PREFIX.fullmatch(prefix) or any(p in (".", "..") for p in prefix.split("/")):
            raise ValueError(f"prefix must be a valid shard key path: {prefix!r}")
        if max_txn_keys < 2 or max_read_keys < 2 or max_body < 2 * BODY_MARGIN:
            raise ValueError("max_txn_keys and max_read_keys must be >= 2, max_body >= 2048")
        problem = None if agent_id is None else identifier_problem(agent_id)
        if problem:  # it travels in a header: refused now, not by every write later
            raise ValueError(f"agent_id {agent_id!r} {problem}")
        self.session_id = session_id
        self.session_settings: SessionSettings | None = (
            session_settings if session_settings is not None else SessionSettings()
        )
        self.bus = bus
        self.prefix = prefix
        self.max_txn_keys = max_txn_keys
        self.max_body = max_body
        self.max_read_keys = max_read_keys
        self.max_elapsed = max_elapsed
        # Refused writes redone so far (observability: how contended the conversation is).
        self.conflicts = 0
        self._root = f"{prefix}/{conversation_segment(session_id)}"
        self._head_key = f"{self._root}/head"
        if len(self.item_key(2**53)) > MAX_KEY_LENGTH:
            raise ValueError(
                f"prefix {prefix!r} is too long: this conversation's item keys would pass "
                f"{MAX_KEY_LENGTH} characters"
            )
        self._bus_session: AsyncSession = bus.session(agent_id)

    def item_key(self, index: int) -> str:
        """The shard key of the item at position ``index`` of the conversation."""
        return f"{self._root}/items/{index}"

    @property
    def head_key(self) -> str:
        return self._head_key

    # -- the protocol ---------------------------------------------------------------

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The conversation in order; with a positive ``limit`` its latest ``limit``
        items (``0``: none; a negative one: all, as the SDK's SQLiteSession). ``None``
        means ``session_settings.limit``."""
        wanted = resolve_session_limit(limit, self.session_settings)
        if wanted == 0:
            return []
        budget = self._budget()
        while True:
            head = await self._read_head()
            first = (
                head.start if wanted is None or wanted < 0 else max(head.start, head.end - wanted)
            )
            shards = await self._read_items(range(first, head.end))
            again = await self._read_head()
            if again.shard == head.shard:
                return [item for item in (decode(s) for s in shards) if item is not None]
            await self._conflict(budget, None, count=False)  # changed while reading

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append ``items`` in order, atomically per multi-commit (see the class)."""
        if not items:
            return
        contents = [json.dumps(item) for item in items]
        for chunk in self._chunks(contents):
            await self._append(chunk)

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove the latest item and return it; None when the conversation is empty.
        An item that is not valid JSON is removed and skipped, as SQLiteSession does."""
        budget = self._budget()
        while True:
            head = await self._read_head()
            if head.shard is None or head.end <= head.start:
                return None
            key = self.item_key(head.end - 1)
            try:
                item = await self._bus_session.read(key, record=False)
                await self._commit(
                    [self._head_write(head, head.start, head.end - 1)],
                    deletes=[(key, item)],
                    rationale="pop_item",
                )
            except RETRIED as err:
                await self._conflict(budget, err)
                continue
            decoded = decode(item)
            if decoded is not None:
                return decoded  # type: ignore[no-any-return] # the JSON add_items stored

    async def clear_session(self) -> None:
        """Empty the conversation in one atomic step (``start`` moves to ``end``), which
        also deletes the items when they fit in it; larger ones are deleted in further
        multi-commits (they are no longer part of the conversation by then)."""
        budget = self._budget()
        while True:
            head = await self._read_head()
            if head.shard is None or head.end <= head.start:
                return
            shards = await self._read_items(range(head.start, head.end))
            deletes: list[Delete] = [(s.key, s) for s in shards]
            now = deletes[: self.max_txn_keys - 1]
            try:
                await self._commit(
                    [self._head_write(head, head.end, head.end)],
                    deletes=now,
                    rationale="clear_session",
                )
            except RETRIED as err:
                await self._conflict(budget, err)
                continue
            break
        # Only this writer knows the range it cut off, so nothing contends for these.
        rest = deletes[len(now) :]
        for at in range(0, len(rest), self.max_txn_keys):
            await self._commit(deletes=rest[at : at + self.max_txn_keys], rationale="clear_session")

    # -- the steps ------------------------------------------------------------------

    async def _append(self, contents: Sequence[str]) -> None:
        budget = self._budget()
        while True:
            head = await self._read_head()
            creates: list[Create] = [
                (self.item_key(head.end + i), content) for i, content in enumerate(contents)
            ]
            writes: list[Write] = []
            new_head = self._head_content(head.start, head.end + len(contents))
            if head.shard is None:
                creates.append((self._head_key, new_head))
            else:
                writes.append((self._head_key, new_head, head.shard))
            try:
                await self._commit(writes, creates=creates, rationale="add_items")
            except RETRIED as err:
                await self._conflict(budget, err)
                continue
            return

    async def _commit(
        self,
        writes: Sequence[Write] = (),
        *,
        creates: Sequence[Create] = (),
        deletes: Sequence[Delete] = (),
        rationale: str,
    ) -> None:
        """One multi-commit in the internal bus session. The bus records every write in
        the committer's DeliveryLog and checks those entries at its later commits
        (docs/protocol.md 1.6); this class decides on the head's version alone, so an
        entry gone stale (another writer popped an item this object wrote) or expired
        (this object sat idle past SBUS_SESSION_TTL) must not refuse a write: empty the
        bus session and send the same commit again (nothing of the refused one landed)."""
        try:
            await self._bus_session.commit_many(
                writes, creates=creates, deletes=deletes, rationale=rationale
            )
        except (CrossShardStale, SessionExpired):
            await self._bus_session.reset()
            await self._bus_session.commit_many(
                writes, creates=creates, deletes=deletes, rationale=rationale
            )

    async def _read_head(self) -> Head:
        found = await self._bus_session.read_many([self._head_key], record=False, missing_ok=True)
        shard = found.get(self._head_key)
        if shard is None:
            return Head(0, 0, None)
        try:
            body = json.loads(shard.content)
            start, end, owner = int(body["start"]), int(body["end"]), body["session_id"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self._head_key} is not a conversation head") from exc
        if owner != self.session_id:
            raise ValueError(
                f"{self._head_key} belongs to conversation {owner!r}, not {self.session_id!r}"
            )
        return Head(start, end, shard)

    async def _read_items(self, indexes: range) -> list[Shard]:
        """The items at ``indexes`` in order (unrecorded; in requests of at most
        ``max_read_keys``). One missing (removed meanwhile) is left out: the caller's
        head check notices the change."""
        keys = [self.item_key(i) for i in indexes]
        shards: list[Shard] = []
        for at in range(0, len(keys), self.max_read_keys):
            part = keys[at : at + self.max_read_keys]
            found = await self._bus_session.read_many(part, record=False, missing_ok=True)
            shards.extend(found[k] for k in part if k in found)
        return shards

    def _head_content(self, start: int, end: int) -> str:
        return json.dumps({"session_id": self.session_id, "start": start, "end": end})

    def _head_write(self, head: Head, start: int, end: int) -> Write:
        assert head.shard is not None
        return (self._head_key, self._head_content(start, end), head.shard)

    def _chunks(self, contents: list[str]) -> list[list[str]]:
        """Split an append so that each multi-commit stays within ``max_txn_keys``
        entries (the head is one) and ``max_body`` bytes."""
        chunks: list[list[str]] = [[]]
        size = BODY_MARGIN
        for content in contents:
            # The entry as sent, with the longest key this conversation could need.
            cost = len(dumps({"key": self.item_key(2**53), "create": True, "delta": content})) + 1
            current = chunks[-1]
            if current and (len(current) + 1 >= self.max_txn_keys or size + cost > self.max_body):
                chunks.append([])
                size = BODY_MARGIN
            chunks[-1].append(content)
            size += cost
        return chunks

    def _budget(self) -> Backoff:
        budget = Backoff(0.01, 1.0, None, self.max_elapsed)
        budget.start()
        return budget

    async def _conflict(
        self, budget: Backoff, err: Exception | None, *, count: bool = True
    ) -> None:
        """Count a conflict (a refused write) and wait its full-jitter backoff;
        RetriesExhausted when the budget is spent."""
        if count:
            self.conflicts += 1
        wait = budget.delay()
        if wait is None:
            raise RetriesExhausted(budget.attempts, err)
        if wait > 0:
            await asyncio.sleep(wait)

    def __repr__(self) -> str:
        return f"SBusSession({self.session_id!r}, head={self._head_key!r})"


def decode(shard: Shard) -> Any:
    """An item's JSON; None for content that is not JSON (skipped, as SQLiteSession
    skips such rows)."""
    try:
        return json.loads(shard.content)
    except ValueError:
        return None
