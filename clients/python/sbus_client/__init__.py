"""Python client for the S-Bus HTTP state bus (docs/sdk.md in the S-Bus repository).

``Bus``/``Session`` block; ``AsyncBus``/``AsyncSession`` are their asyncio twins. Both
drive one I/O-free core, so requests, retries and errors behave identically. Every
problem code of the server has its own exception class here (``VersionMismatch``,
``ShardNotFound``, ...), derived from ``SBusError`` and from the builtin that says
whether retrying can help (see ``sbus_client._errors``).
"""

from __future__ import annotations

from sbus_client import _codes
from sbus_client._async import AsyncBus, AsyncSession
from sbus_client._codes import *  # noqa: F403 (one class per server code, generated)
from sbus_client._errors import (
    BusUnreachable,
    CompatibilityWarning,
    ConflictError,
    RetriesExhausted,
    SBusError,
    UnknownClientError,
    UnknownServerError,
)
from sbus_client._models import Committed, HistoryEntry, KeysPage, Mandate, ServerVersion, Shard
from sbus_client._retry import TransportRetry
from sbus_client._sync import Bus, Session
from sbus_client._transactional import AsyncTransactional, Transactional
from sbus_client._version import __version__
from sbus_client._watch import WatchEvent, WatchReset

__all__ = [
    "AsyncBus",
    "AsyncSession",
    "AsyncTransactional",
    "Bus",
    "BusUnreachable",
    "Committed",
    "CompatibilityWarning",
    "ConflictError",
    "HistoryEntry",
    "KeysPage",
    "Mandate",
    "RetriesExhausted",
    "SBusError",
    "ServerVersion",
    "Session",
    "Shard",
    "Transactional",
    "TransportRetry",
    "UnknownClientError",
    "UnknownServerError",
    "WatchEvent",
    "WatchReset",
    "__version__",
]
__all__ += _codes.__all__
