"""The I/O-free client: every operation, written once for the sync and async drivers.

An operation is a generator (:data:`sbus_client._wire.Op`): it yields a :class:`Call`
to send or a :class:`Sleep` to take, receives the response (or the transport
exception), and returns its result or raises an :class:`SBusError`. The drivers
(``_sync``, ``_async``) only send, sleep and loop, so request building, response
parsing, transport retries, the token refresh after a 401, the version check and
``Session.update``'s retry loop exist once.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from sbus_client._codes import VersionMismatch
from sbus_client._errors import (
    BusUnreachable,
    CompatibilityWarning,
    RetriesExhausted,
    UnknownServerError,
)
from sbus_client._models import (
    Committed,
    HistoryEntry,
    KeysPage,
    Mandate,
    ServerVersion,
    Shard,
)
from sbus_client._retry import Backoff, TransportRetry, resendable, retry_after
from sbus_client._wire import (
    Call,
    Op,
    Sleep,
    body_of,
    committed_of,
    dumps,
    error_of,
    etag_version,
    headers_for,
    history_of,
    identifier_problem,
    key_path,
    missing_error,
    multi_of,
    new_idempotency_key,
    shard_of,
    with_query,
)

# The HTTP API major this client speaks (GET /version answers {"api": N}).
API_MAJOR = 1

Token = str | Callable[[], str] | None
Expected = Shard | Committed | int
Write = tuple[str, str, Expected]
Create = tuple[str, str]
Delete = tuple[str, Expected]
MandateArg = Mandate | str | None


@dataclass(frozen=True)
class Ident:
    """Who a request speaks for: the agent and, inside a session, its session id."""

    agent: str | None
    session: str | None = None

    def __post_init__(self) -> None:
        # Checked where a Bus or session is made, not as a UnicodeEncodeError (or a 422)
        # at the first request: both travel in HTTP headers.
        for what, value in (("agent_id", self.agent), ("session_id", self.session)):
            if value is None:
                continue
            if not isinstance(value, str):
                raise TypeError(f"{what} must be a str, not {type(value).__name__}")
            problem = identifier_problem(value)
            if problem is not None:
                raise ValueError(f"{what} {value!r} {problem}")


def expected_version(key: str, expected: Expected) -> int:
    """The version a write is conditioned on; a Shard or Committed must be of ``key``
    (passing another key's version is a bug the bus could not detect)."""
    if isinstance(expected, Shard | Committed):
        if expected.key != key:
            raise ValueError(f"expected= is a version of {expected.key!r}, not of {key!r}")
        return expected.version
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise ValueError(f"expected= must be a Shard, a Committed or a version >= 0: {expected!r}")
    return expected


def key_list(keys: Iterable[str], what: str) -> list[str]:
    """A list of keys from any iterable but a str, which iterates its characters
    ("plan" would read, or grant, the keys "p", "l", "a" and "n")."""
    if isinstance(keys, str | bytes):
        raise TypeError(f"{what} takes a list of keys, not one key: [{keys!r}]")
    return list(keys)


def mandate_fields(
    mandate: MandateArg, context: Mapping[str, Any] | None
) -> tuple[str | None, dict[str, Any] | None]:
    """A Mandate object brings the context it was issued for unless one is given."""
    if mandate is None:
        return None, dict(context) if context is not None else None
    if isinstance(mandate, Mandate):
        chosen = context if context is not None else mandate.context
        return mandate.token, dict(chosen)
    return mandate, dict(context) if context is not None else None


class Core:
    """Configuration plus the operations. Immutable after construction, so one Core
    serves any number of threads or tasks."""

    def __init__(
        self,
        base_url: str,
        *,
        agent_id: str | None,
        token: Token,
        retry: TransportRetry,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        Ident(agent_id)  # refuses an agent id no header can carry, before any request
        if not base_url.lower().startswith(("http://", "https://")):
            # Caught here, not after a round of transport retries of every request.
            raise ValueError(f"the bus URL must start with http:// or https://: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.agent_id = agent_id
        self.token = token
        self.retry = retry
        self.clock = clock
        self.rand = rand

    # -- the exchange: transport retries and auth, for every operation ---------------

    def _bearer(self) -> str | None:
        token = self.token() if callable(self.token) else self.token
        return f"Bearer {token}" if token else None

    def exchange(self, call: Call) -> Op[httpx.Response]:
        """Send ``call`` until it gets a decided answer: a 2xx is returned, an error
        answer raised as its SBusError (BusUnreachable when nothing answered within the
        budget).
        Resends are byte-identical apart from the bearer token, which a callable
        token provides afresh for every send, and once more after a 401."""
        started = self.clock()
        budget: Backoff | None = None  # made on the first failure: most calls never need it
        refreshed = False
        sends = 0
        while True:
            bearer = self._bearer()
            reply = yield call if bearer is None else call.with_header("Authorization", bearer)
            assert reply is not None, "a driver answers every Call"
            sends += 1
            if isinstance(reply, httpx.Response):
                if reply.status_code < 300:
                    return reply
                if reply.status_code == 401 and callable(self.token) and not refreshed:
                    refreshed = True  # the token may have rotated since it was fetched
                    continue
            if not resendable(reply):
                raise self.failure(reply, sends)
            if budget is None:
                budget = Backoff(
                    self.retry.base,
                    self.retry.cap,
                    self.retry.attempts,
                    self.retry.max_elapsed,
                    clock=self.clock,
                    rand=self.rand,
                    started=started,
                )
            hint = retry_after(reply) if isinstance(reply, httpx.Response) else None
            wait = budget.delay(hint or 0.0)
            if wait is None:
                raise self.failure(reply, sends)
            if wait > 0:
                yield Sleep(wait)

    def failure(self, reply: httpx.Response | httpx.TransportError, sends: int) -> Exception:
        """The exception for an answer the transport loop will not (or may no longer)
        resend: the answer's SBusError, or BusUnreachable when nothing answered."""
        if isinstance(reply, httpx.Response):
            return error_of(reply)
        unreachable = BusUnreachable.after(self.base_url, sends, reply)
        unreachable.__cause__ = reply
        return unreachable

    def need_agent(self, ident: Ident, what: str) -> None:
        """Fail before any request: the bus would refuse (422) a state change that
        names no agent. In token mode the token's subject is the agent."""
        if ident.agent is None and self.token is None:
            raise ValueError(
                f"{what} needs an agent: pass agent_id to Bus(...) or bus.session(...)"
            )

    def version(self) -> Op[ServerVersion | None]:
        """One GET /version, no retries; warns on another API major. None: unknown
        (an older server answers 404)."""
        reply = yield Call("GET", "/version", headers_for(None, None, body=False))
        if isinstance(reply, httpx.TransportError):
            raise reply
        assert reply is not None
        if reply.status_code != 200:
            return None
        try:
            body = reply.json()
            found = ServerVersion(str(body["name"]), str(body["version"]), int(body["api"]))
        except (ValueError, KeyError, TypeError):
            return None
        if found.api != API_MAJOR:
            warnings.warn(
                f"the bus at {self.base_url} speaks HTTP API {found.api} (server "
                f"{found.version}); this sbus-client speaks API {API_MAJOR}: upgrade the "
                "one that is older",
                CompatibilityWarning,
                stacklevel=6,  # the caller of the Session method that asked
            )
        return found

    # -- reads ----------------------------------------------------------------------

    def read(self, ident: Ident, key: str, record: bool = True) -> Op[Shard]:
        path = key_path("/shard/", key)
        target = path if record else with_query(path, {"record": "false"})
        call = Call("GET", target, headers_for(ident.agent, ident.session, body=False))
        response = yield from self.exchange(call)
        return shard_of(body_of(response), response.headers.get("etag"))

    def read_many(
        self, ident: Ident, keys: Iterable[str], record: bool, missing_ok: bool
    ) -> Op[dict[str, Shard]]:
        keys = key_list(keys, "read_many")
        if not keys:
            return {}
        body = dumps({"keys": keys, "record": record})
        call = Call("POST", "/read", headers_for(ident.agent, ident.session, body=True), body)
        answer = body_of((yield from self.exchange(call)))
        found = {s.key: s for s in (shard_of(item) for item in answer.get("shards", ()))}
        if not missing_ok:
            for item in answer.get("missing", ()):
                raise missing_error(item)
        return {key: found[key] for key in keys if key in found}

    def keys_page(self, ident: Ident, prefix: str, after: str | None, content: bool) -> Op[Any]:
        target = with_query(
            "/shards",
            {"prefix": prefix or None, "after": after, "include": "content" if content else None},
        )
        call = Call("GET", target, headers_for(ident.agent, ident.session, body=False))
        return body_of((yield from self.exchange(call)))

    def list_page(
        self, ident: Ident, prefix: str, after: str | None, limit: int | None
    ) -> Op[KeysPage]:
        target = with_query("/shards", {"prefix": prefix or None, "after": after, "limit": limit})
        call = Call("GET", target, headers_for(ident.agent, ident.session, body=False))
        page = body_of((yield from self.exchange(call)))
        return KeysPage([str(k) for k in page["shards"]], page.get("next_after"))

    def list_keys(self, ident: Ident, prefix: str) -> Op[list[str]]:
        keys: list[str] = []
        after: str | None = None
        while True:
            page = yield from self.keys_page(ident, prefix, after, content=False)
            keys.extend(str(k) for k in page["shards"])
            after = page.get("next_after")
            if after is None:
                return keys

    def scan(self, ident: Ident, prefix: str) -> Op[list[Shard]]:
        shards: list[Shard] = []
        after: str | None = None
        while True:
            page = yield from self.keys_page(ident, prefix, after, content=True)
            if "items" not in page:
                raise UnknownServerError(
                    "this bus does not serve GET /shards?include=content: upgrade it, or "
                    "list() the keys and read them with record=False",
                    status=200,
                )
            shards.extend(shard_of(item) for item in page["items"])
            after = page.get("next_after")
            if after is None:
                return shards

    def history(
        self, ident: Ident, key: str, limit: int | None, before: int | None
    ) -> Op[list[HistoryEntry]]:
        target = with_query(key_path("/history/", key), {"limit": limit, "before": before})
        call = Call("GET", target, headers_for(ident.agent, ident.session, body=False))
        return history_of(body_of((yield from self.exchange(call))))

    # -- writes: each carries a fresh Idempotency-Key, kept across transport retries --

    def _post(self, ident: Ident, path: str, payload: Mapping[str, Any]) -> Op[httpx.Response]:
        headers = headers_for(
            ident.agent, ident.session, body=True, idempotency_key=new_idempotency_key()
        )
        return (yield from self.exchange(Call("POST", path, headers, dumps(payload))))

    def create(
        self, ident: Ident, key: str, content: str, goal_tag: str, require_mandate: bool
    ) -> Op[Shard]:
        payload: dict[str, Any] = {"key": key, "content": content}
        if goal_tag:
            payload["goal_tag"] = goal_tag
        if require_mandate:
            payload["policy"] = {"require_mandate": True}
        response = yield from self._post(Ident(ident.agent), "/shard", payload)
        return shard_of(body_of(response), response.headers.get("etag"))

    def commit(
        self,
        ident: Ident,
        key: str,
        content: str,
        expected: Expected,
        *,
        mandate: MandateArg = None,
        context: Mapping[str, Any] | None = None,
        rationale: str | None = None,
    ) -> Op[Committed]:
        self.need_agent(ident, "a commit")
        payload: dict[str, Any] = {
            "key": key,
            "expected_version": expected_version(key, expected),
            "delta": content,
        }
        _add_optional(payload, mandate, context, rationale)
        response = yield from self._post(ident, "/commit/v2", payload)
        return committed_of(key, response)

    def commit_many(
        self,
        ident: Ident,
        writes: Iterable[Write],
        creates: Iterable[Create],
        deletes: Iterable[Delete],
        *,
        mandate: MandateArg = None,
        context: Mapping[str, Any] | None = None,
        rationale: str | None = None,
    ) -> Op[dict[str, Committed]]:
        self.need_agent(ident, "commit_many")
        items: list[dict[str, Any]] = [
            {"key": k, "expected_version": expected_version(k, e), "delta": c} for k, c, e in writes
        ]
        items += [{"key": k, "create": True, "delta": c} for k, c in creates]
        items += [
            {"key": k, "delete": True, "expected_version": expected_version(k, e)}
            for k, e in deletes
        ]
        if not items:
            raise ValueError("commit_many needs at least one write, create or delete")
        payload: dict[str, Any] = {"writes": items}
        _add_optional(payload, mandate, context, rationale)
        return multi_of((yield from self._post(ident, "/commit/multi", payload)))

    def rollback(
        self,
        ident: Ident,
        key: str,
        target_version: int,
        expected: Expected | None,
        *,
        mandate: MandateArg = None,
        context: Mapping[str, Any] | None = None,
    ) -> Op[Shard]:
        self.need_agent(ident, "a rollback")
        payload: dict[str, Any] = {"key": key, "target_version": target_version}
        if expected is not None:
            payload["expected_version"] = expected_version(key, expected)
        _add_optional(payload, mandate, context, None)
        response = yield from self._post(ident, "/rollback", payload)
        return shard_of(body_of(response), response.headers.get("etag"))

    def delete(
        self,
        ident: Ident,
        key: str,
        expected: Expected,
        *,
        mandate: MandateArg = None,
        context: Mapping[str, Any] | None = None,
    ) -> Op[int]:
        """The tombstone's version (a DELETE answers 204 with only its ETag)."""
        self.need_agent(ident, "a delete")
        version = expected_version(key, expected)
        token, ctx = mandate_fields(mandate, context)
        extra: dict[str, str] = {}
        if token is not None:
            extra["X-SBus-Mandate"] = token
        if ctx is not None:
            extra["X-SBus-Mandate-Context"] = dumps(ctx).decode()
        headers = headers_for(
            ident.agent,
            ident.session,
            body=True,
            idempotency_key=new_idempotency_key(),
            extra=extra,
        )
        target = with_query(key_path("/shard/", key), {"expected_version": version})
        response = yield from self.exchange(Call("DELETE", target, headers, b"{}"))
        return etag_version(response)

    def reset_session(self, ident: Ident) -> Op[None]:
        """POST /session: empty the (agent, session) DeliveryLog (idempotent by nature)."""
        headers = headers_for(ident.agent, ident.session, body=True)
        yield from self.exchange(Call("POST", "/session", headers, b"{}"))

    def issue_mandate(
        self,
        ident: Ident,
        holder: str,
        keys: Sequence[str],
        context: Mapping[str, Any] | None,
        ttl_s: int,
    ) -> Op[Mandate]:
        self.need_agent(ident, "issuing a mandate")
        ctx = dict(context or {})
        payload = {
            "holder": holder,
            "keys": key_list(keys, "issue_mandate"),
            "context": ctx,
            "ttl_s": ttl_s,
        }
        headers = headers_for(ident.agent, None, body=True)
        body = body_of(
            (yield from self.exchange(Call("POST", "/mandates", headers, dumps(payload))))
        )
        return Mandate(
            token=str(body["mandate"]),
            jti=str(body["jti"]),
            expires_at=str(body["expires_at"]),
            context_hash=str(body["context_hash"]),
            context=ctx,
        )

    # -- the pure-merge loop ----------------------------------------------------------

    def update(
        self,
        ident: Ident,
        key: str,
        fn: Callable[[Shard], str | None],
        max_attempts: int | None,
        max_elapsed: float,
    ) -> Op[Committed | None]:
        """Read, apply ``fn``, commit on that version; on VersionMismatch only, wait a
        full-jitter backoff (10 ms doubling to 1 s) and do it again."""
        self.need_agent(ident, "update")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be None (no cap) or >= 1, not {max_attempts}")
        if max_elapsed < 0:
            raise ValueError(f"max_elapsed must not be negative, not {max_elapsed}")
        budget = Backoff(0.01, 1.0, max_attempts, max_elapsed, clock=self.clock, rand=self.rand)
        budget.start()
        while True:
            shard = yield from self.read(ident, key)
            content = fn(shard)
            if content is None or content == shard.content:
                return None
            try:
                return (yield from self.commit(ident, key, content, shard))
            except VersionMismatch as err:
                wait = budget.delay()
                if wait is None:
                    raise RetriesExhausted(budget.attempts, err) from err
                if wait > 0:
                    yield Sleep(wait)


def _add_optional(
    payload: dict[str, Any],
    mandate: MandateArg,
    context: Mapping[str, Any] | None,
    rationale: str | None,
) -> None:
    token, ctx = mandate_fields(mandate, context)
    if token is not None:
        payload["mandate"] = token
    if ctx is not None:
        payload["context"] = ctx
    if rationale is not None:
        payload["rationale"] = rationale
