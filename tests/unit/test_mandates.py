from __future__ import annotations

import hashlib
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sbus.core.errors import CapabilityDenied, MandateNotFound, SBusError, ValidationFailed
from sbus.core.rights import Capabilities, Identity, open_capabilities, parse_allow
from sbus.security import (
    MandateContextMismatch,
    MandateExpired,
    MandateHolderMismatch,
    MandateScopeMismatch,
    SigningUnavailable,
    TokenInvalid,
)
from sbus.security.keys import KeySet
from sbus.security.mandates import MANDATE_TYP, MandateClaims, Mandates, context_hash
from sbus.security.tokens import Issuer, Verifier, encode_jwt
from tests.unit.work import bytecodes, worst_keys, worst_patterns

NS = "sbus"
NOW = 1_800_000_000_000  # store clock, ms
CONTEXT = {"order": "o-17", "amount": 42, "items": [{"sku": "b"}, {"sku": "a"}]}
GRANTOR = Identity(
    "planner",
    Capabilities((parse_allow("mandate,read:pay/**"), parse_allow("write:pay/**"))),
)


@pytest.fixture(params=["EdDSA", "HS256"])
def keys(request: pytest.FixtureRequest) -> KeySet:
    if request.param == "EdDSA":
        return KeySet.from_ed25519(Ed25519PrivateKey.generate())
    return KeySet.from_secret("m" * 32)


@pytest.fixture
def mandates(keys: KeySet) -> Mandates:
    return Mandates(keys, namespace=NS, max_ttl=3600, leeway=30)


def issue(mandates: Mandates, **over: Any) -> str:
    args: dict[str, Any] = {
        "issuer": GRANTOR,
        "holder": "payer",
        "keys": ["pay/orders/*"],
        "context": CONTEXT,
        "ttl_s": 600,
        "now_ms": NOW,
    }
    args.update(over)
    return mandates.issue_mandate(**args)[0]


def verify(mandates: Mandates, token: str, **over: Any) -> Any:
    args: dict[str, Any] = {
        "agent": "payer",
        "written_keys": ["pay/orders/o-17"],
        "context": dict(reversed(CONTEXT.items())),  # key order must not matter
        "now_ms": NOW + 1000,
    }
    args.update(over)
    return mandates.verify_mandate(token, **args)


def test_context_hash_is_sha256_of_sorted_compact_json() -> None:
    expected = hashlib.sha256('{"a":"é","b":{"c":1,"d":[2,1]}}'.encode()).hexdigest()
    assert context_hash({"b": {"d": [2, 1], "c": 1}, "a": "é"}) == expected
    assert context_hash(None) == context_hash({}) == hashlib.sha256(b"{}").hexdigest()
    with pytest.raises(ValidationFailed):
        context_hash({"x": object()})
    with pytest.raises(ValidationFailed):
        context_hash(["not", "an", "object"])  # type: ignore[arg-type]


def test_round_trip(mandates: Mandates) -> None:
    token, issued = mandates.issue_mandate(
        GRANTOR, "payer", ["pay/orders/*"], CONTEXT, 600, now_ms=NOW
    )
    assert issued.grantor == "planner" and issued.grantor_scopes == ("pay/**",)
    assert issued.expires_at_ms == NOW + 600_000
    assert issued.retain_until_ms(30) == NOW + 630_000
    assert issued.context_hash == context_hash(CONTEXT)
    claims = verify(mandates, token)
    assert claims == issued
    # several written keys, and the last instant before expiry
    verify(
        mandates,
        token,
        written_keys=["pay/orders/b", "pay/orders/a"],
        now_ms=issued.expires_at_ms - 1,
    )


