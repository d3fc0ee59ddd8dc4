"""protocol.md §4 step 1: who is calling. The gate asks an :class:`Authenticator` for
the request's principal before any body is read and puts it in the ASGI scope state
(``scope["state"]["principal"]``), where :func:`sbus.api.deps.principal_of` reads it.

- open mode: every request gets the same :class:`~sbus.core.rights.Identity` with no
  agent of its own (the agent comes from the request, protocol.md §2) and every right
  except admin, which ``SBUS_ADMIN_ENABLED=1`` adds.
- token mode: every route except :data:`PUBLIC` needs ``Authorization: Bearer <jwt>``;
  the principal is the verified :class:`~sbus.security.tokens.Claims`. A missing or
  refused token is a :class:`~sbus.security.TokenInvalid` (401).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from sbus.api import assets
from sbus.core.rights import Identity, Principal, open_capabilities
from sbus.core.types import Revocation
from sbus.security import TokenExpired, TokenInvalid, TokenRevoked
from sbus.security.tokens import MAX_TOKEN_LENGTH, Claims, Verifier

# Never authenticated: liveness and readiness probes, the server's version (a client asks
# before it has a token to send), the API description, and the browser pages and their
# assets (sbus.api.assets), which hold no data.
PUBLIC = frozenset({"/livez", "/admin/health", "/version", "/openapi.json"})
PRINCIPAL = "principal"
BEARER = b"bearer "

# jti -> its revocation entry and the store clock (Store.revocation), the lookup behind
# POST /admin/tokens/revoke.
RevocationCheck = Callable[[str], Awaitable[Revocation]]


def sent_bearer(authorization: Sequence[bytes]) -> bool:
    """Whether the request carried a bearer token at all (selects the 401 challenge)."""
    return any(value[: len(BEARER)].lower() == BEARER for value in authorization)


def bearer_token(authorization: Sequence[bytes]) -> str:
    """The one bearer token of the request; :class:`TokenInvalid` otherwise."""
    if not authorization:
        raise TokenInvalid("Authorization: Bearer <token> is required")
    if len(authorization) > 1:
        raise TokenInvalid("more than one Authorization header")
    raw = authorization[0]
    if raw[: len(BEARER)].lower() != BEARER:
        raise TokenInvalid("Authorization must use the Bearer scheme")
    token = raw[len(BEARER) :].strip()
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise TokenInvalid("empty or oversized bearer token")
    try:
        return token.decode("ascii")
    except UnicodeDecodeError:
        raise TokenInvalid("bearer token is not ASCII") from None


class Authenticator:
    """``verifier`` None means open mode. ``revoked`` is the store's revocation lookup."""

    def __init__(
        self,
        *,
        verifier: Verifier | None,
        admin_enabled: bool,
        revoked: RevocationCheck | None = None,
    ) -> None:
        self.verifier = verifier
        self.revoked = revoked
        self.open_identity = Identity("", open_capabilities(admin_enabled=admin_enabled))

    @property
    def token_mode(self) -> bool:
        return self.verifier is not None

    async def authenticate(self, path: str, authorization: Sequence[bytes]) -> Principal | None:
        """The principal, None for a :data:`PUBLIC` route in token mode, or
        :class:`TokenInvalid` / ``TokenExpired`` / :class:`TokenRevoked`."""
        if self.verifier is None:
            return self.open_identity
        if path in PUBLIC or assets.is_public(path):
            return None
        claims: Claims = self.verifier.verify(bearer_token(authorization))
        if self.revoked is None:
            return claims
        # One store read per request, so every replica refuses a token revoked through
        # any of them.
        state = await self.revoked(claims.jti)
        if state.revoked:
            raise TokenRevoked(f"token {claims.jti} has been revoked")
        # The verifier checked exp against this replica's clock; the store keeps a
        # revocation until exp + leeway on ITS clock and then forgets it. Refusing a token
        # past that point by the store clock too means no clock running ahead of the
        # other can bring a revoked token back: expiry follows whichever clock is ahead.
        if state.now_ms >= (claims.expires_at + self.verifier.leeway) * 1000:
            raise TokenExpired(f"token {claims.jti} expired by the store clock")
        return claims
