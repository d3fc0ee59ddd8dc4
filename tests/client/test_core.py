"""The client's I/O-free core, driven by a scripted fake: request bytes, the transport
retry decisions, token refresh, error parsing and the update loop. No network, no time."""

from __future__ import annotations

import json
import re
import warnings
from typing import Any

import httpx
import pytest

from sbus_client import (
    BusUnreachable,
    CompatibilityWarning,
    ConflictError,
    CrossShardStale,
    Mandate,
    RetriesExhausted,
    SBusError,
    ShardDeleted,
    ShardNotFound,
    SigningUnavailable,
    StoreUnavailable,
    TransportRetry,
    Unauthorized,
    UnknownClientError,
    UnknownServerError,
    VersionMismatch,
)
from sbus_client._core import Ident
from sbus_client._retry import Backoff, full_jitter, retry_after
from sbus_client._wire import Call, error_of
from tests.client.fake import (
    calls,
    committed_response,
    connect_error,
    core,
    drive,
    json_response,
    problem,
    shard_body,
    shard_response,
    sleeps,
)

A = Ident("a", "s1")
KEY_RE = re.compile(r"^[0-9a-f]{32}$")


def header(call: Call, name: str) -> str | None:
    found = [v for k, v in call.headers if k.lower() == name.lower()]
    assert len(found) <= 1, call.headers
    return found[0] if found else None


def body(call: Call) -> Any:
    assert call.body is not None
    return json.loads(call.body)


# -- request building --------------------------------------------------------------


def test_commit_request_is_exact() -> None:
    result, steps = drive(
        core().commit(A, "plan", "v2", 3, rationale="why"), [committed_response(4)]
    )
    (call,) = calls(steps)
    assert (call.method, call.target) == ("POST", "/commit/v2")
    assert call.body == b'{"key":"plan","expected_version":3,"delta":"v2","rationale":"why"}'
    assert header(call, "Content-Type") == "application/json"
    assert header(call, "X-Agent-Id") == "a"
    assert header(call, "X-SBus-Session-Id") == "s1"
    assert KEY_RE.match(header(call, "Idempotency-Key") or "")
    assert header(call, "Authorization") is None
    assert (result.key, result.version, result.replayed) == ("plan", 4, False)


def test_every_state_change_gets_its_own_idempotency_key() -> None:
    c = core()
    _, first = drive(c.commit(A, "k", "x", 0), [committed_response(1)])
    _, second = drive(c.commit(A, "k", "x", 0), [committed_response(1)])
    k1, k2 = header(calls(first)[0], "Idempotency-Key"), header(calls(second)[0], "Idempotency-Key")
    assert k1 and k2 and k1 != k2


def test_expected_accepts_shard_or_committed_of_the_same_key_only() -> None:
    c = core()
    shard = c_shard = drive(c.read(A, "plan"), [shard_response("plan", 5, "x")])[0]
    _, steps = drive(c.commit(A, "plan", "y", c_shard), [committed_response(6)])
    assert body(calls(steps)[0])["expected_version"] == 5
    with pytest.raises(ValueError, match="'plan', not of 'other'"):
        drive(c.commit(A, "other", "y", shard), [])
    with pytest.raises(ValueError, match="version >= 0"):
        drive(c.commit(A, "plan", "y", -1), [])
    with pytest.raises(ValueError, match="version >= 0"):
        drive(c.commit(A, "plan", "y", True), [])


def test_state_change_without_agent_fails_before_any_request() -> None:
    c = core(agent_id=None)
    nobody = Ident(None, "s")
    for op in (
        c.commit(nobody, "k", "x", 0),
        c.delete(nobody, "k", 0),
        c.commit_many(nobody, [("k", "x", 0)], [], []),
        c.rollback(nobody, "k", 0, None),
        c.update(nobody, "k", lambda s: "x", None, 1.0),
        c.issue_mandate(nobody, "b", ["k"], None, 60),
    ):
        with pytest.raises(ValueError, match="needs an agent"):
            drive(op, [])


def test_token_mode_needs_no_agent_id() -> None:
    c = core(agent_id=None, token="tok")
    _, steps = drive(c.commit(Ident(None, "s"), "k", "x", 0), [committed_response(1)])
    call = calls(steps)[0]
    assert header(call, "Authorization") == "Bearer tok"
    assert header(call, "X-Agent-Id") is None


