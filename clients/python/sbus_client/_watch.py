"""``bus.watch(prefix)``: the change stream (``GET /watch``, protocol.md section 3.11) as
an iterator of :class:`WatchEvent`, for :class:`~sbus_client.Bus` and
:class:`~sbus_client.AsyncBus`.

The iterator resumes by itself: when the connection ends or breaks (a replica restarts,
a proxy times out, the bus cut a slow reader), it reconnects with ``Last-Event-ID`` set
to the last cursor it saw, so no event is lost or repeated. It raises
:class:`WatchReset` when the bus answers ``event: reset`` (the cursor is older than the
bus keeps): what happened meanwhile is unknown, so re-read what you need and watch again
from ``WatchReset.cursor``. An error answer (a bad prefix, a missing right) raises its
:class:`~sbus_client.SBusError` at once; reconnection gives up with the last error after
``TransportRetry.attempts`` failures in a row.

The parsing here does no I/O: :class:`EventParser` turns lines into events, and the sync
and async drivers only connect, read lines and sleep.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from sbus_client._errors import SBusError
from sbus_client._wire import error_of

# Longer than the bus's heartbeat (15 s by default): a connection silent for this long is
# dead, and is replaced.
READ_TIMEOUT_S = 45.0
RECONNECT_DELAY_S = 0.5


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One committed version (``op``: create, commit, rollback, delete) or, with
    ``conflicts=True``, one refused commit (``op == "conflict"``: ``error`` and
    ``stale_keys`` are set, ``version``, ``commit_id`` and ``committed_at`` are None).
    ``cursor`` resumes right after this event (``watch(..., after=cursor)``)."""

    key: str
    op: str
    agent_id: str
    cursor: str
    version: int | None = None
    commit_id: str | None = None
    committed_at: str | None = None
    error: str | None = None
    stale_keys: tuple[str, ...] = ()


class WatchReset(Exception):
    """The bus no longer holds every change after the cursor (``reason``:
    ``cursor_expired``). ``cursor`` is the live edge: watch again from it once you have
    re-read what you need."""

    def __init__(self, reason: str, cursor: str | None) -> None:
        super().__init__(f"the change stream was reset ({reason}); resume from {cursor!r}")
        self.reason = reason
        self.cursor = cursor


class EventParser:
    """Server-Sent Events, line by line: the events with data, and the cursor to resume
    from (the last ``id`` seen, or the ``: subscribed`` cursor before any)."""

    def __init__(self, cursor: str | None) -> None:
        self.cursor = cursor
        self._event: str | None = None
        self._id: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> WatchEvent | None:
        """Take one line (without its end); an event when it completes one. Raises
        WatchReset on a reset event."""
        if line == "":
            return self._dispatch()
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "":
            word, _, rest = value.partition(" ")
            if word == "subscribed" and rest and self.cursor is None:
                self.cursor = rest
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        elif name == "data":
            self._data.append(value)
        return None

    def _dispatch(self) -> WatchEvent | None:
        event, ident, data = self._event, self._id, self._data
        self._event, self._id, self._data = None, None, []
        if ident is not None:
            self.cursor = ident  # an id-only block too: it moves Last-Event-ID
        if not data:
            return None
        body: dict[str, Any] = json.loads("\n".join(data))
        if event == "reset":
            raise WatchReset(str(body.get("reason", "")), ident)
        return WatchEvent(
            key=str(body["key"]),
            op=str(body["op"]),
            agent_id=str(body.get("agent_id", "")),
            cursor=ident or "",
            version=body.get("version"),
            commit_id=body.get("commit_id"),
            committed_at=body.get("committed_at"),
            error=body.get("error"),
            stale_keys=tuple(body.get("stale_keys") or ()),
        )


def request_parts(
    prefix: str, cursor: str | None, conflicts: bool, bearer: str | None
) -> tuple[dict[str, str], dict[str, str]]:
    """The query and headers of one ``GET /watch``."""
    params = {"prefix": prefix}
    if conflicts:
        params["include"] = "conflicts"
    headers = {"Accept": "text/event-stream"}
    if cursor is not None:
        headers["Last-Event-ID"] = cursor
    if bearer is not None:
        headers["Authorization"] = bearer
    return params, headers


TIMEOUT = httpx.Timeout(10.0, read=READ_TIMEOUT_S)


def sync_watch(
    http: httpx.Client,
    base_url: str,
    bearer: Any,
    prefix: str,
    *,
    after: str | None,
    conflicts: bool,
    attempts: int,
    sleep: Any,
) -> Iterator[WatchEvent]:
    parser = EventParser(after)
    failures = 0
    while True:
        params, headers = request_parts(prefix, parser.cursor, conflicts, bearer())
        try:
            with http.stream(
                "GET", base_url + "/watch", params=params, headers=headers, timeout=TIMEOUT
            ) as response:
                if response.status_code != 200:
                    response.read()
                    error = error_of(response)
                    if response.status_code < 500:
                        raise error
                    raise _Retry(error)
                failures = 0
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except (httpx.TransportError, _Retry) as exc:
            failures += 1
            if failures >= attempts:
                raise (exc.error if isinstance(exc, _Retry) else exc) from None
        sleep(RECONNECT_DELAY_S)


async def async_watch(
    http: httpx.AsyncClient,
    base_url: str,
    bearer: Any,
    prefix: str,
    *,
    after: str | None,
    conflicts: bool,
    attempts: int,
    sleep: Any,
) -> AsyncIterator[WatchEvent]:
    parser = EventParser(after)
    failures = 0
    while True:
        params, headers = request_parts(prefix, parser.cursor, conflicts, bearer())
        try:
            async with http.stream(
                "GET", base_url + "/watch", params=params, headers=headers, timeout=TIMEOUT
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    error = error_of(response)
                    if response.status_code < 500:
                        raise error
                    raise _Retry(error)
                failures = 0
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except (httpx.TransportError, _Retry) as exc:
            failures += 1
            if failures >= attempts:
                raise (exc.error if isinstance(exc, _Retry) else exc) from None
        await sleep(RECONNECT_DELAY_S)


class _Retry(Exception):
    """A 5xx answer: reconnect (it counts as a failure)."""

    def __init__(self, error: SBusError) -> None:
        super().__init__(str(error))
        self.error = error
