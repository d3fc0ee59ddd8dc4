"""Shard key and string hygiene rules (SPEC section 1), shared by every entry point."""

from __future__ import annotations

import re

MAX_KEY_LENGTH = 256
MAX_INT = 2**53 - 1
_SEGMENT = re.compile(r"[A-Za-z0-9._:@-]+")


def key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid shard key, or None when it is."""
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        return f"key must be 1-{MAX_KEY_LENGTH} characters"
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            return "key segments must be non-empty and not '.' or '..'"
        if not _SEGMENT.fullmatch(segment):
            return "key segments may contain only A-Z a-z 0-9 . _ : @ -"
    return None


def text_problem(value: str) -> str | None:
    """Why ``value`` is not acceptable text: U+0000 or a lone surrogate."""
    if "\x00" in value:
        return "strings must not contain U+0000"
    try:
        value.encode()
    except UnicodeEncodeError:
        return "strings must be valid Unicode (no lone surrogates)"
    return None
