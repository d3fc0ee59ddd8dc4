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

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

CONSUMED = """
CREATE OR REPLACE FUNCTION sbus_mandate_consumed(p_jti text, p_now bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  PERFORM pg_advisory_xact_lock(hashtextextended(p_jti, 2));
  RETURN EXISTS (
    SELECT 1 FROM sbus_consumed_mandates WHERE jti = p_jti AND retain_until_ms > p_now
  );
END $$;
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(CONSUMED)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION IF EXISTS sbus_mandate_consumed(text, bigint)")
