"""Each rule of the atomic step has one home, checked on the source: the replay rule
(sbus.core.idempotency), the order of the commit step for the Python-run stores
(sbus.core.commit), the success bodies (sbus.core.rules.render*) and the wording of
errors (their classes). A store that grows its own copy fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sbus
from sbus.core.errors import IdempotencyKeyReused
from sbus.core.idempotency import recorded, replay
from sbus.core.types import IdemRecord, Outcome

SBUS = Path(sbus.__file__).parent
STORAGE = sorted((SBUS / "storage").rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _compares_fingerprints(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(n, ast.Attribute) and n.attr == "fingerprint" for n in sides):
                return True
    return False


def _calls(tree: ast.Module) -> set[str]:
    """The dotted names called in ``tree`` (``rules.decide``, ``Outcome``, ...)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                found.add(func.id)
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                found.add(f"{func.value.id}.{func.attr}")
    return found


def test_fingerprints_are_compared_in_one_place() -> None:
    comparing = sorted(
        str(p.relative_to(SBUS)) for p in SBUS.rglob("*.py") if _compares_fingerprints(_tree(p))
    )
    assert comparing == ["core/idempotency.py"]


@pytest.mark.parametrize("path", STORAGE, ids=lambda p: str(p.relative_to(SBUS)))
def test_no_store_builds_an_answer_or_a_reuse_refusal(path: Path) -> None:
    calls = _calls(_tree(path))
    assert not calls & {"Outcome", "IdempotencyKeyReused"}


@pytest.mark.parametrize("name", ["memory.py", "sql/sqlite.py"])
def test_memory_and_sqlite_run_the_shared_commit_step(name: str) -> None:
    calls = _calls(_tree(SBUS / "storage" / name))
    assert not calls & {"rules.decide", "rules.render", "rules.render_create"}
    assert {"commit.apply", "commit.create", "commit.create_row"} <= calls


def test_replay_rule() -> None:
    record = recorded("fp", Outcome(201, {"key": "k"}, etag=0))
    assert record == IdemRecord("fp", 201, {"key": "k"}, 0)
    assert replay(None, "fp") is None
    assert replay(record, "fp") == Outcome(201, {"key": "k"}, replayed=True, etag=0)
    with pytest.raises(IdempotencyKeyReused):
        replay(record, "other")
