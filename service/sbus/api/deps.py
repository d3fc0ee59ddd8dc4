"""Transport parsing for the routers: the bus, the principal and identity resolution
(protocol.md section 2, "Identity on the wire"; section 4 step 4) into a
:class:`~sbus.core.commands.Caller`, If-Match, Idempotency-Key fingerprints and the
mandate context header. No rights are checked here: the engine derives and checks them
(``sbus.core.authz``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Annotated, Any, cast

from fastapi import Depends, Request

from sbus.api.auth import PRINCIPAL
from sbus.api.runtime import Runtime, runtime_of
from sbus.api.wire import DIGITS
from sbus.config import Settings
from sbus.core import errors as e
from sbus.core.chain import canonical_json
from sbus.core.commands import Caller, Command
from sbus.core.engine import Bus
from sbus.core.keys import json_problem, text_problem
from sbus.core.rights import Capabilities, Principal
from sbus.core.types import IdemRef
from sbus.security import TokenInvalid
from sbus.telemetry.exchange import note_caller

AGENT_HEADERS = ("x-agent-id", "x-sbus-agent-id")
NOBODY = Caller(None, "", Capabilities(), token_bound=False)
SESSION_HEADER = "x-sbus-session-id"


# Dependencies are ``async def`` on purpose: FastAPI runs plain ``def`` dependencies in
# its threadpool, a hop that cost ~11% of server time per request in profiles.
async def get_runtime(request: Request) -> Runtime:
    return runtime_of(request.app)


async def get_bus(request: Request) -> Bus:
    return runtime_of(request.app).bus


async def get_settings(request: Request) -> Settings:
    return runtime_of(request.app).settings


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
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


def principal_of(request: Request) -> Principal:
    """The principal the gate authenticated. Fails closed: a route reached without one
    (only the PUBLIC routes are, and they never ask) is unauthenticated."""
    principal = request.scope.get("state", {}).get(PRINCIPAL)
    if principal is None:
        raise TokenInvalid("this route needs an authenticated principal")
    return cast(Principal, principal)


def token_agent(request: Request) -> str | None:
    """The agent the token names (token mode), or None (open mode: the request names it)."""
    return principal_of(request).agent or None


def agent_of(request: Request, *claimed: str | None) -> str | None:
    """The one agent named by the token, headers and body/query fields; empty means
    absent. Two sources that disagree are an AgentMismatch. In token mode the agent IS
    the token's ``sub``: any other source must name the same agent."""
    sources = [_header_text(request, h) for h in AGENT_HEADERS]
    sources.extend(claimed)
    named = {s for s in sources if s}
    bound = token_agent(request)
    if bound is not None:
        others = named - {bound}
        if others:
            raise e.AgentMismatch(
                f"the token is for agent {bound!r}; the request names "
                + ", ".join(repr(o) for o in sorted(others))
            )
        return bound
    if len(named) > 1:
        raise e.AgentMismatch("agent identity sources disagree: " + ", ".join(sorted(named)))
    return named.pop() if named else None


def caller_of(request: Request, agent: str | None, session: str = "") -> Caller:
    """The engine's view of this request: the principal's rights and the agent and
    session the request resolved to."""
    principal = principal_of(request)
    note_caller(request.scope, agent, session)
    # Claims carry the token's jti (the audit log names it); open mode's Identity none.
    jti = getattr(principal, "jti", None)
    return Caller(agent, session, principal.capabilities, bool(principal.agent), jti)


def token_caller(request: Request) -> Caller:
    """The caller of a route whose request names no agent (the admin routes): the
    token's agent in token mode, so the audit log can name it; none in open mode."""
    return caller_of(request, token_agent(request))


def public_caller(request: Request) -> Caller:
    """The caller of a route that answers without a token (token mode, :data:`PUBLIC`
    routes such as /admin/health): the principal if the gate found one, else nobody,
    holding no right."""
    principal = request.scope.get("state", {}).get(PRINCIPAL)
    if principal is None:
        return NOBODY
    return caller_of(request, None)


def admitted(kind: type[Command[Any]]) -> Any:
    """A route dependency: the engine's refusals of a ``kind`` command that need only
    the caller (:meth:`Bus.admit`), made before FastAPI validates the body, so an admin
    route refuses a caller without the right whatever it sent (403, never 422)."""

    async def admit(request: Request) -> None:
        await runtime_of(request.app).bus.admit(token_caller(request), kind)

    return Depends(admit)


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
    if len(value) >= 3 and value[0] == '"' and value[-1] == '"' and DIGITS.fullmatch(value[1:-1]):
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


def idempotency(
    request: Request, agent_id: str, session_id: str, body: Callable[[], Mapping[str, Any]]
) -> IdemRef | None:
    """The Idempotency-Key record to check, or None without the header. The fingerprint
    covers the resolved agent and session, wherever the request named them (body,
    query or header): the same retry naming its agent in a header instead of the body
    is the same request, the same body sent for another session is not. ``body`` gives
    the request's fields, asked for only when the header is sent (most requests carry
    none); every value in them passed validation, so encoding them cannot fail."""
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
    fields = {k: v for k, v in body().items() if k not in ("agent_id", "session_id")}
    digest.update(canonical_json({"agent": agent_id, "session": session_id, "body": fields}))
    return IdemRef(agent_id, key, digest.hexdigest())


def header_context(request: Request) -> dict[str, Any] | None:
    """DELETE carries its mandate context as JSON in X-SBus-Mandate-Context."""
    raw = request.headers.get("x-sbus-mandate-context")
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        value = None
    problem = "must be a JSON object" if not isinstance(value, dict) else json_problem(value)
    if problem:
        raise e.ValidationFailed(
            f"X-SBus-Mandate-Context: {problem}", loc=["header", "X-SBus-Mandate-Context"]
        )
    assert isinstance(value, dict)
    return value