def test_refusal_codes_in_spec_order(mandates: Mandates) -> None:
    """Start from a request that fails every check, then fix one cause at a time: each
    step must report the next code of protocol.md §4, step 9a."""
    token = issue(mandates)
    wrong: dict[str, Any] = {
        "agent": "mallory",
        "written_keys": ["pay/orders/o-17", "pay/refunds/r-1"],
        "context": {"order": "o-18"},
        "now_ms": NOW + 600_000,
    }
    steps: list[tuple[type[SBusError], str, dict[str, Any]]] = [
        (MandateNotFound, "MandateNotFound", {}),
        (MandateExpired, "MandateExpired", {}),
        (MandateHolderMismatch, "MandateHolderMismatch", {"now_ms": NOW}),
        (MandateScopeMismatch, "MandateScopeMismatch", {"agent": "payer"}),
        (MandateContextMismatch, "MandateContextMismatch", {"written_keys": ["pay/orders/x"]}),
    ]
    current = token + "x"  # garbled
    for i, (cls, code, fix) in enumerate(steps):
        wrong.update(fix)
        if i == 1:
            current = token
        with pytest.raises(cls) as info:
            mandates.verify_mandate(current, **wrong)
        assert type(info.value) is cls and info.value.code == code
    wrong["context"] = CONTEXT
    assert mandates.verify_mandate(current, **wrong).holder == "payer"


def test_scope_mismatch_names_the_first_key_in_order(mandates: Mandates) -> None:
    token = issue(mandates)
    with pytest.raises(MandateScopeMismatch) as info:
        verify(mandates, token, written_keys=["pay/orders/z/deep", "pay/orders/a/deep"])
    assert info.value.fields["key"] == "pay/orders/a/deep"


def test_mandate_keys_do_not_widen_the_grantor_scopes(mandates: Mandates) -> None:
    # The mandate names keys outside the grantor's mandate right: they never verify.
    token = issue(mandates, keys=["**"])
    verify(mandates, token, written_keys=["pay/x"])
    with pytest.raises(MandateScopeMismatch):
        verify(mandates, token, written_keys=["code/A/x"])


def test_expiry_uses_the_given_store_clock(mandates: Mandates) -> None:
    token = issue(mandates, ttl_s=60)
    verify(mandates, token, now_ms=NOW + 59_999)
    with pytest.raises(MandateExpired):
        verify(mandates, token, now_ms=NOW + 60_000)


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a.b.c", "x" * 70_000, None, 17],
)
def test_garbage_is_not_found(mandates: Mandates, token: Any) -> None:
    with pytest.raises(MandateNotFound):
        verify(mandates, token)


def test_foreign_mandates_are_not_found(keys: KeySet, mandates: Mandates) -> None:
    other_keys = KeySet.from_ed25519(Ed25519PrivateKey.generate())
    for other in (
        Mandates(other_keys, namespace=NS, max_ttl=3600, leeway=30),
        Mandates(keys, namespace="staging", max_ttl=3600, leeway=30),
        Mandates(keys, namespace=NS, max_ttl=7200, leeway=30),
    ):
        with pytest.raises(MandateNotFound):
            verify(mandates, issue(other, ttl_s=5000 if other.max_ttl == 7200 else 600))


def test_capability_token_is_not_a_mandate_and_vice_versa(keys: KeySet) -> None:
    mandates = Mandates(keys, namespace=NS, max_ttl=3600, leeway=30)
    now = time.time()
    cap, _ = Issuer(keys, namespace=NS, max_ttl=3600).issue("payer", [], 600)
    with pytest.raises(MandateNotFound):
        verify(mandates, cap, now_ms=int(now * 1000))
    mandate, claims = mandates.issue_mandate(
        GRANTOR, "payer", ["pay/**"], {}, 600, now_ms=int(now * 1000)
    )
    with pytest.raises(TokenInvalid) as info:
        Verifier(keys, namespace=NS, max_ttl=3600, leeway=30).verify(mandate)
    assert 'missing the "sub" claim' in info.value.detail, info.value.detail
    # even a mandate payload relabelled as a capability token (a signer's slip) fails
    with pytest.raises(TokenInvalid) as info:
        Verifier(keys, namespace=NS, max_ttl=3600, leeway=30).verify(
            encode_jwt(keys, claims.to_json(), typ="at+jwt")
        )
    assert 'missing the "sub" claim' in info.value.detail, info.value.detail