def test_unrecorded_read_and_key_escaping() -> None:
    _, steps = drive(core().read(A, "plan/step 1", record=False), [shard_response("x", 0, "")])
    assert calls(steps)[0].target == "/shard/plan/step%201?record=false"
    _, steps = drive(core().read(A, "a:b@c.d_e-f/g"), [shard_response("x", 0, "")])
    assert calls(steps)[0].target == "/shard/a:b@c.d_e-f/g"


def test_delete_sends_mandate_in_headers_and_returns_tombstone_version() -> None:
    m = Mandate("jwt", "j1", "2026-01-01T00:00:00.000Z", "h", {"order": 42})
    version, steps = drive(
        core().delete(A, "k", 4, mandate=m), [httpx.Response(204, headers={"ETag": '"5"'})]
    )
    call = calls(steps)[0]
    assert version == 5
    assert (call.method, call.target, call.body) == ("DELETE", "/shard/k?expected_version=4", b"{}")
    assert header(call, "X-SBus-Mandate") == "jwt"
    assert header(call, "X-SBus-Mandate-Context") == '{"order":42}'
    assert KEY_RE.match(header(call, "Idempotency-Key") or "")


def test_commit_with_mandate_object_sends_its_context_unless_overridden() -> None:
    m = Mandate("jwt", "j1", "t", "h", {"order": 42})
    _, steps = drive(core().commit(A, "k", "x", 0, mandate=m), [committed_response(1)])
    assert body(calls(steps)[0])["mandate"] == "jwt"
    assert body(calls(steps)[0])["context"] == {"order": 42}
    _, steps = drive(
        core().commit(A, "k", "x", 0, mandate="raw", context={"o": 1}), [committed_response(1)]
    )
    assert (body(calls(steps)[0])["mandate"], body(calls(steps)[0])["context"]) == ("raw", {"o": 1})


def test_commit_many_sends_writes_creates_deletes_in_one_request() -> None:
    answer = json_response(
        200,
        {
            "results": [
                {"key": "a", "new_version": 1},
                {"key": "c", "new_version": 0},
                {"key": "d", "new_version": 5},
            ],
            "commit_id": "f" * 32,
        },
    )
    result, steps = drive(
        core().commit_many(A, [("a", "1", 0)], [("c", "x")], [("d", 4)]), [answer]
    )
    (call,) = calls(steps)
    assert call.target == "/commit/multi"
    assert body(call) == {
        "writes": [
            {"key": "a", "expected_version": 0, "delta": "1"},
            {"key": "c", "create": True, "delta": "x"},
            {"key": "d", "delete": True, "expected_version": 4},
        ]
    }
    assert {k: c.version for k, c in result.items()} == {"a": 1, "c": 0, "d": 5}
    assert {c.commit_id for c in result.values()} == {"f" * 32}
    with pytest.raises(ValueError, match="at least one"):
        drive(core().commit_many(A, [], [], []), [])


def test_read_many_raises_the_missing_keys_class_unless_missing_ok() -> None:
    answer = json_response(
        200,
        {
            "shards": [shard_body("b", 2, "B"), shard_body("a", 1, "A")],
            "missing": [{"key": "c", "error": "ShardDeleted", "version": 4}],
        },
    )
    found, steps = drive(core().read_many(A, ["a", "b", "c"], True, True), [answer])
    assert list(found) == ["a", "b"]
    assert (found["a"].version, found["a"].etag, found["b"].content) == (1, '"1"', "B")
    assert body(calls(steps)[0]) == {"keys": ["a", "b", "c"], "record": True}
    with pytest.raises(ShardDeleted) as err:
        drive(core().read_many(A, ["a", "b", "c"], True, False), [answer])
    assert (err.value.key, err.value.version, err.value.status) == ("c", 4, 404)
    assert isinstance(err.value, LookupError)
    assert drive(core().read_many(A, [], True, False), [])[0] == {}


