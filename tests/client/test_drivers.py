"""The thin drivers over httpx's MockTransport: the version is asked once per Bus even
from many threads or tasks, an incompatible server warns once, the sleeps the core asks
for are taken, and a Session resets on exit without hiding the task's own error."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import warnings
from typing import Any

import httpx
import pytest

from sbus_client import (
    AsyncBus,
    Bus,
    CompatibilityWarning,
    ShardNotFound,
    StoreUnavailable,
    TransportRetry,
)
from tests.client.fake import committed_response, problem, shard_response

URL = "http://bus.test"


class FakeBus:
    """Answers GET /version with ``api``, reads of ``k`` with a shard, POST /session with
    ``session_status``, and counts every request by (method, path)."""

    def __init__(self, api: int | None = 1, session_status: int = 200) -> None:
        self.api = api
        self.session_status = session_status
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.fail_commits = 0
        self.retry_after = "1"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.seen.append((request.method, request.url.path))
        path = request.url.path
        if path == "/version":
            if self.api is None:
                return problem(404, "NotFound")
            return httpx.Response(200, json={"name": "sbus", "version": "9.9.9", "api": self.api})
        if path == "/session":
            if self.session_status != 200:
                return problem(self.session_status, "StoreUnavailable", outcome="not_applied")
            return httpx.Response(200, json={"agent_id": "a", "status": "created"})
        if path == "/shard/k":
            return shard_response("k", 3, "x")
        if path == "/commit/v2":
            if self.fail_commits:
                self.fail_commits -= 1
                return problem(
                    503, "StoreUnavailable", {"Retry-After": self.retry_after}, outcome="unknown"
                )
            return committed_response(json.loads(request.content)["expected_version"] + 1)
        return problem(404, "ShardNotFound", key=path.removeprefix("/shard/"))

    def count(self, path: str) -> int:
        return sum(1 for _, p in self.seen if p == path)


def sync_bus(fake: FakeBus, **options: Any) -> Bus:
    http = httpx.Client(transport=httpx.MockTransport(fake))
    return Bus(URL, agent_id="a", http_client=http, **options)


def async_bus(fake: FakeBus, **options: Any) -> AsyncBus:
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    return AsyncBus(URL, agent_id="a", http_client=http, **options)


def test_version_is_asked_once_from_many_threads() -> None:
    fake = FakeBus()
    bus = sync_bus(fake)
    barrier = threading.Barrier(8)

    def read() -> None:
        barrier.wait()
        with bus.session(keep=True) as s:
            s.read("k")

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (fake.count("/version"), fake.count("/shard/k")) == (1, 8)
    assert fake.seen[0] == ("GET", "/version")


async def test_version_is_asked_once_from_many_tasks() -> None:
    fake = FakeBus()
    bus = async_bus(fake)

    async def read() -> None:
        async with bus.session(keep=True) as s:
            await s.read("k")

    await asyncio.gather(*(read() for _ in range(8)))
    assert (fake.count("/version"), fake.count("/shard/k")) == (1, 8)
    version = await bus.server_version()
    assert version is not None and (version.version, version.api) == ("9.9.9", 1)


def test_incompatible_server_warns_once() -> None:
    bus = sync_bus(FakeBus(api=2))
    with (
        pytest.warns(CompatibilityWarning, match="speaks HTTP API 2") as caught,
        bus.session(keep=True) as s,
    ):
        s.read("k")
        s.read("k")
    assert len([w for w in caught if w.category is CompatibilityWarning]) == 1


def test_older_server_without_version_is_not_checked() -> None:
    fake = FakeBus(api=None)
    bus = sync_bus(fake)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bus.server_version() is None
        with bus.session(keep=True) as s:
            assert s.read("k").version == 3
    assert fake.count("/version") == 1


def test_sync_driver_takes_the_waits_and_resends(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("sbus_client._sync.time.sleep", slept.append)
    fake = FakeBus()
    fake.fail_commits = 2
    bus = sync_bus(fake, retry=TransportRetry(base=0.25))
    with bus.session(keep=True) as s:
        assert s.commit("k", "y", expected=3).version == 4
    assert fake.count("/commit/v2") == 3
    assert slept == [1.0, 1.0]  # Retry-After is the floor; the backoff (<= 0.5 s) is less


async def test_async_driver_gives_up_after_its_budget() -> None:
    fake = FakeBus()
    fake.fail_commits = 5
    fake.retry_after = "0"
    bus = async_bus(fake, retry=TransportRetry(attempts=3, base=0))
    async with bus.session(keep=True) as s:
        with pytest.raises(StoreUnavailable) as err:
            await s.commit("k", "y", expected=3)
    assert (err.value.outcome, fake.count("/commit/v2")) == ("unknown", 3)
    fake.retry_after = "1"
    late = async_bus(fake, retry=TransportRetry(max_elapsed=0.5))
    async with late.session(keep=True) as s:
        with pytest.raises(StoreUnavailable):
            await s.commit("k", "y", expected=3)  # Retry-After past the budget: no wait
    assert fake.count("/commit/v2") == 4


def test_session_resets_on_exit_unless_kept() -> None:
    fake = FakeBus()
    bus = sync_bus(fake)
    with bus.session() as s:
        s.read("k")
    with bus.session(keep=True) as s:
        s.read("k")
    assert fake.count("/session") == 1
    with Bus(URL, http_client=httpx.Client(transport=httpx.MockTransport(fake))).session() as s:
        s.read("k")  # no agent: nothing was recorded, nothing to reset
    assert fake.count("/session") == 1


def test_failed_reset_does_not_hide_the_tasks_error(caplog: pytest.LogCaptureFixture) -> None:
    bus = sync_bus(FakeBus(session_status=503), retry=TransportRetry(attempts=1))
    with pytest.raises(ShardNotFound), bus.session() as s:
        s.read("missing")
    with caplog.at_level(logging.WARNING, logger="sbus_client"), bus.session() as s:
        s.read("k")  # the task went fine: its result stands, the failed reset is logged
    assert f"could not empty session {s.session_id}" in caplog.text


def test_an_interrupted_session_does_not_wait_on_the_bus() -> None:
    """Ctrl-C or a cancelled task: no reset request (it could wait out the whole
    transport budget against a hung bus); the session expires by its TTL."""
    fake = FakeBus()
    with pytest.raises(KeyboardInterrupt), sync_bus(fake).session() as s:
        s.read("k")
        raise KeyboardInterrupt
    assert fake.count("/session") == 0
