"""The S-Bus error tree.

Every failure the bus can report is a subclass of :class:`SBusError` with a stable
``code`` (the compat ``error`` field on the wire) and optional structured ``fields``
that are copied into the problem document. Only ``sbus.api.problems`` knows HTTP
statuses; everything below the API raises these classes and nothing else.

    SBusError
    ├── RequestError            the request itself is unacceptable (4xx before the store)
    │   ├── MalformedJSON, UnsupportedMediaType, RequestTooLarge, RequestTimeout
    │   ├── ValidationFailed (InvalidPattern: a scope or mandate-key pattern), InvalidCursor
    │   ├── AmbiguousField, PreconditionConflict, PreconditionRequired, InvalidPrecondition
    │   ├── DeltaTooLarge, FieldTooLarge, ReadSetTooLarge, TooManyWrites, AgentRequired
    │   ├── IdempotencyKeyReused, RouteNotFound, MethodNotAllowed, RateLimited
    │   └── HostNotAllowed, CrossSiteRequest, AgentMismatch, AdminDisabled, CapabilityDenied
    ├── StateError              the store's state refuses the request
    │   ├── ShardNotFound, ShardDeleted, ShardAlreadyExists, VersionNotFound
    │   ├── VersionMismatch, CrossShardStale, SessionExpired
    │   └── MandateRequired, MandateNotFound, MandateExpired, MandateConsumed
    ├── StoreUnavailable        the store could not be reached or gave up (503)
    │   └── StoreMisconfigured  reachable but unusable: old schema, Redis eviction on
    └── InternalError           a fault of the bus itself (500): never raised, the answer
                                to an exception nothing else handled
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

# Whether a change the store failed on may have landed (the wire ``outcome`` field).
StoreOutcome = Literal["not_applied", "unknown"]


class SBusError(Exception):
    """Base of every error the bus reports; ``code`` is the wire ``error`` value."""

    code: ClassVar[str] = "SBusError"
    title: ClassVar[str] = "S-Bus error"

    def __init__(self, detail: str, **fields: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fields: dict[str, Any] = fields


class RequestError(SBusError):
    code = "BadRequest"
    title = "Bad request"


class MalformedJSON(RequestError):
    code = "MalformedJSON"
    title = "Request body is not valid JSON"


class UnsupportedMediaType(RequestError):
    code = "UnsupportedMediaType"
    title = "Content-Type must be application/json"


class RequestTooLarge(RequestError):
    code = "RequestTooLarge"
    title = "Request body too large"


class RequestTimeout(RequestError):
    """The client took longer than SBUS_HEADER_TIMEOUT / SBUS_BODY_TIMEOUT to send its
    request; the connection is closed after the answer."""

    code = "RequestTimeout"
    title = "Request timeout"


class ValidationFailed(RequestError):
    """A 422. Always carries ``errors: [{loc, msg, type}]`` (protocol.md §6); ``loc``
    names the offending field when the caller knows it."""

    code = "ValidationError"
    title = "Request failed validation"

    def __init__(self, detail: str, *, loc: list[str | int] | None = None, **fields: Any) -> None:
        fields.setdefault("errors", [{"loc": loc or [], "msg": detail, "type": "value_error"}])
        super().__init__(detail, **fields)

    @classmethod
    def past_current_version(cls, key: str, current: int) -> ValidationFailed:
        """The admin inject-stale of a version ``key`` has not reached (every store)."""
        return cls(f"stale_version must be between 0 and {current}", key=key)


class InvalidPattern(ValidationFailed):
    """A scope or mandate-key pattern (protocol.md section 5.3) that is not valid."""

    code = "ValidationError"
    title = "Invalid key pattern"


class InvalidCursor(RequestError):
    """A ``Last-Event-ID`` (or SDK cursor) that is not a cursor of this store's change log."""

    code = "InvalidCursor"
    title = "Not a change-stream cursor"


class AmbiguousField(RequestError):
    code = "AmbiguousField"
    title = "A field and its alias were both sent"


class PreconditionConflict(RequestError):
    code = "PreconditionConflict"
    title = "If-Match and expected_version disagree"


class PreconditionRequired(RequestError):
    code = "PreconditionRequired"
    title = "A version precondition is required"


class InvalidPrecondition(RequestError):
    code = "InvalidPrecondition"
    title = "If-Match must be exactly one strong ETag"


class DeltaTooLarge(RequestError):
    code = "DeltaTooLarge"
    title = "Content exceeds SBUS_MAX_DELTA"


class FieldTooLarge(RequestError):
    """A free-text field (``rationale``, ``goal_tag``) over its configured byte cap."""

    code = "FieldTooLarge"
    title = "A text field exceeds its configured size"


class ReadSetTooLarge(RequestError):
    code = "ReadSetTooLarge"
    title = "Explicit read set exceeds SBUS_MAX_READ_SET"


class TooManyWrites(RequestError):
    code = "TooManyWrites"
    title = "Transaction writes more keys than SBUS_MAX_TXN_KEYS"


class AgentRequired(RequestError):
    code = "AgentRequired"
    title = "An agent identity is required"


class IdempotencyKeyReused(RequestError):
    code = "IdempotencyKeyReused"
    title = "Idempotency-Key reused for a different request"

    def __init__(self) -> None:
        super().__init__("Idempotency-Key was used for a different request")


