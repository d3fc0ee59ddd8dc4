"""Initial schema: shards, history, DeliveryLog, counters, meta, idempotency.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sbus_shards",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("id", sa.Text, nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("goal_tag", sa.Text, nullable=False),
        sa.Column("require_mandate", sa.Boolean, nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("updated_ms", sa.BigInteger, nullable=False),
        sa.Column("attempt_count", sa.BigInteger, nullable=False),
        sa.Column("conflict_count", sa.BigInteger, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("head_hash", sa.Text, nullable=False),
        sa.Column("hist_min_version", sa.BigInteger, nullable=False),
        sa.Column("hist_bytes", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "sbus_history",
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("agent_id", sa.Text, nullable=False),
        sa.Column("committed_ms", sa.BigInteger, nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("rationale", sa.Text, nullable=True),
        sa.Column("commit_id", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.Text, nullable=False),
        sa.Column("hash", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("key", "version"),
    )
    op.create_table(
        "sbus_dl_entries",
        sa.Column("agent_id", sa.Text, nullable=False),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("served_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("agent_id", "session_id", "key"),
    )
    op.create_table(
        "sbus_dl_sessions",
        sa.Column("agent_id", sa.Text, nullable=False),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("overflowed", sa.Boolean, nullable=False),
        sa.Column("last_served_ms", sa.BigInteger, nullable=True),
        sa.PrimaryKeyConstraint("agent_id", "session_id"),
    )
    op.create_table(
        "sbus_counters",
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("slot", sa.Integer, nullable=False),
        sa.Column("value", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("name", "slot"),
    )
    op.create_table(
        "sbus_meta",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "sbus_idempotency",
        sa.Column("agent_id", sa.Text, nullable=False),
        sa.Column("idem_key", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.Text, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("body", sa.Text, nullable=True),
        sa.Column("etag", sa.BigInteger, nullable=True),
        sa.Column("expires_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("agent_id", "idem_key"),
    )
    op.create_index("sbus_idempotency_expiry", "sbus_idempotency", ["expires_ms"])
    meta = sa.table("sbus_meta", sa.column("name", sa.Text), sa.column("value", sa.BigInteger))
    op.bulk_insert(
        meta, [{"name": "ori_enabled", "value": 1}, {"name": "clock_offset_ms", "value": 0}]
    )


def downgrade() -> None:
    for table in (
        "sbus_idempotency",
        "sbus_meta",
        "sbus_counters",
        "sbus_dl_sessions",
        "sbus_dl_entries",
        "sbus_history",
        "sbus_shards",
    ):
        op.drop_table(table)
