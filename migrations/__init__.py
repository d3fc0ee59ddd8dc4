"""Alembic migrations for the SQL stores (installed as the ``sbus_migrations`` package)."""
