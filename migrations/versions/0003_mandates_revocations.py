"""Consumed mandates, token revocations and rate-limit buckets.

Only consumed mandate jtis are stored, until exp + leeway, so the table is bounded by
live mandates; revocations are kept until the token's expiry and survive /admin/reset.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sbus_consumed_mandates",
        sa.Column("jti", sa.Text, primary_key=True),
        sa.Column("retain_until_ms", sa.BigInteger, nullable=False),
    )
    op.create_index("sbus_consumed_mandates_expiry", "sbus_consumed_mandates", ["retain_until_ms"])
    op.create_table(
        "sbus_rate_buckets",
        sa.Column("agent_id", sa.Text, primary_key=True),
        sa.Column("tokens", sa.Float, nullable=False),
        sa.Column("updated_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "sbus_revocations",
        sa.Column("jti", sa.Text, primary_key=True),
        sa.Column("until_ms", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sbus_revocations")
    op.drop_table("sbus_rate_buckets")
    op.drop_table("sbus_consumed_mandates")
