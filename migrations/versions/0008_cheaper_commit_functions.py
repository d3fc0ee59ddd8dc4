"""PostgreSQL: less server CPU per read and commit, the same behaviour.

``sbus_now_ms`` version 2 is PL/pgSQL instead of a SQL function: PostgreSQL planned the
SQL function's body again on every call made in a new transaction, which every recorded
read and every commit is. ``sbus_txn_load`` version 2 locks and reads each run of keys in
one statement instead of locking through ``sbus_lock_run`` and reading again, reads the
DeliveryLog once, and forces generic plans (the statements over array parameters were
planned afresh on every call). ``sbus_lock_run``, which only version 1 called, is
dropped. The downgrade reinstalls the three version 1 files. A no-op on SQLite.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from sbus_migrations.functions import drop, install, on_postgres, reinstall_previous

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

FUNCTIONS = {"sbus_now_ms": 2, "sbus_txn_load": 2}
DROPPED = {"sbus_lock_run": 1}


def upgrade() -> None:
    if on_postgres():
        install(FUNCTIONS)
        drop(DROPPED)


def downgrade() -> None:
    if on_postgres():
        install(DROPPED)
        reinstall_previous(FUNCTIONS)
