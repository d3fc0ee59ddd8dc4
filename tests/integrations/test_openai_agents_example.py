"""examples/openai_agents runs as documented: a Runner with a scripted model keeps its
conversation in SBusSession, a second agent process sees the first one's turns, and two
runs at once both keep all their items."""

from __future__ import annotations

import sys
from collections import Counter

import pytest

from examples.openai_agents.__main__ import main
from examples.openai_agents.desk import run
from sbus_client import AsyncBus
from sbus_client.testing import AsyncLocalBus

FIRST = "The printer on floor 3 is on fire."
SECOND = "It is out now, but it smells."
CONCURRENT = {"Who pays for the new printer?", "Please order a fan."}


def test_the_help_desk_example(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["python -m examples.openai_agents"])
    main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"[desk] 1 message(s) on this ticket: {FIRST}"
    assert lines[1] == f"[expert] 2 message(s) on this ticket: {FIRST} | {SECOND}"
    # The two runs at once: each saw the history up to its own message at least.
    assert lines[2].startswith("[desk] ") and lines[3].startswith("[expert] ")
    count, kinds = lines[4].split(" items on the bus: ")
    assert int(count) == 16
    assert Counter(kinds.split(", ")) == {
        "user": 4,
        "function_call": 4,
        "function_call_output": 4,
        "message": 4,
    }
    kept = lines[5].removeprefix("user messages kept: ").split(" | ")
    assert kept[:2] == [FIRST, SECOND] and set(kept[2:]) == CONCURRENT
    assert len(lines) == 6


async def test_a_second_run_on_the_same_bus_tells_the_same_story() -> None:
    # As on a running `sbus serve` (--url): the first run's ticket is still on the bus.
    async with AsyncLocalBus() as local:
        front = AsyncBus(local.url, agent_id="front-desk", http_client=local.http)
        back = AsyncBus(local.url, agent_id="back-office", http_client=local.http)
        await run(front, back)
        again = await run(front, back)
    assert again[0] == f"[desk] 1 message(s) on this ticket: {FIRST}"
    assert again[4].startswith("16 items on the bus: ")