def test_list_and_scan_follow_every_page() -> None:
    pages = [
        json_response(200, {"shards": ["n/a", "n/b"], "count": 2, "next_after": "n/b"}),
        json_response(200, {"shards": ["n/c"], "count": 1, "next_after": None}),
    ]
    keys, steps = drive(core().list_keys(A, "n/"), pages)
    assert keys == ["n/a", "n/b", "n/c"]
    assert [c.target for c in calls(steps)] == [
        "/shards?prefix=n%2F",
        "/shards?prefix=n%2F&after=n%2Fb",
    ]
    scanned = [
        json_response(
            200,
            {"shards": ["x"], "items": [shard_body("x", 3, "X")], "count": 1, "next_after": None},
        )
    ]
    shards, steps = drive(core().scan(A, ""), scanned)
    assert [(s.key, s.version, s.content) for s in shards] == [("x", 3, "X")]
    assert calls(steps)[0].target == "/shards?include=content"
    older = json_response(200, {"shards": ["x"], "count": 1, "next_after": None})
    with pytest.raises(UnknownServerError, match="include=content"):
        drive(core().scan(A, ""), [older])


# -- transport retries -------------------------------------------------------------


def test_connection_error_resends_the_same_bytes_and_key() -> None:
    result, steps = drive(
        core().commit(A, "k", "x", 0),
        [connect_error(), httpx.ReadTimeout("lost"), committed_response(1, replayed=True)],
    )
    first, second, third = calls(steps)
    assert first == second == third  # body, headers and Idempotency-Key identical
    assert sleeps(steps) == [0.05, 0.1]  # full jitter at its maximum: base, 2 x base
    assert (result.version, result.replayed) == (1, True)


def test_429_waits_retry_after_then_resends() -> None:
    limited = problem(429, "RateLimited", {"Retry-After": "3"}, retry_after=3)
    _, steps = drive(core().commit(A, "k", "x", 0), [limited, committed_response(1)])
    assert sleeps(steps) == [3.0]
    assert calls(steps)[0] == calls(steps)[1]


@pytest.mark.parametrize("outcome", ["not_applied", "unknown"])
def test_503_with_outcome_is_resent(outcome: str) -> None:
    busy = problem(503, "StoreUnavailable", {"Retry-After": "1"}, outcome=outcome)
    _, steps = drive(core().commit(A, "k", "x", 0), [busy, committed_response(1)])
    assert sleeps(steps) == [1.0]
    assert len(calls(steps)) == 2


@pytest.mark.parametrize("status", [502, 503, 504])
def test_proxy_answer_without_problem_is_resent(status: int) -> None:
    proxy = httpx.Response(
        status, text="<html>bad gateway</html>", headers={"content-type": "text/html"}
    )
    _, steps = drive(core().commit(A, "k", "x", 0), [proxy, committed_response(1)])
    assert len(calls(steps)) == 2


def test_signing_unavailable_is_not_resent() -> None:
    refusal = problem(503, "SigningUnavailable")
    with pytest.raises(SigningUnavailable) as err:
        drive(core().issue_mandate(A, "b", ["k"], None, 60), [refusal])
    assert isinstance(err.value, RuntimeError)


@pytest.mark.parametrize(
    "answer",
    [
        problem(409, "VersionMismatch", key="k", expected=0, found=1),
        problem(422, "ValidationError", errors=[]),
        problem(500, "KeyConfigError"),
        problem(502, "SomethingNew"),  # a problem document: the bus decided, not a proxy
        httpx.Response(500, text="oops"),
    ],
)
def test_decided_answers_are_not_resent(answer: httpx.Response) -> None:
    with pytest.raises(SBusError):
        drive(core().commit(A, "k", "x", 0), [answer])


def test_transport_retries_are_bounded_by_attempts() -> None:
    c = core(retry=TransportRetry(attempts=3))
    with pytest.raises(BusUnreachable) as gone:
        drive(c.commit(A, "k", "x", 0), [connect_error()] * 3)
    assert (gone.value.attempts, gone.value.url) == (3, c.base_url)
    assert isinstance(gone.value, RuntimeError) and isinstance(gone.value, SBusError)
    assert isinstance(gone.value.__cause__, httpx.ConnectError)
    assert str(gone.value).startswith(
        f"no answer from the bus at {c.base_url} after 3 attempt(s) "
        "(ConnectError: connection refused) [BusUnreachable] Next: check that the bus is running"
    )
    busy = problem(503, "StoreUnavailable", outcome="unknown")
    with pytest.raises(StoreUnavailable) as err:
        drive(c.commit(A, "k", "x", 0), [busy] * 3)
    assert (err.value.outcome, isinstance(err.value, RuntimeError)) == ("unknown", True)