@pytest.mark.parametrize(
    "over",
    [
        {"holder": ""},
        {"keys": []},
        {"keys": "pay/*"},
        {"keys": ["***"]},
        {"keys": [""]},
        {"keys": ["pay/*"] * 257},
        {"keys": ["pay/" + "x" * 508] * 9},
        {"ttl_s": 0},
        {"ttl_s": 3601},
        {"context": {"x": {1, 2}}},
    ],
)
def test_issue_validation(mandates: Mandates, over: dict[str, Any]) -> None:
    with pytest.raises(ValidationFailed):
        issue(mandates, **over)


def test_issuer_needs_the_mandate_right(mandates: Mandates) -> None:
    reader = Identity("reader", Capabilities((parse_allow("read,write:**"),)))
    with pytest.raises(CapabilityDenied):
        issue(mandates, issuer=reader)
    opened = Identity("anyone", open_capabilities(admin_enabled=False))
    assert verify(mandates, issue(mandates, issuer=opened)).grantor_scopes == ("**",)


def test_token_claims_can_issue(keys: KeySet, mandates: Mandates) -> None:
    _, claims = Issuer(keys, namespace=NS, max_ttl=3600).issue(
        "planner", [parse_allow("mandate:pay/orders/*")], 600
    )
    assert verify(mandates, issue(mandates, issuer=claims)).grantor == "planner"


def test_verify_only_replica_verifies_but_cannot_issue() -> None:
    private = Ed25519PrivateKey.generate()
    signer = Mandates(KeySet.from_ed25519(private), namespace=NS, max_ttl=3600, leeway=30)
    replica = Mandates(
        KeySet.from_ed25519(None, [private.public_key()]), namespace=NS, max_ttl=3600, leeway=30
    )
    assert verify(replica, issue(signer)).holder == "payer"
    with pytest.raises(SigningUnavailable):
        issue(replica)


@pytest.mark.parametrize(
    "over",
    [
        {"holder": None},
        {"keys": []},
        {"keys": ["***"]},
        {"keys": ["pay/" + "x" * 508] * 9},
        {"grantor_scopes": None},
        {"grantor_scopes": ["pay/" + "x" * 508] * 9},
        {"context_hash": "abc"},
        {"exp": "later"},
        {"jti": ""},
    ],
)
def test_malformed_mandate_claims_are_not_found(
    keys: KeySet, mandates: Mandates, over: dict[str, Any]
) -> None:
    _, claims = mandates.issue_mandate(GRANTOR, "payer", ["pay/**"], CONTEXT, 600, now_ms=NOW)
    payload = {k: v for k, v in (claims.to_json() | over).items() if v is not None}
    with pytest.raises(MandateNotFound):
        verify(mandates, encode_jwt(keys, payload, typ=MANDATE_TYP))


def test_checking_the_worst_multi_is_linear_in_its_keys() -> None:
    """128 keys of 256 characters against mandate keys and grantor scopes both at the
    pattern bounds, every key covered only by the last pattern of each list. The work
    is counted in bytecodes (machine-independent): a fixed amount per key character
    and list, where the per-pattern engine this replaced did ~15x as much, and a 64 KB
    mandate (which the bounds now refuse at issue) ~30x as much again."""
    keys = worst_keys()
    claims = MandateClaims(
        jti="j",
        holder="payer",
        keys=worst_patterns(),
        grantor_scopes=worst_patterns(),
        grantor="planner",
        context_hash=context_hash({}),
        issued_at=NOW // 1000,
        expires_at=NOW // 1000 + 600,
        namespace=NS,
    )
    limit = 2 * 50 * sum(map(len, keys))
    assert bytecodes(lambda: all(claims.covers(key) for key in keys), limit=limit).result is True


def test_the_issue_size_bound_keeps_mandates_verifiable(mandates: Mandates) -> None:
    """Issue refuses what decoding would refuse: any mandate it signs is verifiable."""
    wide = [f"pay/{i:03d}/" + "x" * 8 for i in range(256)]  # 4096 characters
    token = issue(mandates, keys=wide)
    assert verify(mandates, token, written_keys=["pay/007/xxxxxxxx"]).keys == tuple(wide)
