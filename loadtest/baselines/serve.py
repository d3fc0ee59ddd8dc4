"""Serve a bench-only baseline store behind the bus's own HTTP front.

    .venv/bin/python loadtest/baselines/serve.py serializable serve --store URL --port 7100
    .venv/bin/python loadtest/baselines/serve.py watch serve --store redis://... --workers 2

``serializable`` is :class:`pg_serializable.SerializablePostgresStore` (a PostgreSQL URL),
``watch`` :class:`redis_watch.WatchRedisStore` (a Redis URL). The app is ``create_app``
with the same settings (SBUS_* variables) and the store given, under uvicorn with the
options ``sbus serve`` uses, so the requests, checks and answers are the bus's own and
only the commit's concurrency control differs. The arguments after the baseline's name
are a subset of ``sbus serve``'s: ``--port``, ``--store``, ``--workers``, ``--host``,
``--log-level``, ``--no-access-log``. Run ``sbus migrate --store URL`` first for
PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KINDS = ("serializable", "watch")


def make_store(kind: str, url: str, settings: Any) -> Any:
    if kind == "serializable":
        from pg_serializable import SerializablePostgresStore

        return SerializablePostgresStore(url, settings.store_limits(), pool_size=settings.pg_pool())
    if kind == "watch":
        from redis_watch import WatchRedisStore

        return WatchRedisStore(url, settings.store_limits(), namespace=settings.namespace)
    raise SystemExit(f"serve: unknown baseline {kind!r}; one of {', '.join(KINDS)}")


def factory() -> Any:
    """uvicorn's app factory: each worker builds its app and baseline store."""
    from sbus.bootstrap import create_app
    from sbus.config import Settings

    settings = Settings()
    store = make_store(os.environ["SBUS_BENCH_BASELINE"], settings.store, settings)
    return create_app(settings, store=store)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("command", choices=["serve"])
    ap.add_argument("--store", required=True)
    ap.add_argument("--port", type=int, default=7100)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--log-level", default="warning")
    ap.add_argument("--no-access-log", action="store_true")
    args = ap.parse_args(argv)

    import uvicorn

    from sbus.cli import scratch_dirs
    from sbus.config import Settings
    from sbus.telemetry.logs import log_config

    want = "postgres" if args.kind == "serializable" else "redis"
    if not args.store.startswith(want):
        raise SystemExit(f"serve: the {args.kind} baseline needs a {want} URL")
    os.environ.update(
        SBUS_BENCH_BASELINE=args.kind,
        SBUS_STORE=args.store,
        SBUS_WORKERS=str(args.workers),
        SBUS_HOST=args.host,
        SBUS_PORT=str(args.port),
    )
    # The workers import this module by name (uvicorn's factory string).
    sys.path.insert(0, str(HERE))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    access = not args.no_access_log
    with scratch_dirs(args.workers):
        uvicorn.run(
            "serve:factory",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_config=log_config(args.log_level, "text", access),
            log_level=None,
            access_log=access,
            timeout_graceful_shutdown=10,
            http="sbus.api.connections:GuardedHttpToolsProtocol",
            timeout_keep_alive=Settings().keepalive_timeout,
        )


if __name__ == "__main__":
    main()
