"""Shard key and string hygiene rules (protocol.md §1), shared by every entry point."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

MAX_KEY_LENGTH = 256
MAX_INT = 2**53 - 1
# Free-form JSON (a mandate ``context``) nests at most this deep; the outermost object
# or array is level 1. Canonical JSON encoders have limits of their own (orjson: 255).
MAX_JSON_DEPTH = 32
_SEGMENT = re.compile(r"[A-Za-z0-9._:@-]+")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


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


_PREFIX = re.compile(r"[A-Za-z0-9._:@/-]+")


def prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot start any shard key (a watched prefix), or None: empty (every
    key), or up to MAX_KEY_LENGTH characters of the key alphabet and '/', not starting
    with '/'."""
    if prefix == "":
        return None
    if len(prefix) > MAX_KEY_LENGTH:
        return f"prefix must be at most {MAX_KEY_LENGTH} characters"
    if not _PREFIX.fullmatch(prefix) or prefix.startswith("/") or "//" in prefix:
        return "prefix must start a valid key: A-Z a-z 0-9 . _ : @ - and single '/'"
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


def json_problem(value: Any) -> str | None:
    """Why the free-form JSON ``value`` breaks the input rules, or None: every string
    (object keys too) passes :func:`text_problem`, every number is finite and within
    0..2^53-1, and arrays and objects nest at most MAX_JSON_DEPTH deep. A value that
    passes has exactly one canonical JSON encoding and encoding it cannot fail, so
    fingerprints and context hashes over it never raise and never collide (NaN would
    encode as ``null``)."""
    found = _json_problem(value, [])
    if found is None:
        return None
    path, problem = found
    return f"{path_text(path)}: {problem}" if path else problem


def _json_problem(value: Any, path: list[str | int]) -> tuple[list[str | int], str] | None:
    if isinstance(value, dict | list) and len(path) >= MAX_JSON_DEPTH:
        return path, f"nesting deeper than {MAX_JSON_DEPTH} levels"
    if isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(name, str):
                return path, "object keys must be strings"
            problem = text_problem(name)
            if problem:
                return [*path, name], "object key: " + problem
            found = _json_problem(item, [*path, name])
            if found is not None:
                return found
        return None
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _json_problem(item, [*path, i])
            if found is not None:
                return found
        return None
    if isinstance(value, str):
        problem = text_problem(value)
        return (path, problem) if problem else None
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        if math.isfinite(value) and 0 <= value <= MAX_INT:
            return None
        return path, "numbers must be finite and within 0..2^53-1"
    return path, "not a JSON value"


def path_text(path: Sequence[str | int]) -> str:
    """A location inside a JSON value as printable ASCII without commas, safe in a
    detail or a header whatever the object keys hold: ``writes[0].foo``; a key that is
    not a plain name is quoted, escaped and cut to 64 characters: ``a["x y"]``."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif _NAME.fullmatch(part):
            out.append(f".{part}" if out else part)
        else:
            cut = part if len(part) <= 64 else part[:64] + "..."
            out.append("[" + json.dumps(cut).replace(",", "\\u002c") + "]")
    return "".join(out)
