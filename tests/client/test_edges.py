"""The SDK at its edges, as a careless or adversarial caller meets it: keys that URL
normalisation would rewrite, arguments of the wrong type, exceptions that cross process
boundaries. Each runs against the in-process bus (the real server app)."""

from __future__ import annotations

import asyncio
import copy
import functools
import http.server
import json
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Awaitable, Iterator
from typing import Any

import httpx
import pytest

from sbus_client import (
    AsyncBus,
    AsyncSession,
    Bus,
    BusUnreachable,
    HistoryEntry,
    RetriesExhausted,
    SBusError,
    Session,
    SessionExpired,
    Shard,
    ShardNotFound,
    TransportRetry,
    UnknownClientError,
    UnknownServerError,
    ValidationError,
    VersionMismatch,
)
from sbus_client import _codes as codes
from sbus_client.testing import LocalBus, local_settings
from tests.client.behaviour import AsyncBusFactory, BusFactory
from tests.client.fake import shard_response
from tests.client.test_drivers import FakeBus, async_bus, sync_bus


@pytest.mark.parametrize("key", ["../admin/health", "a/../k", "./k", "a/.", "k/.."])
def test_dot_segments_reach_the_bus_as_written(make_bus: BusFactory, key: str) -> None:
    """A "." or ".." segment is refused by the bus (422), not resolved by the client
    into another path: "a/../k" must not read k, "../admin/health" must not reach the
    health route."""
    bus = make_bus()
    with bus.session() as s:
        s.create("k", "secret")
        for call in (
            lambda: s.read(key),
            lambda: s.read(key, record=False),
            lambda: s.history(key),
            lambda: s.delete(key, expected=0),
        ):
            with pytest.raises(ValidationError) as caught:
                call()
            assert caught.value.status == 422
            assert "'.' or '..'" in caught.value.detail
        assert s.read("k").version == 0  # the delete reached nothing


def test_a_key_that_is_not_a_str_is_a_type_error(make_bus: BusFactory) -> None:
    bus = make_bus()
    with bus.session() as s:
        with pytest.raises(TypeError, match="a key is a str, not int"):
            s.read(5)  # type: ignore[arg-type]
        with pytest.raises(ShardNotFound):
            s.read("a.b/c..d")  # dots inside a segment are plain key characters


def _errors() -> list[SBusError]:
    """One instance of every error class, with every field its code documents."""
    fields = {
        "key": "k",
        "expected": 1,
        "found": 2,
        "stale_keys": [{"key": "a", "version_at_read": 0, "current_version": 1}],
        "outcome": "unknown",
        "reason": "ttl",
        "right": "write",
        "version": 3,
        "target_version": 1,
        "retry_after": 2,
    }
    made: list[SBusError] = []
    for name in codes.__all__:
        cls = getattr(codes, name)
        problem = {"error": name, "status": cls.STATUS, "detail": "d", **fields}
        made.append(cls("d", status=cls.STATUS, problem=problem))
    made.append(UnknownClientError("d", status=418, problem={"error": "Teapot"}))
    made.append(UnknownServerError("d", status=599))
    made.append(RetriesExhausted(9, made[0]))
    made.append(BusUnreachable.after("http://127.0.0.1:9", 5, httpx.ConnectError("refused")))
    return made


@pytest.mark.parametrize("err", _errors(), ids=lambda e: type(e).__name__)
def test_every_error_survives_pickle_and_copy(err: SBusError) -> None:
    """Frameworks move exceptions between processes: each class comes back as itself,
    with its fields and its message."""
    for again in (pickle.loads(pickle.dumps(err)), copy.copy(err), copy.deepcopy(err)):
        assert type(again) is type(err)
        assert str(again) == str(err)
        assert (again.status, again.code, again.detail) == (err.status, err.code, err.detail)
        assert again.problem == err.problem
        for name in type(err).FIELDS:
            assert getattr(again, name) == getattr(err, name)
    back = pickle.loads(pickle.dumps(err))
    if isinstance(err, RetriesExhausted):
        assert isinstance(back, RetriesExhausted)
        assert back.attempts == 9
        assert type(back.last_error) is type(err.last_error)
        assert str(back.last_error) == str(err.last_error)


