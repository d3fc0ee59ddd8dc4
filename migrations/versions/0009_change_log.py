"""The change log and the conflict ring behind ``GET /watch`` (sbus.core.changes).

``sbus_changes`` gets one row per committed version, written in the commit's own
transaction; PostgreSQL adds the writing transaction's id (``xid``), by which readers
deliver rows in commit order. ``sbus_conflicts`` holds the newest refused commits.
``seq`` never repeats: AUTOINCREMENT on SQLite, an identity sequence on PostgreSQL.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    extra = [sa.Column("xid", sa.BigInteger, nullable=False)] if postgres else []
    op.create_table(
        "sbus_changes",
        sa.Column("seq", SEQ, primary_key=True, autoincrement=True),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("op", sa.Text, nullable=False),
        sa.Column("agent_id", sa.Text, nullable=False),
        sa.Column("commit_id", sa.Text, nullable=False),
        sa.Column("committed_ms", sa.BigInteger, nullable=False),
        *extra,
        sqlite_autoincrement=True,
    )
    op.create_index("sbus_changes_age", "sbus_changes", ["committed_ms"])
    if postgres:
        op.create_index("sbus_changes_xid", "sbus_changes", ["xid"])
    op.create_table(
        "sbus_conflicts",
        sa.Column("seq", SEQ, primary_key=True, autoincrement=True),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("agent_id", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("stale_keys", sa.Text, nullable=False),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("sbus_conflicts")
    op.drop_table("sbus_changes")
