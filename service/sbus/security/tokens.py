"""Capability tokens: JWTs signed with the deployment's one algorithm (protocol.md §5).

Header ``{alg, typ: "at+jwt", kid}``; claims ``sub`` (the agent), ``scopes: [{pattern,
rights}]``, ``iat``, ``exp``, ``jti`` (128 random bits), ``iss`` = ``aud`` =
``SBUS_NAMESPACE``, with ``exp - iat <= SBUS_TOKEN_MAX_TTL``.

Verification pins the algorithm of the key set (PyJWT's ``algorithms=[alg]``), so ``alg:
none`` and an HS256 token "signed" with the Ed25519 public key are refused before any
signature check; looks the key up by ``kid`` (unknown -> refused, never "try them all");
checks ``iss``, ``aud`` (a string, exactly), the presence and types of every claim, and
``exp``/``iat`` against the replica clock with ``SBUS_CLOCK_LEEWAY``. The explicit ``typ``
keeps a mandate (``sbus-mandate+jwt``) from ever passing as a capability token, and the
reverse. Revocation is the caller's step (``sbus.api.auth``): look ``Claims.jti`` up in the
store, raise :class:`~sbus.security.TokenRevoked`, and refuse a token past ``exp`` + leeway
by the store clock too, since that clock decides when the entry is forgotten.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt

from sbus.config import Settings
from sbus.core.errors import ValidationFailed
from sbus.core.keys import text_problem
from sbus.core.rights import Capabilities, Scope, check_scopes, scopes_from_json
from sbus.security import TokenExpired, TokenInvalid
from sbus.security.keys import KeySet

CAPABILITY_TYP = "at+jwt"
MAX_AGENT_LENGTH = 256
# Far above any honest token; bounds the work spent on junk. The pattern bounds
# (sbus.core.patterns) keep most tokens well below it, but not all (non-ASCII
# patterns are \u-escaped in the JSON), so encode_jwt refuses to sign anything longer.
MAX_TOKEN_LENGTH = 64 * 1024
_CLAIMS = ["sub", "scopes", "iat", "exp", "jti", "iss", "aud"]


def validate_agent(agent: object, *, loc: list[str | int] | None = None) -> str:
    if not isinstance(agent, str) or not agent:
        raise ValidationFailed("agent must be a non-empty string", loc=loc)
    if len(agent) > MAX_AGENT_LENGTH:
        raise ValidationFailed(f"agent must be at most {MAX_AGENT_LENGTH} characters", loc=loc)
    problem = text_problem(agent)
    if problem:
        raise ValidationFailed(problem, loc=loc)
    return agent


def validate_ttl(ttl_s: object, maximum: int, variable: str) -> int:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1:
        raise ValidationFailed("ttl_s must be a positive integer of seconds", loc=["ttl_s"])
    if ttl_s > maximum:
        raise ValidationFailed(f"ttl_s {ttl_s} exceeds {variable} ({maximum})", loc=["ttl_s"])
    return ttl_s


def new_jti() -> str:
    return secrets.token_urlsafe(16)


def _int_claim(payload: dict[str, Any], name: str) -> int:
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TokenInvalid(f"claim {name!r} must be an integer")
    return value


def _str_claim(payload: dict[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise TokenInvalid(f"claim {name!r} must be a non-empty string")
    return value


def encode_jwt(keys: KeySet, payload: dict[str, Any], *, typ: str) -> str:
    """Sign ``payload`` with the key set's signing key (:class:`SigningUnavailable`
    on a verify-only replica). A result the verifiers would refuse unread (over
    :data:`MAX_TOKEN_LENGTH`) is :class:`ValidationFailed` (422) instead."""
    kid, key = keys.signer()
    token = jwt.encode(payload, key, algorithm=keys.algorithm, headers={"kid": kid, "typ": typ})
    if len(token) > MAX_TOKEN_LENGTH:
        raise ValidationFailed(
            f"the signed token would be {len(token)} bytes, over the {MAX_TOKEN_LENGTH} a "
            "verifier accepts; use fewer or shorter patterns"
        )
    return token


def decode_jwt(
    keys: KeySet,
    token: object,
    *,
    typ: str,
    namespace: str,
    required: Sequence[str],
    leeway: int,
    verify_time: bool = True,
) -> dict[str, Any]:
    """Verify signature, algorithm, ``kid``, ``typ``, ``iss``/``aud`` and presence of
    ``required``; also ``exp``/``iat`` with ``leeway`` unless ``verify_time`` is off (then
    the caller checks time against its own clock). Returns the payload.

    Raises :class:`TokenExpired` for an authentic token past ``exp`` + leeway (time is
    checked only after the signature) and :class:`TokenInvalid` for everything else."""
    if not isinstance(token, str) or not token:
        raise TokenInvalid("no token")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenInvalid("token too large")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise TokenInvalid("token is not a JWS compact serialization") from None
    if header.get("alg") != keys.algorithm:
        raise TokenInvalid(f"algorithm {header.get('alg')!r} not accepted")
    kid = header.get("kid")
    key = keys.verify_key(kid) if isinstance(kid, str) else None
    if key is None:
        raise TokenInvalid(f"unknown key id {kid!r}")
    options: dict[str, Any] = {
        "require": list(required),
        "strict_aud": True,
        "verify_exp": verify_time,
        "verify_iat": verify_time,
        "verify_nbf": verify_time,
    }
    try:
        decoded = jwt.api_jwt.decode_complete(
            token,
            key,
            algorithms=[keys.algorithm],
            options=options,  # type: ignore[arg-type]
            audience=namespace,
            issuer=namespace,
            leeway=leeway,
        )
    except jwt.ExpiredSignatureError:
        raise TokenExpired("token expired") from None
    except jwt.ImmatureSignatureError:
        raise TokenInvalid("token not yet valid (iat in the future)") from None
    except jwt.InvalidTokenError as exc:
        raise TokenInvalid(f"token rejected: {exc}") from None
    # The header is signed, so its typ is authentic now.
    if decoded["header"].get("typ") != typ:
        raise TokenInvalid(f"token type {decoded['header'].get('typ')!r} is not {typ!r}")
    payload: dict[str, Any] = decoded["payload"]
    return payload


@dataclass(frozen=True, slots=True)
class Claims:
    """A verified (or freshly issued) capability token."""

    agent: str
    scopes: tuple[Scope, ...]
    issued_at: int
    expires_at: int
    jti: str
    namespace: str
    capabilities: Capabilities = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "capabilities", Capabilities(self.scopes))

    def to_json(self) -> dict[str, Any]:
        """The JWT claims set."""
        return {
            "sub": self.agent,
            "scopes": [scope.to_json() for scope in self.scopes],
            "iat": self.issued_at,
            "exp": self.expires_at,
            "jti": self.jti,
            "iss": self.namespace,
            "aud": self.namespace,
        }


class Issuer:
    """Mints capability tokens. ``now`` (seconds) is injectable for tests."""

    def __init__(
        self,
        keys: KeySet,
        *,
        namespace: str,
        max_ttl: int,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.namespace = namespace
        self.max_ttl = max_ttl
        self._now = now

    @classmethod
    def from_settings(cls, settings: Settings, keys: KeySet | None = None) -> Issuer:
        return cls(
            keys or KeySet.from_settings(settings),
            namespace=settings.namespace,
            max_ttl=settings.token_max_ttl,
        )

    def issue(self, agent: str, scopes: Iterable[Scope], ttl_s: int) -> tuple[str, Claims]:
        """Sign a token for ``agent``. Raises :class:`ValidationFailed` (bad agent, ttl
        not in 1..SBUS_TOKEN_MAX_TTL, too many scopes) or :class:`SigningUnavailable`."""
        validate_agent(agent, loc=["agent"])
        validate_ttl(ttl_s, self.max_ttl, "SBUS_TOKEN_MAX_TTL")
        iat = int(self._now())
        claims = Claims(agent, check_scopes(scopes), iat, iat + ttl_s, new_jti(), self.namespace)
        return encode_jwt(self.keys, claims.to_json(), typ=CAPABILITY_TYP), claims


class Verifier:
    """Checks capability tokens; stateless and safe to share between requests."""

    def __init__(self, keys: KeySet, *, namespace: str, max_ttl: int, leeway: int) -> None:
        self.keys = keys
        self.namespace = namespace
        self.max_ttl = max_ttl
        self.leeway = leeway

    @classmethod
    def from_settings(cls, settings: Settings, keys: KeySet | None = None) -> Verifier:
        return cls(
            keys or KeySet.from_settings(settings),
            namespace=settings.namespace,
            max_ttl=settings.token_max_ttl,
            leeway=settings.clock_leeway,
        )

    def verify(self, token: str) -> Claims:
        """The claims of a valid token; :class:`TokenExpired` or :class:`TokenInvalid`."""
        payload = decode_jwt(
            self.keys,
            token,
            typ=CAPABILITY_TYP,
            namespace=self.namespace,
            required=_CLAIMS,
            leeway=self.leeway,
        )
        iat, exp = _int_claim(payload, "iat"), _int_claim(payload, "exp")
        if not 0 < exp - iat <= self.max_ttl:
            raise TokenInvalid(f"token lifetime {exp - iat}s outside 1..SBUS_TOKEN_MAX_TTL")
        try:
            agent = validate_agent(payload.get("sub"))
            scopes = scopes_from_json(payload.get("scopes"))
        except ValidationFailed as exc:
            raise TokenInvalid(f"malformed claims: {exc.detail}") from None
        return Claims(agent, scopes, iat, exp, _str_claim(payload, "jti"), self.namespace)
