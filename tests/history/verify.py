"""The whole pipeline a test runs on a history it recorded: the ndjson round trip (each
line valid against ``schemas/history.schema.json``), every check of ``check``, and the
Elle export (valid against its schema). With ``SBUS_HISTORY_DIR`` set, both files are
kept there for offline checking (``python -m tests.history``, or Elle where it exists).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from tests.history.check import Summary, assert_clean
from tests.history.elle import elle_errors, history_errors, structure_errors, to_elle
from tests.history.record import Op, dumps, loads

KEEP_ENV = "SBUS_HISTORY_DIR"


def verify(ops: Sequence[Op], *, realtime: bool = True, label: str = "history") -> Summary:
    text = dumps(ops)
    for number, line in enumerate(text.splitlines(), 1):
        errors = history_errors(json.loads(line))
        assert not errors, f"{label}: ndjson line {number} breaks the schema: {errors[:3]}"
    again = loads(text)
    assert again == list(ops), f"{label}: the ndjson round trip changed the history"
    summary = assert_clean(again, realtime=realtime, label=label)
    document = to_elle(again)
    errors = elle_errors(document)
    assert not errors, f"{label}: the Elle export breaks its schema: {errors[:3]}"
    errors = structure_errors(document)
    assert not errors, f"{label}: the Elle export is not a well-formed history: {errors[:3]}"
    keep = os.environ.get(KEEP_ENV)
    if keep:
        stem = Path(keep) / re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".ndjson").write_text(text)
        stem.with_suffix(".elle.json").write_text(json.dumps(document, separators=(",", ":")))
    return summary
