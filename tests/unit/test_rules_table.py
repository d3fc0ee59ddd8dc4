"""docs/storage.md's table of where each rule lives per store stays true: every rule has
its row, and every name in a cell exists (a Python function or method, a PostgreSQL
function file at the version the newest migration deploys, a Lua script or prelude
function of the Redis store)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sbus_migrations.functions import deployed_versions

from sbus.storage.redis import scripts
from sbus.storage.sql.migrate import alembic_config, head_revision

DOC = Path(__file__).resolve().parents[2] / "docs" / "storage.md"
HEADING = "## Where each rule lives"
COLUMNS = ["Rule", "memory", "SQLite", "PostgreSQL", "Redis"]
RULES = [
    "Idempotency check and replay",
    "Idempotency record",
    "Stale read check (read set and DeliveryLog, ORI)",
    "Version conflict",
    "Create over a tombstone",
    "Delete leaves a tombstone",
    "History trim by depth and bytes",
    "DeliveryLog record and overflow",
    "DeliveryLog expiry",
    "Read-your-writes",
    "Mandate consume and expiry",
    "Counters",
    "Rate-limit bucket",
    "Revocation",
    "Purge",
    "Audit entry, aggregated per group and minute",
    "Mandate consumption's audit entry",
    "Audit retention (age and row cap)",
    "Clock offset",
]
# Where a short Python name is looked up, in order.
PACKAGES = ("sbus.core", "sbus.storage")


def table() -> list[list[str]]:
    """The rows of the table under HEADING, header first, cells stripped."""
    text = DOC.read_text(encoding="utf-8")
    assert HEADING in text, f"{DOC.name} lost its section {HEADING!r}"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and "---" not in line]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def python_object(name: str) -> Any:
    """The object a dotted name under one of PACKAGES stands for, or None."""
    parts = name.split(".")
    for package in PACKAGES:
        for cut in range(len(parts), 0, -1):
            try:
                found: Any = importlib.import_module(".".join([package, *parts[:cut]]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                found = getattr(found, attr, None)
            if callable(found):
                return found
            break
    return None


def deployed_files() -> set[str]:
    """The function files the migrations up to the newest deploy: each function at the
    version the last migration naming it installs."""
    script = ScriptDirectory.from_config(alembic_config())
    steps = reversed(list(script.iterate_revisions(head_revision(), "base")))
    versions = deployed_versions(step.module for step in steps)
    return {f"{name}.v{version}.sql" for name, version in versions.items()}


def lua_exists(name: str) -> bool:
    if name.isupper():
        return name.lower() in scripts.SCRIPTS
    sources = "".join(script.source for script in scripts.SCRIPTS.values())
    return re.search(rf"\blocal function {re.escape(name)}\(", sources) is not None


def test_the_table_has_every_rule_and_every_store() -> None:
    rows = table()
    assert rows[0] == COLUMNS
    assert [row[0] for row in rows[1:]] == RULES
    for row in rows[1:]:
        assert len(row) == len(COLUMNS), row[0]
        for column, cell in zip(COLUMNS[1:], row[1:], strict=True):
            assert names(cell), f"{row[0]} / {column} names nothing"


CELLS = [
    (row[0], column, name)
    for row in table()[1:]
    for column, cell in zip(COLUMNS[1:], row[1:], strict=False)
    for name in names(cell)
]


@pytest.mark.parametrize(("rule", "column", "name"), CELLS)
def test_every_name_exists(rule: str, column: str, name: str) -> None:
    where = f"{rule} / {column}: {name}"
    if name.endswith(".sql"):
        assert column == "PostgreSQL", where
        assert name in deployed_files(), f"{where} is not the version deployed"
    elif "." in name:
        assert python_object(name) is not None, f"{where} is no Python function"
    else:
        assert column == "Redis", where
        assert lua_exists(name), f"{where} is no Lua script or prelude function"


def test_every_postgres_function_has_a_place() -> None:
    named = {name for _, column, name in CELLS if column == "PostgreSQL"}
    assert deployed_files() <= named
