"""``sbus-mcp``: the MCP server as a command.

Configuration comes from the command line and the environment only, never from the
model: the bus (``--url``/``SBUS_URL``), the agent (``--agent-id``/``SBUS_AGENT_ID``; in
token mode the subject of ``SBUS_TOKEN``), the transport. The token is read from the
environment only, so it never shows in a process listing.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import socket
import sys
from collections.abc import Mapping, Sequence

import anyio
from mcp.server import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from sbus_client._async import AsyncBus
from sbus_client._sync import DEFAULT_URL
from sbus_client._wire import identifier_problem
from sbus_client.mcp._server import build_server

LOOPBACK_HOSTS = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
LOOPBACK_ORIGINS = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sbus-mcp",
        description="Serve an S-Bus to MCP clients: shared, versioned state for agents.",
    )
    p.add_argument("--url", help=f"the bus (env SBUS_URL; default {DEFAULT_URL})")
    p.add_argument(
        "--agent-id",
        help="who this server acts as (env SBUS_AGENT_ID; in token mode the token's "
        "subject; default mcp-<hostname>-<pid>)",
    )
    p.add_argument("--transport", choices=["stdio", "streamable-http"], default="stdio")
    p.add_argument("--host", default="127.0.0.1", help="streamable-http: address to bind")
    p.add_argument("--port", type=int, default=8000, help="streamable-http: port")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="streamable-http: allow a non-loopback --host (every client that reaches it "
        "acts with this server's token and agent)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="streamable-http: another Host header to accept (repeatable; 'name:*' for any "
        "port); loopback names and --host are always accepted",
    )
    return p


def agent_of(flag: str | None, env: Mapping[str, str]) -> str | None:
    """The configured agent: the flag, else SBUS_AGENT_ID; else, in token mode, None
    (the bus takes the token's subject); else ``mcp-<hostname>-<pid>``."""
    if flag:
        return flag
    if env.get("SBUS_AGENT_ID"):
        return env["SBUS_AGENT_ID"]
    if env.get("SBUS_TOKEN"):
        return None
    return f"mcp-{socket.gethostname()}-{os.getpid()}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def transport_security(host: str, extra_hosts: Sequence[str]) -> TransportSecuritySettings:
    """Host/Origin checking (DNS-rebinding protection), always on: a web page the user
    visits cannot drive the server through a name that resolves to it."""
    hosts = [*LOOPBACK_HOSTS, *extra_hosts]
    origins = list(LOOPBACK_ORIGINS)
    if not is_loopback(host):
        bracketed = f"[{host}]" if ":" in host else host
        hosts.append(f"{bracketed}:*")
        origins.append(f"http://{bracketed}:*")
    origins += [f"http://{h}" for h in extra_hosts]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    remote = args.transport == "streamable-http" and not is_loopback(args.host)
    if remote and not args.allow_remote:
        parser().error(
            f"--host {args.host} is not a loopback address: every client that can reach "
            "it gets this server's token and agent; add --allow-remote to accept that"
        )
    env = os.environ
    url = args.url or env.get("SBUS_URL") or DEFAULT_URL
    agent = agent_of(args.agent_id, env)
    problem = None if agent is None else identifier_problem(agent)
    if problem:
        parser().error(f"the agent id (--agent-id / SBUS_AGENT_ID) {agent!r} {problem}")
    token = env.get("SBUS_TOKEN") or None
    try:  # the SDK checks the URL; a bad one is a usage error, not a traceback
        bus = AsyncBus(url, agent_id=agent, token=token)
    except ValueError as err:
        parser().error(f"--url / SBUS_URL: {err}")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a user stops it
        anyio.run(_serve, args, bus, agent)


async def _serve(args: argparse.Namespace, bus: AsyncBus, agent: str | None) -> None:
    url = bus.base_url
    async with bus:
        server: MCPServer = build_server(bus)
        if args.transport == "stdio":
            await server.run_stdio_async()
        else:
            print(
                f"sbus-mcp: serving {url} as {agent or 'the token subject'} on "
                f"http://{args.host}:{args.port}/mcp",
                file=sys.stderr,
            )
            await server.run_streamable_http_async(
                host=args.host,
                port=args.port,
                transport_security=transport_security(args.host, args.allowed_host),
            )
