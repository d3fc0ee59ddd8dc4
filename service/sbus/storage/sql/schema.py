"""The relational schema (SQLAlchemy Core), shared by the SQL backends and by the
Alembic migrations in ``migrations/``. Times are integer store-clock milliseconds.

History versions of a key are consecutive (every version writes one entry and
retention drops the oldest first), so a shard row needs only the oldest retained
version and the retained byte total to describe its history."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
)

metadata = MetaData()

shards = Table(
    "sbus_shards",
    metadata,
    Column("key", Text, primary_key=True),
    Column("id", Text, nullable=False),
    Column("content", Text, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("goal_tag", Text, nullable=False),
    Column("require_mandate", Boolean, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    Column("attempt_count", BigInteger, nullable=False),
    Column("conflict_count", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("head_hash", Text, nullable=False),
    Column("hist_min_version", BigInteger, nullable=False),
    Column("hist_bytes", BigInteger, nullable=False),
)

history = Table(
    "sbus_history",
    metadata,
    Column("key", Text, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("agent_id", Text, nullable=False),
    Column("committed_ms", BigInteger, nullable=False),
    Column("content", Text, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("rationale", Text, nullable=True),
    Column("commit_id", Text, nullable=False),
    Column("prev_hash", Text, nullable=False),
    Column("hash", Text, nullable=False),
    # what the entry counts against SBUS_HISTORY_MAX_BYTES (rules.entry_bytes)
    Column("size", BigInteger, nullable=False),
    PrimaryKeyConstraint("key", "version"),
)

dl_entries = Table(
    "sbus_dl_entries",
    metadata,
    Column("agent_id", Text, nullable=False),
    Column("session_id", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("served_ms", BigInteger, nullable=False),
    PrimaryKeyConstraint("agent_id", "session_id", "key"),
)

dl_sessions = Table(
    "sbus_dl_sessions",
    metadata,
    Column("agent_id", Text, nullable=False),
    Column("session_id", Text, nullable=False),
    Column("overflowed", Boolean, nullable=False),
    Column("last_served_ms", BigInteger, nullable=True),
    PrimaryKeyConstraint("agent_id", "session_id"),
)

# Counters are split into slots so that PostgreSQL commits need not serialize on one
# row; readers sum the slots. SQLite uses slot 0 only.
counters = Table(
    "sbus_counters",
    metadata,
    Column("name", Text, nullable=False),
    Column("slot", Integer, nullable=False),
    Column("value", BigInteger, nullable=False),
    PrimaryKeyConstraint("name", "slot"),
)

meta = Table(
    "sbus_meta",
    metadata,
    Column("name", Text, primary_key=True),
    Column("value", BigInteger, nullable=False),
)

idempotency = Table(
    "sbus_idempotency",
    metadata,
    Column("agent_id", Text, nullable=False),
    Column("idem_key", Text, nullable=False),
    Column("fingerprint", Text, nullable=False),
    Column("status", Integer, nullable=False),
    Column("body", Text, nullable=True),
    Column("etag", BigInteger, nullable=True),
    Column("expires_ms", BigInteger, nullable=False),
    PrimaryKeyConstraint("agent_id", "idem_key"),
)
Index("sbus_idempotency_expiry", idempotency.c.expires_ms)

consumed_mandates = Table(
    "sbus_consumed_mandates",
    metadata,
    Column("jti", Text, primary_key=True),
    Column("retain_until_ms", BigInteger, nullable=False),
)
Index("sbus_consumed_mandates_expiry", consumed_mandates.c.retain_until_ms)

revocations = Table(
    "sbus_revocations",
    metadata,
    Column("jti", Text, primary_key=True),
    Column("until_ms", BigInteger, nullable=False),
)

rate_buckets = Table(
    "sbus_rate_buckets",
    metadata,
    Column("agent_id", Text, primary_key=True),
    Column("tokens", Float, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)

# The audit log (sbus.core.audit): ids only grow (SQLite's AUTOINCREMENT never reuses
# one, so a paging cursor stays valid after a purge); an aggregated entry has a group
# key (its group and store-clock minute), unique, and counts its events.
audit = Table(
    "sbus_audit",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("at_ms", BigInteger, nullable=False),
    Column("kind", Text, nullable=False),
    Column("agent", Text, nullable=False),
    Column("details", Text, nullable=False),  # a JSON object
    Column("grp", Text, nullable=True),
    Column("count", BigInteger, nullable=False),
    sqlite_autoincrement=True,
)
Index("sbus_audit_at", audit.c.at_ms)
Index("sbus_audit_grp", audit.c.grp, unique=True)
# The change log (sbus.core.changes): one row per committed version, appended in the
# commit's transaction. ``seq`` never repeats (SQLite: AUTOINCREMENT, even after the
# newest rows are purged; PostgreSQL: a sequence); on SQLite, whose writers are
# serialized, it is commit order. PostgreSQL adds ``xid`` (postgres_metadata below).
SEQ = BigInteger().with_variant(Integer, "sqlite")
changes = Table(
    "sbus_changes",
    metadata,
    Column("seq", SEQ, primary_key=True, autoincrement=True),
    Column("key", Text, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("op", Text, nullable=False),
    Column("agent_id", Text, nullable=False),
    Column("commit_id", Text, nullable=False),
    Column("committed_ms", BigInteger, nullable=False),
    sqlite_autoincrement=True,
)
Index("sbus_changes_age", changes.c.committed_ms)

# The conflict ring: the newest refused-for-conflict commits (``stale_keys`` as JSON).
conflicts = Table(
    "sbus_conflicts",
    metadata,
    Column("seq", SEQ, primary_key=True, autoincrement=True),
    Column("key", Text, nullable=False),
    Column("agent_id", Text, nullable=False),
    Column("error", Text, nullable=False),
    Column("stale_keys", Text, nullable=False),
    sqlite_autoincrement=True,
)

# PostgreSQL's schema: the tables above, the open-mode signing secret that every replica
# reads (SQLite keeps it in a key file beside the database instead), and the PL/pgSQL
# functions the store calls, as (name, identity arguments, result type).
# tests/storage/test_migrations.py holds a migrated database to all three.
postgres_metadata = MetaData()
for _table in metadata.tables.values():
    _table.to_metadata(postgres_metadata)

# The committing transaction's id (pg_current_xact_id() as bigint): a reader delivers
# a change once its transaction is visible in the reader's snapshot (postgres.py says
# why that, not ``seq``, gives commit order).
_pg_changes = postgres_metadata.tables["sbus_changes"]
_pg_changes.append_column(Column("xid", BigInteger, nullable=False))
Index("sbus_changes_xid", _pg_changes.c.xid)

secrets = Table(
    "sbus_secrets",
    postgres_metadata,
    Column("name", Text, primary_key=True),
    Column("value", LargeBinary, nullable=False),
)

POSTGRES_FUNCTIONS = frozenset(
    {
        ("sbus_now_ms", "", "bigint"),
        (
            "sbus_txn_load",
            "p_agent text, p_session text, p_writes text[], p_reads text[], "
            "p_rb_keys text[], p_rb_versions bigint[], p_idem_key text",
            "jsonb",
        ),
        ("sbus_txn_apply", "p jsonb", "jsonb"),
        (
            "sbus_read",
            "p_key text, p_agent text, p_session text, p_record boolean, p_ttl bigint, "
            "p_max bigint",
            "jsonb",
        ),
        ("sbus_mandate_consumed", "p_jti text, p_now bigint", "boolean"),
    }
)
