"""Metrics, request ids and logs, and tracing (OpenTelemetry, when it is on)."""
