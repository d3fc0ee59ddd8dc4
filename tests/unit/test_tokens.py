from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from sbus.cli import app, parse_ttl
from sbus.config import Settings
from sbus.core.errors import ValidationFailed
from sbus.core.rights import Right, parse_allow
from sbus.security import KeyConfigError, SigningUnavailable, TokenExpired, TokenInvalid
from sbus.security.keys import KeySet, kid_of, token_mode_problem, write_keypair
from sbus.security.tokens import CAPABILITY_TYP, Claims, Issuer, Verifier, encode_jwt

NS = "sbus"
SECRET = "s" * 32
SCOPES = [parse_allow("read:plan/*"), parse_allow("write,create:code/A/*")]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: dict[str, Any]) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


@pytest.fixture(params=["EdDSA", "HS256"])
def keys(request: pytest.FixtureRequest) -> KeySet:
    if request.param == "EdDSA":
        return KeySet.from_ed25519(Ed25519PrivateKey.generate())
    return KeySet.from_secret(SECRET)


def issuer(keys: KeySet, *, shift: float = 0, namespace: str = NS, max_ttl: int = 3600) -> Issuer:
    return Issuer(keys, namespace=namespace, max_ttl=max_ttl, now=lambda: time.time() + shift)


def verifier(keys: KeySet, *, leeway: int = 30, max_ttl: int = 3600) -> Verifier:
    return Verifier(keys, namespace=NS, max_ttl=max_ttl, leeway=leeway)


def refused(keys: KeySet, token: str, reason: str, **options: int) -> None:
    """``token`` is refused as TokenInvalid, for ``reason`` (a fragment of the detail)."""
    with pytest.raises(TokenInvalid) as info:
        verifier(keys, **options).verify(token)
    assert not isinstance(info.value, TokenExpired)
    assert reason in info.value.detail, info.value.detail


def payload(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "A",
        "scopes": [{"pattern": "plan/*", "rights": ["read"]}],
        "iat": now,
        "exp": now + 600,
        "jti": "j1",
        "iss": NS,
        "aud": NS,
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def test_round_trip(keys: KeySet) -> None:
    token, issued = issuer(keys).issue("agent-A", SCOPES, 600)
    claims = verifier(keys).verify(token)
    assert claims == issued
    assert claims.agent == "agent-A" and claims.expires_at - claims.issued_at == 600
    assert claims.capabilities.allows(Right.READ, "plan/x")
    assert not claims.capabilities.allows(Right.WRITE, "plan/x")
    assert claims.capabilities.allows(Right.CREATE, "code/A/y")
    assert len(claims.jti) >= 20
    assert claims.to_json()["iss"] == claims.to_json()["aud"] == NS
    # jti is random per token
    assert issuer(keys).issue("agent-A", SCOPES, 600)[1].jti != issued.jti


def test_header_carries_alg_kid_typ(keys: KeySet) -> None:
    token, _ = issuer(keys).issue("A", SCOPES, 60)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": keys.algorithm, "kid": keys.signing_kid, "typ": CAPABILITY_TYP}


def test_expired_beyond_leeway(keys: KeySet) -> None:
    token, _ = issuer(keys, shift=-700).issue("A", SCOPES, 600)  # exp = now - 100
    with pytest.raises(TokenExpired) as info:
        verifier(keys, leeway=30).verify(token)
    assert info.value.code == "Unauthorized"


def test_expired_within_leeway_is_accepted(keys: KeySet) -> None:
    token, _ = issuer(keys, shift=-610).issue("A", SCOPES, 600)  # exp = now - 10
    assert verifier(keys, leeway=30).verify(token).agent == "A"


def test_not_yet_valid(keys: KeySet) -> None:
    token, _ = issuer(keys, shift=3600).issue("A", SCOPES, 600)
    with pytest.raises(TokenInvalid) as info:
        verifier(keys).verify(token)
    assert not isinstance(info.value, TokenExpired)
    assert "not yet valid" in info.value.detail


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"iss": "other"}, "Invalid issuer"),
        ({"aud": "other"}, "Audience doesn't match"),
        ({"aud": [NS]}, "Invalid claim format in token (strict)"),
        ({"iss": None}, 'missing the "iss" claim'),
        ({"aud": None}, 'missing the "aud" claim'),
    ],
)
def test_wrong_iss_or_aud(keys: KeySet, over: dict[str, Any], reason: str) -> None:
    claims = {name: value() if callable(value) else value for name, value in over.items()}
    refused(keys, encode_jwt(keys, payload(**claims), typ=CAPABILITY_TYP), reason)


