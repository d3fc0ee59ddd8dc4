"""What the engine asks of tracing: a port that ``sbus.telemetry.tracing`` implements with
OpenTelemetry. The engine holds ``None`` while tracing is off and then checks that one
attribute per request, so an untraced request makes no span, context or attribute
(docs/observability.md).

Traced, a commit reports the steps of protocol.md section 4 it runs, each as a child of
the request's span, in this order: ``sbus.rate_limit`` (step 5, when a rate limit is
configured), ``sbus.idempotency`` (6, when the request carries an Idempotency-Key),
``sbus.limits`` (7), ``sbus.capabilities`` (8), ``sbus.mandate`` (9a's checks that need
no store, when a mandate is presented) and ``sbus.atomic`` (9, the one store call). The
gate adds ``sbus.auth`` (step 1) and the telemetry layer ``sbus.render`` (10) and the
store calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

# What an attribute may hold (OpenTelemetry's attribute types, the ones used here).
AttributeValue = str | bool | int | float | Sequence[str]

AUTH = "sbus.auth"
RATE_LIMIT = "sbus.rate_limit"
IDEMPOTENCY = "sbus.idempotency"
LIMITS = "sbus.limits"
CAPABILITIES = "sbus.capabilities"
MANDATE = "sbus.mandate"
ATOMIC = "sbus.atomic"
RENDER = "sbus.render"

# The request span's attributes set by the engine (the agent, session and outcome are
# the telemetry layer's: it reports them for every request, traced or not).
OP = "sbus.op"
KEYS_WRITTEN = "sbus.keys_written"
READ_SET_SIZE = "sbus.read_set.size"
STALE_KEYS = "sbus.stale_keys"
CONFLICT_KEY = "sbus.conflict_key"


class Tracer(Protocol):
    def phase(self, name: str) -> AbstractContextManager[object]:
        """A span named ``name``, child of the current one, around one step; an error
        raised inside marks it failed and propagates."""
        ...

    def annotate(self, attributes: Mapping[str, AttributeValue]) -> None:
        """Set ``attributes`` on the request's span."""
        ...

    def finished(self) -> None:
        """The use case has answered (or raised): what follows is rendering."""
        ...
