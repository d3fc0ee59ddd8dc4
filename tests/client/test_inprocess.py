"""The SDK behaviour class against the server app in process, plus what only an
in-process bus can show cheaply: a response lost after the commit landed."""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator

import httpx
import pytest

from sbus_client import (
    AsyncBus,
    Bus,
    BusUnreachable,
    CapabilityDenied,
    CompatibilityWarning,
    TransportRetry,
    Unauthorized,
)
from sbus_client.testing import AsyncLocalBus, LocalBus
from tests.api.auth_helpers import SECRET, token
from tests.client.behaviour import BusFactory, SDKBehaviour

URL = "http://127.0.0.1:7000"


class TestSDKInProcess(SDKBehaviour):
    pass


class LosesFirstResponses(httpx.AsyncBaseTransport):
    """Forwards every request; for the first ``lose`` POSTs, the bus's answer is
    thrown away and the client sees a dropped connection instead."""

    def __init__(self, inner: httpx.AsyncBaseTransport, lose: int) -> None:
        self.inner = inner
        self.lose = lose
        self.seen: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "POST" and request.url.path.startswith("/commit"):
            self.seen.append(request)
            if self.lose > 0:
                self.lose -= 1
                await response.aread()
                raise httpx.RemoteProtocolError("connection dropped before the response")
        return response


@pytest.fixture
async def asgi() -> AsyncIterator[httpx.AsyncBaseTransport]:
    async with AsyncLocalBus() as local:
        yield local.http._transport


async def test_lost_response_is_replayed_exactly_once(asgi: httpx.AsyncBaseTransport) -> None:
    lossy = LosesFirstResponses(asgi, lose=2)
    async with httpx.AsyncClient(transport=lossy) as http:
        bus = AsyncBus(URL, agent_id="a", http_client=http, retry=TransportRetry(base=0.001))
        async with bus.session() as s:
            await s.create("k", "v0")
            done = await s.commit("k", "v1", expected=0)
            assert (done.version, done.replayed) == (1, True)
            assert len(lossy.seen) == 3
            keys = {r.headers["idempotency-key"] for r in lossy.seen}
            assert len(keys) == 1  # one request, sent three times
            assert len({r.content for r in lossy.seen}) == 1
            assert [h.version for h in await s.history("k")] == [1, 0]  # moved once


async def test_transport_budget_spent_raises_bus_unreachable(
    asgi: httpx.AsyncBaseTransport,
) -> None:
    lossy = LosesFirstResponses(asgi, lose=10)
    async with httpx.AsyncClient(transport=lossy) as http:
        bus = AsyncBus(
            URL, agent_id="a", http_client=http, retry=TransportRetry(attempts=2, base=0)
        )
        async with bus.session() as s:
            await s.create("k", "v0")
            with pytest.raises(BusUnreachable) as gone:
                await s.commit("k", "v1", expected=0)
            assert isinstance(gone.value.__cause__, httpx.RemoteProtocolError)
            assert len(lossy.seen) == gone.value.attempts == 2
            assert (await s.read("k")).version == 1  # it had landed: the key would replay it


def test_version_is_read_once_per_bus(make_bus: BusFactory) -> None:
    bus = make_bus()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatibilityWarning)
        first = bus.server_version()
        assert first is not None and (first.name, first.api) == ("sbus", 1)
        assert bus.server_version() is first


def test_token_mode_callable_token_refreshes_after_401() -> None:
    with LocalBus(auth="token", secret=SECRET) as local:
        valid = token(local.app, "agent-7", ("**", "read,write,create,delete"))
        handed: list[str] = []

        def current() -> str:
            handed.append("stale" if not handed else valid)  # the first one was rotated out
            return handed[-1]

        bus = Bus(local.url, token=current, http_client=local.http)
        with bus.session() as s:  # no agent_id: the token's subject is the agent
            assert s.create("k", "v0").version == 0
            assert s.commit("k", "v1", expected=0).version == 1
            assert s.history("k")[0].agent_id == "agent-7"
        assert handed[:2] == ["stale", valid]
        # create: stale -> 401, then valid; commit, history, the session reset: one each
        assert len(handed) == 5


def test_token_mode_refusals_are_permission_errors() -> None:
    with LocalBus(auth="token", secret=SECRET) as local:
        narrow = token(local.app, "b", ("plan/*", "read"))
        with Bus(local.url, token=narrow, http_client=local.http).session() as s:
            with pytest.raises(CapabilityDenied) as denied:
                s.create("plan/x", "")
            assert (denied.value.key, denied.value.right) == ("plan/x", "create")
            assert isinstance(denied.value, PermissionError)
        with pytest.raises(Unauthorized) as err:
            Bus(local.url, token="garbage", http_client=local.http).session().read("k")
        assert err.value.status == 401
