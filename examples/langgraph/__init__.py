"""SBusStore in a LangGraph graph: an LLM proposes, a short node applies under
RetryPolicy, so a conflict never calls the model again (``python -m examples.langgraph``)."""
