"""What the engine asks of security, as ports it owns (the adapters live above core).

``sbus.security.tokens.Issuer`` satisfies :class:`TokenIssuer` and
``sbus.security.mandates.Mandates`` satisfies :class:`MandateSigner`; the bootstrap hands
them to the engine (:meth:`sbus.core.engine.Bus.attach_signers`), in open mode without
configured keys only once the store's secret has arrived.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from sbus.core.rights import Principal, Scope


class IssuedToken(Protocol):
    """A freshly signed capability token's claims."""

    @property
    def jti(self) -> str: ...

    @property
    def expires_at(self) -> int:
        """Epoch seconds."""
        ...

    def to_json(self) -> dict[str, Any]: ...


class TokenIssuer(Protocol):
    def issue(self, agent: str, scopes: Iterable[Scope], ttl_s: int) -> tuple[str, IssuedToken]:
        """Sign a token for ``agent``: ValidationFailed (agent, ttl, scopes) or
        SigningUnavailable (a verify-only replica)."""
        ...


class MandateGrant(Protocol):
    """A mandate's claims, as issued or as verified."""

    @property
    def jti(self) -> str: ...

    @property
    def expires_at(self) -> int:
        """Epoch seconds."""
        ...

    @property
    def expires_at_ms(self) -> int: ...

    @property
    def context_hash(self) -> str: ...

    def retain_until_ms(self, leeway_s: int) -> int:
        """How long the store must remember the jti once consumed."""
        ...


class MandateSigner(Protocol):
    """Issues mandates and runs the checks of step 9a that need no store
    (protocol.md section 5.5)."""

    @property
    def leeway(self) -> int: ...

    def issue_mandate(
        self,
        issuer: Principal,
        holder: str,
        keys: Sequence[str],
        context: Mapping[str, Any] | None,
        ttl_s: int,
        *,
        now_ms: int,
    ) -> tuple[str, MandateGrant]: ...

    def verify_mandate(
        self,
        token: object,
        *,
        agent: str,
        written_keys: Iterable[str],
        context: Mapping[str, Any] | None,
        now_ms: int,
    ) -> MandateGrant: ...
