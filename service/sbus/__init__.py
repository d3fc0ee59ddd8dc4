"""S-Bus: an HTTP state bus with observable-read isolation for multi-agent LLM systems."""

__version__ = "0.1.0"

# The wire protocol's major version (GET /version, protocol.md section 2.11): raised only
# by a change an existing client cannot follow, so a client warns on any other value.
API_VERSION = 1