def test_other_namespace_issuer_is_refused(keys: KeySet) -> None:
    token, _ = issuer(keys, namespace="staging").issue("A", SCOPES, 60)
    refused(keys, token, "Invalid issuer")


def test_alg_none_is_refused(keys: KeySet) -> None:
    header = {"alg": "none", "typ": CAPABILITY_TYP, "kid": keys.signing_kid}
    for token, reason in (
        (f"{segment(header)}.{segment(payload())}.", "algorithm 'none' not accepted"),
        (f"{segment(header)}.{segment(payload())}", "not a JWS compact serialization"),
    ):
        refused(keys, token, reason)


def test_hs256_signed_with_the_ed25519_public_key_is_refused() -> None:
    private = Ed25519PrivateKey.generate()
    keys = KeySet.from_ed25519(private)
    public = private.public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    header = {"alg": "HS256", "typ": CAPABILITY_TYP, "kid": keys.signing_kid}
    for secret in (pem, raw):
        signing_input = f"{segment(header)}.{segment(payload())}"
        sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        with pytest.raises(TokenInvalid) as info:
            verifier(keys).verify(f"{signing_input}.{b64(sig)}")
        assert "algorithm" in info.value.detail


def test_eddsa_token_refused_by_hs256_deployment() -> None:
    token, _ = issuer(KeySet.from_ed25519(Ed25519PrivateKey.generate())).issue("A", SCOPES, 60)
    refused(KeySet.from_secret(SECRET), token, "algorithm 'EdDSA' not accepted")


def test_unknown_kid_is_refused(keys: KeySet) -> None:
    other = (
        KeySet.from_ed25519(Ed25519PrivateKey.generate())
        if keys.algorithm == "EdDSA"
        else KeySet.from_secret("t" * 32)
    )
    token, _ = issuer(other).issue("A", SCOPES, 60)
    with pytest.raises(TokenInvalid) as info:
        verifier(keys).verify(token)
    assert "unknown key id" in info.value.detail


def test_kid_swapped_in_header_breaks_the_signature(keys: KeySet) -> None:
    """The header is signed: a token whose kid is changed to another KNOWN kid (here one
    naming the very same key, so only the header bytes differ) fails the signature check,
    not the kid look-up."""
    assert keys.signing_kid is not None
    alias = "0" * 16
    ring = keys.verifying | {alias: keys.verifying[keys.signing_kid]}
    both = KeySet(keys.algorithm, keys.signing, keys.signing_kid, ring)
    token, _ = issuer(both).issue("A", SCOPES, 60)
    _, body, sig = token.split(".")
    header = {"alg": keys.algorithm, "kid": alias, "typ": CAPABILITY_TYP}
    refused(both, f"{segment(header)}.{body}.{sig}", "Signature verification failed")
    # the control: the alias is a known kid, and a token signed under it verifies
    resigned = KeySet(keys.algorithm, keys.signing, alias, ring)
    assert verifier(both).verify(issuer(resigned).issue("A", SCOPES, 60)[0]).agent == "A"


def test_missing_kid_is_refused(keys: KeySet) -> None:
    token, _ = issuer(keys).issue("A", SCOPES, 60)
    _, body, sig = token.split(".")
    header = {"alg": keys.algorithm, "typ": CAPABILITY_TYP}
    refused(keys, f"{segment(header)}.{body}.{sig}", "unknown key id None")


def test_tampered_payload(keys: KeySet) -> None:
    token, claims = issuer(keys).issue("A", SCOPES, 60)
    head, _, sig = token.split(".")
    forged = claims.to_json() | {"scopes": [{"pattern": "**", "rights": ["admin"]}]}
    refused(keys, f"{head}.{segment(forged)}.{sig}", "Signature verification failed")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "no token"),
        ("garbage", "not a JWS compact serialization"),
        ("a.b.c", "not a JWS compact serialization"),
        ("a.b", "not a JWS compact serialization"),
        ("....", "not a JWS compact serialization"),
    ],
)
def test_garbled_tokens(keys: KeySet, token: str, reason: str) -> None:
    refused(keys, token, reason)


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"scopes": "read:plan/*"}, "malformed claims"),
        ({"scopes": None}, 'missing the "scopes" claim'),
        ({"scopes": [{"pattern": "plan/*", "rights": ["fly"]}]}, "malformed claims"),
        ({"scopes": [{"pattern": "plan/*", "rights": ["admin"]}]}, "malformed claims"),
        ({"scopes": [{"pattern": "***", "rights": ["read"]}]}, "malformed claims"),
        ({"scopes": [{"pattern": "a", "rights": ["read"], "x": 1}]}, "malformed claims"),
        ({"scopes": [{"pattern": "a", "rights": []}]}, "malformed claims"),
        ({"sub": ""}, "malformed claims: agent must be a non-empty string"),
        ({"sub": 7}, "Subject must be a string"),
        ({"sub": None}, 'missing the "sub" claim'),
        ({"jti": None}, 'missing the "jti" claim'),
        ({"jti": ""}, "claim 'jti' must be a non-empty string"),
        ({"iat": "now"}, "Issued At claim (iat) must be an integer"),
        # A callable: computed when the test runs, so the claim is still in the future
        # however long after collection that is (else it is refused as expired instead).
        ({"exp": lambda: float(time.time() + 60)}, "claim 'exp' must be an integer"),
        ({"exp": None}, 'missing the "exp" claim'),
        ({"iat": None}, 'missing the "iat" claim'),
    ],
)
def test_malformed_claims(keys: KeySet, over: dict[str, Any], reason: str) -> None:
    claims = {name: value() if callable(value) else value for name, value in over.items()}
    refused(keys, encode_jwt(keys, payload(**claims), typ=CAPABILITY_TYP), reason)


