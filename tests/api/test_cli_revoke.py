"""``sbus token revoke`` against every shared store: the CLI puts the jti on the same
revocation list ``POST /admin/tokens/revoke`` does, so a running bus over that store
refuses the token at once (401 TokenRevoked) and keeps accepting the others."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from sbus.api.runtime import runtime_of
from sbus.cli import app as cli
from sbus.core.clock import rfc3339
from tests.api.auth_helpers import SECRET, auth, root_token, token, token_app, verifier
from tests.api.helpers import ok, problem
from tests.conftest import AppFactory, store_url


async def revoke(*args: str) -> Result:
    """The command in a thread: it runs its own event loop."""
    env = {"SBUS_SECRET": SECRET}
    return await asyncio.to_thread(CliRunner(env=env).invoke, cli, ["token", "revoke", *args])


# The memory store lives inside one process; the CLI refuses it (tests/unit/test_cli.py).
@pytest.mark.parametrize("store_kind", ["sqlite", "postgres", "redis"], indirect=True)
@pytest.mark.parametrize("by", ["token", "jti"])
async def test_cli_revocation_is_seen_by_the_running_bus(
    make_client: AppFactory, store_kind: str, tmp_path: Path, by: str
) -> None:
    app, c = await token_app(make_client)
    root = auth(root_token(app))
    ok(await c.post("/shard", json={"key": "plan/a", "content": "v0"}, headers=root), 201)
    a_token = token(app, "A", ("plan/*", "read"))
    other = auth(token(app, "B", ("plan/*", "read")))
    ok(await c.get("/shard/plan/a", headers=auth(a_token)))
    claims = verifier(app).verify(a_token)

    argument = a_token if by == "token" else claims.jti
    # A jti is base64url and may begin with "-": "--" ends the options, as users must too.
    result = await revoke("--store", store_url(store_kind, tmp_path), "--", argument)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert (answer["revoked"], answer["jti"]) == (True, claims.jti)
    if by == "token":
        # kept until the token's own exp plus the leeway, as the endpoint does with exp
        leeway = runtime_of(app).settings.clock_leeway
        assert answer["until"] == rfc3339((claims.expires_at + leeway) * 1000)

    problem(await c.get("/shard/plan/a", headers=auth(a_token)), 401, "TokenRevoked")
    ok(await c.get("/shard/plan/a", headers=other))
    # the audit log has it, by the CLI (no agent: whoever holds the store's credentials)
    logged = await runtime_of(app).bus.store.audit_log(None, 100)
    revokes = [e.details for e in logged if e.kind == "token_revoke" and e.agent == ""]
    assert [(d["token_id"], d["via"]) for d in revokes] == [(claims.jti, "cli")]
    assert rfc3339(revokes[0]["until"]) == answer["until"]


async def test_cli_revoke_of_an_unreachable_store_fails_in_one_line() -> None:
    result = await revoke("some-jti", "--store", "redis://127.0.0.1:1/0")
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("sbus: cannot reach Redis at redis://127.0.0.1:1/0")
    assert "Traceback" not in result.output
