"""The lockstep model test's Hypothesis seed for this run: fresh every run, or the one
``SBUS_TEST_MODEL_SEED`` names (to repeat a run). ``tests/conftest.py`` prints it in
pytest's header, so every run's log says how to repeat it."""

from __future__ import annotations

import os
import secrets

SEED_ENV = "SBUS_TEST_MODEL_SEED"


def _seed() -> int:
    given = os.environ.get(SEED_ENV, "").strip()
    if not given:
        return secrets.randbits(32)
    try:
        return int(given)
    except ValueError:
        raise SystemExit(f"{SEED_ENV} must be an integer, not {given!r}") from None


SEED = _seed()
