"""The ``sbus`` command: serve, migrate, version, and the token commands.

Every failure a user can cause (a bad setting, an unusable store URL, a malformed token)
ends with one ``sbus: ...`` line on stderr and a non-zero status, never a traceback:
2 for a configuration or usage error, 1 when the store fails or a token does not pass.
``sbus serve`` stopped by SIGTERM or SIGINT exits 0 once its requests in flight are done,
or 4 when ``SBUS_DRAIN_TIMEOUT`` had to cut some (docs/operations.md section 6); one
stopped while still starting exits 0 without serving.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from pydantic import ValidationError

from sbus import __version__
from sbus.config import Settings
from sbus.core.patterns import MAX_PATTERN_LENGTH
from sbus.core.rights import ADMIN_PATTERN, Right

if TYPE_CHECKING:
    from sbus.core.store import Store

EXIT_CONFIG = 2  # a bad setting, store URL or argument
EXIT_FAILED = 1  # the store failed, or a token did not pass
EXIT_CUT = 4  # sbus serve stopped, but the drain bound cut requests in flight

app = typer.Typer(add_completion=False, no_args_is_help=True, help="S-Bus state bus")


def fail(message: str, code: int = EXIT_CONFIG) -> NoReturn:
    """One line on stderr (drivers' messages may span several), then exit ``code``."""
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    typer.echo(f"sbus: {line}", err=True)
    raise typer.Exit(code)


def settings_problem(exc: ValidationError) -> str:
    """One line naming every rejected variable and why."""
    from sbus.storage.urls import redact_url

    parts = []
    for error in exc.errors():
        field = "_".join(str(part) for part in error["loc"])
        shown = error.get("input")
        if field == "store" and isinstance(shown, str):
            shown = redact_url(shown)
        got = "" if field in ("secret",) else f" (got {shown!r})"
        parts.append(f"SBUS_{field.upper()}: {error['msg']}{got}")
    return "invalid setting: " + "; ".join(parts)


def load_settings(**values: Any) -> Settings:
    """The settings from the environment (and ``values``), or a one-line exit."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        fail(settings_problem(exc))


def open_configured_store(settings: Settings) -> Store:
    from sbus.storage.factory import open_store
    from sbus.storage.urls import redact_url

    try:
        return open_store(
            settings.store,
            settings.store_limits(),
            settings.namespace,
            pool_size=settings.pg_pool(),
            redis_wait=settings.redis_wait(),
        )
    except (ValueError, OSError) as exc:
        # UnknownStore already names SBUS_STORE; the drivers' URL errors do not.
        message = str(exc)
        if "SBUS_STORE" not in message:
            message = f"SBUS_STORE {redact_url(settings.store)}: {message}"
        fail(message)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit"
        ),
    ] = False,
) -> None:
    """S-Bus state bus. Settings are SBUS_* environment variables: docs/configuration.md."""


def _factory() -> object:
    """uvicorn's app factory: each worker builds its own app from the environment,
    freezes what start-up built once its store is ready (FrozenOnceReady) and stops
    gracefully on SIGTERM (GracefulStop)."""
    from sbus.api.runtime import runtime_of
    from sbus.bootstrap import create_app
    from sbus.bootstrap.lifecycle import FrozenOnceReady
    from sbus.bootstrap.shutdown import GracefulStop

    settings = Settings()
    app = create_app(settings)
    runtime = runtime_of(app)
    runtime.lifecycle = GracefulStop(
        FrozenOnceReady(runtime.lifecycle),
        delay_s=settings.shutdown_delay,
        drain_s=settings.drain_timeout,
    )
    return app


def _preflight(settings: Settings) -> None:
    """Connect once before serving. A store that answers but is misconfigured (old
    schema, Redis eviction) or a URL no driver can use stops the start, and so does an
    SQLite file that cannot be opened; a server that does not answer yet is left to the
    running bus, which retries with backoff while /admin/health says not_ready."""
    if settings.store.startswith("memory"):
        return
    import asyncio

    from sbus.core.errors import StoreMisconfigured, StoreUnavailable
    from sbus.storage.urls import redact_url

    store = open_configured_store(settings)

    async def check() -> None:
        try:
            await store.start()
        finally:
            await store.close()

    try:
        asyncio.run(check())
    except StoreMisconfigured as exc:
        fail(exc.detail)
    except StoreUnavailable as exc:
        if settings.store.startswith("sqlite"):
            fail(exc.detail)
        typer.echo(f"sbus: store not reachable yet ({exc.detail}); will retry", err=True)
    except Exception as exc:  # noqa: BLE001 - each driver refuses an unusable URL its own way
        fail(f"SBUS_STORE {redact_url(settings.store)} cannot be used: {exc}")


@contextmanager
def scratch_dirs(count: int) -> Iterator[str | None]:
    """The directories a multi-worker server shares (the Prometheus multiprocess
    files, the ready markers), removed when the server stops, also after SIGTERM or
    SIGINT: uvicorn's supervisor handles those and returns. Yields the markers'
    directory (None for one worker)."""
    made: list[str] = []
    ready_dir: str | None = None
    try:
        if count > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            made.append(tempfile.mkdtemp(prefix="sbus-prom-"))
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = made[-1]
        if count > 1:
            # /admin/health answers ready only when every worker has its store (readiness.py).
            ready_dir = tempfile.mkdtemp(prefix="sbus-ready-")
            made.append(ready_dir)
            os.environ["SBUS_READY_DIR"] = ready_dir
        yield ready_dir
    finally:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@app.command(epilog="Every setting, with its default: docs/configuration.md")
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (SBUS_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (SBUS_PORT)")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (SBUS_WORKERS)")] = None,
    store: Annotated[str | None, typer.Option(help="Store URL (SBUS_STORE)")] = None,
    log_level: Annotated[
        str | None,
        typer.Option(help="critical, error, warning, info or debug (SBUS_LOG_LEVEL, default info)"),
    ] = None,
    access_log: Annotated[
        bool | None,
        typer.Option(
            "--access-log/--no-access-log", help="One line per request on stdout (SBUS_ACCESS_LOG)"
        ),
    ] = None,
) -> None:
    """Run the bus (defaults: 127.0.0.1:7000 on sqlite:///./sbus.db).

    Settings come from SBUS_* environment variables; an option overrides its variable.
    All of them, with their defaults, are in docs/configuration.md.
    """
    from sbus.bootstrap import serving, shutdown, startup_problem
    from sbus.storage.urls import redact_url

    # SIGTERM or SIGINT while starting stops the server once it would begin to serve
    # (and leaves the caller's handlers as they were when it returns).
    with shutdown.noting_signals():
        overrides: dict[str, object] = {
            "host": host,
            "port": port,
            "workers": workers,
            "store": store,
            "log_level": log_level,
            "access_log": None if access_log is None else int(access_log),
        }
        for name, value in overrides.items():
            if value is not None:
                os.environ[f"SBUS_{name.upper()}"] = str(value)
        settings = load_settings()
        problem = startup_problem(settings)
        if problem:
            fail(problem)
        _preflight(settings)
        early = shutdown.stopped_early()
        if early:
            typer.echo(f"sbus: stopped by {early} before serving", err=True)
            return
        count = settings.worker_count()
        if count > 1 and settings.store.startswith("memory"):
            fail("the memory store cannot be shared by several workers")
        typer.echo(
            f"sbus {__version__}: {settings.auth_mode} mode, store {redact_url(settings.store)}, "
            f"http://{settings.host}:{settings.port} ({count} worker{'s' if count > 1 else ''})",
            err=True,
        )
        with scratch_dirs(count) as ready_dir:
            cut = serving.run(settings, count, ready_dir)
        if cut:
            fail(
                f"stopped, but SBUS_DRAIN_TIMEOUT={settings.drain_timeout:g}s cut {cut} "
                "request(s) in flight",
                EXIT_CUT,
            )


@app.command()
def migrate(
    store: Annotated[str | None, typer.Option(help="Store URL (SBUS_STORE)")] = None,
) -> None:
    """Upgrade the store's schema to the newest migration."""
    import asyncio

    from sbus.core.errors import StoreMisconfigured, StoreUnavailable
    from sbus.storage.urls import redact_url

    settings = load_settings() if store is None else load_settings(store=store)
    target = open_configured_store(settings)

    async def run() -> None:
        migrate_ = getattr(target, "migrate", None)
        try:
            if migrate_ is not None:
                await migrate_()  # PostgreSQL: explicit; serve refuses an old schema
            else:
                await target.start()  # SQLite migrates on start; memory and Redis have no schema
        finally:
            await target.close()

    try:
        asyncio.run(run())
    except StoreMisconfigured as exc:
        fail(exc.detail)  # a URL or store no retry fixes: a configuration error
    except StoreUnavailable as exc:
        fail(exc.detail, EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001 - the driver's own words, on one line
        fail(f"cannot migrate {redact_url(settings.store)}: {exc}", EXIT_FAILED)
    typer.echo(f"sbus: schema of {redact_url(settings.store)} is at the newest revision", err=True)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


token_app = typer.Typer(no_args_is_help=True, help="Capability tokens (token mode)")
app.add_typer(token_app, name="token")

_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


# ASCII digits only (str.isdigit() takes "\u00b2", which int() refuses), and few enough
# for int(); the issuer refuses anything past SBUS_TOKEN_MAX_TTL.
_TTL_NUMBER = re.compile(r"[0-9]{1,12}")


def parse_ttl(text: str) -> int:
    """``30s``, ``15m``, ``1h``, ``1d`` or plain seconds -> seconds; ValueError (its
    message says what is expected) for anything else."""
    text = text.strip()
    number, unit = (text[:-1], text[-1]) if text[-1:] in _TTL_UNITS else (text, "s")
    if not _TTL_NUMBER.fullmatch(number) or int(number) < 1:
        raise ValueError(f"--ttl {text!r}: expected a positive duration like 30s, 15m, 1h, 1d")
    return int(number) * _TTL_UNITS[unit]


ISSUE_HELP = f"""Sign a capability token with SBUS_SIGNING_KEY or SBUS_SECRET.

Each --allow RIGHTS:PATTERN grants the comma-separated RIGHTS on every key that
PATTERN matches; repeat it for more scopes.

Rights: {", ".join(r.value for r in Right)}. {Right.ADMIN.value} guards the /admin
endpoints and is only valid with the pattern {ADMIN_PATTERN}; no right implies another.

Patterns match the whole key, case-sensitively: * matches any run of characters
except /, ** matches any run including /, every other character is literal; at most
{MAX_PATTERN_LENGTH} characters. plan/* matches plan/a but not plan/a/b; plan/** matches
both; ** matches every key.

Example: sbus token issue --agent A --allow 'read:plan/*'
--allow 'read,write,create:code/A/**'
"""


@token_app.command("issue", help=ISSUE_HELP)
def token_issue(
    agent: Annotated[str, typer.Option(help="The agent the token identifies (sub)")],
    allow: Annotated[
        list[str],
        typer.Option(help="RIGHTS:PATTERN, e.g. 'read:plan/*', 'write,create:code/A/*'"),
    ],
    ttl: Annotated[str, typer.Option(help="Lifetime: 30s, 15m, 1h, 1d")] = "1h",
    json_: Annotated[bool, typer.Option("--json", help="Print {token, claims} as JSON")] = False,
) -> None:
    import json

    from sbus.core.errors import SBusError
    from sbus.core.rights import parse_allow
    from sbus.security.tokens import Issuer

    try:
        seconds = parse_ttl(ttl)
    except ValueError as exc:
        fail(str(exc))
    settings = load_settings()
    try:
        scopes = [parse_allow(spec) for spec in allow]
        token, claims = Issuer.from_settings(settings).issue(agent, scopes, seconds)
    except SBusError as exc:
        fail(exc.detail)
    if json_:
        typer.echo(json.dumps({"token": token, "claims": claims.to_json()}, indent=2))
    else:
        typer.echo(token)


@token_app.command("keygen")
def token_keygen(
    path: Annotated[str, typer.Argument(help="Where to write the private key PEM")],
    force: Annotated[bool, typer.Option(help="Replace existing files")] = False,
) -> None:
    """Write an Ed25519 private key (mode 0600) and its public key beside it."""
    from pathlib import Path

    from sbus.security.keys import write_keypair

    try:
        private, public, kid = write_keypair(Path(path), force=force)
    except OSError as exc:
        fail(str(exc))
    typer.echo(f"private key: {private} (SBUS_SIGNING_KEY)", err=True)
    typer.echo(f"public key:  {public} (SBUS_VERIFY_KEY on verify-only replicas)", err=True)
    typer.echo(f"kid:         {kid}", err=True)


@token_app.command("inspect")
def token_inspect(
    token: Annotated[str, typer.Argument(help="The token (a JWT)")],
) -> None:
    """Print a token's header and claims as JSON, and whether it passes.

    With a key configured (SBUS_SIGNING_KEY, SBUS_VERIFY_KEY or SBUS_SECRET) the token is
    verified exactly as the bus verifies it; without one it is only decoded, and said so.
    Exit status 0 only for a verified token that has not expired; 1 otherwise (the
    claims are printed either way); 2 for something that is not a JWT at all.
    """
    import json

    from sbus.security import KeyConfigError
    from sbus.security.inspection import inspect_token

    try:
        report = inspect_token(token.strip(), load_settings())
    except KeyConfigError as exc:
        fail(exc.detail)
    if report.header is None:
        fail(report.verdict)
    typer.echo(json.dumps(report.to_json(), indent=2))
    typer.echo(f"sbus: {report.verdict}", err=True)
    if not report.passes:
        raise typer.Exit(EXIT_FAILED)


@token_app.command("revoke")
def token_revoke(
    token_or_jti: Annotated[
        str,
        typer.Argument(
            metavar="TOKEN_OR_JTI", help="A token (its jti and exp are read from it) or a jti"
        ),
    ],
    exp: Annotated[
        int | None,
        typer.Option(
            help="The token's expiry (epoch seconds); default: read from the token, "
            "else SBUS_TOKEN_MAX_TTL from now"
        ),
    ] = None,
    store: Annotated[str | None, typer.Option(help="Store URL (SBUS_STORE)")] = None,
) -> None:
    """Revoke a token in the configured store, as POST /admin/tokens/revoke does.

    Every replica over that store refuses the token from the next request on; the
    revocation is kept until the token's expiry plus SBUS_CLOCK_LEEWAY.
    """
    import asyncio
    import json

    from sbus.core import revocation
    from sbus.core.audit import AuditEvent
    from sbus.core.clock import rfc3339
    from sbus.core.errors import StoreUnavailable, ValidationFailed
    from sbus.security.inspection import revocation_target

    settings = load_settings() if store is None else load_settings(store=store)
    if settings.store.startswith("memory"):
        fail("the memory store lives inside one sbus serve; use POST /admin/tokens/revoke")
    try:
        jti, token_exp = revocation_target(token_or_jti.strip())
    except ValueError as exc:
        fail(str(exc))
    target = open_configured_store(settings)

    async def run() -> int:
        try:
            await target.start()
            until = await revocation.revoke_token(
                target,
                jti,
                exp if exp is not None else token_exp,
                leeway_s=settings.clock_leeway,
                max_ttl_s=settings.token_max_ttl,
            )
            # The audit log names no agent: whoever holds the store's credentials did it.
            details = {"token_id": jti, "until": until, "via": "cli"}
            await target.audit(AuditEvent("token_revoke", "", details))
            return until
        finally:
            await target.close()

    try:
        until_ms = asyncio.run(run())
    except ValidationFailed as exc:
        fail(exc.detail)
    except StoreUnavailable as exc:
        fail(exc.detail, EXIT_FAILED)
    typer.echo(json.dumps({"revoked": True, "jti": jti, "until": rfc3339(until_ms)}))


def _audit_over_http(url: str, token: str | None, after: int | None, limit: int) -> Any:
    """GET /admin/audit of a running bus; one ``sbus:`` line for any failure."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    query = {"limit": str(limit)} | ({} if after is None else {"after": str(after)})
    target = f"{url.rstrip('/')}/admin/audit?{urllib.parse.urlencode(query)}"
    if not target.startswith(("http://", "https://")):
        fail(f"--url {url!r}: expected http://HOST:PORT or https://...")
    request = urllib.request.Request(target, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        try:
            problem = json.loads(exc.read())
            said = f"{problem.get('error', '')}: {problem.get('detail', '')}"
        except ValueError:
            said = exc.reason
        fail(f"{url} answered {exc.code} {said}", EXIT_FAILED)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        fail(f"cannot reach {url}: {getattr(exc, 'reason', exc)}", EXIT_FAILED)


def _audit_from_store(settings: Settings, after: int | None, limit: int) -> Any:
    """The configured store's audit log, read directly (no server needed)."""
    import asyncio

    from sbus.core.audit import page_json
    from sbus.core.errors import StoreUnavailable

    if settings.store.startswith("memory"):
        fail("the memory store lives inside one sbus serve; use --url to ask that server")
    target = open_configured_store(settings)

    async def run() -> Any:
        try:
            await target.start()
            return page_json(await target.audit_log(after, limit + 1), limit)
        finally:
            await target.close()

    try:
        return asyncio.run(run())
    except StoreUnavailable as exc:
        fail(exc.detail, EXIT_FAILED)


@app.command("audit")
def audit_log(
    url: Annotated[
        str | None,
        typer.Option(help="Ask a running bus (GET /admin/audit) instead of reading the store"),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(help="Bearer token with the admin right, for --url (default SBUS_TOKEN)"),
    ] = None,
    store: Annotated[str | None, typer.Option(help="Store URL (SBUS_STORE)")] = None,
    after: Annotated[
        int | None, typer.Option(min=0, help="Only entries with a greater id (a cursor)")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Entries per page")] = 100,
    json_: Annotated[
        bool, typer.Option("--json", help="Print the page as GET /admin/audit answers it")
    ] = False,
) -> None:
    """Print the audit log, oldest first: one page of at most --limit entries after the
    cursor --after. Reads the configured store (SBUS_STORE or --store) directly, or with
    --url asks a running bus, which needs a token with the admin right in token mode.
    A following page starts at the printed next_after."""
    import json

    from sbus.core.clock import rfc3339

    if url is not None:
        page = _audit_over_http(url, token or os.environ.get("SBUS_TOKEN"), after, limit)
    else:
        settings = load_settings() if store is None else load_settings(store=store)
        page = _audit_from_store(settings, after, limit)
    if json_:
        typer.echo(json.dumps(page))
        return
    for entry in page["entries"]:
        details = json.dumps(entry["details"], separators=(",", ":"))
        at = rfc3339(entry["at"])
        typer.echo(f"{entry['id']}\t{at}\t{entry['kind']}\t{entry['agent'] or '-'}\t{details}")
    if page["next_after"] is not None:
        typer.echo(f"sbus: more entries: --after {page['next_after']}", err=True)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
