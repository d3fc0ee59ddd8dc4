"""A help desk whose conversation lives on the bus: two agent processes (here: two
``AsyncBus`` clients, as two processes would have) take turns on one ticket, then both
answer at the same moment; every turn of both is kept, in order.

The model is scripted (:class:`ScriptedModel`, an ``agents.models.interface.Model``), so
no LLM and no API key are involved: on a user message it calls the ``file_note`` tool,
and after the tool's output it answers from the history the Runner loaded from the
session, which is how the example shows that the memory is shared.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from agents import (
    Agent,
    AgentOutputSchemaBase,
    Handoff,
    ModelResponse,
    ModelSettings,
    ModelTracing,
    RunConfig,
    Runner,
    Tool,
    TResponseInputItem,
    Usage,
    function_tool,
)
from agents.items import TResponseStreamEvent
from agents.models.interface import Model
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)
from openai.types.responses.response_prompt_param import ResponsePromptParam

from sbus_client import AsyncBus
from sbus_client.openai_agents import SBusSession

TICKET = "ticket-42"
# Model calls never leave the process, and no trace is sent anywhere.
RUN_CONFIG = RunConfig(tracing_disabled=True)


@function_tool
def file_note(text: str) -> str:
    """File a note on the ticket."""
    return f"filed: {text}"


def _field(item: Any, name: str) -> Any:
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


def user_texts(items: Sequence[Any]) -> list[str]:
    """The user messages of a conversation, oldest first."""
    return [
        str(_field(i, "content"))
        for i in items
        if _field(i, "role") == "user" and isinstance(_field(i, "content"), str)
    ]


class ScriptedModel(Model):
    """A stand-in for an LLM: a user message gets a ``file_note`` call, a tool output
    gets an answer naming every user message in the history it was given."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ids = itertools.count(1)

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        items: list[Any] = [{"role": "user", "content": input}] if isinstance(input, str) else input
        n = next(self._ids)
        last = items[-1]
        if _field(last, "type") == "function_call_output":
            said = user_texts(items)
            text = f"[{self.name}] {len(said)} message(s) on this ticket: " + " | ".join(said)
            output: Any = ResponseOutputMessage(
                id=f"msg_{self.name}_{n}",
                type="message",
                role="assistant",
                status="completed",
                content=[ResponseOutputText(type="output_text", text=text, annotations=[])],
            )
        else:
            output = ResponseFunctionToolCall(
                type="function_call",
                id=f"fc_{self.name}_{n}",
                call_id=f"call_{self.name}_{n}",
                name="file_note",
                arguments=json.dumps({"text": str(_field(last, "content"))}),
            )
        return ModelResponse(output=[output], usage=Usage(), response_id=None)

    def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        raise NotImplementedError("this example runs without streaming")


def desk_agent(name: str) -> Agent[Any]:
    return Agent(
        name=name,
        instructions="File a note for every message, then summarise the ticket.",
        model=ScriptedModel(name),
        tools=[file_note],
    )


async def turn(bus: AsyncBus, agent: Agent[Any], text: str) -> str:
    """One turn of ``agent`` on the ticket: history from the bus, new items to it."""
    session = SBusSession(TICKET, bus)
    result = await Runner.run(agent, text, session=session, run_config=RUN_CONFIG)
    return str(result.final_output)


async def run(front: AsyncBus, back: AsyncBus) -> list[str]:
    """The story; returns the lines it prints."""
    desk, expert = desk_agent("desk"), desk_agent("expert")
    # A new ticket each run: on a running bus an earlier run's conversation is still there.
    await SBusSession(TICKET, front).clear_session()
    lines = [
        await turn(front, desk, "The printer on floor 3 is on fire."),
        await turn(back, expert, "It is out now, but it smells."),
    ]
    # Both processes answer at once: each run appends its items while the other does.
    lines += await asyncio.gather(
        turn(front, desk, "Who pays for the new printer?"),
        turn(back, expert, "Please order a fan."),
    )
    history = await SBusSession(TICKET, front).get_items()
    kinds = [str(_field(i, "type") or _field(i, "role")) for i in history]
    lines.append(f"{len(history)} items on the bus: " + ", ".join(kinds))
    lines.append("user messages kept: " + " | ".join(user_texts(history)))
    return lines
