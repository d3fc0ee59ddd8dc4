"""Schemathesis against the OpenAPI document, in process over the memory store: once in
open mode (admin and test hooks enabled) and once in token mode with an all-rights
token. Four checks only: no 5xx, and every status, content type and body documented.

Seeded (derandomized) and bounded to about 25 examples per operation, so a run is
reproducible and stays well under three minutes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app
from sbus.config import Settings
from sbus.core.rights import ALL_RIGHTS, Scope
from sbus.security.tokens import Issuer

CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Open mode only answers Host: localhost (DNS-rebinding guard); token mode accepts any.
BASE_URL = "http://localhost"
EXAMPLES = 25
SEED = 20260501


SECRET = "x" * 32
# Open mode as it starts by default (no key configured: POST /admin/tokens and
# POST /mandates sign with the key the store keeps), plus admin and the test hooks.
OPEN_APP = create_app(Settings(store="memory://", admin_enabled=True, test_hooks=True))
TOKEN_SETTINGS = Settings(store="memory://", auth="token", secret=SECRET)
TOKEN_APP = create_app(TOKEN_SETTINGS)


TestFunction = Callable[..., None]


def _load(app: FastAPI) -> schemathesis.BaseSchema:
    """The schema as the app serves it over ASGI (this starts the app's lifespan);
    ``/admin/reset`` is left out: it would wipe state mid-run, and the API tests cover it."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Host": "localhost"})
    schema.config.update(base_url=BASE_URL)
    return schema.exclude(path="/admin/reset")


def _parametrize(schema: schemathesis.BaseSchema) -> Callable[[TestFunction], TestFunction]:
    decorator: Callable[[TestFunction], TestFunction] = schema.parametrize()
    return decorator


open_api = _parametrize(_load(OPEN_APP))
token_api = _parametrize(_load(TOKEN_APP))


@pytest.fixture(scope="module", autouse=True)
def _lifespans() -> Iterator[None]:
    """Wait for both stores to connect; stop the apps' lifespans afterwards."""
    deadline = time.monotonic() + 10
    for app in (OPEN_APP, TOKEN_APP):
        while not runtime_of(app).ready and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runtime_of(app).ready, runtime_of(app).not_ready_reason
    yield
    asgi.shutdown_lifespans()


@pytest.fixture(scope="module")
def root_headers() -> dict[str, str]:
    value, _ = Issuer.from_settings(TOKEN_SETTINGS).issue("root", [Scope("**", ALL_RIGHTS)], 600)
    return {"Authorization": f"Bearer {value}"}


def _headers(case: schemathesis.Case[Any], extra: dict[str, str]) -> dict[str, str]:
    headers = dict(extra)
    # Bodyless POST/DELETE still need Content-Type (415 otherwise); send it so the
    # generated cases reach the handlers instead of all stopping at the gate.
    if case.method.upper() in ("POST", "DELETE") and case.media_type is None:
        headers["Content-Type"] = "application/json"
    return headers


_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


@open_api
@_SETTINGS
def test_open_mode(case: schemathesis.Case[Any]) -> None:
    case.call_and_validate(headers=_headers(case, {}), checks=CHECKS)


@token_api
@_SETTINGS
def test_token_mode(case: schemathesis.Case[Any], root_headers: dict[str, str]) -> None:
    case.call_and_validate(headers=_headers(case, root_headers), checks=CHECKS)
