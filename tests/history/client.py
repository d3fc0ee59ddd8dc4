"""Record every bus request of an ``httpx.Client`` into a :class:`History`, unchanged
for the test that sends it: :meth:`Recorder.attach` installs request and response
hooks.

What a commit rests on is rebuilt on the client side, as an agent framework would see
it: a mirror of each (agent, session) DeliveryLog holds the versions that session's
recorded GETs returned and its own commits installed (read-your-writes). The mirror is
built to know a subset of what the bus recorded, so that the checker can miss an anomaly
through it but not invent one: a register records versions the client is never told, an
advanced test clock may have expired entries (the mirror then forgets everything), and a
create or an idempotent replay touches no DeliveryLog entry. Known limits, which the
tests using it stay clear of: a history starts on a fresh store (ORI on) unless the test
sets :attr:`Recorder.ori`; ORI switched while a commit is in flight labels it with the
state at sending; sessions are driven only through recorded clients; and an entry
expiring in real time (``SBUS_SESSION_TTL``) is not modelled.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import jwt

from tests.history.record import History, Op, OpKind, Result, installed

OP_KEY = "sbus_history_op"
MIRRORED = frozenset({"commit", "multi", "rollback", "delete"})
AGENT_HEADERS = ("x-agent-id", "x-sbus-agent-id")
SESSION_HEADER = "x-sbus-session-id"


class Recorder:
    def __init__(self, history: History | None = None) -> None:
        self.history = history if history is not None else History()
        self.earlier: list[History] = []  # closed by an /admin/reset
        self._mirrors: dict[tuple[str, str], dict[str, int]] = {}
        self._lock = threading.Lock()
        self._processes: dict[int, int] = {}  # client -> its current process number
        self._busy: set[int] = set()  # processes with a request in flight
        self._next_process = 0
        self.ori = True
        # A test that records anomalies on purpose checks its history itself.
        self.checked_by_test = False

    def histories(self) -> list[History]:
        """Every history recorded, the current one last (one per /admin/reset)."""
        return [*self.earlier, self.history]

    def attach(self, client: httpx.Client) -> httpx.Client:
        """Record ``client``'s requests as one process; returns the client."""
        key = id(client)
        client.event_hooks = {
            "request": [*client.event_hooks["request"], lambda r: self.sent(key, r)],
            "response": [*client.event_hooks["response"], answered],
        }
        return client

    def attach_async(self, client: httpx.AsyncClient) -> httpx.AsyncClient:
        """The same for an ``httpx.AsyncClient`` (whose hooks are coroutines)."""
        key = id(client)

        async def on_request(request: httpx.Request) -> None:
            self.sent(key, request)

        async def on_response(response: httpx.Response) -> None:
            await response.aread()
            answered(response)

        client.event_hooks = {
            "request": [*client.event_hooks["request"], on_request],
            "response": [*client.event_hooks["response"], on_response],
        }
        return client

    def process_of(self, client_key: int) -> int:
        """A small process number per client (Elle wants integers). A process sends one
        request at a time, as Elle requires: a client with a request still in flight
        (concurrent requests on one async client, or one that never got an answer) is
        given a fresh process number, as Jepsen does after an indeterminate operation (a
        process whose operation ended ``info`` never sends again)."""
        with self._lock:
            process = self._processes.get(client_key)
            if process is None or process in self._busy:
                process = self._next_process
                self._next_process += 1
                self._processes[client_key] = process
            self._busy.add(process)
            return process

    # --- requests ---------------------------------------------------------------------

    def sent(self, client_key: int, request: httpx.Request) -> None:
        """Request hook: stamp the invocation (the answer goes to :func:`answered`)."""
        body = _json(request.content)
        kind, keys = _classify(request, body)
        if kind is None:
            request.extensions[OP_KEY] = (self, None, body)
            return
        agent = _agent(request, body)
        session = _session(request, body)
        op = self.history.begin(self.process_of(client_key), agent, session, kind, ori=self.ori)
        request.extensions[OP_KEY] = (self, op, body)
        if kind == "get":
            return
        op.guards = [(k, _expected(request, body, k)) for k in keys]
        if kind != "create" and agent is not None:
            # Only the written keys an expected version guards leave the read set (an
            # unconditional rollback rests on its caller's read of its own key), and
            # those a multi-commit creates: "not live" is a create's guard.
            written = {k for k, guard in op.guards if guard is not None} | _created(body)
            with self._lock:
                mirror = dict(self._mirrors.get((agent, session), {}))
            pairs = {(k, v) for k, v in mirror.items() if k not in written}
            for item in body.get("read_set") or []:
                if isinstance(item, dict) and item.get("key") not in written:
                    pairs.add((item["key"], item["version_at_read"]))
            op.reads = sorted(pairs)
        op.mandate = _jti(body.get("mandate") or request.headers.get("x-sbus-mandate"))
        op.idem = request.headers.get("idempotency-key")

    # --- answers ----------------------------------------------------------------------

    def answered(self, op: Op | None, response: httpx.Response, body: dict[str, Any]) -> None:
        response.read()
        request = response.request
        answer = _json(response.content) if response.content else {}
        status = response.status_code
        if op is None:
            self._side_effects(request, body, status, answer)
            return
        error = answer.get("error") if status >= 400 else None
        result: Result
        if 200 <= status < 300:
            result = "ok"
        elif status >= 500 and (status != 503 or answer.get("outcome") == "unknown"):
            result = "info"
        else:
            result = "fail"
        if result != "info":
            with self._lock:
                self._busy.discard(op.process)
        op.replay = response.headers.get("idempotent-replayed") == "true"
        if op.op == "get":
            self._read(op, request, body, status, answer)
        elif result == "ok":
            op.writes = installed(op, answer, response.headers.get("etag"))
            if op.op == "create" and status != 201:
                result = "fail"  # POST /admin/shard: 200 already_exists installed nothing
        if op.op == "get" and op.reads:
            result = "ok"  # a tombstone's 404 still read a version
        self.history.end(op, result, status, error)
        if op.replay:
            self.history.resolve_retry(op)
        if op.agent is None:
            return
        key = (op.agent, op.session)
        with self._lock:
            if error == "SessionExpired":
                self._mirrors.pop(key, None)
            elif op.op in MIRRORED and result == "ok" and not op.replay:
                # Read-your-writes: the bus sets the committer's entries; a create and a
                # replay set none.
                self._mirrors.setdefault(key, {}).update(op.writes)

    def _read(
        self,
        op: Op,
        request: httpx.Request,
        body: dict[str, Any],
        status: int,
        answer: dict[str, Any],
    ) -> None:
        """A GET that answered a version read it (a tombstone's 404 names its version);
        a bulk read (POST /read) read every version it answered, tombstones included."""
        if request.method == "POST":
            if status != 200:
                return
            op.reads = [(s["key"], s["version"]) for s in answer.get("shards", [])]
            op.reads += [
                (m["key"], m["version"]) for m in answer.get("missing", []) if "version" in m
            ]
            recorded = body.get("record", True) is not False
        elif status == 200 or answer.get("error") == "ShardDeleted":
            op.reads = [(_shard_key(request), answer["version"])]
            recorded = request.url.params.get("record", "true") != "false"
        else:
            return
        if op.agent is not None and recorded:
            with self._lock:
                self._mirrors.setdefault((op.agent, op.session), {}).update(op.reads)

    def _side_effects(
        self, request: httpx.Request, body: dict[str, Any], status: int, answer: dict[str, Any]
    ) -> None:
        """Requests that change what later commits rest on without being operations."""
        if status != 200:
            return
        path = request.url.path
        with self._lock:
            if path == "/session" and isinstance(answer.get("agent_id"), str):
                # The answer names whose session was reset (an admin may reset another's).
                self._mirrors.pop((answer["agent_id"], _session(request, body)), None)
            elif path in ("/admin/config", "/stats") and "ori_enabled" in answer:
                self.ori = bool(answer["ori_enabled"])
            elif path == "/admin/test/advance-clock":
                self._mirrors.clear()
            elif path == "/admin/reset":
                # Versions start again at 0: what follows is a new history.
                self._mirrors.clear()
                self.earlier.append(self.history)
                self.history = History()


