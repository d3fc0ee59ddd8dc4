"""SQL backends (SQLite now; PostgreSQL shares the schema and migrations)."""
