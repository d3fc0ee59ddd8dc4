"""What runs before an app is built: whether a configuration may serve at all.

Above the API layer (``sbus serve`` and the in-process test bus ask it before they build
an app), so it may read the key files the settings name; the settings themselves never
read files (:meth:`sbus.config.Settings.own_problem`).
"""

from __future__ import annotations

from sbus.config import Settings
from sbus.security.keys import token_mode_problem


def startup_problem(settings: Settings) -> str | None:
    """Why this configuration must not serve, or None: the settings' own problem, then in
    token mode the key it needs (a missing, short or unreadable key)."""
    problem = settings.own_problem()
    if problem is None and settings.auth_mode == "token":
        problem = token_mode_problem(settings)
    return problem