def test_sync_transactional_refuses_async_and_generator_functions(make_bus: BusFactory) -> None:
    """A Bus would only create the coroutine or generator: no session, no retry."""
    bus = make_bus()

    async def coroutine(s: Session) -> int:
        return 1

    def generator(s: Session) -> Iterator[int]:
        yield 1

    for fn in (coroutine, generator):
        with pytest.raises(TypeError, match=fn.__qualname__):
            bus.transactional()(fn)
        with pytest.raises(TypeError, match=fn.__qualname__):
            bus.run(fn)


async def test_async_transactional_refuses_a_plain_function_before_running_it(
    make_async_bus: AsyncBusFactory,
) -> None:
    bus = make_async_bus()
    ran: list[str] = []

    def plain(s: AsyncSession) -> int:
        ran.append(s.session_id)
        return 1

    @functools.wraps(plain)
    def wrapped(s: AsyncSession) -> int:
        return plain(s)

    for fn in (plain, wrapped):
        with pytest.raises(TypeError, match="not a coroutine function"):
            bus.transactional()(fn)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not a coroutine function"):
            await bus.run(fn)  # type: ignore[arg-type]
    assert ran == []

    async def real(s: AsyncSession, n: int) -> int:
        return n

    # What still works: a coroutine function, a partial of one, a wrapper of one.
    assert await bus.transactional()(real)(3) == 3
    assert await bus.run(functools.partial(real), 4) == 4

    @functools.wraps(real)
    def delegating(s: AsyncSession, n: int) -> Awaitable[int]:
        return real(s, n)

    assert await bus.run(delegating, 5) == 5


@pytest.mark.parametrize(
    ("part", "extra", "module"),
    [
        ("sbus_client.testing", "testing", "asgi_lifespan"),
        ("sbus_client.testing", "testing", "sbus"),
        ("sbus_client.mcp", "mcp", "mcp"),
        ("sbus_client.langgraph", "langgraph", "langgraph"),
        ("sbus_client.langgraph", "langgraph", "langchain_core"),
        ("sbus_client.openai_agents", "openai-agents", "agents"),
    ],
)
def test_a_part_without_its_extra_names_the_extra(part: str, extra: str, module: str) -> None:
    """`pip install sbus-client` alone: importing an optional part says which extra to
    install instead of naming a module the user never heard of."""
    script = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "import sbus_client\n"
        "try:\n"
        f"    import {part}\n"
        "except ModuleNotFoundError as err:\n"
        "    print(type(err).__name__, err.name, '|', err)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.startswith(f"ModuleNotFoundError {module}"), done.stdout
    assert f"{part} needs the '{extra}' extra" in done.stdout
    assert f"pip install 'sbus-client[{extra}]'" in done.stdout


def _refusing_transport(seen: list[str]) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        return httpx.Response(500)

    return httpx.MockTransport(answer)


def test_checks_without_the_server_fail_before_any_request() -> None:
    """A missing agent and an expected= of another key are ValueErrors raised before
    anything is sent: not even the version check (a hung server would delay them)."""
    seen: list[str] = []
    bus = Bus("http://bus.test", http_client=httpx.Client(transport=_refusing_transport(seen)))
    other = Shard("other", 1, "x", "", '"1"')
    s = bus.session()
    with pytest.raises(ValueError, match="needs an agent"):
        s.commit("k", "x", expected=0)
    with pytest.raises(ValueError, match="needs an agent"):
        s.update("k", lambda shard: "y")
    with pytest.raises(ValueError, match="needs an agent"):
        s.commit_many([("k", "x", 0)])
    with pytest.raises(ValueError, match="not of 'k'"):
        bus.session(agent_id="a").commit("k", "x", expected=other)
    assert bus.session(agent_id="a").read_many([]) == {}
    assert seen == []


async def test_async_checks_without_the_server_fail_before_any_request() -> None:
    seen: list[str] = []
    client = httpx.AsyncClient(transport=httpx.MockTransport(_refusing_transport(seen).handler))
    bus = AsyncBus("http://bus.test", http_client=client)
    s = bus.session()
    with pytest.raises(ValueError, match="needs an agent"):
        await s.commit("k", "x", expected=0)
    with pytest.raises(ValueError, match="needs an agent"):
        await s.delete("k", expected=0)
    assert await bus.session(agent_id="a").read_many([]) == {}
    assert seen == []


