"""Request-scoped helpers: the bus, identity resolution (SPEC section 2, "Identity on
the wire"), If-Match parsing, Idempotency-Key fingerprints and the admin gate."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import Depends, Request

from sbus.config import Settings
from sbus.core import errors as e
from sbus.core.chain import canonical_json
from sbus.core.engine import Bus
from sbus.core.keys import text_problem
from sbus.core.types import IdemRef

AGENT_HEADERS = ("x-agent-id", "x-sbus-agent-id")
SESSION_HEADER = "x-sbus-session-id"


# Dependencies are ``async def`` on purpose: FastAPI runs plain ``def`` dependencies in
# its threadpool, a hop that cost ~11% of server time per request in profiles.
async def get_bus(request: Request) -> Bus:
    bus: Bus = request.app.state.bus
    return bus


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


BusDep = Annotated[Bus, Depends(get_bus)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _header_text(request: Request, name: str) -> str | None:
    value = request.headers.get(name)
    if value is None or value == "":
        return None
    if len(value) > 256 or text_problem(value):
        raise e.ValidationFailed(
            f"header {name} is not a valid identifier",
            errors=[{"loc": ["header", name], "msg": "invalid identifier", "type": "value_error"}],
        )
    return value


def agent_of(request: Request, *claimed: str | None) -> str | None:
    """The one agent named by headers and body/query fields; empty means absent.
    Two sources that disagree are an AgentMismatch."""
    sources = [_header_text(request, h) for h in AGENT_HEADERS]
    sources.extend(claimed)
    named = {s for s in sources if s}
    if len(named) > 1:
        raise e.AgentMismatch("agent identity sources disagree: " + ", ".join(sorted(named)))
    return named.pop() if named else None


def require_agent(request: Request, *claimed: str | None) -> str:
    agent = agent_of(request, *claimed)
    if agent is None:
        raise e.ValidationFailed(
            "agent_id is required (body field, query parameter or X-Agent-Id header)",
            errors=[{"loc": ["body", "agent_id"], "msg": "Field required", "type": "missing"}],
        )
    return agent


def session_of(request: Request, claimed: str | None = None) -> str:
    header = request.headers.get(SESSION_HEADER)
    if header is not None and (len(header) > 256 or text_problem(header)):
        raise e.ValidationFailed(
            f"header {SESSION_HEADER} is not a valid identifier", loc=["header", SESSION_HEADER]
        )
    if header is not None and claimed is not None and header != claimed:
        raise e.AgentMismatch("session_id and X-SBus-Session-Id disagree")
    return claimed if claimed is not None else (header or "")


def if_match(request: Request) -> int | None:
    """Exactly one strong ``"N"``; ``*``, weak tags and lists are refused (400)."""
    raw = request.headers.get("if-match")
    if raw is None:
        return None
    value = raw.strip()
    if len(value) >= 3 and value[0] == '"' and value[-1] == '"' and value[1:-1].isdigit():
        number = int(value[1:-1])
        if number <= 2**53 - 1:
            return number
    raise e.InvalidPrecondition('If-Match must be exactly one strong ETag such as "3"')


def expected_from(body_value: int | None, header_value: int | None) -> int | None:
    if body_value is not None and header_value is not None and body_value != header_value:
        raise e.PreconditionConflict(
            f"expected_version {body_value} and If-Match {header_value} disagree",
            expected_version=body_value,
            if_match=header_value,
        )
    return body_value if body_value is not None else header_value


def idempotency(request: Request, agent_id: str, body: Any) -> IdemRef | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not all(" " <= ch <= "~" for ch in key):
        raise e.ValidationFailed(
            "Idempotency-Key must be 1-255 printable ASCII characters",
            errors=[
                {"loc": ["header", "Idempotency-Key"], "msg": "invalid", "type": "value_error"}
            ],
        )
    digest = hashlib.sha256()
    digest.update(request.method.encode())
    digest.update(b"\n")
    route = request.scope.get("route")
    digest.update(str(getattr(route, "path", request.url.path)).encode())
    digest.update(b"\n")
    digest.update(request.headers.get("if-match", "").encode())
    digest.update(b"\n")
    digest.update(canonical_json(body))
    return IdemRef(agent_id, key, digest.hexdigest())


async def require_admin(settings: SettingsDep) -> None:
    if not settings.admin_enabled:
        raise e.AdminDisabled("admin endpoints are disabled; set SBUS_ADMIN_ENABLED=1")


AdminDep = Depends(require_admin)
