"""Reading a capability token from the command line: what ``sbus token inspect`` shows
(decoded always, verified exactly as the bus verifies when a key is configured) and
what ``sbus token revoke`` takes from a token (its ``jti`` and ``exp``).

Nothing here trusts an unverified token for a decision of the bus: an unverified
``jti`` only tells an operator's revocation which id to put on the list.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from sbus.config import Settings
from sbus.core.clock import rfc3339
from sbus.core.keys import text_problem
from sbus.security import TokenExpired, TokenInvalid
from sbus.security.keys import KeySet, configured
from sbus.security.tokens import MAX_TOKEN_LENGTH, Verifier

MAX_JTI_LENGTH = 256  # as POST /admin/tokens/revoke accepts


@dataclass(frozen=True, slots=True)
class Inspection:
    """What a token says and whether the bus would accept it (revocation aside: that
    lives in the store). ``header`` is None when the text is not a JWT at all."""

    header: dict[str, Any] | None
    claims: dict[str, Any] | None
    verified: bool
    expired: bool
    verdict: str  # one line for a human
    passes: bool  # verified and unexpired

    def to_json(self) -> dict[str, Any]:
        exp = (self.claims or {}).get("exp")
        return {
            "header": self.header,
            "claims": self.claims,
            "verified": self.verified,
            "expired": self.expired,
            "expires_at": _when(exp),
            "verdict": self.verdict,
        }


def _when(exp: object) -> str | None:
    if isinstance(exp, bool) or not isinstance(exp, int):
        return None
    try:
        return rfc3339(exp * 1000)
    except (ValueError, OverflowError, OSError):
        return None


def decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a JWS compact token, signature NOT checked; ValueError
    when it is not one."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise ValueError(f"longer than the {MAX_TOKEN_LENGTH} characters the bus accepts")
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError as exc:
        raise ValueError(f"not a JWT ({exc})") from None
    if not isinstance(claims, dict):
        raise ValueError("not a JWT (its claims are not a JSON object)")
    return header, claims


def inspect_token(
    token: str, settings: Settings, *, now: Callable[[], float] = time.time
) -> Inspection:
    """Decode ``token`` and, when the settings name a key, verify it. A configured key
    that cannot be loaded raises :class:`~sbus.security.KeyConfigError`."""
    try:
        header, claims = decode_unverified(token)
    except ValueError as exc:
        return Inspection(None, None, False, False, str(exc), False)
    exp = claims.get("exp")
    expired = isinstance(exp, int) and now() > exp + settings.clock_leeway
    expiry = f"expired at {_when(exp)}" if expired else f"expires at {_when(exp)}"
    if not configured(settings):
        verdict = (
            "UNVERIFIED: no key is configured (SBUS_SIGNING_KEY, SBUS_VERIFY_KEY or "
            f"SBUS_SECRET), so nothing above is proven; {expiry}"
        )
        return Inspection(header, claims, False, expired, verdict, False)
    verifier = Verifier.from_settings(settings, KeySet.from_settings(settings))
    try:
        verifier.verify(token)
    except TokenExpired:
        # Time is checked only after the signature: the token is authentic.
        verdict = (
            f"EXPIRED: signature valid, but {expiry} (plus SBUS_CLOCK_LEEWAY "
            f"{settings.clock_leeway}s)"
        )
        return Inspection(header, claims, True, True, verdict, False)
    except TokenInvalid as exc:
        return Inspection(header, claims, False, expired, f"INVALID: {exc.detail}", False)
    verdict = f"valid: signature verified (kid {header.get('kid')}); {expiry}"
    return Inspection(header, claims, True, False, verdict, True)


def revocation_target(token_or_jti: str) -> tuple[str, int | None]:
    """The ``jti`` to revoke and the token's ``exp`` when a whole token is given (three
    dot-separated parts), else the text itself as the ``jti``. ValueError when unusable."""
    if token_or_jti.count(".") == 2:
        _, claims = decode_unverified(token_or_jti)
        jti, exp = claims.get("jti"), claims.get("exp")
        if not isinstance(jti, str) or not jti:
            raise ValueError("the token carries no jti to revoke")
        if isinstance(exp, bool) or not isinstance(exp, int) or exp < 0:
            exp = None
    else:
        jti, exp = token_or_jti, None
    if not jti or len(jti) > MAX_JTI_LENGTH:
        raise ValueError(f"a jti has 1 to {MAX_JTI_LENGTH} characters")
    problem = text_problem(jti)
    if problem:
        raise ValueError(f"jti: {problem}")
    return jti, exp
