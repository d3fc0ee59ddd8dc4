"""PostgreSQL: the open-mode signing secret, kept for every replica of the deployment.

Open mode without a configured key (``SBUS_SECRET``, ``SBUS_SIGNING_KEY``) signs
mandates and tokens with an HS256 secret the store keeps: the first replica to need it
inserts a random one, every replica reads the row, so a mandate issued by one replica
verifies on all. ``/admin/reset`` keeps it. A no-op on SQLite, which keeps its secret in
a file beside the database (sbus.storage.sql.keyfile).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.create_table(
        "sbus_secrets",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_table("sbus_secrets")