def answered(response: httpx.Response) -> None:
    """Response hook: hand the answer to the recorder that saw the request."""
    entry = response.request.extensions.get(OP_KEY)
    if entry is not None:
        recorder, op, body = entry
        recorder.answered(op, response, body)


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _shard_key(request: httpx.Request) -> str:
    return request.url.path[len("/shard/") :]


def _classify(request: httpx.Request, body: dict[str, Any]) -> tuple[OpKind | None, list[str]]:
    path, method = request.url.path, request.method
    if method == "GET" and path.startswith("/shard/"):
        return "get", [_shard_key(request)]
    if method == "DELETE" and path.startswith("/shard/"):
        return "delete", [_shard_key(request)]
    if method != "POST":
        return None, []
    if path == "/read":
        keys = body.get("keys")
        return "get", [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []
    if path in ("/shard", "/admin/shard"):
        return "create", [body.get("key", "")]
    if path in ("/commit", "/commit/v2"):
        return "commit", [body.get("key", "")]
    if path == "/rollback":
        return "rollback", [body.get("key", "")]
    if path == "/commit/multi":
        return "multi", [w.get("key", "") for w in body.get("writes") or [] if isinstance(w, dict)]
    return None, []


def _created(body: dict[str, Any]) -> set[str]:
    """The keys a multi-commit body creates (protocol.md §3.1)."""
    writes = body.get("writes") or []
    return {w.get("key", "") for w in writes if isinstance(w, dict) and w.get("create") is True}


def _claims(token: str | None) -> dict[str, Any]:
    if not token:
        return {}
    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}
    return claims


def _agent(request: httpx.Request, body: dict[str, Any]) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        sub = _claims(auth[7:].strip()).get("sub")
        if isinstance(sub, str):
            return sub
    for header in AGENT_HEADERS:
        if request.headers.get(header):
            return request.headers[header]
    agent = body.get("agent_id") or request.url.params.get("agent_id")
    return str(agent) if agent else None


def _session(request: httpx.Request, body: dict[str, Any]) -> str:
    session = body.get("session_id")
    if session is None:
        session = request.headers.get(SESSION_HEADER) or request.url.params.get("session_id")
    return str(session or "")


def _expected(request: httpx.Request, body: dict[str, Any], key: str) -> int | None:
    for write in body.get("writes") or []:
        if isinstance(write, dict) and write.get("key") == key:
            value = write.get("expected_version", write.get("expected_ver"))
            return value if isinstance(value, int) else None
    value = body.get("expected_version", body.get("expected_ver"))
    if value is None:
        value = request.url.params.get("expected_version")
    if value is None:
        tag = request.headers.get("if-match", "").strip('" ')
        value = tag if tag.isdigit() else None
    if request.url.path in ("/shard", "/admin/shard") or value is None:
        return None
    return int(value) if str(value).isdigit() else None


def _jti(token: str | None) -> str | None:
    jti = _claims(token).get("jti")
    return jti if isinstance(jti, str) else None