class _ShardHandler(http.server.BaseHTTPRequestHandler):
    """A keep-alive HTTP/1.1 server answering GET /version and GET /shard/k: enough for
    pooled connections, which is where an event loop's ownership shows."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/version"):
            payload: dict[str, Any] = {"name": "sbus", "version": "0", "api": 1}
        else:
            payload = {"key": "k", "version": 3, "content": "x", "updated_at": ""}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_an_async_bus_serves_one_event_loop_after_another() -> None:
    """A module-level AsyncBus used by two asyncio.run() calls: the second must not meet
    the first loop's dead connections ("Event loop is closed")."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ShardHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        bus = AsyncBus(f"http://127.0.0.1:{server.server_address[1]}", agent_id="a")

        async def read() -> int:
            async with bus.session(keep=True) as s:
                return (await s.read("k")).version

        assert [asyncio.run(read()) for _ in range(3)] == [3, 3, 3]

        async def read_and_close() -> int:
            version = await read()
            await bus.aclose()
            return version

        assert asyncio.run(read_and_close()) == 3
    finally:
        server.shutdown()
        server.server_close()


def test_one_key_where_a_list_is_expected_is_a_type_error(make_bus: BusFactory) -> None:
    """A str is an iterable of str: read_many("plan") would read "p", "l", "a", "n" and
    issue_mandate(holder, "plan") grant them."""
    bus = make_bus()
    with bus.session() as s:
        s.create("plan", "x")
        with pytest.raises(TypeError, match=r"read_many takes a list of keys.*\['plan'\]"):
            s.read_many("plan")
        with pytest.raises(TypeError, match=r"issue_mandate takes a list of keys"):
            bus.issue_mandate("b", "plan")
        assert list(s.read_many(k for k in ["plan"])) == ["plan"]


def test_reprs_cut_long_content() -> None:
    """A 256 KiB shard must not print 256 KiB into a log line or a traceback."""
    big = "x" * 262144
    shard = Shard("k", 1, big, "t", '"1"')
    entry = HistoryEntry(1, "a", "t", big, False, big, "c", "p", "h")
    for value in (shard, entry):
        text = repr(value)
        assert len(text) < 600, len(text)
        assert "...(262144 chars)" in text
        assert text.startswith(f"{type(value).__name__}(")
    assert repr(Shard("k", 1, "short", "t", '"1"')) == (
        "Shard(key='k', version=1, content='short', updated_at='t', etag='\"1\"', "
        "created_at='', goal_tag='', require_mandate=False)"
    )
    assert shard == Shard("k", 1, big, "t", '"1"')  # only the repr is shortened


def test_retry_budgets_are_checked_where_they_are_given() -> None:
    seen: list[str] = []
    bus = Bus(
        "http://bus.test",
        agent_id="a",
        http_client=httpx.Client(transport=_refusing_transport(seen)),
    )
    for bad in ({"max_retries": -1}, {"max_elapsed": -1.0}, {"base": -0.1}, {"cap": -1.0}):
        with pytest.raises(ValueError, match="must"):
            bus.transactional(**bad)
    s = bus.session()
    with pytest.raises(ValueError, match="max_attempts must be None"):
        s.update("k", lambda shard: "y", max_attempts=0)
    with pytest.raises(ValueError, match="max_elapsed must not be negative"):
        s.update("k", lambda shard: "y", max_elapsed=-1.0)
    assert seen == []


def test_retries_exhausted_says_what_happened_and_what_to_do() -> None:
    mismatch = VersionMismatch(
        "version mismatch on key=k", problem={"error": "VersionMismatch", "key": "k"}
    )
    contended = str(RetriesExhausted(9, mismatch))
    assert contended.startswith(
        "gave up after 9 attempt(s); last error: VersionMismatch: version mismatch on key=k "
        "[RetriesExhausted] Next: the keys are heavily contended"
    ), contended
    expired = SessionExpired(
        "session expired", problem={"error": "SessionExpired", "reason": "ttl"}
    )
    slow = str(RetriesExhausted(3, expired))
    assert "each attempt's session expired (ttl)" in slow
    assert "SBUS_SESSION_TTL" in slow
    assert "contended" not in slow


