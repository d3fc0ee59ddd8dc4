"""Every problem code the server can answer, raised by a real ``Bus`` as its own class
with its base, status, code, detail and every field docs/errors.md documents for it.

Table-driven from the server itself: the codes and statuses come from
``sbus.api.problems.STATUS`` and the error class tree (the walk of
tests/unit/test_docs_tables.py), so a new server code without a client class fails here;
the fields from docs/errors.md's "extra fields" column. A mock transport answers the
problem document. (tests/client/test_codes.py checks the generated classes against the
same table; this checks what a caller catches.)
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

import sbus_client
from sbus.api.problems import STATUS
from sbus_client import (
    Bus,
    ConflictError,
    CrossShardStale,
    SBusError,
    StoreUnavailable,
    TransportRetry,
    VersionMismatch,
)
from tests.unit.test_docs_tables import ERRORS_MD, server_table, table_lines

BUILTINS: tuple[type[Exception], ...] = (LookupError, PermissionError, ValueError, RuntimeError)

# The fixed bases (what LangGraph and other frameworks read to decide a retry).
BASES: dict[type[Exception], frozenset[str]] = {
    ConflictError: frozenset({"VersionMismatch", "CrossShardStale", "SessionExpired"}),
    LookupError: frozenset(
        {"ShardNotFound", "ShardDeleted", "VersionNotFound", "MandateNotFound", "NotFound"}
    ),
    PermissionError: frozenset(
        {
            "Unauthorized",
            "TokenRevoked",
            "AgentMismatch",
            "HostNotAllowed",
            "AdminDisabled",
            "CapabilityDenied",
            "MandateRequired",
            "MandateHolderMismatch",
            "MandateScopeMismatch",
            "MandateContextMismatch",
        }
    ),
    ValueError: frozenset(
        {
            "ValidationError",
            "AmbiguousField",
            "PreconditionConflict",
            "PreconditionRequired",
            "InvalidPrecondition",
            "IdempotencyKeyReused",
            "MalformedJSON",
            "UnsupportedMediaType",
            "MethodNotAllowed",
            "RequestTooLarge",
            "DeltaTooLarge",
            "FieldTooLarge",
            "ReadSetTooLarge",
            "TooManyWrites",
        }
    ),
    RuntimeError: frozenset(
        {
            "ShardAlreadyExists",
            "MandateConsumed",
            "MandateExpired",
            "SigningUnavailable",
            "RateLimited",
            "StoreUnavailable",
        }
    ),
}


def wire_codes() -> dict[str, int]:
    """Every code the server has a class for, with its one status: the emitted ones
    (the class walk) and the roots ``STATUS`` maps too (BadRequest, StateError, ...)."""
    codes: dict[str, int] = {}
    for cls, status in STATUS.items():
        codes.setdefault(cls.code, status)
    for code, statuses in server_table().items():
        assert len(statuses) == 1, (code, statuses)
        codes[code] = next(iter(statuses))
    return codes


CODES = wire_codes()


def expected_base(code: str, status: int) -> type[Exception]:
    """The table's base; a code outside it goes by its status class (a refusal of who
    you are is a PermissionError, a missing thing a LookupError)."""
    for base, codes in BASES.items():
        if code in codes:
            return base
    if status in (401, 403):
        return PermissionError
    if status == 404:
        return LookupError
    return ValueError if status < 500 else RuntimeError


def documented_fields() -> dict[str, list[str]]:
    """code -> the field names of docs/errors.md's last column (``name`` at the start of
    each comma-separated item; values like `ttl` after a colon are not names)."""
    fields: dict[str, list[str]] = {}
    for line in table_lines(ERRORS_MD.read_text(encoding="utf-8")):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        names = re.findall(r"(?:^|, )`([a-z_]+)[`:]", cells[3])
        for code in re.findall(r"`([A-Za-z]+)`", cells[1]):
            fields.setdefault(code, [])
            fields[code] += [n for n in names if n not in fields[code]]
    return fields


FIELDS = documented_fields()


def client_class(code: str) -> type[SBusError]:
    cls = getattr(sbus_client, code, None)
    assert isinstance(cls, type) and issubclass(cls, SBusError), (
        f"sbus_client has no exception class for the server's code {code!r}"
    )
    return cls


def test_the_walk_sees_the_whole_table() -> None:
    """Guard the table itself, so an empty walk cannot pass everything below."""
    assert len(CODES) >= 40
    assert CODES["VersionMismatch"] == 409
    assert CODES["StoreUnavailable"] == 503
    assert CODES["Unauthorized"] == 401
    assert set().union(*BASES.values()) <= set(CODES)
    assert FIELDS["CrossShardStale"] == ["key", "version_at_read", "current_version", "stale_keys"]
    assert FIELDS["SessionExpired"] == ["reason", "agent_id"]
    assert FIELDS["StoreUnavailable"] == ["outcome"]


# --- raised from a problem document --------------------------------------------------


def problem_bus(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Bus:
    """A Bus whose every request but the version check gets this answer, sent once (no
    transport retry, so a 429 or 503 is raised at once)."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/version":
            return httpx.Response(200, json={"name": "sbus", "version": "0.1.0", "api": 1})
        return httpx.Response(
            status,
            json=body,
            headers={"content-type": "application/problem+json", **(headers or {})},
        )

    http = httpx.Client(transport=httpx.MockTransport(answer), base_url="http://bus.test")
    return Bus("http://bus.test", agent_id="a", http_client=http, retry=TransportRetry(attempts=1))


