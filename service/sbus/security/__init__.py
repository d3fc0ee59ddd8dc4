"""Token mode: capability tokens, signing keys and mandates (protocol.md §5).

The glob syntax of scopes and mandate keys (``sbus.core.patterns``) and the rights and
capability sets (``sbus.core.rights``) are pure logic the engine checks, so they live in
core. Here, innermost first: ``keys`` (the one signing algorithm of a deployment and its
key ring), ``tokens`` (Issuer, Verifier, Claims) and
``mandates`` (consume-once authorizations). None of them touches the store or HTTP; the
API layer calls them and ``sbus.api.problems`` maps the errors below to statuses.

The errors of token mode live here rather than in ``sbus.core.errors`` because only this
package raises them; they extend the same :class:`~sbus.core.errors.SBusError` tree.
Intended statuses (the table in ``api/problems.py`` is the authority)::

    SBusError
    ├── TokenInvalid (Unauthorized)             401  unverifiable, malformed, wrong iss/aud/kid
    │   ├── TokenExpired (Unauthorized)         401  exp + SBUS_CLOCK_LEEWAY has passed
    │   └── TokenRevoked (TokenRevoked)         401  jti on the revocation list (store hook)
    ├── KeyConfigError (KeyConfigError)         startup refusal: no usable key, short secret
    │   └── SigningUnavailable                  a verify-only replica was asked to issue
    └── StateError
        ├── MandateNotFound (core)              404  garbled, unverifiable, not a mandate
        ├── MandateExpired                      410  store clock >= exp
        ├── MandateHolderMismatch               403  holder != committing agent
        ├── MandateScopeMismatch                403  a written key outside keys or grantor scopes
        ├── MandateContextMismatch              403  context hash differs
        └── MandateConsumed                     409  jti already consumed (the store's check)

Issue-time refusals reuse the core classes: ``ValidationFailed`` (422: bad agent, ttl,
scopes, context) and ``CapabilityDenied`` (403: issuing a mandate without the mandate right).
"""

from __future__ import annotations

# MandateExpired and MandateConsumed are raised inside the store's atomic step too, so
# they live in the core tree; re-exported here with the rest of the mandate errors.
from sbus.core.errors import (
    MandateConsumed,
    MandateExpired,
    SBusError,
    StateError,
)


class TokenInvalid(SBusError):
    """The bearer token cannot be accepted. ``detail`` says why, for logs; clients only
    need the code."""

    code = "Unauthorized"
    title = "Missing or invalid token"


class TokenExpired(TokenInvalid):
    code = "Unauthorized"
    title = "Token expired"


class TokenRevoked(TokenInvalid):
    code = "TokenRevoked"
    title = "Token revoked"


class KeyConfigError(SBusError):
    """The key configuration cannot serve token mode; the detail names the variables."""

    code = "KeyConfigError"
    title = "Token keys misconfigured"


class SigningUnavailable(KeyConfigError):
    """This deployment holds no signing key (a verify-only replica)."""

    code = "SigningUnavailable"
    title = "This replica cannot issue tokens"


class MandateHolderMismatch(StateError):
    code = "MandateHolderMismatch"
    title = "Mandate held by another agent"


class MandateScopeMismatch(StateError):
    code = "MandateScopeMismatch"
    title = "Written key outside the mandate"


class MandateContextMismatch(StateError):
    code = "MandateContextMismatch"
    title = "Mandate context differs"


__all__ = [
    "KeyConfigError",
    "MandateConsumed",
    "MandateContextMismatch",
    "MandateExpired",
    "MandateHolderMismatch",
    "MandateScopeMismatch",
    "SigningUnavailable",
    "TokenExpired",
    "TokenInvalid",
    "TokenRevoked",
]
