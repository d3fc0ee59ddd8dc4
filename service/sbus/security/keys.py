"""The key ring of a deployment: exactly one JWT algorithm, chosen by configuration.

- ``SBUS_SIGNING_KEY`` (path to a PEM Ed25519 private key): EdDSA. The bus signs with it
  and verifies with its public key plus every key named by ``SBUS_VERIFY_KEY``.
- ``SBUS_VERIFY_KEY`` alone (comma-separated paths of PEM Ed25519 public keys): EdDSA,
  verify-only; issuing raises :class:`SigningUnavailable`.
- otherwise ``SBUS_SECRET`` (at least 32 bytes of UTF-8): HS256.
- none of them: :class:`KeyConfigError` naming the three variables in token mode. Open
  mode then signs with the deployment's own HS256 secret, which the store keeps for every
  replica (:func:`open_mode_keys`, ``Store.open_mode_secret``).

When an Ed25519 key is configured ``SBUS_SECRET`` is ignored, as protocol.md orders; HS256
tokens are then refused like any other algorithm. Each key has a ``kid``, a 16-hex-digit
fingerprint: sha256 of the raw Ed25519 public key, or HMAC-SHA256 of a fixed label under
the secret (so the kid reveals nothing a token's own signature does not). Rotation: sign
with the new key and keep the old public key in ``SBUS_VERIFY_KEY`` until the last token
it signed has expired; tokens name their key by ``kid``. HS256 has a single secret, so
changing it invalidates every outstanding token.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from sbus.config import Settings
from sbus.core.errors import StoreMisconfigured
from sbus.security import KeyConfigError, SigningUnavailable

Algorithm = Literal["EdDSA", "HS256"]
SigningMaterial = Ed25519PrivateKey | bytes
VerifyMaterial = Ed25519PublicKey | bytes

MIN_SECRET_BYTES = 32
_KID_LABEL = b"sbus key id v1"


def kid_of(key: Ed25519PublicKey | Ed25519PrivateKey | bytes) -> str:
    """The stable fingerprint of a key (its ``kid``)."""
    if isinstance(key, bytes):
        return hmac.new(key, _KID_LABEL, hashlib.sha256).hexdigest()[:16]
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class KeySet:
    """One algorithm, at most one signing key, and the verify keys by kid."""

    algorithm: Algorithm
    signing: SigningMaterial | None
    signing_kid: str | None
    verifying: dict[str, VerifyMaterial] = field(hash=False)

    @property
    def can_sign(self) -> bool:
        return self.signing is not None

    def signer(self) -> tuple[str, SigningMaterial]:
        """(kid, key) to sign with; :class:`SigningUnavailable` on a verify-only replica."""
        if self.signing is None or self.signing_kid is None:
            raise SigningUnavailable(
                "this replica holds no signing key (SBUS_VERIFY_KEY without SBUS_SIGNING_KEY); "
                "issue tokens and mandates on a replica that has SBUS_SIGNING_KEY"
            )
        return self.signing_kid, self.signing

    def verify_key(self, kid: str) -> VerifyMaterial | None:
        return self.verifying.get(kid)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_secret(cls, secret: str | bytes) -> KeySet:
        raw = secret.encode() if isinstance(secret, str) else secret
        if len(raw) < MIN_SECRET_BYTES:
            raise KeyConfigError(
                f"SBUS_SECRET must be at least {MIN_SECRET_BYTES} bytes (got {len(raw)}); "
                "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'"
            )
        kid = kid_of(raw)
        return cls("HS256", raw, kid, {kid: raw})

    @classmethod
    def from_ed25519(
        cls, signing: Ed25519PrivateKey | None, verify: list[Ed25519PublicKey] | None = None
    ) -> KeySet:
        publics = list(verify or [])
        if signing is not None:
            publics.insert(0, signing.public_key())
        if not publics:
            raise KeyConfigError("an EdDSA key set needs a signing or a verify key")
        ring: dict[str, VerifyMaterial] = {kid_of(k): k for k in publics}
        return cls("EdDSA", signing, kid_of(signing) if signing else None, ring)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeySet:
        """The key set the configuration describes, or :class:`KeyConfigError`."""
        verify_paths = [p.strip() for p in settings.verify_key.split(",") if p.strip()]
        if settings.signing_key.strip() or verify_paths:
            signing = None
            if settings.signing_key.strip():
                signing = load_private_key(Path(settings.signing_key.strip()))
            publics = [load_public_key(Path(p)) for p in verify_paths]
            return cls.from_ed25519(signing, publics)
        if settings.secret:
            return cls.from_secret(settings.secret)
        raise KeyConfigError(
            "token mode needs a key: set SBUS_SIGNING_KEY (Ed25519 private key PEM; "
            "see `sbus token keygen`), SBUS_VERIFY_KEY (public key PEM, verify-only replica) "
            f"or SBUS_SECRET (HS256, at least {MIN_SECRET_BYTES} bytes)"
        )


def _read(path: Path, variable: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyConfigError(f"{variable}: cannot read {str(path)!r}: {exc.strerror}") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read(path, "SBUS_SIGNING_KEY")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyConfigError(
            f"SBUS_SIGNING_KEY: {str(path)!r} is not an unencrypted PEM private key ({exc})"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyConfigError(f"SBUS_SIGNING_KEY: {str(path)!r} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = _read(path, "SBUS_VERIFY_KEY")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyConfigError(
            f"SBUS_VERIFY_KEY: {str(path)!r} is not a PEM public key ({exc})"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyConfigError(f"SBUS_VERIFY_KEY: {str(path)!r} is not an Ed25519 key")
    return key


def configured(settings: Settings) -> bool:
    """Whether the settings name any key (then they alone decide, even in open mode)."""
    return any(v.strip() for v in (settings.signing_key, settings.verify_key, settings.secret))


async def open_mode_keys(kept: Callable[[bytes], Awaitable[bytes]]) -> KeySet:
    """The key set of an open-mode deployment that configures no key: HS256 with the
    secret the store keeps (``kept`` is ``Store.open_mode_secret``), which stores the
    fresh random candidate offered here only when it holds none. Every replica over the
    store gets the same secret, so a mandate issued by one verifies on all.
    :class:`StoreMisconfigured` if what the store holds is not a usable secret."""
    secret = await kept(secrets.token_bytes(MIN_SECRET_BYTES))
    if len(secret) < MIN_SECRET_BYTES:
        raise StoreMisconfigured(
            f"the store's open-mode signing key is {len(secret)} bytes, under "
            f"{MIN_SECRET_BYTES}; remove it (docs/security.md says where it is kept) and a "
            "new one is made"
        )
    return KeySet.from_secret(secret)


def token_mode_problem(settings: Settings) -> str | None:
    """Why these settings cannot run token mode, or None (reading the key files they
    name; for :func:`sbus.bootstrap.startup_problem`)."""
    try:
        KeySet.from_settings(settings)
    except KeyConfigError as exc:
        return exc.detail
    return None


def public_path_for(private_path: Path) -> Path:
    """Where ``sbus token keygen`` puts the public key: ``x.pem`` -> ``x.pub.pem``,
    anything else -> ``<name>.pub``."""
    if private_path.suffix == ".pem":
        return private_path.with_suffix(".pub.pem")
    return private_path.with_name(private_path.name + ".pub")


def write_keypair(private_path: Path, *, force: bool = False) -> tuple[Path, Path, str]:
    """Generate an Ed25519 key pair: the private key PEM (PKCS#8, mode 0600, created
    exclusively so no existing file or symlink is followed) and the public key PEM
    beside it. Returns (private path, public path, kid). Refuses to overwrite unless
    ``force``; raises :class:`FileExistsError` / :class:`OSError`."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public_path = public_path_for(private_path)
    if not force:
        for path in (private_path, public_path):
            if path.exists() or path.is_symlink():
                raise FileExistsError(f"{path} exists (use --force to replace it)")
    for path, data, mode in ((private_path, private_pem, 0o600), (public_path, public_pem, 0o644)):
        if force and (path.exists() or path.is_symlink()):
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        os.fchmod(fd, mode)  # the umask may only have narrowed it; make it exact
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    return private_path, public_path, kid_of(key)
