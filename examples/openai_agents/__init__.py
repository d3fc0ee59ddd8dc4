"""An OpenAI Agents SDK help desk whose conversation is an ``SBusSession`` on the bus
(``python -m examples.openai_agents``); scripted model, no LLM key."""

from examples.openai_agents.desk import ScriptedModel, run

__all__ = ["ScriptedModel", "run"]