def test_retry_after_past_the_budget_is_not_waited_for() -> None:
    c = core(retry=TransportRetry(max_elapsed=10.0))
    limited = problem(429, "RateLimited", {"Retry-After": "60"}, retry_after=60)
    with pytest.raises(SBusError) as err:
        drive(c.commit(A, "k", "x", 0), [limited])
    assert err.value.code == "RateLimited"


def test_elapsed_budget_stops_resending() -> None:
    now = [0.0]
    c = core(retry=TransportRetry(attempts=100, max_elapsed=1.0), clock=lambda: now[0])

    def late(call: Call) -> httpx.TransportError:
        now[0] += 1.0
        return connect_error()

    _, steps = drive(c.commit(A, "k", "x", 0), [connect_error(), committed_response(1)])
    assert len(calls(steps)) == 2
    with pytest.raises(BusUnreachable):
        drive(c.commit(A, "k", "x", 0), [connect_error(), late])


def test_callable_token_is_asked_per_send_and_once_more_after_401() -> None:
    issued = iter(["t1", "t2", "t3", "t4"])
    c = core(token=lambda: next(issued))
    _, steps = drive(
        c.commit(A, "k", "x", 0), [problem(401, "Unauthorized"), committed_response(1)]
    )
    first, second = calls(steps)
    assert (header(first, "Authorization"), header(second, "Authorization")) == (
        "Bearer t1",
        "Bearer t2",
    )
    assert header(first, "Idempotency-Key") == header(second, "Idempotency-Key")
    assert first.body == second.body
    with pytest.raises(Unauthorized) as err:
        drive(c.commit(A, "k", "x", 0), [problem(401, "Unauthorized")] * 2)
    assert isinstance(err.value, PermissionError)


def test_static_token_is_not_resent_after_401() -> None:
    with pytest.raises(Unauthorized):
        drive(core(token="tok").commit(A, "k", "x", 0), [problem(401, "Unauthorized")])


# -- errors ---------------------------------------------------------------------------


def test_error_carries_the_problem_fields() -> None:
    err = error_of(problem(409, "VersionMismatch", key="k", expected=2, found=5))
    assert isinstance(err, VersionMismatch) and isinstance(err, ConflictError)
    assert (err.key, err.expected, err.found, err.status, err.code) == (
        "k",
        2,
        5,
        409,
        "VersionMismatch",
    )
    assert err.problem["found"] == 5
    assert "re-read 'k'" in str(err) and "now version 5" in str(err)


def test_cross_shard_stale_tells_which_keys_to_reread() -> None:
    stale = [
        {"key": "a", "version_at_read": 1, "current_version": 2},
        {"key": "b", "version_at_read": 0, "current_version": 3},
    ]
    err = error_of(
        problem(
            409, "CrossShardStale", key="a", version_at_read=1, current_version=2, stale_keys=stale
        )
    )
    assert isinstance(err, CrossShardStale)
    assert err.stale_keys == stale
    assert "re-read the keys in stale_keys (a, b)" in str(err)


def test_unknown_codes_fall_back_by_status_class() -> None:
    client = error_of(problem(418, "Teapot"))
    server = error_of(problem(507, "DiskFull"))
    assert isinstance(client, UnknownClientError) and isinstance(client, ValueError)
    assert isinstance(server, UnknownServerError) and isinstance(server, RuntimeError)
    assert (client.code, client.status, server.code) == ("Teapot", 418, "DiskFull")
    plain = error_of(httpx.Response(404, text="not here"))
    assert isinstance(plain, UnknownClientError)
    assert plain.detail == "HTTP 404 Not Found: not here"


def test_missing_field_reads_as_none_and_hint_falls_back() -> None:
    err = error_of(problem(404, "ShardNotFound"))
    assert isinstance(err, ShardNotFound)
    assert err.key is None
    assert str(err).startswith("ShardNotFound happened [ShardNotFound, HTTP 404] Next: ")


def test_retries_exhausted_keeps_attempts_and_last_error() -> None:
    last = VersionMismatch("x", status=409, problem={"error": "VersionMismatch"})
    err = RetriesExhausted(3, last)
    assert (err.attempts, err.last_error, isinstance(err, RuntimeError)) == (3, last, True)
    assert not isinstance(err, ConflictError)


