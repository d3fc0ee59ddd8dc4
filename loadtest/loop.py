"""The closed-loop client of the peer comparison: one stdlib HTTP client for every system.

One process runs ``threads`` clients, each a thread with its own keep-alive
``http.client`` connection, looping on a read+commit cycle until the deadline:

* ``sbus``: ``GET /shard/{key}?agent_id=A`` (a recorded read), then ``POST /commit`` at the
  version read; 200 is a commit, 409 a conflict (loop back to the read).
* ``etcd``: ``POST /v3/kv/range`` of the key, then ``POST /v3/kv/txn`` whose compare is the
  key's ``mod_revision`` read and whose success branch puts the new value; ``succeeded``
  false is a conflict.

The new content is the old one plus one (the content is a decimal counter), so after a run
the final counter of a key equals the commits acknowledged on it unless an update was
lost. Cycles that END inside ``[start, end)`` (epoch seconds, the same for every process)
count towards throughput and latency; commits are counted per key over the whole run for
the lost-update check. The process's own CPU over the window is reported too.

    python loadtest/loop.py '<json config>'      # prints one JSON result line

Config: ``{"system": "sbus"|"etcd", "url", "keys": [[key, agent], ...] (one per thread),
"start", "end", "stop", "timeout"}``. Run by peers.py, two processes at a time.
"""

from __future__ import annotations

import base64
import http.client
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

JSON = {"Content-Type": "application/json"}


@dataclass
class Counts:
    cycles: int = 0  # completed inside the window (commit or conflict)
    commits: int = 0  # successful commits inside the window
    conflicts: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # successful cycles
    commits_by_key: dict[str, int] = field(default_factory=dict)  # whole run
    error_samples: list[str] = field(default_factory=list)


class Client:
    """One connection; ``read`` returns (token, counter) and ``commit`` True/False."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        self.conn.request(method, path, body=body, headers=JSON)
        r = self.conn.getresponse()
        data = r.read()
        return r.status, (json.loads(data) if data else None)


class SBus(Client):
    def read(self, key: str, agent: str) -> tuple[int, int]:
        status, body = self.call("GET", f"/shard/{quote(key, safe='/')}?agent_id={agent}")
        if status != 200:
            raise RuntimeError(f"GET {key}: {status} {body}")
        return int(body["version"]), int(body["content"] or 0)

    def commit(self, key: str, agent: str, token: int, value: int) -> bool:
        payload = {"key": key, "expected_version": token, "delta": str(value), "agent_id": agent}
        status, body = self.call("POST", "/commit", json.dumps(payload).encode())
        if status == 200:
            return True
        if status == 409:
            return False
        raise RuntimeError(f"commit {key}: {status} {body}")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Etcd(Client):
    def read(self, key: str, agent: str) -> tuple[int, int]:
        status, body = self.call("POST", "/v3/kv/range", json.dumps({"key": b64(key)}).encode())
        if status != 200:
            raise RuntimeError(f"range {key}: {status} {body}")
        kvs = body.get("kvs") or []
        if not kvs:
            return 0, 0
        value = base64.b64decode(kvs[0].get("value", "")).decode() or "0"
        return int(kvs[0]["mod_revision"]), int(value)

    def commit(self, key: str, agent: str, token: int, value: int) -> bool:
        k = b64(key)
        txn = {
            "compare": [{"key": k, "result": "EQUAL", "target": "MOD", "mod_revision": token}],
            "success": [{"request_put": {"key": k, "value": b64(str(value))}}],
        }
        status, body = self.call("POST", "/v3/kv/txn", json.dumps(txn).encode())
        if status != 200:
            raise RuntimeError(f"txn {key}: {status} {body}")
        return bool(body.get("succeeded", False))


def client_for(system: str, url: str, timeout: float) -> SBus | Etcd:
    return Etcd(url, timeout) if system == "etcd" else SBus(url, timeout)


def run_thread(
    cfg: dict[str, Any], key: str, agent: str, counts: Counts, lock: threading.Lock
) -> None:
    client = client_for(cfg["system"], cfg["url"], cfg["timeout"])
    start, end, stop = cfg["start"], cfg["end"], cfg["stop"]
    mine = Counts()
    committed = 0
    while (now := time.time()) < stop:
        t0 = time.perf_counter()
        try:
            token, value = client.read(key, agent)
            ok = client.commit(key, agent, token, value + 1)
        except (OSError, RuntimeError, http.client.HTTPException, ValueError) as exc:
            mine.errors += 1
            if len(mine.error_samples) < 3:
                mine.error_samples.append(str(exc)[:200])
            client.conn.close()
            time.sleep(0.01)
            continue
        elapsed_ms = (time.perf_counter() - t0) * 1000
        done_at = now + elapsed_ms / 1000
        committed += ok
        if start <= done_at < end:
            mine.cycles += 1
            if ok:
                mine.commits += 1
                mine.latencies_ms.append(elapsed_ms)
            else:
                mine.conflicts += 1
    client.conn.close()
    with lock:
        counts.cycles += mine.cycles
        counts.commits += mine.commits
        counts.conflicts += mine.conflicts
        counts.errors += mine.errors
        counts.latencies_ms += mine.latencies_ms
        counts.commits_by_key[key] = counts.commits_by_key.get(key, 0) + committed
        counts.error_samples += mine.error_samples[: max(0, 5 - len(counts.error_samples))]


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    counts, lock = Counts(), threading.Lock()
    threads = [
        threading.Thread(target=run_thread, args=(cfg, key, agent, counts, lock), daemon=True)
        for key, agent in cfg["keys"]
    ]
    for t in threads:
        t.start()
    # This process's CPU over the measuring window (the generator's share).
    time.sleep(max(0.0, cfg["start"] - time.time()))
    cpu0 = time.process_time()
    time.sleep(max(0.0, cfg["end"] - time.time()))
    cpu = time.process_time() - cpu0
    for t in threads:
        t.join(timeout=cfg["stop"] - time.time() + cfg["timeout"] + 5)
    return {
        "cycles": counts.cycles,
        "commits": counts.commits,
        "conflicts": counts.conflicts,
        "errors": counts.errors,
        "latencies_ms": counts.latencies_ms,
        "commits_by_key": counts.commits_by_key,
        "error_samples": counts.error_samples,
        "cpu_s": cpu,
    }


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
