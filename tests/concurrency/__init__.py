"""Concurrency tests against real ``sbus serve`` processes on loopback ports."""
