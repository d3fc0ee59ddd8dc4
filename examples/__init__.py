"""Runnable examples of the S-Bus client. Each needs nothing running and no LLM key;
the test suite runs every one."""
