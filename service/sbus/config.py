"""Service settings (pydantic-settings, ``SBUS_`` prefix). Every field is documented in
docs/configuration.md; nothing reads them at import time."""

from __future__ import annotations

import ipaddress
import os
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from sbus.core.audit import DEFAULT_MAX_ROWS, DEFAULT_TTL_S
from sbus.core.engine import EngineLimits
from sbus.core.types import Limits, RateLimit


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


AuthMode = Literal["open", "token"]

# One `sbus serve` opens at most this many PostgreSQL connections by default (all its
# workers together), leaving 20 of PostgreSQL's default max_connections=100 for
# superuser-reserved slots, `sbus migrate` and an operator's psql.
PG_CONNECTION_BUDGET = 80
PG_POOL_MAX = 32  # more per worker bought nothing in the benchmarks (docs/performance.md)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SBUS_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(7000, ge=0, le=65535)
    store: str = "sqlite:///./sbus.db"
    workers: int | None = Field(None, ge=1)
    # Set by `sbus serve --workers N` for its workers (sbus.api.readiness); not for operators.
    ready_dir: str | None = None
    namespace: str = "sbus"
    auth: AuthMode | None = None
    allow_insecure: bool = False
    admin_enabled: bool = False
    cors_origins: str = ""
    allowed_hosts: str = ""
    session_ttl: int = Field(3600, ge=0)
    max_delta: int = Field(262_144, ge=0)
    max_rationale: int = Field(4096, ge=0)
    max_goal_tag: int = Field(4096, ge=0)
    max_body: int = Field(1_048_576, ge=1)
    max_read_set: int = Field(1024, ge=0)
    max_dl_entries: int = Field(16384, ge=1)
    max_txn_keys: int = Field(128, ge=1)
    max_read_keys: int = Field(256, ge=1)
    list_max: int = Field(10_000, ge=1)
    history_depth: int = Field(1000, ge=1)
    history_max_bytes: int = Field(16 * 1024 * 1024, ge=1)
    idempotency_ttl: int = Field(86_400, ge=1)
    # The audit log (sbus.core.audit): seconds kept (0 = no age limit), and a row cap.
    audit_ttl: int = Field(DEFAULT_TTL_S, ge=0)
    audit_max_rows: int = Field(DEFAULT_MAX_ROWS, ge=1)
    require_agent_id: bool = False
    test_hooks: bool = False
    # With test_hooks: every worker but the first of `sbus serve --workers N` waits this
    # long before connecting its store, so tests can see a half-ready server.
    test_connect_delay_ms: int = Field(0, ge=0, le=60_000)
    # Token mode (protocol.md §5); sbus.security.keys reads the key variables.
    secret: str = ""
    signing_key: str = ""
    verify_key: str = ""
    token_max_ttl: int = 86_400
    mandate_max_ttl: int = 3600
    clock_leeway: int = 30
    rate_limit: str = ""
    # Operations (docs/configuration.md): what `sbus serve` logs.
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["json", "text"] = "json"
    access_log: bool = False
    pg_pool_size: int | None = Field(None, ge=1, le=1000)
    # Redis: replicas every write waits for (WAIT), and how long (docs/redis.md).
    redis_wait_replicas: int = Field(0, ge=0, le=16)
    redis_wait_timeout_ms: int = Field(1000, ge=1, le=60_000)
    # Slow and idle clients (sbus.api.connections), per worker process.
    header_timeout: float = Field(10.0, gt=0, le=3600)
    body_timeout: float = Field(30.0, gt=0, le=3600)
    keepalive_timeout: int = Field(5, ge=1, le=3600)
    max_connections: int = Field(512, ge=1)
    # The graceful stop on SIGTERM (docs/operations.md section 6), per worker process.
    shutdown_delay: float = Field(0.0, ge=0, le=3600)
    drain_timeout: float = Field(10.0, ge=0, le=3600)
    # The change stream, GET /watch (protocol.md section 3.11).
    watch_retention: int = Field(3600, ge=1)
    watch_max_changes: int = Field(1_000_000, ge=1)
    watch_conflicts: int = Field(1000, ge=0)
    watch_poll_ms: int = Field(250, ge=10, le=60_000)
    watch_heartbeat: float = Field(15.0, gt=0, le=3600)
    watch_send_timeout: float = Field(10.0, gt=0, le=3600)

    @property
    def auth_mode(self) -> AuthMode:
        if self.auth is not None:
            return self.auth
        return "open" if is_loopback(self.host) else "token"

    def worker_count(self) -> int:
        if self.workers is not None:
            return self.workers
        if self.store.startswith(("sqlite", "memory")):
            return 1
        return os.cpu_count() or 1

    def pg_pool(self) -> int:
        """PostgreSQL connections per worker: SBUS_PG_POOL_SIZE, else an even share of
        :data:`PG_CONNECTION_BUDGET` over the workers (at most 32, at least 1)."""
        if self.pg_pool_size is not None:
            return self.pg_pool_size
        return max(1, min(PG_POOL_MAX, PG_CONNECTION_BUDGET // self.worker_count()))

    def redis_wait(self) -> tuple[int, int]:
        return self.redis_wait_replicas, self.redis_wait_timeout_ms

    def store_limits(self) -> Limits:
        return Limits(
            session_ttl_ms=self.session_ttl * 1000,
            max_dl_entries=self.max_dl_entries,
            history_depth=self.history_depth,
            history_max_bytes=self.history_max_bytes,
            idempotency_ttl_ms=self.idempotency_ttl * 1000,
            audit_ttl_ms=self.audit_ttl * 1000,
            audit_max_rows=self.audit_max_rows,
            change_retention_ms=self.watch_retention * 1000,
            change_max=self.watch_max_changes,
            conflict_ring=self.watch_conflicts,
        )

    def engine_limits(self) -> EngineLimits:
        return EngineLimits(
            max_delta=self.max_delta,
            max_rationale=self.max_rationale,
            max_goal_tag=self.max_goal_tag,
            max_read_set=self.max_read_set,
            max_txn_keys=self.max_txn_keys,
        )

    def own_problem(self) -> str | None:
        """Why these settings, read alone, must not serve, or None. The key files they
        name are read where keys are built (sbus.bootstrap.startup_problem checks both)."""
        try:
            RateLimit.parse(self.rate_limit)
        except ValueError as exc:
            return str(exc)
        if self.auth_mode == "token":
            return None
        if not is_loopback(self.host) and not self.allow_insecure:
            return (
                f"refusing to serve open mode on non-loopback host {self.host!r}: "
                "set SBUS_ALLOW_INSECURE=1 to accept unauthenticated access"
            )
        return None
