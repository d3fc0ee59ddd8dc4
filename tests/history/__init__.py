"""History recording and isolation checking for the bus (issue 5; docs/isolation.md).

``record`` turns client-side observations into ndjson histories, ``check`` verifies
WWSerial, ORILegal, NoWriteSkew (Adya's dependency graph) and MandateConsumeOnce on
them, ``elle`` exports them in Elle's rw-register JSON form, and ``client`` records
every request of an ``httpx.Client`` transparently. ``python -m tests.history`` runs
the checker and the export on saved files.
"""
