"""The client's exception tree (the per-code classes are generated into ``_codes``).

Frameworks decide whether to retry by an exception's *base* class (LangGraph, for
one, retries everything except ValueError, LookupError, PermissionError/OSError,
RuntimeError and a few more), so every server code also derives from the builtin that
says whether a blind retry can help::

    SBusError
    ├── ConflictError           VersionMismatch, CrossShardStale, SessionExpired:
    │                           re-read and redo (bus.transactional does it for you)
    ├── (LookupError)           ShardNotFound, ShardDeleted, VersionNotFound, ...
    ├── (PermissionError)       Unauthorized, CapabilityDenied, Mandate*Mismatch, ...
    ├── (ValueError)            ValidationError, IdempotencyKeyReused, size limits, ...
    │   └── UnknownClientError  a 4xx with a code this client does not know
    └── (RuntimeError)          ShardAlreadyExists, StoreUnavailable, RateLimited, ...
        ├── UnknownServerError  a 5xx with a code this client does not know
        ├── BusUnreachable      no answer at all once the transport retries are spent
        └── RetriesExhausted    a retry loop spent its budget

``str()`` of every error ends with what an agent should do next.
"""

from __future__ import annotations

from typing import Any, ClassVar


class CompatibilityWarning(UserWarning):
    """The server speaks another major version of the HTTP API than this client."""


class SBusError(Exception):
    """Base of every error the bus (or this client) reports.

    ``code`` is the problem's ``error`` field, ``status`` the HTTP status, ``detail``
    the server's explanation and ``problem`` the whole problem document. The fields a
    code documents (docs/errors.md) are also attributes, e.g. ``VersionMismatch.found``.
    """

    CODE: ClassVar[str] = ""
    STATUS: ClassVar[int] = 0
    FIELDS: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, detail: str, *, status: int | None = None, problem: dict[str, Any] | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.problem: dict[str, Any] = dict(problem or {})
        self.status: int = status if status is not None else type(self).STATUS
        code = self.problem.get("error")
        self.code: str = code if isinstance(code, str) else type(self).CODE
        for name in type(self).FIELDS:
            # A field a proxy or an older server left out reads as None.
            setattr(self, name, self.problem.get(name))

    def next_step(self) -> str:
        """What a caller (or an agent reading this) should do about the error."""
        hint = HINTS.get(self.code)
        if hint is None:
            return _base_hint(self)
        try:
            return hint.format_map({**self.problem, **vars(self), **_derived(self.problem)})
        except (KeyError, IndexError, ValueError):
            return _base_hint(self)

    def __str__(self) -> str:
        # Status 0: raised by the client itself (RetriesExhausted), no HTTP answer.
        http = f"HTTP {self.status}" if self.status else ""
        where = ", ".join(part for part in (self.code, http) if part)
        return f"{self.detail} [{where}] Next: {self.next_step()}"


class ConflictError(SBusError):
    """The state moved under the caller: re-read, redo the change, commit again.

    Only VersionMismatch, CrossShardStale and SessionExpired are conflicts; they are
    what ``bus.transactional`` re-runs on."""


class UnknownClientError(SBusError, ValueError):
    """A 4xx answer whose code this client does not know (a newer server, a proxy)."""


class UnknownServerError(SBusError, RuntimeError):
    """A 5xx answer whose code this client does not know (a newer server, a proxy)."""


class BusUnreachable(SBusError, RuntimeError):
    """No answer from the bus at all (refused, reset, timed out) after every transport
    resend. ``url`` is the bus, ``attempts`` the sends made; the httpx exception of the
    last one is ``__cause__``. A RuntimeError like StoreUnavailable: the transport loop
    has already waited, so a framework should not retry blindly on top of it."""

    CODE = "BusUnreachable"
    FIELDS = ("url", "attempts", "reason")
    url: str
    attempts: int
    reason: str

    @classmethod
    def after(cls, url: str, attempts: int, last: Exception) -> BusUnreachable:
        reason = f"{type(last).__name__}: {last}" if str(last) else type(last).__name__
        detail = f"no answer from the bus at {url} after {attempts} attempt(s) ({reason})"
        return cls(
            detail, problem={"error": cls.CODE, "url": url, "attempts": attempts, "reason": reason}
        )


