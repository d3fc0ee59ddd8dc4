"""S-Bus as an MCP server (extra ``sbus-client[mcp]``; docs/integrations/mcp.md).

``sbus-mcp`` (:func:`main`) serves the bus's tools over stdio or streamable HTTP;
:func:`build_server` builds the same server around an ``AsyncBus`` you already have, for
embedding and tests. ``import sbus_client`` never imports this package.
"""

from __future__ import annotations

from sbus_client._extras import needs_extra

with needs_extra("mcp", "sbus_client.mcp"):
    from sbus_client.mcp._cli import main
    from sbus_client.mcp._server import build_server

__all__ = ["build_server", "main"]
