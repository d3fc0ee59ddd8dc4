"""Two agents write one shared item through SBusStore: propose (LLM), then apply.

The graph fans out one ``propose`` task per topic: each asks a chat model for a note
(a langchain-core fake model here, so no key is needed). Then one ``apply`` task per
proposal folds it into the shared item ``("team", "notes")``: read, merge, put. The
apply tasks run in parallel, and both read before either writes (a barrier forces that
race every run; a real deployment hits it by chance), so the second put is refused with
a ConflictError. ``apply`` carries a ``RetryPolicy``: LangGraph re-runs it, it reads the
note the other task added, merges again and lands. ``propose`` is not re-run: the model
is called once per topic, however many conflicts the apply step meets.
"""

from __future__ import annotations

import operator
import threading
from dataclasses import dataclass, field
from typing import Annotated, Any, TypedDict

from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import RetryPolicy, Send

from sbus_client import Bus, ConflictError
from sbus_client.langgraph import SBusStore

NOTES = ("team", "notes")
# What the fake model answers for each topic (a real graph would call a real model).
ANSWERS = {
    "caching": "Cache embeddings by content hash.",
    "retries": "Retry on 409, never on 422.",
}


class Topic(TypedDict):
    topic: str


class Proposal(TypedDict):
    note: str


class State(TypedDict, total=False):
    topics: list[str]
    proposals: Annotated[list[str], operator.add]


@dataclass
class Tally:
    """What happened, for the summary: model calls, apply attempts, conflicts."""

    llm_calls: int = 0
    apply_attempts: int = 0
    conflicts: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def build(store: SBusStore, tally: Tally) -> Any:
    both_read = threading.Barrier(len(ANSWERS), timeout=60)

    def propose(task: Topic) -> State:
        """The expensive step: runs once per topic, outside any retry."""
        model = FakeListChatModel(responses=[ANSWERS[task["topic"]]])
        with tally.lock:
            tally.llm_calls += 1
        answer = model.invoke(f"One short engineering note about {task['topic']}.")
        return {"proposals": [str(answer.content)]}

    def apply(task: Proposal, *, runtime: Runtime[None]) -> State:
        """The cheap step: read, merge, put. A conflict raises; RetryPolicy re-runs it."""
        assert runtime.store is not None
        info = runtime.execution_info
        with tally.lock:
            tally.apply_attempts += 1
        current = runtime.store.get(NOTES, "shared")
        notes = list(current.value["notes"]) if current else []
        if info is not None and info.node_attempt == 1:
            both_read.wait()  # force the race: every apply has read before any writes
        try:
            runtime.store.put(NOTES, "shared", {"notes": [*notes, task["note"]]})
        except ConflictError as err:
            with tally.lock:
                tally.conflicts.append(err.code)
            raise
        return {}

    def fan_out_topics(state: State) -> list[Send]:
        return [Send("propose", {"topic": t}) for t in state["topics"]]

    def fan_out_proposals(state: State) -> list[Send]:
        return [Send("apply", {"note": note}) for note in state["proposals"]]

    builder: StateGraph[State, None, State, State] = StateGraph(State)
    # langgraph's add_node overloads reject a TypedDict input schema under mypy, hence Any.
    nodes: dict[str, Any] = {"propose": propose, "apply": apply}
    builder.add_node("propose", nodes["propose"], input_schema=Topic)
    builder.add_node("gather", lambda state: {})
    # RetryPolicy's default retry_on re-runs on ConflictError. (Its default jitter adds
    # up to a second per retry; this demo has one known conflict and does without.)
    retry = RetryPolicy(max_attempts=5, initial_interval=0.05, jitter=False)
    builder.add_node("apply", nodes["apply"], input_schema=Proposal, retry_policy=retry)
    builder.add_conditional_edges(START, fan_out_topics, ["propose"])
    builder.add_edge("propose", "gather")
    builder.add_conditional_edges("gather", fan_out_proposals, ["apply"])
    builder.add_edge("apply", END)
    return builder.compile(store=store)


def run(bus: Bus) -> str:
    """Run the graph on ``bus`` and describe what happened."""
    store = SBusStore(bus, prefix="example")
    store.bind("setup").put(NOTES, "shared", {"notes": []})
    tally = Tally()
    build(store, tally).invoke({"topics": sorted(ANSWERS)})
    item = store.bind("reader").get(NOTES, "shared")
    notes = sorted(item.value["notes"]) if item else []
    lines = ["shared notes:"]
    lines += [f"  - {note}" for note in notes]
    lines += [
        f"model calls: {tally.llm_calls} (one per topic)",
        f"apply attempts: {tally.apply_attempts} "
        f"(conflicts: {', '.join(tally.conflicts) or 'none'}; RetryPolicy re-ran apply only)",
    ]
    return "\n".join(lines)