# -- the update loop ---------------------------------------------------------------


def mismatch(found: int) -> httpx.Response:
    return problem(409, "VersionMismatch", key="n", expected=found - 1, found=found)


def test_update_rereads_and_reapplies_on_version_mismatch() -> None:
    seen: list[str] = []

    def incr(shard: Any) -> str:
        seen.append(shard.content)
        return str(int(shard.content) + 1)

    result, steps = drive(
        core().update(A, "n", incr, None, 30.0),
        [
            shard_response("n", 0, "0"),
            mismatch(1),
            shard_response("n", 1, "1"),
            committed_response(2),
        ],
    )
    assert seen == ["0", "1"]
    assert result is not None and result.version == 2
    assert sleeps(steps) == [0.01]
    second_commit = calls(steps)[3]
    assert body(second_commit) == {"key": "n", "expected_version": 1, "delta": "2"}
    assert header(calls(steps)[1], "Idempotency-Key") != header(second_commit, "Idempotency-Key")


def test_update_without_change_commits_nothing() -> None:
    result, steps = drive(
        core().update(A, "n", lambda s: None, None, 30.0), [shard_response("n", 0, "x")]
    )
    assert result is None and len(calls(steps)) == 1
    result, steps = drive(
        core().update(A, "n", lambda s: s.content, None, 30.0), [shard_response("n", 0, "x")]
    )
    assert result is None and len(calls(steps)) == 1


def test_update_gives_up_after_max_attempts() -> None:
    answers = [shard_response("n", 0, "0"), mismatch(1), shard_response("n", 1, "1"), mismatch(2)]
    with pytest.raises(RetriesExhausted) as err:
        drive(core().update(A, "n", lambda s: s.content + "!", 2, 30.0), answers)
    assert err.value.attempts == 2
    assert isinstance(err.value.last_error, VersionMismatch)


def test_update_does_not_rerun_other_conflicts() -> None:
    stale = problem(
        409, "CrossShardStale", key="o", version_at_read=0, current_version=1, stale_keys=[]
    )
    with pytest.raises(CrossShardStale):
        drive(
            core().update(A, "n", lambda s: "y", None, 30.0), [shard_response("n", 0, "x"), stale]
        )


# -- backoff and version ---------------------------------------------------------


def test_full_jitter_doubles_to_the_cap() -> None:
    assert [full_jitter(n, 0.02, 2.0, lambda: 1.0) for n in range(9)] == [
        0.02,
        0.04,
        0.08,
        0.16,
        0.32,
        0.64,
        1.28,
        2.0,
        2.0,
    ]
    assert full_jitter(500, 0.02, 2.0, lambda: 0.5) == 1.0


def test_backoff_counts_attempts_and_elapsed_time() -> None:
    now = [0.0]
    budget = Backoff(0.1, 1.0, 3, 10.0, clock=lambda: now[0], rand=lambda: 1.0)
    budget.start()
    assert [budget.delay(), budget.delay(), budget.delay()] == [0.1, 0.2, None]
    timed = Backoff(0.1, 1.0, None, 10.0, clock=lambda: now[0], rand=lambda: 1.0)
    timed.start()
    now[0] = 9.95
    assert timed.delay() == pytest.approx(0.05)  # clamped to what is left
    now[0] = 10.0
    assert timed.delay() is None


def test_retry_after_reads_seconds_and_dates() -> None:
    assert retry_after(httpx.Response(429, headers={"Retry-After": "7"})) == 7.0
    assert retry_after(httpx.Response(429, headers={"Retry-After": "soon"})) is None
    past = httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert retry_after(past) == 0.0
    assert retry_after(httpx.Response(429)) is None


def test_version_check_warns_only_on_another_api_major() -> None:
    c = core()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = drive(
            c.version(), [json_response(200, {"name": "sbus", "version": "0.1.0", "api": 1})]
        )[0]
        assert same is not None and same.api == 1
        assert drive(c.version(), [problem(404, "NotFound")])[0] is None
    with pytest.warns(CompatibilityWarning, match="speaks HTTP API 2"):
        drive(c.version(), [json_response(200, {"name": "sbus", "version": "9.0", "api": 2})])
