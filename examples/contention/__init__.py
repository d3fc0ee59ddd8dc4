"""Contention demo: N agents share state three ways (a JSON file, per-key CAS, the bus)
under a forced worst interleaving; only the bus loses nothing and keeps the invariant.
Run it with ``make demo``; see README.md here."""

from examples.contention.demo import Result, render, run
from examples.contention.workloads import Row

__all__ = ["Result", "Row", "render", "run"]
