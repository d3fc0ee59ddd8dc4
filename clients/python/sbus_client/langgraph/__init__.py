"""LangGraph's store on the bus (extra ``sbus-client[langgraph]``).

:class:`SBusStore` is a ``langgraph.store.base.BaseStore`` whose items are bus shards:
a put is a versioned commit, a batch's writes are one atomic multi-commit, and a put
that lost a race raises the SDK's ``ConflictError`` (so a ``RetryPolicy`` re-runs the
node) instead of overwriting. docs/integrations/langgraph.md shows the pattern.
"""

from __future__ import annotations

from sbus_client._extras import needs_extra

with needs_extra("langgraph", "sbus_client.langgraph"):
    from sbus_client.langgraph._store import SBusStore

__all__ = ["SBusStore"]