def test_a_url_without_scheme_is_refused_when_the_bus_is_made() -> None:
    for url in ("127.0.0.1:7000", "localhost", "ftp://bus.test", ""):
        with pytest.raises(ValueError, match="must start with http:// or https://"):
            Bus(url)
        with pytest.raises(ValueError, match="must start with http:// or https://"):
            AsyncBus(url)
    assert Bus("HTTPS://bus.test/").base_url == "HTTPS://bus.test"


def _silent_version(seen: list[str]) -> httpx.MockTransport:
    """GET /version times out (a server that accepts and never answers it); the rest
    answers."""

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/version":
            raise httpx.ReadTimeout("timed out", request=request)
        return shard_response("k", 3, "x")

    return httpx.MockTransport(answer)


def test_a_version_check_that_timed_out_is_not_repeated_before_every_call() -> None:
    seen: list[str] = []
    bus = Bus(
        "http://bus.test", agent_id="a", http_client=httpx.Client(transport=_silent_version(seen))
    )
    with bus.session(keep=True) as s:
        assert [s.read("k").version for _ in range(3)] == [3, 3, 3]
    assert seen == ["/version", "/shard/k", "/shard/k", "/shard/k"]
    assert bus.server_version() is None


async def test_async_version_check_that_timed_out_is_not_repeated() -> None:
    seen: list[str] = []
    transport = httpx.MockTransport(_silent_version(seen).handler)
    bus = AsyncBus(
        "http://bus.test", agent_id="a", http_client=httpx.AsyncClient(transport=transport)
    )
    async with bus.session(keep=True) as s:
        assert [(await s.read("k")).version for _ in range(3)] == [3, 3, 3]
    assert seen == ["/version", "/shard/k", "/shard/k", "/shard/k"]


def test_run_uses_its_own_bus_with_the_functions_policy(make_bus: BusFactory) -> None:
    """bus_b.run(f) of a function decorated on bus_a runs in bus_b's sessions (as bus_b's
    agent), keeping f's retry settings."""
    bus_a, bus_b = make_bus("a"), make_bus("b")
    retries: list[int] = []

    @bus_a.transactional(max_retries=1, base=0.0, on_retry=lambda n, e, w: retries.append(n))
    def who(s: Session) -> str:
        if not retries:
            raise VersionMismatch("forced", problem={"error": "VersionMismatch"})
        return f"{s.agent_id}"

    assert bus_b.run(who) == "b"
    assert retries == [1]
    assert who() == "a"


async def test_async_run_uses_its_own_bus(make_async_bus: AsyncBusFactory) -> None:
    bus_a, bus_b = make_async_bus("a"), make_async_bus("b")

    @bus_a.transactional()
    async def who(s: AsyncSession) -> str | None:
        return s.agent_id

    assert await bus_b.run(who) == "b"
    assert await who() == "a"


def test_a_redirect_is_an_error_that_names_where_it_points() -> None:
    """An http URL for an https bus (or a missing path prefix): the redirect is not
    followed (a POST resent elsewhere is a new request) and not parsed as an answer."""
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(301, headers={"Location": "https://bus.test" + request.url.path})

    bus = Bus(
        "http://bus.test",
        agent_id="a",
        http_client=httpx.Client(transport=httpx.MockTransport(answer)),
    )
    s = bus.session(keep=True)
    for call in (lambda: s.read("k"), lambda: s.commit("k", "x", expected=0)):
        with pytest.raises(UnknownClientError) as caught:
            call()
        assert caught.value.status == 301
        assert "301 Moved Permanently to https://bus.test/" in str(caught.value)
        assert "does not follow redirects" in str(caught.value)
    assert seen == ["/version", "/shard/k", "/commit/v2"]  # each sent once, not resent


def test_a_misspelt_local_setting_is_refused_not_ignored() -> None:
    """LocalBus(sesion_ttl=60) silently ran with the default TTL."""
    with (
        pytest.raises(
            TypeError, match=r"no such setting 'sesion_ttl' \(did you mean 'session_ttl'\?\)"
        ),
        LocalBus(sesion_ttl=60),
    ):
        pass
    with pytest.raises(TypeError, match=r"no such setting 'nonsense';"):
        local_settings(nonsense=1)
    assert local_settings(session_ttl=60).session_ttl == 60


