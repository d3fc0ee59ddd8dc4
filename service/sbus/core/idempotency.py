"""The idempotent-replay rule of protocol.md §4 step 6, written once.

The engine applies it before anything else (a pre-check against a record read outside
the atomic step) and every store applies it again inside its atomic step, where the
decision is final: the first of two concurrent requests under one key records its
outcome before the second can look. Both call :func:`replay`; no store compares
fingerprints itself.
"""

from __future__ import annotations

from typing import overload

from sbus.core.errors import IdempotencyKeyReused
from sbus.core.types import IdemRecord, Outcome


@overload
def replay(record: IdemRecord, fingerprint: str) -> Outcome: ...


@overload
def replay(record: IdemRecord | None, fingerprint: str) -> Outcome | None: ...


def replay(record: IdemRecord | None, fingerprint: str) -> Outcome | None:
    """What a request whose Idempotency-Key has ``record`` answers: None when nothing
    is recorded (the request runs), the recorded outcome marked replayed when the
    request's ``fingerprint`` is the recorded one, else IdempotencyKeyReused."""
    if record is None:
        return None
    if record.fingerprint != fingerprint:
        raise IdempotencyKeyReused()
    return Outcome(record.status, record.body, replayed=True, etag=record.etag)


def recorded(fingerprint: str, outcome: Outcome) -> IdemRecord:
    """The record a store keeps for a successful ``outcome`` under an Idempotency-Key."""
    return IdemRecord(fingerprint, outcome.status, outcome.body, outcome.etag)
