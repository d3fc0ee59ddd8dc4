"""Two scripted agents sharing state through the S-Bus MCP server (no LLM key)."""