def problem(code: str, status: int, **fields: Any) -> dict[str, Any]:
    return {
        "type": f"https://sbus.dev/problems/{code}",
        "title": code,
        "status": status,
        "detail": f"the {code} detail",
        "error": code,
        **fields,
    }


@pytest.mark.parametrize("code", sorted(CODES))
def test_each_problem_raises_its_class_with_its_fields(code: str) -> None:
    status = CODES[code]
    fields: dict[str, Any] = {name: f"<{name}>" for name in FIELDS.get(code, [])}
    if code == "StoreUnavailable":
        fields["outcome"] = "not_applied"
    body = problem(code, status, **fields)
    with (
        problem_bus(status, body, {"retry-after": "0"}) as bus,
        bus.session(keep=True) as s,
        pytest.raises(SBusError) as caught,
    ):
        s.read("k")
    err = caught.value
    assert type(err) is client_class(code)
    base = expected_base(code, status)
    assert isinstance(err, base), f"{code} must be caught as {base.__name__}"
    assert [b for b in BUILTINS if isinstance(err, b)] == ([] if base is ConflictError else [base])
    assert (err.status, err.code, err.detail) == (status, code, f"the {code} detail")
    assert err.problem == body
    for name, value in fields.items():
        assert getattr(err, name) == value, (code, name)
    assert str(err).startswith(f"the {code} detail")


def test_the_named_fields_keep_their_values() -> None:
    body = problem("VersionMismatch", 409, key="plan", expected=2, found=5)
    with (
        problem_bus(409, body) as bus,
        bus.session(keep=True) as s,
        pytest.raises(VersionMismatch) as vm,
    ):
        s.commit("plan", "x", expected=2)
    assert (vm.value.key, vm.value.expected, vm.value.found) == ("plan", 2, 5)
    assert "'plan'" in str(vm.value)  # says which key to re-read

    stale = [{"key": "b", "version_at_read": 1, "current_version": 3}]
    body = problem(
        "CrossShardStale", 409, key="b", version_at_read=1, current_version=3, stale_keys=stale
    )
    with (
        problem_bus(409, body) as bus,
        bus.session(keep=True) as s,
        pytest.raises(CrossShardStale) as cs,
    ):
        s.commit("a", "x", expected=0)
    assert cs.value.stale_keys == stale
    assert "b" in str(cs.value).split("Next:")[-1]

    body = problem("StoreUnavailable", 503, outcome="unknown")
    with (
        problem_bus(503, body) as bus,
        bus.session(keep=True) as s,
        pytest.raises(StoreUnavailable) as su,
    ):
        s.commit("a", "x", expected=0)
    assert su.value.outcome == "unknown"
