"""The key set and the signers built on it: the issuer of POST /admin/tokens and the
mandate signer of POST /mandates (and the verifier of presented mandates)."""

from __future__ import annotations

from sbus.api.runtime import Runtime
from sbus.config import Settings
from sbus.security import KeyConfigError
from sbus.security.keys import KeySet
from sbus.security.mandates import Mandates
from sbus.security.tokens import Issuer
from sbus.security.unsigned import NoSigningKeys


def configured_keys(settings: Settings) -> tuple[KeySet | None, str | None]:
    """The configured key set, or None and why not. Token mode needs one (KeyConfigError,
    which :func:`sbus.bootstrap.startup_problem` reports before we get here); open mode
    signs mandates and POST /admin/tokens with it, and without one configured with the
    store's secret (installed once the store answers, :mod:`sbus.bootstrap.lifecycle`)."""
    try:
        return KeySet.from_settings(settings), None
    except KeyConfigError as exc:
        if settings.auth_mode == "token":
            raise
        return None, exc.detail


def install(runtime: Runtime, keys: KeySet | None) -> None:
    """The engine signs and verifies with ``keys`` from now on (None: issuing is 503
    SigningUnavailable, naming ``runtime.no_issuer_reason``, and no mandate verifies)."""
    settings = runtime.settings
    if keys is None:
        unsigned = NoSigningKeys(runtime.no_issuer_reason)
        runtime.bus.attach_signers(unsigned, unsigned)
    else:
        issuer = Issuer.from_settings(settings, keys)
        runtime.bus.attach_signers(issuer, Mandates.from_settings(settings, keys))
