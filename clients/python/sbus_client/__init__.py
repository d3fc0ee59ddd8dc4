"""Python client for the S-Bus HTTP state bus."""

from __future__ import annotations

__version__ = "0.1.0"
