"""PostgreSQL: history retention counts every byte of an entry, not only its content.

``sbus_txn_apply`` (migration 0002) measured a new history entry as the octets of its
content, so a large rationale was retained without limit. The caller now hands each
entry's size as ``size``, computed by ``sbus.core.rules.entry_bytes`` (the one
definition every store uses); this migration replaces the function so it stores and
counts that size. Rows written before keep their content-only size, which is what their
trimming subtracts, so the running total stays consistent. A no-op on SQLite.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import importlib

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# The function text of 0002, with the one line that measured an entry replaced.
_APPLY_0002: str = importlib.import_module("sbus_migrations.versions.0002_postgres_functions").APPLY
_CONTENT_SIZE = "v_size := octet_length(h->>'content');"
_ENTRY_SIZE = "v_size := (h->>'size')::bigint;"
assert _APPLY_0002.count(_CONTENT_SIZE) == 1
APPLY = _APPLY_0002.replace(_CONTENT_SIZE, _ENTRY_SIZE)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(APPLY)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(_APPLY_0002)
