"""PostgreSQL: the consume-once check of a mandate in one round trip instead of two.

``sbus_mandate_consumed`` takes the mandate's advisory lock (concurrent commits carrying
one mandate queue on it, on any replica), then checks for a consumed record. The check
must see a winner that committed while this transaction waited for the lock: under READ
COMMITTED a statement's snapshot is taken before it waits, so lock and check cannot be
one statement, but in a VOLATILE PL/pgSQL function every statement takes a fresh
snapshot, so the check after the lock sees the winner. A no-op on SQLite.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from sbus_migrations.functions import drop, install, on_postgres

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FUNCTIONS = {"sbus_mandate_consumed": 1}


def upgrade() -> None:
    if on_postgres():
        install(FUNCTIONS)


def downgrade() -> None:
    if on_postgres():
        drop(FUNCTIONS)
