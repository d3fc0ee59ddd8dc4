"""Token-mode helpers: an app in token mode, tokens for it, and forged tokens."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import jwt
from fastapi import FastAPI

from sbus.api.runtime import runtime_of
from sbus.core.rights import ALL_RIGHTS, Right, Scope
from sbus.security.keys import KeySet
from sbus.security.tokens import CAPABILITY_TYP, Issuer, Verifier
from tests.conftest import AppFactory

SECRET = "x" * 32
ALL = tuple(r.value for r in Right)


async def token_app(make_client: AppFactory, **overrides: Any) -> tuple[FastAPI, httpx.AsyncClient]:
    options: dict[str, Any] = {"auth": "token", "secret": SECRET, "admin_enabled": False}
    options.update(overrides)
    return await make_client(**options)


def issuer(app: FastAPI, *, now: float | None = None) -> Issuer:
    base = Issuer.from_settings(runtime_of(app).settings)
    if now is None:
        return base
    fixed = now
    return Issuer(base.keys, namespace=base.namespace, max_ttl=base.max_ttl, now=lambda: fixed)


def verifier(app: FastAPI) -> Verifier:
    """The token-mode app's verifier (open mode has none)."""
    found = runtime_of(app).authenticator.verifier
    assert found is not None, "not a token-mode app"
    return found


def token(app: FastAPI, agent: str, *scopes: tuple[str, str], ttl: int = 600) -> str:
    """``scopes`` as (pattern, "read,write") pairs."""
    parsed = [Scope.of(pattern, *rights.split(",")) for pattern, rights in scopes]
    value, _ = issuer(app).issue(agent, parsed, ttl)
    return value


def root_token(app: FastAPI, agent: str = "root") -> str:
    value, _ = issuer(app).issue(agent, [Scope("**", ALL_RIGHTS)], 600)
    return value


def auth(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def expired_token(app: FastAPI) -> str:
    value, _ = issuer(app, now=time.time() - 7200).issue("a", [Scope.of("**", "read")], 600)
    return value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(app: FastAPI, agent: str = "a") -> dict[str, Any]:
    now = int(time.time())
    ns = runtime_of(app).settings.namespace
    return {
        "sub": agent,
        "scopes": [{"pattern": "**", "rights": list(ALL)}],
        "iat": now,
        "exp": now + 600,
        "jti": "forged",
        "iss": ns,
        "aud": ns,
    }


def alg_none_token(app: FastAPI) -> str:
    keys: KeySet = issuer(app).keys
    header = {"alg": "none", "typ": CAPABILITY_TYP, "kid": keys.signing_kid}
    payload = _claims(app)
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}."


def wrong_secret_token(app: FastAPI) -> str:
    keys: KeySet = issuer(app).keys
    return jwt.encode(
        _claims(app),
        "y" * 32,
        algorithm="HS256",
        headers={"kid": keys.signing_kid or "", "typ": CAPABILITY_TYP},
    )


# Bodies every admin route refuses (422) from an admin: a caller without the right never
# learns that, the admin refusal comes first (as it did when a dependency checked it).
BAD_ADMIN_ROUTES: list[tuple[str, str, object]] = [
    ("POST", "/admin/reset", [1]),
    ("POST", "/admin/config", {"ori_enabled": "yes"}),
    ("GET", "/admin/delivery-log?limit=0", None),
    ("POST", "/admin/inject-stale", {"agent_id": "A", "key": "", "stale_version": -1}),
    ("POST", "/admin/shard", {"key": "", "content": 1}),
    ("POST", "/admin/test/advance-clock", {"ms": -1}),
    ("POST", "/admin/tokens", {"agent": "A", "scopes": [{"pattern": "***", "rights": []}]}),
    ("POST", "/admin/tokens/revoke", {"jti": ""}),
]