def test_valid_handmade_payload_passes(keys: KeySet) -> None:
    # the control for test_malformed_claims
    token = encode_jwt(keys, payload(), typ=CAPABILITY_TYP)
    assert verifier(keys).verify(token).jti == "j1"


def test_wrong_typ_is_refused(keys: KeySet) -> None:
    for typ in ("JWT", "sbus-mandate+jwt"):
        refused(keys, encode_jwt(keys, payload(), typ=typ), f"token type {typ!r} is not")


def test_lifetime_over_max_is_refused_on_verify(keys: KeySet) -> None:
    token, _ = issuer(keys, max_ttl=7200).issue("A", SCOPES, 7200)
    refused(keys, token, "token lifetime 7200s outside 1..SBUS_TOKEN_MAX_TTL", max_ttl=3600)


@pytest.mark.parametrize("ttl", [0, -1, 3601])
def test_ttl_outside_range_is_refused(keys: KeySet, ttl: int) -> None:
    with pytest.raises(ValidationFailed) as info:
        issuer(keys, max_ttl=3600).issue("A", SCOPES, ttl)
    assert info.value.fields["errors"][0]["loc"] == ["ttl_s"]


@pytest.mark.parametrize("agent", ["", "x" * 257, "a\x00b"])
def test_bad_agent_is_refused(keys: KeySet, agent: str) -> None:
    with pytest.raises(ValidationFailed):
        issuer(keys).issue(agent, SCOPES, 60)


def test_verify_only_replica_verifies_but_cannot_issue() -> None:
    private = Ed25519PrivateKey.generate()
    signer = KeySet.from_ed25519(private)
    replica = KeySet.from_ed25519(None, [private.public_key()])
    assert not replica.can_sign and replica.verifying.keys() == signer.verifying.keys()
    token, _ = issuer(signer).issue("A", SCOPES, 60)
    assert verifier(replica).verify(token).agent == "A"
    with pytest.raises(SigningUnavailable):
        issuer(replica).issue("A", SCOPES, 60)


def test_rotation_old_key_kept_for_verification() -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    old_token, _ = issuer(KeySet.from_ed25519(old)).issue("A", SCOPES, 60)
    rotated = KeySet.from_ed25519(new, [old.public_key()])
    new_token, _ = issuer(rotated).issue("B", SCOPES, 60)
    assert verifier(rotated).verify(old_token).agent == "A"
    assert verifier(rotated).verify(new_token).agent == "B"
    assert rotated.signing_kid == kid_of(new) == kid_of(new.public_key())
    refused(KeySet.from_ed25519(new), old_token, f"unknown key id {kid_of(old)!r}")


def test_secret_length() -> None:
    with pytest.raises(KeyConfigError) as info:
        KeySet.from_secret("s" * 31)
    assert "SBUS_SECRET" in info.value.detail
    assert KeySet.from_secret("s" * 32).algorithm == "HS256"
    # bytes, not characters: 11 three-byte characters are 33 bytes
    assert KeySet.from_secret("€" * 11).algorithm == "HS256"


def test_kid_is_stable_and_does_not_expose_the_secret() -> None:
    assert kid_of(SECRET.encode()) == KeySet.from_secret(SECRET).signing_kid
    assert len(kid_of(SECRET.encode())) == 16
    assert kid_of(SECRET.encode()) != hashlib.sha256(SECRET.encode()).hexdigest()[:16]


