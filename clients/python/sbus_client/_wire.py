"""The wire format, both ways: request descriptions (no I/O) and response parsing.

A :class:`Call` is everything needed to send one HTTP request except the bearer token,
which is resolved per send (a callable token may rotate). Its bytes never change
between transport retries, so a resend is the same request to the bus's idempotency
check.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Generator, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeAlias, TypeVar
from urllib.parse import quote, urlencode

import httpx

from sbus_client._codes import BY_CODE
from sbus_client._errors import SBusError, UnknownClientError, UnknownServerError
from sbus_client._models import Committed, HistoryEntry, Shard
from sbus_client._retry import is_problem
from sbus_client._version import __version__

USER_AGENT = f"sbus-client/{__version__}"
JSON = "application/json"
# Key characters (docs/protocol.md section 1.2) that need no escaping in a path segment;
# other characters are escaped so a bad key reaches the bus as itself and gets its 422/404.
KEY_SAFE = ":@._-"
# A "." or ".." segment is removed by URL normalisation (RFC 3986 section 5.2.4) before
# the request leaves, so "../admin/health" would reach another route; escaped, it
# reaches the bus as written and is refused there.
DOT_SEGMENTS = {".": "%2E", "..": "%2E%2E"}
# Agent and session ids travel in headers (headers_for): HTTP carries visible ASCII and
# inner spaces there (outer ones are stripped on the way), and the bus takes at most 256
# characters (docs/protocol.md section 1).
MAX_IDENTIFIER = 256
_HEADER_TEXT = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")


@dataclass(frozen=True)
class Call:
    """One HTTP request: method, path with its query string, headers, body bytes."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None

    def with_header(self, name: str, value: str) -> Call:
        return replace(self, headers=(*self.headers, (name, value)))


@dataclass(frozen=True)
class Sleep:
    """Ask the driver to wait (time.sleep or asyncio.sleep) before the next step."""

    seconds: float


T = TypeVar("T")
Step: TypeAlias = Call | Sleep
Reply: TypeAlias = httpx.Response | httpx.TransportError | None
# An operation: yields what to do next, receives what came of it, returns its result.
Op: TypeAlias = Generator[Step, Reply, T]


# One encoder for the process: json.dumps with non-default options builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON: what is sent is what the bus fingerprints."""
    return _ENCODER.encode(value).encode()


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def key_path(prefix: str, key: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"a key is a str, not {type(key).__name__}: {key!r}")
    segments = (DOT_SEGMENTS.get(s) or quote(s, safe=KEY_SAFE) for s in key.split("/"))
    return prefix + "/".join(segments)


def with_query(path: str, params: Mapping[str, str | int | None]) -> str:
    present = {k: str(v) for k, v in params.items() if v is not None}
    return f"{path}?{urlencode(present)}" if present else path


def identifier_problem(value: str, *, room: int = 0) -> str | None:
    """Why ``value`` cannot be an agent or session id on the wire (None if it can):
    printable ASCII without outer spaces, at most 256 characters less ``room`` (what a
    caller may append later)."""
    limit = MAX_IDENTIFIER - room
    if not _HEADER_TEXT.fullmatch(value):
        return (
            "must be 1 or more printable ASCII characters without leading or trailing "
            "spaces (it travels in an HTTP header)"
        )
    if len(value) > limit:
        return f"must be at most {limit} characters"
    return None