class RetriesExhausted(SBusError, RuntimeError):
    """A retry loop (``transactional`` or ``Session.update``) spent its budget.

    ``attempts`` is how many times the work ran, ``last_error`` the conflict that
    ended the final attempt."""

    CODE = "RetriesExhausted"

    def __init__(self, attempts: int, last_error: BaseException | None) -> None:
        if isinstance(last_error, SBusError):
            last = f"{last_error.code}: {last_error.detail}"
        else:
            last = repr(last_error)
        detail = f"gave up after {attempts} attempt(s); last error: {last}"
        super().__init__(detail, problem={"error": self.CODE})
        self.attempts = attempts
        self.last_error = last_error

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickles as cls(*self.args), and args is the one detail string here:
        # rebuild from the constructor's own arguments, so the error survives a process
        # boundary (multiprocessing, task queues) and copy.copy.
        return (type(self), (self.attempts, self.last_error), self.__dict__)

    def next_step(self) -> str:
        last = self.last_error
        if isinstance(last, SBusError) and last.code == "SessionExpired":
            # Every attempt outlived its session: contention is not the cause.
            return (
                f"each attempt's session expired ({last.problem.get('reason')}): keep slow "
                "work such as LLM calls outside the function, read fewer keys, or raise "
                "SBUS_SESSION_TTL"
            )
        return (
            "the keys are heavily contended: raise max_retries/max_elapsed, split the "
            "work over fewer keys, or report the failure to whoever asked for it"
        )


def _base_hint(err: SBusError) -> str:
    if isinstance(err, ConflictError):
        return "re-read the keys involved, redo the change and commit again"
    if isinstance(err, LookupError):
        return "check the key (and version) you asked for"
    if isinstance(err, PermissionError):
        return "use a token or mandate that grants this; retrying as is cannot help"
    if isinstance(err, ValueError):
        return "fix the request; sending it again unchanged gets the same answer"
    return "wait and retry later, or report the failure"


def _derived(problem: dict[str, Any]) -> dict[str, str]:
    stale = problem.get("stale_keys")
    if isinstance(stale, list):
        names = [str(s.get("key")) for s in stale if isinstance(s, dict)]
        return {"stale_key_names": ", ".join(names)}
    return {}


# Per-code advice; fields of the problem document fill the braces. A hint that cannot
# be filled (a field missing) falls back to the advice of the error's base class.
HINTS: dict[str, str] = {
    "BusUnreachable": (
        "check that the bus is running and reachable at {url}; a state change may or may "
        "not have been applied, so re-read before redoing it"
    ),
    "VersionMismatch": (
        "someone committed {key!r} first (now version {found}, you expected {expected}): "
        "re-read {key!r} and apply your change to that content (Session.update does it)"
    ),
    "CrossShardStale": (
        "re-read the keys in stale_keys ({stale_key_names}), reconsider, and commit "
        "again; or start a new session (bus.session())"
    ),
    "SessionExpired": (
        "the session's reads expired ({reason}): start a new session and read again"
    ),
    "ShardNotFound": "{key!r} never existed: create it with Session.create",
    "ShardDeleted": "{key!r} was deleted (tombstone version {version}): create it again",
    "VersionNotFound": "version {target_version} of {key!r} is not retained: see history()",
    "ShardAlreadyExists": "{key!r} exists already: read it and commit instead of create",
    "CapabilityDenied": "the token lacks the {right!r} right on {key!r}: get one that has it",
    "MandateRequired": "{key!r} needs a mandate: obtain one (bus.issue_mandate) and pass it",
    "MandateConsumed": "that mandate was used already: obtain a new one",
    "MandateExpired": "that mandate expired: obtain a new one",
    "Unauthorized": "send a valid bearer token (Bus(token=...))",
    "TokenRevoked": "that token was revoked: obtain a new one",
    "StoreUnavailable": (
        "the store failed (outcome {outcome}); the client already retried: try later"
    ),
    "RateLimited": "slow down: retry after {retry_after} s",
    "IdempotencyKeyReused": "use a fresh Idempotency-Key for a different request",
}
