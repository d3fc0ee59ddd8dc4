"""Mandates: consume-once authorizations for side-effecting commits (protocol.md §5).

A mandate is a JWT with header ``typ: "sbus-mandate+jwt"`` and claims ``jti``, ``holder``,
``keys`` (patterns), ``grantor`` (the issuing agent), ``grantor_scopes`` (the patterns on
which the grantor holds the mandate right, frozen at issue), ``context_hash``, ``iat``,
``exp`` and ``iss`` = ``aud`` = ``SBUS_NAMESPACE``. Validity and expiry therefore need no
store lookup; the store only remembers consumed jtis, until ``exp`` plus the leeway.

Mandate time is the store's clock (protocol.md §1), so both calls take ``now_ms`` from
``Store.now_ms()`` rather than reading the replica clock; ``exp`` is compared without
leeway because every replica sees the same store clock.

:meth:`Mandates.verify_mandate` runs the checks of step 9a that need no store, in protocol.md
order: 404 MandateNotFound (not a verifiable mandate of this deployment), 410
MandateExpired, 403 MandateHolderMismatch, 403 MandateScopeMismatch, 403
MandateContextMismatch. MandateRequired (the shard policy) precedes them and 409
MandateConsumed follows them; both are the store's, inside the commit's atomic step,
using :attr:`MandateClaims.jti` and :meth:`MandateClaims.retain_until_ms`. The store may
re-check ``now_ms < expires_at_ms`` there to close the gap between the two clock reads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from sbus.config import Settings
from sbus.core.chain import canonical_json
from sbus.core.errors import CapabilityDenied, MandateNotFound, ValidationFailed
from sbus.core.patterns import MAX_PATTERNS, pattern_set, validate_patterns
from sbus.core.rights import Principal, Right
from sbus.security import (
    MandateContextMismatch,
    MandateExpired,
    MandateHolderMismatch,
    MandateScopeMismatch,
    TokenInvalid,
)
from sbus.security.keys import KeySet
from sbus.security.tokens import decode_jwt, encode_jwt, new_jti, validate_agent, validate_ttl

MANDATE_TYP = "sbus-mandate+jwt"
MAX_MANDATE_KEYS = MAX_PATTERNS
_CLAIMS = [
    "jti",
    "holder",
    "keys",
    "grantor",
    "grantor_scopes",
    "context_hash",
    "iat",
    "exp",
    "iss",
    "aud",
]


def context_hash(context: Mapping[str, Any] | None) -> str:
    """sha256 hex of the sorted-key compact JSON (UTF-8, non-ASCII unescaped) of
    ``context``; None counts as ``{}``. Raises :class:`ValidationFailed` for values JSON
    cannot carry."""
    if context is None:
        context = {}
    if not isinstance(context, Mapping):
        raise ValidationFailed("context must be a JSON object", loc=["context"])
    try:
        data = canonical_json(dict(context))
    except (orjson.JSONEncodeError, TypeError) as exc:
        raise ValidationFailed(f"context is not JSON: {exc}", loc=["context"]) from None
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class MandateClaims:
    jti: str
    holder: str
    keys: tuple[str, ...]
    grantor: str
    grantor_scopes: tuple[str, ...]
    context_hash: str
    issued_at: int
    expires_at: int
    namespace: str

    @property
    def expires_at_ms(self) -> int:
        return self.expires_at * 1000

    def retain_until_ms(self, leeway_s: int) -> int:
        """How long the store must remember this jti once consumed."""
        return (self.expires_at + leeway_s) * 1000

    def covers(self, key: str) -> bool:
        """``key`` matches one of the mandate's keys AND one of the grantor's scopes."""
        return pattern_set(self.keys)(key) and pattern_set(self.grantor_scopes)(key)

    def to_json(self) -> dict[str, Any]:
        """The JWT claims set (minus iss/aud, added at signing)."""
        return {
            "jti": self.jti,
            "holder": self.holder,
            "keys": list(self.keys),
            "grantor": self.grantor,
            "grantor_scopes": list(self.grantor_scopes),
            "context_hash": self.context_hash,
            "iat": self.issued_at,
            "exp": self.expires_at,
            "iss": self.namespace,
            "aud": self.namespace,
        }


def _patterns(value: object, loc: str) -> tuple[str, ...]:
    """Bounded at issue and again when decoding, so no mandate, whoever signed it, can
    make matching expensive."""
    return validate_patterns(value, what=loc)


class Mandates:
    """Issues and verifies mandates with the deployment's key set."""

    def __init__(self, keys: KeySet, *, namespace: str, max_ttl: int, leeway: int) -> None:
        self.keys = keys
        self.namespace = namespace
        self.max_ttl = max_ttl
        self.leeway = leeway

    @classmethod
    def from_settings(cls, settings: Settings, keys: KeySet | None = None) -> Mandates:
        return cls(
            keys or KeySet.from_settings(settings),
            namespace=settings.namespace,
            max_ttl=settings.mandate_max_ttl,
            leeway=settings.clock_leeway,
        )

    def issue_mandate(
        self,
        issuer: Principal,
        holder: str,
        keys: Sequence[str],
        context: Mapping[str, Any] | None,
        ttl_s: int,
        *,
        now_ms: int,
    ) -> tuple[str, MandateClaims]:
        """Sign a mandate from ``issuer`` (token claims or an open-mode identity) for
        ``holder``. Raises :class:`CapabilityDenied` if the issuer holds the mandate right
        nowhere; :class:`ValidationFailed` for a bad holder, pattern, context or ttl (1..
        SBUS_MANDATE_MAX_TTL); :class:`SigningUnavailable` on a verify-only replica."""
        grantor_scopes = issuer.capabilities.patterns_with(Right.MANDATE)
        if not grantor_scopes:
            raise CapabilityDenied(
                f"agent {issuer.agent!r} lacks the mandate right", right=Right.MANDATE.value
            )
        validate_agent(holder, loc=["holder"])
        patterns = _patterns(keys, "keys")
        digest = context_hash(context)
        validate_ttl(ttl_s, self.max_ttl, "SBUS_MANDATE_MAX_TTL")
        iat = now_ms // 1000
        claims = MandateClaims(
            jti=new_jti(),
            holder=holder,
            keys=patterns,
            grantor=issuer.agent,
            grantor_scopes=grantor_scopes,
            context_hash=digest,
            issued_at=iat,
            expires_at=iat + ttl_s,
            namespace=self.namespace,
        )
        return encode_jwt(self.keys, claims.to_json(), typ=MANDATE_TYP), claims

    def decode(self, token: object) -> MandateClaims:
        """The claims of an authentic mandate of this deployment, expired or not;
        :class:`MandateNotFound` otherwise."""
        try:
            payload = decode_jwt(
                self.keys,
                token,
                typ=MANDATE_TYP,
                namespace=self.namespace,
                required=_CLAIMS,
                leeway=self.leeway,
                verify_time=False,
            )
            claims = _claims(payload, self.namespace)
            if not 0 < claims.expires_at - claims.issued_at <= self.max_ttl:
                raise TokenInvalid("mandate lifetime outside 1..SBUS_MANDATE_MAX_TTL")
            return claims
        except (TokenInvalid, ValidationFailed) as exc:
            raise MandateNotFound(f"mandate not recognised: {exc.detail}") from None

    def verify_mandate(
        self,
        token: object,
        *,
        agent: str,
        written_keys: Iterable[str],
        context: Mapping[str, Any] | None,
        now_ms: int,
    ) -> MandateClaims:
        """Step 9a without the store; see the module docstring for the order. A
        ``context`` of None counts as ``{}``. On success the caller consumes
        ``jti`` atomically with the commit (409 MandateConsumed if already consumed)."""
        claims = self.decode(token)
        if now_ms >= claims.expires_at_ms:
            raise MandateExpired(claims.jti)
        if claims.holder != agent:
            raise MandateHolderMismatch(
                f"mandate is held by {claims.holder!r}, not {agent!r}", holder=claims.holder
            )
        for key in sorted(written_keys):
            if not claims.covers(key):
                raise MandateScopeMismatch(f"key {key!r} is outside the mandate", key=key)
        if context_hash(context) != claims.context_hash:
            raise MandateContextMismatch(
                "context does not match the mandate", context_hash=claims.context_hash
            )
        return claims


def _claims(payload: dict[str, Any], namespace: str) -> MandateClaims:
    def string(name: str) -> str:
        value = payload.get(name)
        if not isinstance(value, str) or not value:
            raise TokenInvalid(f"claim {name!r} must be a non-empty string")
        return value

    def integer(name: str) -> int:
        value = payload.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TokenInvalid(f"claim {name!r} must be an integer")
        return value

    digest = string("context_hash")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise TokenInvalid("claim 'context_hash' must be sha256 hex")
    return MandateClaims(
        jti=string("jti"),
        holder=validate_agent(payload.get("holder")),
        keys=_patterns(payload.get("keys"), "keys"),
        grantor=validate_agent(payload.get("grantor")),
        grantor_scopes=_patterns(payload.get("grantor_scopes"), "grantor_scopes"),
        context_hash=digest,
        issued_at=integer("iat"),
        expires_at=integer("exp"),
        namespace=namespace,
    )
