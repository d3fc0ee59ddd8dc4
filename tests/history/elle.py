"""Export a history in Elle's rw-register JSON form, and validate it against the schema
kept in ``schemas/elle-rw-register.schema.json``.

Every operation becomes a transaction (``f: "txn"``) with an invocation event and a
completion event. A key is a shard key and a value is a shard version: versions are
unique per key because the bus assigns them, which is what rw-register needs to
recover the version order. A commit reads the versions of its validated read set and
of its guards (``["r", k, v]``) and writes the versions it installed (``["w", k, v]``),
so Elle sees "read v, then wrote v + 1" for every guarded key.

Choices, documented in docs/isolation.md: a failed commit carries no writes (the bus
never assigned it a version); an attempt of unknown outcome carries the writes a replay
of its retry revealed, else none; an idempotent replay is left out (it repeats an
earlier answer and installs nothing); reads ORI did not validate are left out, as reads
obtained outside the bus would be.

The JSON Schema checks each event's shape; :func:`structure_errors` checks what Elle
relies on across events: ``index`` is the position, time never goes back, a process
has one operation at a time and never sends again after an ``info``, each completion
repeats its invocation's micro-operations, and no two writes install one value of a key.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from tests.history.record import Op

SCHEMA_PATH = Path(__file__).parent / "schemas" / "elle-rw-register.schema.json"
HISTORY_SCHEMA_PATH = Path(__file__).parent / "schemas" / "history.schema.json"

Mop = list[Any]


def _mops(op: Op, completed: bool) -> list[Mop]:
    reads: list[Mop] = [["r", k, v if completed else None] for k, v in op.validated_reads()]
    if op.op == "get":
        reads = [["r", k, v if completed else None] for k, v in op.reads]
    # ok: what it installed; info: what a replay of its retry showed it installed, if any.
    writes: list[Mop] = [["w", k, v] for k, v in op.writes] if op.result != "fail" else []
    return reads + writes


def to_elle(ops: list[Op]) -> list[dict[str, Any]]:
    events: list[tuple[int, int, int, dict[str, Any]]] = []
    end = max((op.complete_ns or op.invoke_ns for op in ops), default=0)
    for op in ops:
        if op.replay:
            continue
        events.append((op.invoke_ns, op.index, 0, _event(op, "invoke", op.invoke_ns, False)))
        done = op.complete_ns if op.complete_ns is not None else end
        events.append((done, op.index, 1, _event(op, op.result, done, op.result == "ok")))
    events.sort(key=lambda e: e[:3])
    out = []
    for i, (_, _, _, event) in enumerate(events):
        event["index"] = i
        out.append(event)
    return out


def _event(op: Op, kind: str, time_ns: int, completed: bool) -> dict[str, Any]:
    return {
        "index": 0,
        "time": time_ns,
        "process": op.process,
        "type": kind,
        "f": "txn",
        "value": _mops(op, completed),
    }


def structure_errors(events: list[dict[str, Any]]) -> list[str]:
    errors: list[str] = []
    open_ops: dict[int, dict[str, Any]] = {}
    crashed: set[int] = set()
    written: dict[tuple[str, Any], int] = {}
    last_time = 0
    for position, event in enumerate(events):
        process, kind = event["process"], event["type"]
        where = f"event {position} (process {process})"
        if event["index"] != position:
            errors.append(f"{where}: index {event['index']} is not its position")
        if event["time"] < last_time:
            errors.append(f"{where}: time goes back")
        last_time = max(last_time, event["time"])
        if kind == "invoke":
            if process in open_ops:
                errors.append(f"{where}: invoked while its previous operation is open")
            if process in crashed:
                errors.append(f"{where}: invoked after an info completion")
            open_ops[process] = event
            continue
        invoke = open_ops.pop(process, None)
        if invoke is None:
            errors.append(f"{where}: {kind} without an invocation")
            continue
        if [m[:2] for m in invoke["value"]] != [m[:2] for m in event["value"]] or [
            m for m in invoke["value"] if m[0] == "w"
        ] != [m for m in event["value"] if m[0] == "w"]:
            errors.append(f"{where}: completion does not repeat its invocation")
        if kind == "info":
            crashed.add(process)
        if kind in ("ok", "info"):
            for mop in event["value"]:
                if mop[0] == "w":
                    pair = (mop[1], mop[2])
                    if pair in written:
                        errors.append(
                            f"{where}: {mop[1]}={mop[2]} already written at event {written[pair]}"
                        )
                    written[pair] = position
    errors.extend(f"process {p}: invocation never completed" for p in sorted(open_ops))
    return errors


@cache
def _validator(path: Path) -> Draft202012Validator:
    schema = json.loads(path.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def elle_errors(document: Any) -> list[str]:
    """Schema violations of an Elle export (empty when it conforms)."""
    return [_message(err) for err in _validator(SCHEMA_PATH).iter_errors(document)]


def history_errors(line: Any) -> list[str]:
    """Schema violations of one ndjson history line."""
    return [_message(err) for err in _validator(HISTORY_SCHEMA_PATH).iter_errors(line)]


def _message(err: Any) -> str:
    where = "/".join(str(p) for p in err.absolute_path)
    return f"{where or '<root>'}: {err.message}"


def export(ops: list[Op], path: Path) -> list[dict[str, Any]]:
    """Write the Elle export of ``ops`` to ``path`` after validating it."""
    document = to_elle(ops)
    errors = elle_errors(document) + structure_errors(document)
    if errors:
        raise ValueError("Elle export does not match its schema: " + "; ".join(errors[:5]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, separators=(",", ":")))
    return document
