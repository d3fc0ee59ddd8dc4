"""The ``sbus`` command: serve, migrate, version."""

from __future__ import annotations

import os
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
    typer.echo(
        f"sbus {__version__}: {settings.auth_mode} mode, store {settings.store}, "
        f"http://{settings.host}:{settings.port} ({count} worker{'s' if count > 1 else ''})",
        err=True,
    )
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


@app.command()
def migrate(
    store: Annotated[str | None, typer.Option(help="Store URL (SBUS_STORE)")] = None,
) -> None:
    """Upgrade the store's schema to the newest migration."""
    import asyncio

    from sbus.storage.factory import open_store

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
    typer.echo(f"sbus: schema of {settings.store} is at the newest revision", err=True)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
