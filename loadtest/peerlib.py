"""Processes for the peer comparison: the bus, durable PostgreSQL, Redis and etcd.

Each server runs on a free loopback port in a temporary directory, with the durable
settings of docs/performance.md ("Against the peers"): PostgreSQL fsync and
synchronous_commit on, Redis ``appendonly yes`` + ``appendfsync always``, etcd's default
fsync, SQLite ``synchronous=FULL`` (the bus's own setting). ``cpu`` reads a process tree's
CPU counters from /proc (``bench.cpu_seconds``, reaped children included).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench import cpu_seconds, free_port, sbus_command

__all__ = [
    "ServerProc",
    "cpu_seconds",
    "ensure_etcd",
    "free_port",
    "migrate",
    "sbus_command",
    "start_bus",
    "start_etcd",
    "start_postgres",
    "start_redis",
]

LOOPBACK = "127.0.0.1"


@dataclass
class ServerProc:
    """A server this module started: its URL, the root pids of its process tree and how
    to stop it."""

    name: str
    url: str
    pids: list[int]
    stop_cmd: list[str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    log: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def cpu(self) -> float:
        return cpu_seconds(self.pids) or 0.0

    def stop(self) -> None:
        if self.stop_cmd is not None:
            subprocess.run(self.stop_cmd, capture_output=True, timeout=60, check=False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-2000:]


def _wait_http(url: str, proc: subprocess.Popen[bytes] | None, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready at {url} after {limit_s:.0f} s")
        time.sleep(0.1)


def start_bus(
    store_url: str,
    port: int,
    workers: int,
    log: Path,
    command: list[str],
    env: dict[str, str] | None = None,
) -> ServerProc:
    """``command`` serving the bus on ``port`` (``sbus serve`` or a baseline's script),
    in open mode unless ``env`` says otherwise, until ``GET /admin/health`` answers 200."""
    full_env = {k: v for k, v in os.environ.items() if k != "SBUS_AUTH"}
    full_env.update(SBUS_HOST=LOOPBACK, **(env or {}))
    cmd = [*command, "serve", "--port", str(port), "--store", store_url]
    cmd += ["--workers", str(workers), "--no-access-log", "--log-level", "warning"]
    out = log.open("wb")
    proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProc("bus", f"http://{LOOPBACK}:{port}", [proc.pid], proc=proc, log=log)
    try:
        _wait_http(f"{server.url}/admin/health", proc, 60, "the bus")
    except RuntimeError as exc:
        server.stop()
        raise RuntimeError(f"{exc}\n{server.log_tail()}") from exc
    return server


def migrate(store_url: str) -> None:
    done = subprocess.run(
        [*sbus_command(), "migrate", "--store", store_url],
        capture_output=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"sbus migrate failed: {done.stderr.decode()[-800:]}")


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    return found[-1]


def _as_postgres(*cmd: str) -> list[str]:
    # The server refuses to run as root; machines without runuser run it as themselves.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return list(cmd)


def start_postgres(root: Path) -> ServerProc:
    """A durable PostgreSQL (fsync, synchronous_commit and full_page_writes on)."""
    pgbin = _pg_bin()
    work = root / "pg"
    work.mkdir()
    if os.geteuid() == 0:
        shutil.chown(work, "postgres", "postgres")
    data, port = work / "data", free_port()
    # --no-sync: the new catalog's files are not fsynced; the server itself runs durable.
    initdb = [str(pgbin / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]
    subprocess.run(
        _as_postgres(*initdb, "--no-sync"),
        capture_output=True,
        timeout=120,
        check=True,
    )
    opts = f"-p {port} -k {work} -c listen_addresses={LOOPBACK} -c max_connections=300"
    opts += " -c fsync=on -c synchronous_commit=on -c full_page_writes=on"
    log = work / "pg.log"
    subprocess.run(
        [
            *_as_postgres(
                str(pgbin / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", opts
            ),
            "start",
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pid = int((data / "postmaster.pid").read_text().split()[0])
    stop = _as_postgres(str(pgbin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    url = f"postgresql+asyncpg://postgres@{LOOPBACK}:{port}/postgres"
    return ServerProc("postgres", url, [pid], stop_cmd=stop, log=log)


def start_redis(root: Path) -> ServerProc:
    """A durable Redis: every write fsynced to the append-only file before the reply."""
    work, port = root / "redis", free_port()
    work.mkdir()
    cmd = ["redis-server", "--port", str(port), "--bind", LOOPBACK, "--dir", str(work)]
    cmd += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
    cmd += ["--maxmemory-policy", "noeviction", "--logfile", str(work / "redis.log")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        ping = subprocess.run(
            ["redis-cli", "-p", str(port), "ping"], capture_output=True, timeout=5, check=False
        )
        if ping.stdout.strip() == b"PONG":
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.1)
    url = f"redis://{LOOPBACK}:{port}/0"
    return ServerProc("redis", url, [proc.pid], proc=proc, log=work / "redis.log")


def ensure_etcd() -> str:
    """The etcd binary; installs Debian's etcd-server (3.4) with apt when it is missing."""
    found = shutil.which("etcd")
    if found:
        return found
    print("peers: installing etcd-server (apt)", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=600, check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "etcd-server"], env=env, timeout=600, check=True
    )
    found = shutil.which("etcd")
    if not found:
        raise RuntimeError("apt installed etcd-server but no etcd binary is on PATH")
    return found


def start_etcd(root: Path) -> ServerProc:
    """One etcd member with its default durability (fsync of the WAL per commit)."""
    binary = ensure_etcd()
    work = root / "etcd"
    work.mkdir()
    client, peer = free_port(), free_port()
    curl, purl = f"http://{LOOPBACK}:{client}", f"http://{LOOPBACK}:{peer}"
    cmd = [binary, "--name", "peers", "--data-dir", str(work / "data")]
    cmd += ["--listen-client-urls", curl, "--advertise-client-urls", curl]
    cmd += ["--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl]
    cmd += ["--initial-cluster", f"peers={purl}", "--log-level", "warn"]
    log = work / "etcd.log"
    env = dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""))
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    server = ServerProc("etcd", curl, [proc.pid], proc=proc, log=log)
    deadline = time.monotonic() + 30
    while True:
        try:
            put = json.dumps({"key": base64.b64encode(b"peers/ping").decode(), "value": ""})
            req = urllib.request.Request(f"{curl}/v3/kv/put", data=put.encode(), method="POST")
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return server
        except (OSError, urllib.error.URLError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"etcd did not start: {server.log_tail()}")
        time.sleep(0.2)
