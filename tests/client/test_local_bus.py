"""sbus_client.testing: the in-process bus starts its store, serves (from many threads
at once, in the sync helper) raw HTTP and the SDK, and its clock handle really moves
the store's time."""

from __future__ import annotations

import contextlib
import io
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from sbus_client import AsyncBus, Bus, SessionExpired
from sbus_client.testing import AsyncLocalBus, LocalBus, local_settings
from tests.api.helpers import ok, problem

TTL_S = 3600  # SBUS_SESSION_TTL's default (docs/configuration.md)


def _recorded_read(c: httpx.Client, key: str, session: str) -> None:
    ok(c.get(f"/shard/{key}", params={"agent_id": "x", "session_id": session}))


def _commit(c: httpx.Client, key: str, expected: int, session: str) -> httpx.Response:
    body: dict[str, Any] = {
        "key": key,
        "expected_version": expected,
        "delta": f"{key}{expected + 1}",
        "agent_id": "x",
        "session_id": session,
    }
    return c.post("/commit/v2", json=body)


def test_sync_serves_over_the_memory_store() -> None:
    with LocalBus() as local:
        assert local.settings.store == "memory"
        assert local.settings.auth_mode == "open"
        assert ok(local.http.post("/shard", json={"key": "k", "content": "a"}), 201)["version"] == 0
        assert ok(local.http.get("/shard/k", params={"record": "false"}))["content"] == "a"
        assert ok(local.http.get("/admin/health"))["status"] == "ok"
        assert local.url == "http://127.0.0.1:7000"
    with pytest.raises(RuntimeError, match="not running"):
        local.http  # noqa: B018


def test_sync_serves_many_threads_on_one_store() -> None:
    """32 threads each create a key and bump a shared counter by CAS; every request is
    answered and the counter ends at exactly 32 (the store is one critical section)."""
    with LocalBus() as local:
        c = local.http
        ok(c.post("/shard", json={"key": "n", "content": "0"}), 201)
        barrier = threading.Barrier(32)

        def work(i: int) -> None:
            barrier.wait(timeout=30)
            ok(c.post("/shard", json={"key": f"k{i}", "content": "x"}), 201)
            while True:
                shard = ok(c.get("/shard/n", params={"record": "false"}))
                delta = str(int(shard["content"]) + 1)
                body = {"key": "n", "expected_version": shard["version"], "delta": delta}
                r = c.post("/commit/v2", json={**body, "agent_id": f"a{i}"})
                if r.status_code == 200:
                    return
                problem(r, 409, "VersionMismatch")

        with ThreadPoolExecutor(32) as pool:
            for future in [pool.submit(work, i) for i in range(32)]:
                future.result()
        final = ok(c.get("/shard/n", params={"record": "false"}))
        assert (final["content"], final["version"]) == ("32", 32)
        assert len(ok(c.get("/shards", params={"prefix": "k"}))["shards"]) == 32


def test_sync_advance_clock_expires_a_session() -> None:
    """Session "old" reads at offset 0, "new" one second before the TTL; 1.5 s more
    and only "old" has expired."""
    with LocalBus() as local:
        c = local.http
        for key in ("r", "w"):
            ok(c.post("/shard", json={"key": key, "content": ""}), 201)
        _recorded_read(c, "r", "old")
        assert local.advance_clock(TTL_S - 1) == (TTL_S - 1) * 1000
        _recorded_read(c, "r", "new")
        assert local.advance_clock(1.5) == TTL_S * 1000 + 500
        assert ok(_commit(c, "w", 0, "new"))["new_version"] == 1
        assert problem(_commit(c, "w", 1, "old"), 410, "SessionExpired")["reason"] == "ttl"


def test_settings_override_the_defaults() -> None:
    with LocalBus(session_ttl=60, max_txn_keys=1) as local:
        c = local.http
        for key in ("r", "w"):
            ok(c.post("/shard", json={"key": key, "content": ""}), 201)
        _recorded_read(c, "r", "s")
        local.advance_clock(61)
        assert problem(_commit(c, "w", 0, "s"), 410, "SessionExpired")["reason"] == "ttl"
        writes = [{"key": k, "expected_version": 0, "delta": "1"} for k in ("r", "w")]
        r = c.post("/commit/multi", json={"writes": writes, "agent_id": "x"})
        assert problem(r, 413, "TooManyWrites")["max"] == 1