def test_settings_select_one_algorithm(tmp_path: Path) -> None:
    with pytest.raises(KeyConfigError) as info:
        KeySet.from_settings(Settings(secret="", signing_key="", verify_key=""))
    for name in ("SBUS_SIGNING_KEY", "SBUS_VERIFY_KEY", "SBUS_SECRET"):
        assert name in info.value.detail
    assert token_mode_problem(Settings(secret="short")) is not None
    assert token_mode_problem(Settings(secret=SECRET)) is None
    assert KeySet.from_settings(Settings(secret=SECRET)).algorithm == "HS256"

    priv, pub, kid = write_keypair(tmp_path / "a.pem")
    _, pub_old, kid_old = write_keypair(tmp_path / "old.pem")
    full = KeySet.from_settings(Settings(signing_key=str(priv), secret=SECRET))
    assert (full.algorithm, full.signing_kid) == ("EdDSA", kid)  # the secret is ignored
    ring = KeySet.from_settings(Settings(signing_key=str(priv), verify_key=f"{pub_old}, {pub}"))
    assert set(ring.verifying) == {kid, kid_old}
    replica = KeySet.from_settings(Settings(verify_key=str(pub)))
    assert (replica.algorithm, replica.can_sign, list(replica.verifying)) == ("EdDSA", False, [kid])


def test_settings_refuse_unusable_key_files(tmp_path: Path) -> None:
    priv, pub, _ = write_keypair(tmp_path / "k.pem")
    (tmp_path / "junk").write_text("not a key")
    bad = [
        Settings(signing_key=str(tmp_path / "missing.pem")),
        Settings(signing_key=str(pub)),  # a public key where the private one belongs
        Settings(verify_key=str(priv)),  # a private key where a public one belongs
        Settings(verify_key=str(tmp_path / "junk")),
    ]
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pem").write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    bad.append(Settings(signing_key=str(tmp_path / "ec.pem")))
    for settings in bad:
        with pytest.raises(KeyConfigError) as info:
            KeySet.from_settings(settings)
        assert "SBUS_" in info.value.detail


def test_keygen_files(tmp_path: Path) -> None:
    priv, pub, kid = write_keypair(tmp_path / "sig.pem")
    assert pub == tmp_path / "sig.pub.pem"
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    with pytest.raises(FileExistsError):
        write_keypair(tmp_path / "sig.pem")
    _, _, kid2 = write_keypair(tmp_path / "sig.pem", force=True)
    assert kid2 != kid
    assert write_keypair(tmp_path / "plain")[1] == tmp_path / "plain.pub"


# -- CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("15m", 900), ("1h", 3600), ("1d", 86_400), ("45", 45)]
)
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "0s", "1w", "h", "-1h", "1.5h", "\u00b2h", "\u0663", "1_0", "9" * 5000]
)
def test_parse_ttl_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="expected a positive duration"):
        parse_ttl(text)


def test_cli_keygen_then_issue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["token", "keygen", str(tmp_path / "k.pem")])
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("SBUS_SIGNING_KEY", str(tmp_path / "k.pem"))
    args = ["token", "issue", "--agent", "A", "--allow", "read:plan/*"]
    result = runner.invoke(app, [*args, "--allow", "write:code/A/*", "--ttl", "1h", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    claims = Verifier.from_settings(Settings()).verify(out["token"])
    assert isinstance(claims, Claims) and claims.to_json() == out["claims"]
    assert out["claims"]["exp"] - out["claims"]["iat"] == 3600

    plain = runner.invoke(app, args)
    assert plain.exit_code == 0 and plain.stdout.count(".") == 2

    monkeypatch.setenv("SBUS_TOKEN_MAX_TTL", "3600")
    over = runner.invoke(app, [*args, "--ttl", "2h"])
    assert over.exit_code == 2 and "SBUS_TOKEN_MAX_TTL" in over.output


def test_cli_issue_without_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SBUS_SECRET", "SBUS_SIGNING_KEY", "SBUS_VERIFY_KEY"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, ["token", "issue", "--agent", "A", "--allow", "read:x"])
    assert result.exit_code == 2 and "SBUS_SECRET" in result.output


def test_cli_refuses_a_token_the_verifier_would_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    """256 scopes of non-ASCII patterns are within the pattern bounds but sign to more
    than 64 KiB (the JSON \\u-escapes each character to 12 bytes): exit 2 with the reason,
    no token printed."""
    monkeypatch.setenv("SBUS_SECRET", "c" * 32)
    allows = [f"read,write,create,delete,mandate:{i:03d}/" + "\U0001f600" * 12 for i in range(256)]
    args = ["token", "issue", "--agent", "A"]
    for allow in allows:
        args += ["--allow", allow]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "65536" in result.output and "." not in result.stdout
    fits = ["token", "issue", "--agent", "A", "--allow", allows[0]]
    assert CliRunner().invoke(app, fits).exit_code == 0
