"""The audit log (sbus.core.audit, protocol.md section 2.12).

One row per audited action, or per (group, store-clock minute) for aggregated events
(capability refusals, admin reads), whose ``count`` grows instead. Ids only grow, so a
paging cursor stays valid; ``purge`` keeps the table within SBUS_AUDIT_TTL and
SBUS_AUDIT_MAX_ROWS. Kept by /admin/reset.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sbus_audit",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("agent", sa.Text, nullable=False),
        sa.Column("details", sa.Text, nullable=False),
        sa.Column("grp", sa.Text, nullable=True),
        sa.Column("count", sa.BigInteger, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("sbus_audit_at", "sbus_audit", ["at_ms"])
    op.create_index("sbus_audit_grp", "sbus_audit", ["grp"], unique=True)


def downgrade() -> None:
    op.drop_table("sbus_audit")