def test_a_failed_reset_does_not_turn_a_landed_transaction_into_an_error() -> None:
    """The function returned, so its commit landed: an error emptying the session after
    it must not reach the caller, who would redo the work (a transfer made twice). A
    conflict followed by a failed reset still retries; the function's own error is
    still raised as itself."""
    fake = FakeBus(session_status=503)
    bus = sync_bus(fake, retry=TransportRetry(attempts=1))
    attempts: list[int] = []

    @bus.transactional(base=0.0)
    def bump(s: Session, key: str) -> int:
        attempts.append(1)
        shard = s.read(key)
        if len(attempts) == 1:
            raise VersionMismatch("forced", problem={"error": "VersionMismatch"})
        return s.commit(key, "y", expected=shard).version

    assert bump("k") == 4
    assert len(attempts) == 2
    assert fake.count("/commit/v2") == 1
    assert fake.count("/session") == 2  # both attempts' resets were tried
    with pytest.raises(ShardNotFound):
        bump("missing")


async def test_async_failed_reset_does_not_turn_a_landed_transaction_into_an_error() -> None:
    fake = FakeBus(session_status=503)
    bus = async_bus(fake, retry=TransportRetry(attempts=1))

    @bus.transactional()
    async def bump(s: AsyncSession, key: str) -> int:
        shard = await s.read(key)
        return (await s.commit(key, "y", expected=shard)).version

    assert await bump("k") == 4
    assert (fake.count("/commit/v2"), fake.count("/session")) == (1, 1)
    with pytest.raises(ShardNotFound):
        await bump("missing")


def test_a_transactional_function_keeps_its_name(make_bus: BusFactory) -> None:
    """Frameworks name a node or a tool after the function they are given."""
    bus = make_bus()

    @bus.transactional()
    def move_funds(s: Session, src: str) -> str:
        """Move the funds."""
        return src

    assert move_funds.__name__ == "move_funds"
    assert move_funds.__qualname__.endswith("move_funds")
    assert move_funds.__doc__ == "Move the funds."
    assert move_funds.__module__ == __name__
    assert move_funds.__wrapped__ is not None


async def test_an_async_transactional_function_keeps_its_name(
    make_async_bus: AsyncBusFactory,
) -> None:
    bus = make_async_bus()

    @bus.transactional()
    async def move_funds(s: AsyncSession) -> None:
        """Move the funds."""

    assert (move_funds.__name__, move_funds.__doc__) == ("move_funds", "Move the funds.")


def test_a_bus_that_is_not_there_is_one_clear_error() -> None:
    """Nothing listens: after the transport resends, one BusUnreachable (an SBusError, so
    one `except SBusError` covers every failure) naming the URL and what to do."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"  # bound, never listening
        bus = Bus(url, agent_id="a", retry=TransportRetry(attempts=2, base=0.0))
        with bus, pytest.raises(BusUnreachable) as gone, bus.session(keep=True) as s:
            s.commit("k", "x", expected=0)
    assert (gone.value.url, gone.value.attempts) == (url, 2)
    assert isinstance(gone.value.__cause__, httpx.ConnectError)
    assert f"check that the bus is running and reachable at {url}" in str(gone.value)


@pytest.mark.parametrize(
    ("agent", "session"),
    [("ägent", None), ("a" * 257, None), (" a", None), ("", None), ("a", "s" * 257), ("a", "sé")],
)
def test_an_identity_no_header_can_carry_is_refused_before_any_request(
    agent: str, session: str | None
) -> None:
    """Agent and session ids travel in headers: one that cannot is a ValueError where the
    Bus or the session is made, not a UnicodeEncodeError (or a 422) at the first call."""
    seen: list[str] = []
    http = httpx.Client(transport=_refusing_transport(seen))
    with pytest.raises(ValueError, match=r"agent_id|session_id"):
        Bus("http://127.0.0.1:7000", agent_id=agent, http_client=http).session(session_id=session)
    with pytest.raises(ValueError, match=r"agent_id|session_id"):
        Bus("http://127.0.0.1:7000", http_client=http).session(agent, session)
    assert seen == []
