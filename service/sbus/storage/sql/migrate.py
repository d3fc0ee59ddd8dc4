"""Run the Alembic migrations shipped as the ``sbus_migrations`` package."""

from __future__ import annotations

from importlib import resources
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("sbus_migrations")))
    if url:
        config.set_main_option("sqlalchemy.url", url)
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(connection: Any) -> str | None:
    rev: str | None = MigrationContext.configure(connection).get_current_revision()
    return rev


def upgrade_to_head(connection: Any) -> None:
    """Upgrade over an open connection (in its own transaction)."""
    if current_revision(connection) == head_revision():
        return
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
