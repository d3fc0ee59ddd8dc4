"""The key set and the signers built on it: the issuer of POST /admin/tokens and the
mandate signer of POST /mandates (and the verifier of presented mandates)."""

from __future__ import annotations

from sbus.api.runtime import Runtime
from sbus.config import Settings
from sbus.security import KeyConfigError
from sbus.security.keys import KeySet
from sbus.security.mandates import Mandates
from sbus.security.tokens import Issuer


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
    """Sign with ``keys`` from now on (None: 503 SigningUnavailable)."""
    settings = runtime.settings
    runtime.issuer = Issuer.from_settings(settings, keys) if keys is not None else None
    runtime.mandates = Mandates.from_settings(settings, keys) if keys is not None else None
