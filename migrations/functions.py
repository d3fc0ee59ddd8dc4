"""PostgreSQL functions as versioned files that migrations install.

Each function body lives once, in ``sql/<name>.v<N>.sql`` beside this module, and a
migration names the versions it installs (its ``FUNCTIONS`` mapping, name -> version).
Changing a function is a new file ``<name>.v<N+1>.sql`` and a new migration that
installs it; that migration's downgrade reinstalls ``v<N>``. A released file never
changes: a database migrated before the edit would keep the old body while a fresh
one got the new, so tests/storage/test_migrations.py pins each file's digest.

A migration that retires a function names it in ``DROPPED`` (name -> the version its
downgrade reinstalls, the one deployed before it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib import resources
from types import ModuleType

from alembic import op

SQL_DIR = "sql"


def function_sql(name: str, version: int) -> str:
    """The ``CREATE OR REPLACE FUNCTION`` statement of one version of a function."""
    path = resources.files("sbus_migrations") / SQL_DIR / f"{name}.v{version}.sql"
    return path.read_text(encoding="utf-8")


def on_postgres() -> bool:
    """Functions exist only on PostgreSQL; on SQLite these migrations are no-ops."""
    name: str = op.get_bind().dialect.name
    return name == "postgresql"


def install(functions: Mapping[str, int]) -> None:
    """Install the named version of each function, in the mapping's order."""
    for name, version in functions.items():
        op.execute(function_sql(name, version))


def reinstall_previous(functions: Mapping[str, int]) -> None:
    """Undo :func:`install` of functions that replaced an earlier version of themselves."""
    for name, version in functions.items():
        if version < 2:
            raise ValueError(f"{name} v{version} replaces nothing; drop it instead")
        op.execute(function_sql(name, version - 1))


def drop(functions: Mapping[str, int]) -> None:
    """Drop functions a migration created, newest first."""
    for name in reversed(list(functions)):
        op.execute(f"DROP FUNCTION IF EXISTS {name} CASCADE")


def deployed_versions(migrations: Iterable[ModuleType]) -> dict[str, int]:
    """The version of each function deployed once ``migrations`` (oldest first) have run:
    each one's ``FUNCTIONS`` over those before it, less the names it ``DROPPED``."""
    versions: dict[str, int] = {}
    for migration in migrations:
        versions.update(getattr(migration, "FUNCTIONS", {}))
        for name in getattr(migration, "DROPPED", {}):
            versions.pop(name, None)
    return versions
