"""Where an item lives on the bus: (namespace, key) <-> shard key, and the stored envelope.

A bus key is at most 256 characters of ``/``-separated segments of ``A-Z a-z 0-9 . _ :
@ -`` (docs/protocol.md 1.2). An item ``(("users", "u1"), "prefs")`` under the prefix
``lg`` is the shard ``lg/users/u1/prefs``: one segment per namespace label, then one for
the key, so a namespace prefix is a key prefix (``lg/users/``) and search and
list_namespaces are prefix listings.

Each label and the key are encoded on their own, which makes the mapping reversible and
free of collisions:

- the characters ``A-Z a-z 0-9 . _ : -`` stand for themselves;
- every other character, ``@`` included, is ``@`` and two upper-case hex digits per
  UTF-8 byte (``/`` is ``@2F``), and a segment that would be ``.`` or ``..`` has its
  dots escaped (``@2E``); the empty string is the segment ``@``;
- a label whose encoding is longer than :data:`MAX_SEGMENT`, and a key whose encoding
  does not fit in what the namespace leaves of the 256 characters, is ``@h`` and 32 hex
  digits of its SHA-256 instead. No escape produces ``@h`` (``h`` is not a hex digit),
  so a hashed segment can never equal an encoded one. Hashing a label depends on that
  label alone, so namespace prefixes stay key prefixes.

A hashed segment cannot be decoded, so the shard's content is an envelope that keeps the
real namespace and key beside the value: ``{"ns": [...], "key": "...", "value": {...}}``.
Reads check the envelope against the requested item, which turns a (vanishingly
unlikely) hash collision into an error instead of a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_KEY = 256
# A label longer than this once encoded is hashed: four labels at the limit, a prefix
# and a hashed key still fit in MAX_KEY.
MAX_SEGMENT = 48
HASH_MARK = "@h"
HASH_HEX = 32
HASHED_LEN = len(HASH_MARK) + HASH_HEX
EMPTY = "@"

_PLAIN = frozenset(string.ascii_letters + string.digits + "._:-")
_ESCAPE = re.compile(r"@([0-9A-F]{2})")
_SEGMENT = re.compile(r"[A-Za-z0-9._:@-]+")


def encode_part(text: str) -> str:
    """The reversible encoding of one label or key (no hashing)."""
    if text == "":
        return EMPTY
    out: list[str] = []
    for char in text:
        if char in _PLAIN:
            out.append(char)
        else:
            out.extend(f"@{byte:02X}" for byte in char.encode("utf-8"))
    encoded = "".join(out)
    if encoded in (".", ".."):
        return encoded.replace(".", "@2E")
    return encoded


def decode_part(segment: str) -> str | None:
    """The label or key a segment encodes; None for a hashed segment (only the stored
    envelope knows it). Raises ValueError for a segment this mapping never produces."""
    if segment == EMPTY:
        return ""
    if segment.startswith(HASH_MARK):
        return None
    raw = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(segment):
        raw += segment[pos : match.start()].encode("ascii")
        raw.append(int(match.group(1), 16))
        pos = match.end()
    tail = segment[pos:]
    if "@" in tail:
        raise ValueError(f"not an SBusStore key segment: {segment!r}")
    raw += tail.encode("ascii")
    text = raw.decode("utf-8")
    if encode_part(text) != segment:
        raise ValueError(f"not an SBusStore key segment: {segment!r}")
    return text


def hashed(text: str) -> str:
    return HASH_MARK + hashlib.sha256(text.encode("utf-8")).hexdigest()[:HASH_HEX]


def label_segment(label: str) -> str:
    encoded = encode_part(label)
    return encoded if len(encoded) <= MAX_SEGMENT else hashed(label)


@dataclass(frozen=True)
class Located:
    """A shard key taken apart: the namespace and key when every segment decodes
    (None where a segment is hashed), and the namespace's segments as they are."""

    namespace: tuple[str, ...] | None
    key: str | None
    namespace_segments: tuple[str, ...]


class KeyMap:
    """The mapping under one prefix (a valid bus key of its own, e.g. ``lg``)."""

    def __init__(self, prefix: str) -> None:
        if not isinstance(prefix, str) or len(prefix) > MAX_SEGMENT or not prefix:
            raise ValueError(f"prefix must be a bus key of 1-{MAX_SEGMENT} characters")
        for segment in prefix.split("/"):
            if segment in (".", "..") or not _SEGMENT.fullmatch(segment):
                raise ValueError(
                    f"prefix {prefix!r} is not a bus key: '/'-separated segments of "
                    "A-Z a-z 0-9 . _ : @ - (docs/protocol.md 1.2)"
                )
        self.prefix = prefix
        self._depth = prefix.count("/") + 1

    def namespace_prefix(self, labels: Sequence[str]) -> str:
        """The key prefix every item of a namespace starting with ``labels`` has."""
        return "/".join([self.prefix, *(label_segment(label) for label in labels)]) + "/"

    def shard_key(self, namespace: Sequence[str], key: str) -> str:
        head = self.namespace_prefix(namespace)
        room = MAX_KEY - len(head)
        if room < HASHED_LEN:
            raise ValueError(
                f"namespace {tuple(namespace)!r} is too long for a bus key under prefix "
                f"{self.prefix!r}: its encoding takes {len(head)} of the {MAX_KEY} "
                f"characters; use fewer or shorter labels"
            )
        segment = encode_part(key)
        if len(segment) > room:
            segment = hashed(key)
        return head + segment

    def locate(self, shard_key: str) -> Located | None:
        """The item a shard key holds, or None for a key this mapping never makes."""
        parts = shard_key.split("/")
        if len(parts) < self._depth + 2 or "/".join(parts[: self._depth]) != self.prefix:
            return None
        ns_segments = tuple(parts[self._depth : -1])
        try:
            labels = [decode_part(s) for s in ns_segments]
            key = decode_part(parts[-1])
        except (ValueError, UnicodeDecodeError):
            return None
        known = [label for label in labels if label is not None]
        namespace = tuple(known) if len(known) == len(labels) else None
        return Located(namespace, key, ns_segments)


@dataclass(frozen=True)
class Envelope:
    namespace: tuple[str, ...]
    key: str
    value: dict[str, Any]


def pack(namespace: Sequence[str], key: str, value: Mapping[str, Any]) -> str:
    """The shard content of an item (raises TypeError for a value JSON cannot hold)."""
    try:
        return json.dumps(
            {"ns": list(namespace), "key": key, "value": dict(value)},
            ensure_ascii=False,
            separators=(",", ":"),
        )
    except TypeError as exc:
        raise TypeError(f"SBusStore values must be JSON-serializable: {exc}") from exc


def unpack(content: str) -> Envelope | None:
    """The envelope in a shard's content, or None when the shard is not an item."""
    try:
        body = json.loads(content)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    ns, key, value = body.get("ns"), body.get("key"), body.get("value")
    if (
        not isinstance(ns, list)
        or not all(isinstance(label, str) for label in ns)
        or not isinstance(key, str)
        or not isinstance(value, dict)
    ):
        return None
    return Envelope(tuple(ns), key, value)
