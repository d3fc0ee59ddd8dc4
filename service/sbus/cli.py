"""The ``sbus`` command: serve, migrate, version, token."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Annotated

import typer

from sbus import __version__
from sbus.config import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="S-Bus state bus")


def _factory() -> object:
    """uvicorn's app factory for multi-worker runs: each worker builds its own app
    from the environment."""
    from sbus.api.app import create_app

    return create_app(Settings())


def _preflight(settings: Settings) -> str | None:
    """Connect once before serving: a store that answers but is misconfigured (old
    schema, Redis eviction) stops the start; one that does not answer yet is left to
    the running bus, which retries with backoff while /admin/health says not_ready."""
    if settings.store.startswith(("memory", "sqlite")):
        return None
    import asyncio

    from sbus.core.errors import StoreMisconfigured, StoreUnavailable
    from sbus.storage.factory import open_store

    store = open_store(settings.store, settings.store_limits(), settings.namespace)

    async def check() -> str | None:
        try:
            await store.start()
        except StoreMisconfigured as exc:
            return exc.detail
        except StoreUnavailable as exc:
            typer.echo(f"sbus: store not reachable yet ({exc.detail}); will retry", err=True)
        finally:
            await store.close()
        return None

    return asyncio.run(check())


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (SBUS_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (SBUS_PORT)")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (SBUS_WORKERS)")] = None,
    store: Annotated[str | None, typer.Option(help="Store URL (SBUS_STORE)")] = None,
) -> None:
    """Run the bus (defaults: 127.0.0.1:7000 on sqlite:///./sbus.db)."""
    import uvicorn

    from sbus.storage.factory import redact_url

    overrides = {"host": host, "port": port, "workers": workers, "store": store}
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"SBUS_{name.upper()}"] = str(value)
    settings = Settings()
    problem = settings.startup_problem()
    if problem:
        typer.echo(f"sbus: {problem}", err=True)
        raise typer.Exit(2)
    refusal = _preflight(settings)
    if refusal:
        typer.echo(f"sbus: {refusal}", err=True)
        raise typer.Exit(2)
    count = settings.worker_count()
    if count > 1 and settings.store.startswith("memory"):
        typer.echo("sbus: the memory store cannot be shared by several workers", err=True)
        raise typer.Exit(2)
    if count > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sbus-prom-")
    ready_dir = tempfile.mkdtemp(prefix="sbus-ready-") if count > 1 else None
    if ready_dir is not None:
        # /admin/health answers ready only when every worker has its store (readiness.py).
        os.environ["SBUS_READY_DIR"] = ready_dir
    typer.echo(
        f"sbus {__version__}: {settings.auth_mode} mode, store {redact_url(settings.store)}, "
        f"http://{settings.host}:{settings.port} ({count} worker{'s' if count > 1 else ''})",
        err=True,
    )
    try:
        uvicorn.run(
            "sbus.cli:_factory",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=count,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=10,
        )
    finally:
        if ready_dir is not None:
            shutil.rmtree(ready_dir, ignore_errors=True)


@app.command()
def migrate(
    store: Annotated[str | None, typer.Option(help="Store URL (SBUS_STORE)")] = None,
) -> None:
    """Upgrade the store's schema to the newest migration."""
    import asyncio

    from sbus.storage.factory import open_store, redact_url

    settings = Settings() if store is None else Settings(store=store)
    target = open_store(settings.store, settings.store_limits(), settings.namespace)

    async def run() -> None:
        migrate_ = getattr(target, "migrate", None)
        if migrate_ is not None:
            await migrate_()  # PostgreSQL: explicit; serve refuses an old schema
        else:
            await target.start()  # SQLite migrates on start; memory and Redis have no schema
        await target.close()

    asyncio.run(run())
    typer.echo(f"sbus: schema of {redact_url(settings.store)} is at the newest revision", err=True)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


token_app = typer.Typer(no_args_is_help=True, help="Capability tokens (token mode)")
app.add_typer(token_app, name="token")

_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_ttl(text: str) -> int:
    """``30s``, ``15m``, ``1h``, ``1d`` or plain seconds -> seconds."""
    text = text.strip()
    number, unit = (text[:-1], text[-1]) if text[-1:] in _TTL_UNITS else (text, "s")
    if not number.isdigit() or int(number) < 1:
        raise typer.BadParameter(f"{text!r}: expected a positive duration like 30s, 15m, 1h, 1d")
    return int(number) * _TTL_UNITS[unit]


@token_app.command("issue")
def token_issue(
    agent: Annotated[str, typer.Option(help="The agent the token identifies (sub)")],
    allow: Annotated[
        list[str],
        typer.Option(help="RIGHTS:PATTERN, e.g. 'read:plan/*', 'write,create:code/A/*'"),
    ],
    ttl: Annotated[str, typer.Option(help="Lifetime: 30s, 15m, 1h, 1d")] = "1h",
    json_: Annotated[bool, typer.Option("--json", help="Print {token, claims} as JSON")] = False,
) -> None:
    """Sign a capability token with SBUS_SIGNING_KEY or SBUS_SECRET."""
    import json

    from sbus.core.errors import SBusError
    from sbus.security.rights import parse_allow
    from sbus.security.tokens import Issuer

    seconds = parse_ttl(ttl)
    settings = Settings()
    try:
        scopes = [parse_allow(spec) for spec in allow]
        token, claims = Issuer.from_settings(settings).issue(agent, scopes, seconds)
    except SBusError as exc:
        typer.echo(f"sbus: {exc.detail}", err=True)
        raise typer.Exit(2) from None
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
        typer.echo(f"sbus: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"private key: {private} (SBUS_SIGNING_KEY)", err=True)
    typer.echo(f"public key:  {public} (SBUS_VERIFY_KEY on verify-only replicas)", err=True)
    typer.echo(f"kid:         {kid}", err=True)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
