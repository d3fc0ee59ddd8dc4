"""The recording hooks against a real bus (in-process, memory store): what each kind of
request becomes in the history, and the client-side DeliveryLog mirror that gives a commit
its read set."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager

from sbus.bootstrap import create_app
from sbus.config import Settings
from tests.history.client import Recorder
from tests.history.record import Op
from tests.history.verify import verify

JSON = {"Content-Type": "application/json"}
AS_A = {"agent_id": "a", "session_id": "s"}


@pytest.fixture
async def bus() -> AsyncIterator[tuple[httpx.AsyncClient, Recorder]]:
    app = create_app(Settings(store="memory://", admin_enabled=True, test_hooks=True))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", headers=JSON
        ) as c:
            recorder = Recorder()
            recorder.attach_async(c)
            yield c, recorder


def shape(op: Op) -> tuple[object, ...]:
    return (op.op, op.result, op.status, op.error, op.reads, op.guards, op.writes)


async def test_what_each_request_records(bus: tuple[httpx.AsyncClient, Recorder]) -> None:
    c, recorder = bus
    for key in ("x", "y"):
        assert (await c.post("/shard", json={"key": key, "content": ""})).status_code == 201
    assert (await c.get("/shard/x", params=AS_A)).status_code == 200
    unrecorded = {**AS_A, "record": "false"}
    assert (await c.get("/shard/y", params=unrecorded)).status_code == 200
    commit = {"key": "y", "expected_version": 0, "delta": "1", **AS_A}
    assert (await c.post("/commit/v2", json=commit)).status_code == 200
    # Writing x: its read set is y@1 from the DL (read-your-writes) and y@0 given
    # explicitly; the bus checks both, and y@0 is stale.
    stale = {"key": "x", "delta": "2", **AS_A, "read_set": [{"key": "y", "version_at_read": 0}]}
    resp = await c.post("/commit/v2", json=stale, headers={"If-Match": '"0"'})
    assert resp.json()["error"] == "CrossShardStale"
    assert (await c.post("/session", json=AS_A)).status_code == 200
    again = {"key": "x", "expected_version": 0, "delta": "3", **AS_A}
    headers = {"Idempotency-Key": "k-1"}
    assert (await c.post("/commit/v2", json=again, headers=headers)).status_code == 200
    replay = await c.post("/commit/v2", json=again, headers=headers)
    assert replay.headers["idempotent-replayed"] == "true"
    params = {"expected_version": "1", **AS_A}
    assert (await c.request("DELETE", "/shard/x", params=params)).status_code == 204
    assert (await c.get("/shard/x", params=AS_A)).json()["error"] == "ShardDeleted"
    assert (await c.get("/shard/ghost", params=AS_A)).status_code == 404
    assert (await c.post("/admin/config", json={"ori_enabled": False})).status_code == 200
    multi = {"writes": [{"key": "y", "expected_version": 1, "delta": "m"}], **AS_A}
    assert (await c.post("/commit/multi", json=multi)).status_code == 200

    ops = recorder.history.ops
    assert [shape(op) for op in ops] == [
        ("create", "ok", 201, None, [], [("x", None)], [("x", 0)]),
        ("create", "ok", 201, None, [], [("y", None)], [("y", 0)]),
        ("get", "ok", 200, None, [("x", 0)], [], []),
        ("get", "ok", 200, None, [("y", 0)], [], []),
        ("commit", "ok", 200, None, [("x", 0)], [("y", 0)], [("y", 1)]),
        ("commit", "fail", 409, "CrossShardStale", [("y", 0), ("y", 1)], [("x", 0)], []),
        ("commit", "ok", 200, None, [], [("x", 0)], [("x", 1)]),
        ("commit", "ok", 200, None, [], [("x", 0)], [("x", 1)]),
        ("delete", "ok", 204, None, [], [("x", 1)], [("x", 2)]),
        ("get", "ok", 404, "ShardDeleted", [("x", 2)], [], []),
        ("get", "fail", 404, "ShardNotFound", [], [], []),
        ("multi", "ok", 200, None, [("x", 2)], [("y", 1)], [("y", 2)]),
    ]
    assert [op.replay for op in ops].index(True) == 7
    assert [op.ori for op in ops] == [True] * 11 + [False]
    assert {op.agent for op in ops[2:]} == {"a"} and {op.session for op in ops[2:]} == {"s"}
    summary = verify(ops, label="recorder")
    assert (summary.committed_writes, summary.refused_writes) == (6, 1)

    assert (await c.post("/admin/reset")).status_code == 200
    assert (await c.post("/shard", json={"key": "x", "content": ""})).status_code == 201
    assert [len(h) for h in recorder.histories()] == [12, 1]
    assert shape(recorder.history.ops[0])[-1] == [("x", 0)]


async def test_the_mirror_knows_no_more_than_the_bus(
    bus: tuple[httpx.AsyncClient, Recorder],
) -> None:
    """Creates and idempotent replays set no DeliveryLog entry, so the mirror must not
    either: each sequence below is legal, and would be reported as a stale admitted read
    if the mirror believed the agent had read what it created or what a replay repeated."""
    c, recorder = bus
    as_b = {"agent_id": "b"}
    # a creates x (a create records nothing in a's DeliveryLog); b moves x on.
    created = await c.post("/shard", json={"key": "x", "content": "", "agent_id": "a"})
    assert created.status_code == 201
    assert (await c.post("/shard", json={"key": "y", "content": ""})).status_code == 201
    move = {"key": "x", "expected_version": 0, "delta": "b", **as_b}
    assert (await c.post("/commit/v2", json=move)).status_code == 200
    body = {"key": "y", "expected_version": 0, "delta": "a", "agent_id": "a"}
    assert (await c.post("/commit/v2", json=body)).status_code == 200  # a never read x
    # a commits z with a key, b moves z on, a re-reads z@2, then a's retry is replayed:
    # the bus keeps z@2 in a's DeliveryLog, and so must the mirror.
    assert (await c.post("/shard", json={"key": "z", "content": ""})).status_code == 201
    first = {"key": "z", "expected_version": 0, "delta": "a", "agent_id": "a"}
    key = {"Idempotency-Key": "retry-1"}
    assert (await c.post("/commit/v2", json=first, headers=key)).status_code == 200
    again = {"key": "z", "expected_version": 1, "delta": "b", **as_b}
    assert (await c.post("/commit/v2", json=again)).status_code == 200
    assert (await c.get("/shard/z", params={"agent_id": "a"})).json()["version"] == 2
    replay = await c.post("/commit/v2", json=first, headers=key)
    assert replay.headers["idempotent-replayed"] == "true"
    last = {"key": "y", "expected_version": 1, "delta": "a2", "agent_id": "a"}
    assert (await c.post("/commit/v2", json=last)).status_code == 200
    ops = recorder.history.ops
    assert ops[3].reads == []  # the create did not enter a's reads
    assert ops[-1].reads == [("z", 2)]
    assert ops[-2].replay and ops[-2].idem == "retry-1"
    verify(ops, label="mirror-subset")


async def test_session_reset_and_ori_come_from_the_answers(
    bus: tuple[httpx.AsyncClient, Recorder],
) -> None:
    c, recorder = bus
    assert (await c.post("/shard", json={"key": "x", "content": ""})).status_code == 201
    assert (await c.get("/shard/x", params={"agent_id": "a"})).status_code == 200
    # Reset a's session with the agent named in a header: the answer says whose.
    reset = await c.post("/session", json={}, headers={"X-Agent-Id": "a"})
    assert reset.json() == {"agent_id": "a", "status": "created"}
    body = {"key": "x", "expected_version": 0, "delta": "1", "agent_id": "a"}
    assert (await c.post("/commit/v2", json=body)).status_code == 200
    assert recorder.history.ops[-1].reads == []
    # The ORI state is learned from /stats as well as from /admin/config.
    assert (await c.post("/admin/config", json={"ori_enabled": False})).status_code == 200
    assert recorder.ori is False
    recorder.ori = True  # pretend the recorder missed the switch
    assert (await c.get("/stats")).json()["ori_enabled"] is False
    assert recorder.ori is False


async def test_a_bulk_read_is_one_read_of_every_version_it_answered(
    bus: tuple[httpx.AsyncClient, Recorder],
) -> None:
    """POST /read becomes one get reading each shard and tombstone it answered; a
    recorded one enters the mirror (so the next commit's reads), an unrecorded one not."""
    c, recorder = bus
    for key in ("x", "y", "z"):
        assert (await c.post("/shard", json={"key": key, "content": ""})).status_code == 201
    gone = await c.request("DELETE", "/shard/z", params={"expected_version": "0", "agent_id": "d"})
    assert gone.status_code == 204
    quiet = {"keys": ["y"], "record": False, **AS_A}
    assert (await c.post("/read", json=quiet)).status_code == 200
    body = {"keys": ["x", "ghost", "z"], **AS_A}
    assert (await c.post("/read", json=body)).status_code == 200
    bad = await c.post("/read", json={"keys": ["x", "x"], **AS_A})
    assert bad.status_code == 422
    commit = {"key": "y", "expected_version": 0, "delta": "1", **AS_A}
    assert (await c.post("/commit/v2", json=commit)).status_code == 200
    assert [shape(op) for op in recorder.history.ops[4:]] == [
        ("get", "ok", 200, None, [("y", 0)], [], []),
        ("get", "ok", 200, None, [("x", 0), ("z", 1)], [], []),
        ("get", "fail", 422, "ValidationError", [], [], []),
        ("commit", "ok", 200, None, [("x", 0), ("z", 1)], [("y", 0)], [("y", 1)]),
    ]
    verify(recorder.history.ops, label="bulk-read")