def headers_for(
    agent: str | None,
    session: str | None,
    *,
    body: bool,
    idempotency_key: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> tuple[tuple[str, str], ...]:
    """Identity travels in headers, the same way on every route (docs/protocol.md 2.2)."""
    out: list[tuple[str, str]] = [("User-Agent", USER_AGENT), ("Accept", JSON)]
    if body:
        out.append(("Content-Type", JSON))
    if agent is not None:
        out.append(("X-Agent-Id", agent))
    if session is not None:
        out.append(("X-SBus-Session-Id", session))
    if idempotency_key is not None:
        out.append(("Idempotency-Key", idempotency_key))
    if extra:
        out.extend(extra.items())
    return tuple(out)


def body_of(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise UnknownServerError(
            f"the bus answered {response.status_code} with a body that is not JSON",
            status=response.status_code,
        ) from exc
    if not isinstance(body, dict):
        raise UnknownServerError(
            "the bus answered with JSON that is not an object", status=response.status_code
        )
    return body


def shard_of(body: Mapping[str, Any], etag: str | None = None) -> Shard:
    version = int(body["version"])
    policy = body.get("policy")
    require = bool(policy.get("require_mandate")) if isinstance(policy, dict) else False
    return Shard(
        key=str(body["key"]),
        version=version,
        content=str(body["content"]),
        updated_at=str(body.get("updated_at", "")),
        etag=etag or f'"{version}"',
        created_at=str(body.get("created_at", "")),
        goal_tag=str(body.get("goal_tag") or ""),
        require_mandate=require,
    )


def replayed(response: httpx.Response) -> bool:
    value: str = response.headers.get("idempotent-replayed", "")
    return value.lower() == "true"


def committed_of(key: str, response: httpx.Response) -> Committed:
    body = body_of(response)
    return Committed(
        key=key,
        version=int(body["new_version"]),
        commit_id=str(body.get("commit_id", "")),
        replayed=replayed(response),
    )


def multi_of(response: httpx.Response) -> dict[str, Committed]:
    body = body_of(response)
    commit_id = str(body.get("commit_id", ""))
    again = replayed(response)
    return {
        str(r["key"]): Committed(str(r["key"]), int(r["new_version"]), commit_id, again)
        for r in body["results"]
    }


def etag_version(response: httpx.Response) -> int:
    """The version in a strong ETag ``"N"`` (a DELETE's 204 carries only that)."""
    etag = response.headers.get("etag", "")
    try:
        return int(etag.strip().strip('"'))
    except ValueError as exc:
        raise UnknownServerError(
            f"the bus answered {response.status_code} without a version ETag",
            status=response.status_code,
        ) from exc


def history_of(body: Mapping[str, Any]) -> list[HistoryEntry]:
    return [
        HistoryEntry(
            version=int(e["version"]),
            agent_id=str(e["agent_id"]),
            committed_at=str(e["committed_at"]),
            content=str(e["content"]),
            deleted=bool(e["deleted"]),
            rationale=e.get("rationale"),
            commit_id=str(e["commit_id"]),
            prev_hash=str(e["prev_hash"]),
            hash=str(e["hash"]),
        )
        for e in body["entries"]
    ]


def error_of(response: httpx.Response) -> SBusError:
    """The exception for an error answer: the code's class for a problem document the
    bus wrote, else an Unknown*Error by status class (a proxy, a newer server)."""
    status = response.status_code
    problem: dict[str, Any] = {}
    if is_problem(response):
        try:
            parsed = response.json()
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            problem = parsed
    code = problem.get("error")
    detail = problem.get("detail")
    if not isinstance(detail, str):
        text = response.text.strip().replace("\n", " ")
        detail = f"HTTP {status} {response.reason_phrase}: {text[:200]}".rstrip(": ")
    if 300 <= status < 400:
        # Not followed: a POST resent elsewhere is a new request. The base URL is what
        # is wrong (http for https, a missing path prefix), so say where it points.
        where = response.headers.get("location", "elsewhere")
        detail = (
            f"the bus answered HTTP {status} {response.reason_phrase} to {where}: the "
            "client does not follow redirects; give Bus the URL the bus is served at"
        )
        return UnknownClientError(detail, status=status, problem=problem)
    cls = BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None:
        cls = UnknownClientError if 400 <= status < 500 else UnknownServerError
    return cls(detail, status=status, problem=problem)


def missing_error(item: Mapping[str, Any]) -> SBusError:
    """A bulk read's missing key (``{key, error, version?}``) as the error its single
    read would have raised."""
    key, code = str(item.get("key")), str(item.get("error"))
    cls = BY_CODE.get(code, UnknownClientError)
    detail = f"{code}: {key}"
    problem = {"error": code, "status": 404, "detail": detail, **item}
    return cls(detail, status=404, problem=problem)
