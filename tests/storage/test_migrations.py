"""The Alembic migrations and the Core schema in sbus.storage.sql.schema must agree."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine

from sbus.storage.sql.migrate import head_revision, upgrade_to_head
from sbus.storage.sql.schema import metadata


def test_migrations_produce_the_declared_schema(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    with engine.begin() as conn:
        upgrade_to_head(conn)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn)
        assert context.get_current_revision() == head_revision() == "0006"
        diffs = compare_metadata(context, metadata)
        assert diffs == []
        meta: dict[str, int] = dict(
            conn.exec_driver_sql("SELECT name, value FROM sbus_meta").fetchall()
        )
        assert meta == {"ori_enabled": 1, "clock_offset_ms": 0}
