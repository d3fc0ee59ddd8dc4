"""Worker readiness markers (sbus.api.readiness): /admin/health is ready only when every
worker of one ``sbus serve`` has connected; the multi-process behaviour itself is tested
against real servers in tests/concurrency/test_workers_ready.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager

from sbus import __version__
from sbus.api.readiness import WorkerReadiness, mark_stopping, requests_cut
from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app
from sbus.config import Settings


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_without_a_directory_this_worker_is_the_answer() -> None:
    readiness = WorkerReadiness(None, 4)
    readiness.mark_ready()
    assert readiness.waiting_for() is None
    readiness.clear()


def test_counts_live_markers_only(tmp_path: Path) -> None:
    readiness = WorkerReadiness(str(tmp_path), 2)
    assert readiness.waiting_for() == "0 of 2 workers connected to the store"
    readiness.mark_ready()
    assert (tmp_path / f"ready-{os.getpid()}").exists()
    assert readiness.waiting_for() == "1 of 2 workers connected to the store"
    stale = tmp_path / f"ready-{dead_pid()}"
    stale.touch()
    (tmp_path / "ready-notapid").touch()
    assert readiness.waiting_for() == "1 of 2 workers connected to the store"
    assert not stale.exists()  # a dead worker's marker is cleared when seen
    (tmp_path / "ready-1").touch()  # pid 1 is alive (init), owned by another user or not
    assert readiness.waiting_for() is None
    readiness.clear()
    assert not (tmp_path / f"ready-{os.getpid()}").exists()
    assert readiness.waiting_for() == "1 of 2 workers connected to the store"
    readiness.clear()  # twice is harmless


async def test_health_waits_for_every_worker(tmp_path: Path) -> None:
    """In-process, as worker 1 of 2: ready itself, /admin/health still answers 503 until
    the other worker's marker appears; requests are served meanwhile."""
    app = create_app(Settings(store="memory://", ready_dir=str(tmp_path), workers=2))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            for _ in range(200):
                if runtime_of(app).ready:
                    break
                await asyncio.sleep(0.01)
            resp = await c.get("/admin/health")
            assert (resp.status_code, resp.json()) == (
                503,
                {
                    "status": "not_ready",
                    "version": __version__,
                    "reason": "1 of 2 workers connected to the store",
                },
            )
            assert (await c.get("/shards")).status_code == 200
            (tmp_path / "ready-1").touch()
            resp = await c.get("/admin/health")
            assert (resp.status_code, resp.json()["status"]) == (200, "ok")
    assert sorted(os.listdir(tmp_path)) == ["ready-1"]  # ours was removed at exit


SHUTTING_DOWN = {"status": "not_ready", "version": __version__, "reason": "shutting down"}


async def test_a_stopping_worker_is_not_ready_but_serves(tmp_path: Path) -> None:
    """Once its stop begins (SIGTERM, operations.md section 6) a worker answers 503
    "shutting down", withdraws its ready marker for good, and still serves."""
    app = create_app(Settings(store="memory://", ready_dir=str(tmp_path), workers=2))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            runtime = runtime_of(app)
            for _ in range(200):
                if runtime.ready:
                    break
                await asyncio.sleep(0.01)
            (tmp_path / "ready-1").touch()
            assert (await c.get("/admin/health")).status_code == 200
            runtime.begin_stopping()
            assert not (tmp_path / f"ready-{os.getpid()}").exists()
            resp = await c.get("/admin/health")
            assert (resp.status_code, resp.json()) == (503, SHUTTING_DOWN)
            runtime.mark_ready()  # the store answering again changes nothing
            assert not (tmp_path / f"ready-{os.getpid()}").exists()
            assert (await c.get("/admin/health")).status_code == 503
            assert (await c.get("/shards")).status_code == 200
            assert (await c.get("/livez")).status_code == 200


async def test_a_stopping_server_is_shutting_down_on_every_worker(tmp_path: Path) -> None:
    """The supervisor's ``stopping`` file: a worker that has not seen its signal yet
    already answers "shutting down"."""
    app = create_app(Settings(store="memory://", ready_dir=str(tmp_path), workers=1))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            for _ in range(200):
                if runtime_of(app).ready:
                    break
                await asyncio.sleep(0.01)
            assert (await c.get("/admin/health")).status_code == 200
            mark_stopping(str(tmp_path))
            resp = await c.get("/admin/health")
            assert (resp.status_code, resp.json()) == (503, SHUTTING_DOWN)


def test_cut_requests_add_up_over_the_workers(tmp_path: Path) -> None:
    assert requests_cut(str(tmp_path)) == 0
    WorkerReadiness(str(tmp_path), 2).record_cut(2)
    (tmp_path / "cut-1").write_text("3")
    assert requests_cut(str(tmp_path)) == 5
    WorkerReadiness(None, 1).record_cut(7)  # one worker: nothing to write
    assert requests_cut(str(tmp_path)) == 5
