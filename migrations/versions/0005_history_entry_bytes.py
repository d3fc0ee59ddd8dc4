"""PostgreSQL: history retention counts every byte of an entry, not only its content.

``sbus_txn_apply`` (migration 0002) measured a new history entry as the octets of its
content, so a large rationale was retained without limit. The caller now hands each
entry's size as ``size``, computed by ``sbus.core.rules.entry_bytes`` (the one
definition every store uses); this migration installs version 2 of the function
(``migrations/sql/sbus_txn_apply.v2.sql``), which stores and counts that size, and its
downgrade reinstalls version 1. Rows written before keep their content-only size, which
is what their trimming subtracts, so the running total stays consistent. A no-op on
SQLite.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from sbus_migrations.functions import install, on_postgres, reinstall_previous

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

FUNCTIONS = {"sbus_txn_apply": 2}


def upgrade() -> None:
    if on_postgres():
        install(FUNCTIONS)


def downgrade() -> None:
    if on_postgres():
        reinstall_previous(FUNCTIONS)
