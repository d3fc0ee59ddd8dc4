"""The signers of a deployment that holds no signing keys (open mode with a key
configuration that cannot be used): issuing answers 503 SigningUnavailable, and no
presented mandate verifies (404 MandateNotFound)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn

from sbus.core.errors import MandateNotFound
from sbus.core.rights import Principal, Scope
from sbus.security import SigningUnavailable


class NoSigningKeys:
    """Stands in for both the token issuer and the mandate signer (the engine's
    ``TokenIssuer`` and ``MandateSigner`` ports); ``reason`` says why there are no keys."""

    leeway = 0

    def __init__(self, reason: str | None) -> None:
        self.reason = reason

    def issue(self, agent: str, scopes: Iterable[Scope], ttl_s: int) -> NoReturn:
        raise SigningUnavailable(f"this deployment has no token keys: {self.reason}")

    def issue_mandate(
        self,
        issuer: Principal,
        holder: str,
        keys: Sequence[str],
        context: Mapping[str, Any] | None,
        ttl_s: int,
        *,
        now_ms: int,
    ) -> NoReturn:
        raise SigningUnavailable(f"this deployment has no signing keys: {self.reason}")

    def verify_mandate(
        self,
        token: object,
        *,
        agent: str,
        written_keys: Iterable[str],
        context: Mapping[str, Any] | None,
        now_ms: int,
    ) -> NoReturn:
        raise MandateNotFound("this deployment has no signing keys: no mandate verifies")