class RouteNotFound(RequestError):
    code = "NotFound"
    title = "No such route"


class MethodNotAllowed(RequestError):
    code = "MethodNotAllowed"
    title = "Method not allowed on this route"


class HostNotAllowed(RequestError):
    code = "HostNotAllowed"
    title = "Host header not allowed in open mode"


class CrossSiteRequest(RequestError):
    code = "CrossSiteRequest"
    title = "Request from a web page of another site refused"


class AgentMismatch(RequestError):
    code = "AgentMismatch"
    title = "Identity sources disagree"


class AdminDisabled(RequestError):
    code = "AdminDisabled"
    title = "Admin endpoints are disabled"


class CapabilityDenied(RequestError):
    code = "CapabilityDenied"
    title = "The caller lacks a required right"


class StateError(SBusError):
    code = "StateError"
    title = "State conflict"


# The state errors below word their own detail from their fields, so that every store
# (and the Redis script's answer, rebuilt in Python) says exactly the same thing.


class ShardNotFound(StateError):
    code = "ShardNotFound"
    title = "Shard not found"

    def __init__(self, key: str) -> None:
        super().__init__(f"shard not found: key={key}", key=key)


class ShardDeleted(StateError):
    code = "ShardDeleted"
    title = "Shard has been deleted"

    def __init__(self, key: str, version: int) -> None:
        super().__init__(f"shard deleted: key={key}", key=key, version=version)


class ShardAlreadyExists(StateError):
    code = "ShardAlreadyExists"
    title = "Shard already exists"

    def __init__(self, key: str) -> None:
        super().__init__(f"shard already exists: key={key}", key=key)


class VersionNotFound(StateError):
    code = "VersionNotFound"
    title = "Version not retained"

    def __init__(self, key: str, target_version: int) -> None:
        super().__init__(
            f"version {target_version} of {key!r} is not retained",
            key=key,
            target_version=target_version,
        )


class VersionMismatch(StateError):
    code = "VersionMismatch"
    title = "Version mismatch"

    def __init__(self, key: str, expected: int | None, found: int) -> None:
        super().__init__(
            f"version mismatch on key={key}: expected={expected} found={found}",
            key=key,
            expected=expected,
            found=found,
        )


class CrossShardStale(StateError):
    code = "CrossShardStale"
    title = "A shard in the read set has moved on"

    @classmethod
    def of(cls, stale: list[tuple[str, int, int]]) -> CrossShardStale:
        """The refusal for ``stale``, (key, version_at_read, current_version) in key
        order, worded here once for every store: the first stale key, and the remedy."""
        keys = [
            {"key": key, "version_at_read": version, "current_version": current}
            for key, version, current in stale
        ]
        key, version, current = stale[0]
        return cls(
            f"cross-shard stale read: key={key} version_at_read={version} "
            f"current_version={current}; re-read the keys listed in stale_keys and retry, "
            "or start a new session with POST /session",
            key=key,
            version_at_read=version,
            current_version=current,
            stale_keys=keys,
        )


class SessionExpired(StateError):
    code = "SessionExpired"
    title = "Agent session expired"

    def __init__(self, agent_id: str, reason: str) -> None:
        super().__init__(
            f"session expired for agent {agent_id!r} ({reason})", reason=reason, agent_id=agent_id
        )


class MandateRequired(StateError):
    code = "MandateRequired"
    title = "This shard requires a mandate"

    def __init__(self, key: str) -> None:
        super().__init__(f"shard {key!r} requires a mandate", key=key)


class MandateNotFound(StateError):
    code = "MandateNotFound"
    title = "Mandate not recognised"

    @classmethod
    def unrecognised(cls) -> MandateNotFound:
        """The store's refusal of a commit whose mandate did not verify (protocol.md
        §4 step 9a)."""
        return cls("mandate not recognised by this deployment")


class MandateExpired(StateError):
    code = "MandateExpired"
    title = "Mandate expired"

    def __init__(self, jti: str) -> None:
        super().__init__("mandate expired", jti=jti)


class MandateConsumed(StateError):
    code = "MandateConsumed"
    title = "Mandate already consumed"

    def __init__(self, jti: str) -> None:
        super().__init__("mandate already consumed", jti=jti)


class RateLimited(RequestError):
    """429: the agent's token bucket is empty; ``retry_after`` seconds until a token."""

    code = "RateLimited"
    title = "Rate limit exceeded"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail, retry_after=retry_after)
        self.retry_after = retry_after


class StoreUnavailable(SBusError):
    """The store failed; ``outcome`` tells whether the change may have landed."""

    code = "StoreUnavailable"
    title = "Store unavailable"

    def __init__(
        self, detail: str, *, outcome: StoreOutcome = "not_applied", retry_after: int = 1
    ) -> None:
        super().__init__(detail, outcome=outcome)
        self.retry_after = retry_after


class StoreMisconfigured(StoreUnavailable):
    """The store answers but must not be used as it is (an out-of-date schema, Redis
    without ``noeviction``). ``sbus serve`` exits on it at start; a running bus that
    meets it (at connect or in its periodic check, sbus.bootstrap.upkeep) answers not-ready
    until an operator fixes the store."""

    code = "StoreUnavailable"


class InternalError(SBusError):
    """The answer to an exception no other handler took: a bug. Its detail says no more
    than that; the server's log has the traceback under the request's id."""

    code = "InternalError"
    title = "Internal error"
