"""PostgreSQL server-side functions for the commit protocol and recorded reads.

The commit is one READ COMMITTED transaction of two calls: ``sbus_txn_load`` takes the
idempotency lock, locks the session row, then locks every written key FOR UPDATE and every
read-only key FOR SHARE in ONE pass in ascending byte order (so the write-skew ring cannot
deadlock), and returns what ``sbus.core.rules.decide`` needs; ``sbus_txn_apply`` writes
what it decided. ``sbus_read`` serves and records a read in one round trip. The bodies
are the versioned files in ``migrations/sql`` (sbus_migrations.functions). A no-op on
SQLite.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from sbus_migrations.functions import drop, install, on_postgres

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Installed in this order: sbus_now_ms is a SQL function, whose body PostgreSQL checks
# when it is created; the PL/pgSQL ones are resolved when they run.
FUNCTIONS = {
    "sbus_now_ms": 1,
    "sbus_lock_run": 1,
    "sbus_txn_load": 1,
    "sbus_txn_apply": 1,
    "sbus_read": 1,
}


def upgrade() -> None:
    if on_postgres():
        install(FUNCTIONS)


def downgrade() -> None:
    if on_postgres():
        drop(FUNCTIONS)