def test_environment_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SBUS_AUTH", "token")
    monkeypatch.setenv("SBUS_SESSION_TTL", "5")
    monkeypatch.setenv("SBUS_STORE", "redis://127.0.0.1:1/0")
    settings = local_settings()
    assert (settings.auth_mode, settings.session_ttl, settings.store) == ("open", TTL_S, "memory")
    with LocalBus() as local:
        ok(local.http.post("/shard", json={"key": "k", "content": ""}), 201)


def test_refused_configurations_and_clock_moves() -> None:
    with pytest.raises(ValueError, match="non-loopback host"):
        LocalBus(host="0.0.0.0", auth="open")
    with pytest.raises(ValueError, match="session_ttl"):
        LocalBus(session_ttl=-1)
    with LocalBus() as local:
        with pytest.raises(ValueError, match="only moves forward"):
            local.advance_clock(-1)
        with pytest.raises(ValueError, match="past the cap"):
            local.advance_clock(11 * 365 * 86_400)
        assert local.advance_clock(0) == 0  # both refusals left the offset alone
    with pytest.raises(RuntimeError, match="not running"):
        local.advance_clock(1)


async def test_async_serves_and_advances_the_clock() -> None:
    async with AsyncLocalBus(session_ttl=60) as local:
        c = local.http
        assert local.settings.store == "memory"
        for key in ("r", "w"):
            ok(await c.post("/shard", json={"key": key, "content": ""}), 201)
        for session in ("old", "new"):
            ok(await c.get("/shard/r", params={"agent_id": "x", "session_id": session}))
            assert await local.advance_clock(31) == (62_000 if session == "new" else 31_000)
        body = {"key": "w", "expected_version": 0, "delta": "1", "agent_id": "x"}
        r = await c.post("/commit/v2", json={**body, "session_id": "old"})
        assert problem(r, 410, "SessionExpired")["reason"] == "ttl"
        r = await c.post("/commit/v2", json={**body, "session_id": "new"})
        assert ok(r)["new_version"] == 1
    with pytest.raises(RuntimeError, match="not running"):
        await local.advance_clock(1)


def test_sync_bus_is_an_sdk_bus_over_the_local_app() -> None:
    """``.bus``: 8 threads x 10 ``update`` increments end at exactly 80, and a session
    whose reads outlive SBUS_SESSION_TTL by the store clock is SessionExpired."""
    with LocalBus() as local:
        assert isinstance(local.bus, Bus)
        assert local.bus.base_url == local.url
        with local.bus.session(agent_id="setup") as s:
            assert s.create("n", "0").version == 0
            s.create("w", "")

        def bump(i: int) -> None:
            with local.bus.session(agent_id=f"a{i}") as s:
                for _ in range(10):
                    s.update("n", lambda sh: str(int(sh.content) + 1))

        with ThreadPoolExecutor(8) as pool:
            for future in [pool.submit(bump, i) for i in range(8)]:
                future.result()
        with local.bus.session(agent_id="x") as s:
            final = s.read("n")
            assert (final.content, final.version) == ("80", 80)
            local.advance_clock(TTL_S + 1)
            with pytest.raises(SessionExpired) as info:
                s.commit("w", "w1", expected=0)
            assert info.value.problem["reason"] == "ttl"
    with pytest.raises(RuntimeError, match="not running"):
        local.bus  # noqa: B018


async def test_async_bus_is_an_sdk_bus_over_the_local_app() -> None:
    async with AsyncLocalBus() as local:
        assert isinstance(local.bus, AsyncBus)
        async with local.bus.session(agent_id="x") as s:
            await s.create("w", "")
            await s.create("r", "r0")
            assert (await s.read("r")).content == "r0"
            await local.advance_clock(TTL_S + 1)
            with pytest.raises(SessionExpired):
                await s.commit("w", "w1", expected=0)
    with pytest.raises(RuntimeError, match="not running"):
        local.bus  # noqa: B018


def test_the_readme_example_runs_as_printed() -> None:
    readme = Path(__file__).resolve().parents[2] / "clients" / "python" / "README.md"
    found = re.search(
        r"## Tests without a server\n.*?```python\n(.*?)```", readme.read_text(), re.S
    )
    assert found is not None
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(found.group(1), "README.md", "exec"), {"__name__": "readme"})
    assert out.getvalue() == "ttl\nv1\n"
