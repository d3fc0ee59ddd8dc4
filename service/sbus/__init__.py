"""S-Bus: an HTTP state bus with observable-read isolation for multi-agent LLM systems."""

__version__ = "0.1.0"
