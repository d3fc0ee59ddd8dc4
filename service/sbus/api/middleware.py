"""Pure-ASGI gate for protocol.md §4 steps 1-3 that run before any body is parsed:
authentication (open mode's Host and Origin checks, or the bearer token in token mode,
see ``sbus.api.auth``), the store-readiness gate, the body-size cap and the
``Content-Type: application/json`` requirement on every POST and DELETE.

The Host, Origin and Content-Type rules are what stop a web page in a developer's
browser from driving a loopback bus (``sbus.api.browser``): DNS rebinding arrives with a
foreign Host header, a page's requests carry ``Sec-Fetch-Site`` or a foreign ``Origin``,
and a cross-site form or ``fetch`` without CORS cannot send ``application/json``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sbus.api import assets
from sbus.api.auth import PRINCIPAL, Authenticator, sent_bearer
from sbus.api.browser import OriginPolicy
from sbus.api.problems import problem_response
from sbus.core import errors as e
from sbus.core.tracing import AUTH, Tracer
from sbus.telemetry.exchange import note_outcome

# A Content-Length we read: ASCII digits, short enough that int() cannot refuse it (a
# longer one is past any body cap anyway, and refused as invalid).
CONTENT_LENGTH = re.compile(rb"[0-9]{1,18}")

# Routes that answer while the store is still connecting, with the browser pages and
# their assets (sbus.api.assets).
UNGATED = frozenset({"/livez", "/admin/health", "/version", "/metrics", "/openapi.json"})


def query_problem(raw: bytes) -> str | None:
    """Starlette decodes query strings leniently (invalid UTF-8 becomes U+FFFD), which
    would silently rewrite an agent id; refuse anything that is not strict UTF-8."""
    try:
        unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        return "query string is not valid UTF-8"
    return None


class Gate:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body: int,
        origins: OriginPolicy | None,
        is_ready: Callable[[], bool],
        authenticator: Authenticator,
        body_timeout: float | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.body_timeout = body_timeout  # seconds for the whole body (SBUS_BODY_TIMEOUT)
        # Open mode's browser checks; None in token mode, where a page holds no token.
        self.origins = origins
        self.is_ready = is_ready
        self.authenticator = authenticator
        self.tracer = tracer  # None: tracing is off

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.tracer is None:
            admitted = await self._authenticate(scope, receive, send)
        else:
            with self.tracer.phase(AUTH):
                admitted = await self._authenticate(scope, receive, send)
        if not admitted:
            return
        problem = self._precheck(scope)
        if problem is not None:
            await self._reject(problem, scope, receive, send)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH", "DELETE"):
            await self.app(scope, receive, send)
            return
        await self._with_capped_body(scope, receive, send)

    async def _authenticate(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Step 1: the request's principal into the scope state, or False once the
        refusal has been sent."""
        if self.authenticator.token_mode:
            authorization = [v for k, v in scope["headers"] if k == b"authorization"]
            try:
                principal = await self.authenticator.authenticate(scope["path"], authorization)
            except e.SBusError as exc:
                # TokenInvalid (401), or StoreUnavailable from the revocation lookup: this
                # runs outside the app's exception handlers, so every refusal is rendered
                # here (a store outage is 503 with Retry-After, not a bare 500).
                note_outcome(scope, exc.code)
                response = problem_response(exc, token_sent=sent_bearer(authorization))
                await response(scope, receive, send)
                return False
        else:
            principal = self.authenticator.open_identity
        if principal is not None:
            scope.setdefault("state", {})[PRINCIPAL] = principal
        return True

    def _precheck(self, scope: Scope) -> e.SBusError | None:
        if self.origins is not None:
            refused = self.origins.problem(scope["headers"])
            if refused is not None:
                return refused
        if scope.get("query_string"):
            problem = query_problem(scope["query_string"])
            if problem:
                return e.ValidationFailed(problem, loc=["query"])
        path: str = scope["path"]
        if path not in UNGATED and not assets.is_public(path) and not self.is_ready():
            return e.StoreUnavailable("the store is not ready yet", outcome="not_applied")
        method = scope["method"]
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            # The first of each header; only the body rules read them, so a GET skips this.
            headers: dict[bytes, bytes] = {}
            for name, value in scope["headers"]:
                headers.setdefault(name, value)
            length = headers.get(b"content-length")
            if length is not None:
                # Digits only: int() would also read " 5", "+5" and "1_0".
                if not CONTENT_LENGTH.fullmatch(length):
                    return e.MalformedJSON("invalid Content-Length")
                size = int(length)
                if size > self.max_body:
                    return e.RequestTooLarge(
                        f"request body of {size} bytes exceeds {self.max_body}", max=self.max_body
                    )
            media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
            if media != b"application/json":
                return e.UnsupportedMediaType(
                    "POST and DELETE require Content-Type: application/json"
                )
        return None

    async def _reject(
        self, problem: e.SBusError, scope: Scope, receive: Receive, send: Send
    ) -> None:
        note_outcome(scope, problem.code)
        response = problem_response(problem)
        await response(scope, receive, send)

    async def _with_capped_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the whole body first (it is capped), so the cap and the UTF-8 check run
        before any parsing; then hand the app a receive that replays it."""
        chunks: list[bytes] = []
        size = 0
        more = True
        loop = asyncio.get_running_loop()
        deadline = None if self.body_timeout is None else loop.time() + self.body_timeout
        while more:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                timeout = e.RequestTimeout(
                    f"the request body did not arrive within {self.body_timeout:g} s"
                )
                await self._reject(timeout, scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._reject(
                    e.RequestTooLarge(
                        f"request body exceeds {self.max_body} bytes", max=self.max_body
                    ),
                    scope,
                    receive,
                    send,
                )
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            # JSON is UTF-8 (RFC 8259 section 8.1): json.loads would otherwise accept
            # encoded surrogates through "surrogatepass".
            body.decode("utf-8")
        except UnicodeDecodeError:
            await self._reject(
                e.MalformedJSON("request body is not valid UTF-8"), scope, receive, send
            )
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
