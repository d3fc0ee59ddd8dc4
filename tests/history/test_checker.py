"""The checker must find each anomaly it claims to check, by name, on a small history that
has exactly that anomaly, and stay quiet on the legal neighbour of each: a checker that
cannot fail would make every history test vacuous."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.history.check import (
    assert_clean,
    check,
    dependency_cycles,
    dependency_graph,
    ori_legal,
    summarize,
)
from tests.history.elle import elle_errors, history_errors, structure_errors, to_elle
from tests.history.record import History, Op, OpKind, Result, dumps, loads
from tests.history.verify import verify


def mk(
    index: int,
    op: OpKind,
    *,
    t: tuple[int, int],
    reads: list[tuple[str, int]] | None = None,
    guards: list[tuple[str, int | None]] | None = None,
    writes: list[tuple[str, int]] | None = None,
    result: Result = "ok",
    ori: bool = True,
    mandate: str | None = None,
    replay: bool = False,
    process: int = 0,
) -> Op:
    return Op(
        index=index,
        process=process,
        agent=f"agent{process}",
        session="",
        op=op,
        invoke_ns=t[0],
        complete_ns=t[1],
        reads=reads or [],
        guards=guards or [],
        writes=writes if writes is not None else [],
        result=result,
        status={"ok": 200, "fail": 409, "info": None}[result],
        error="CrossShardStale" if result == "fail" else None,
        ori=ori,
        mandate=mandate,
        replay=replay,
    )


def seed(*keys: str) -> list[Op]:
    return [
        mk(i, "create", t=(i * 10, i * 10 + 1), guards=[(k, None)], writes=[(k, 0)])
        for i, k in enumerate(keys)
    ]


def names(found: list[Any]) -> set[tuple[str, str]]:
    return {(v.check, v.anomaly) for v in found}


def serial_history() -> list[Op]:
    """Two agents, each reads both keys and commits its own, one after the other: the
    second re-read the first's write, so everything is legal."""
    ops = seed("x", "y")
    ops += [
        mk(2, "get", t=(100, 101), reads=[("y", 0)]),
        mk(3, "commit", t=(110, 111), reads=[("y", 0)], guards=[("x", 0)], writes=[("x", 1)]),
        mk(4, "get", t=(120, 121), reads=[("x", 1)], process=1),
        mk(5, "commit", t=(130, 131), reads=[("x", 1)], guards=[("y", 0)], writes=[("y", 1)]),
        mk(6, "commit", t=(140, 141), reads=[("x", 0)], guards=[("y", 0)], result="fail"),
    ]
    return ops


@pytest.mark.parametrize("realtime", [True, False])
def test_a_serial_history_is_clean_and_not_empty(realtime: bool) -> None:
    ops = serial_history()
    assert check(ops, realtime=realtime) == []
    summary = assert_clean(ops, realtime=realtime)
    assert summary.committed_writes == 4
    assert summary.refused_writes == 1
    assert summary.validated_reads == 4
    graph = dependency_graph(ops)
    # create x -> commit x (ww and wr through the guard); commit x -> the GET and the
    # commit of y that read x@1 (wr), and it read y@0, which that commit overwrote (rw);
    # the GET of y@0 anti-depends on the commit that installed y@1.
    assert graph[3] == {4: {"wr"}, 5: {"wr", "rw"}}
    assert graph[2] == {5: {"rw"}}
    assert graph[0][3] == {"ww", "wr"}
    assert summary.edges == sum(len(v) for v in graph.values())


def test_two_commits_installing_one_version() -> None:
    ops = seed("x")
    ops += [
        mk(1, "commit", t=(20, 30), guards=[("x", 0)], writes=[("x", 1)], process=1),
        mk(2, "commit", t=(21, 31), guards=[("x", 0)], writes=[("x", 1)], process=2),
    ]
    assert ("WWSerial", "duplicate-version") in names(check(ops))


def test_a_replay_is_not_a_second_write() -> None:
    ops = seed("x")
    ops += [
        mk(1, "commit", t=(20, 30), guards=[("x", 0)], writes=[("x", 1)]),
        mk(2, "commit", t=(40, 41), guards=[("x", 0)], writes=[("x", 1)], replay=True),
    ]
    assert check(ops) == []


def test_lost_update_and_version_order() -> None:
    ops = seed("x")
    ops += [mk(1, "commit", t=(20, 30), guards=[("x", 0)], writes=[("x", 2)])]
    assert names(check(ops)) >= {("WWSerial", "lost-update")}
    ops = seed("x")
    ops += [
        mk(1, "commit", t=(20, 30), guards=[("x", 1)], writes=[("x", 2)]),
        mk(2, "commit", t=(40, 50), guards=[("x", 0)], writes=[("x", 1)]),
    ]
    found = check(ops)
    assert ("WWSerial", "version-order") in names(found)
    # Over a global order the same history is merely out of order: no real-time claim.
    assert ("WWSerial", "version-order") not in names(check(ops, realtime=False))


def test_reading_a_version_nobody_committed() -> None:
    ops = seed("y")
    ops += [
        mk(1, "commit", t=(20, 30), guards=[("y", 0)], result="fail"),
        mk(2, "get", t=(40, 41), reads=[("y", 1)]),
    ]
    assert names(check(ops)) == {("G1a", "aborted-read")}
    # A key the history never created may be read at versions below its first write.
    ops = [
        mk(0, "get", t=(1, 2), reads=[("z", 3)]),
        mk(1, "commit", t=(3, 4), guards=[("z", 3)], writes=[("z", 4)]),
    ]
    assert check(ops) == []
    # ... unless a write of unknown outcome may have installed it: the version after
    # its guard, not any other.
    ops = [*seed("y"), mk(1, "commit", t=(5, 6), guards=[("y", 0)], result="info")]
    ops.append(mk(2, "get", t=(7, 8), reads=[("y", 1)]))
    assert check(ops) == []
    ops[2] = mk(2, "get", t=(7, 8), reads=[("y", 2)])
    assert names(check(ops)) == {("G1a", "aborted-read")}
    # An unguarded write of unknown outcome (a rollback without expected_version) may
    # have installed any version of its key.
    ops[1] = mk(1, "rollback", t=(5, 6), guards=[("y", None)], result="info")
    assert check(ops) == []


def test_a_replay_reveals_what_an_unknown_attempt_installed() -> None:
    history = History()
    first = history.append(mk(0, "commit", t=(1, 2), guards=[("x", 0)], result="info"))
    first.idem = "k1"
    retry = history.append(
        mk(0, "commit", t=(3, 4), guards=[("x", 0)], writes=[("x", 1)], replay=True)
    )
    retry.idem = "k1"
    history.resolve_retry(retry)
    assert (first.result, first.writes) == ("info", [("x", 1)])
    document = to_elle(history.ops)
    assert structure_errors(document) == []
    assert [e["value"] for e in document] == [[["r", "x", None], ["w", "x", 1]]] * 2
    assert [e["type"] for e in document] == ["invoke", "info"]


def test_a_stale_get_after_a_completed_write() -> None:
    ops = seed("x")
    ops += [
        mk(1, "commit", t=(20, 30), guards=[("x", 0)], writes=[("x", 1)]),
        mk(2, "get", t=(40, 41), reads=[("x", 0)], process=1),
    ]
    assert names(check(ops)) == {("ReadRecency", "stale-get")}
    # Concurrent with the write, either version is a legal answer.
    ops[-1] = mk(2, "get", t=(25, 41), reads=[("x", 0)], process=1)
    assert check(ops) == []
    ops[-1] = mk(2, "get", t=(25, 41), reads=[("x", 1)], process=1)
    assert check(ops) == []
    # But not a version whose writer was sent after the GET's answer came back.
    ops[-1] = mk(2, "get", t=(5, 15), reads=[("x", 1)], process=1)
    assert names(check(ops)) == {("ReadRecency", "future-read")}


def stale_commit(ori: bool, t: tuple[int, int]) -> list[Op]:
    """Agent 1 read y@0; agent 0 installed y@1; agent 1 then commits x on y@0."""
    ops = seed("x", "y")
    ops += [
        mk(2, "get", t=(20, 21), reads=[("y", 0)], process=1),
        mk(3, "commit", t=(30, 40), guards=[("y", 0)], writes=[("y", 1)]),
        mk(4, "commit", t=t, reads=[("y", 0)], guards=[("x", 0)], writes=[("x", 1)], ori=ori),
    ]
    ops[-1].process = 1
    return ops


def test_ori_legal_real_time() -> None:
    found = check(stale_commit(True, (50, 60)))
    assert ("ORILegal", "stale-read-admitted") in names(found)
    # Sent while y@1 was still in flight: the real-time form cannot blame it.
    assert ori_legal(stale_commit(True, (35, 60))) == []
    # ... but the commit order can (the history's index order here).
    assert len(ori_legal(stale_commit(True, (35, 60)), realtime=False)) == 1
    # With ORI off the bus never promised to validate the read.
    assert ori_legal(stale_commit(False, (50, 60))) == []


def test_write_skew_is_g2_item() -> None:
    ops = seed("x", "y")
    ops += [
        mk(2, "commit", t=(20, 40), reads=[("y", 0)], guards=[("x", 0)], writes=[("x", 1)]),
        mk(3, "commit", t=(21, 41), reads=[("x", 0)], guards=[("y", 0)], writes=[("y", 1)]),
    ]
    ops[-1].process = 1
    found = check(ops)
    assert names(found) == {("NoWriteSkew", "G2-item")}
    assert found[0].ops == (2, 3)
    assert "2 -rw-> 3 -rw-> 2" in found[0].detail
    # Neither commit saw the other complete: real-time ORILegal cannot see write skew.
    assert ori_legal(ops) == []
    # The same history with ORI off is the bus's documented behaviour: not flagged.
    for op in ops[2:]:
        op.ori = False
    assert check(ops) == []


def test_read_skew_is_g_single() -> None:
    ops = seed("x", "y", "z")
    ops += [
        mk(3, "multi", t=(20, 30), guards=[("x", 0), ("y", 0)], writes=[("x", 1), ("y", 1)]),
        mk(
            4,
            "commit",
            t=(21, 40),
            reads=[("x", 0), ("y", 1)],
            guards=[("z", 0)],
            writes=[("z", 1)],
        ),
    ]
    assert ("NoWriteSkew", "G-single") in names(dependency_cycles(ops))


def test_circular_information_flow_is_g1c() -> None:
    ops = seed("x", "y")
    ops += [
        mk(2, "commit", t=(20, 40), reads=[("y", 1)], guards=[("x", 0)], writes=[("x", 1)]),
        mk(3, "commit", t=(21, 41), reads=[("x", 1)], guards=[("y", 0)], writes=[("y", 1)]),
    ]
    assert ("NoWriteSkew", "G1c") in names(dependency_cycles(ops))


def test_dirty_write_cycle_is_g0() -> None:
    ops = seed("x", "y")
    ops += [
        mk(2, "multi", t=(20, 40), writes=[("x", 1), ("y", 2)]),
        mk(3, "multi", t=(21, 41), writes=[("x", 2), ("y", 1)]),
    ]
    found = dependency_cycles(ops)
    assert names(found) == {("NoWriteSkew", "G0")}
    assert "-ww->" in found[0].detail


def test_a_mandate_admitting_two_commits() -> None:
    ops = seed("x", "y")
    ops += [
        mk(2, "commit", t=(20, 30), guards=[("x", 0)], writes=[("x", 1)], mandate="m1"),
        mk(3, "commit", t=(21, 31), guards=[("y", 0)], writes=[("y", 1)], mandate="m1"),
    ]
    assert names(check(ops)) == {("MandateConsumeOnce", "reused")}
    ops[3] = mk(3, "commit", t=(21, 31), guards=[("y", 0)], result="fail", mandate="m1")
    assert check(ops) == []


def test_assert_clean_names_the_operations() -> None:
    ops = stale_commit(True, (50, 60))
    with pytest.raises(AssertionError, match=r"ORILegal \[stale-read-admitted\]") as info:
        assert_clean(ops, label="demo")
    assert '"index": 4' in str(info.value)


# --- ndjson, its schema, and the Elle export ----------------------------------------


def test_ndjson_round_trip_and_schema() -> None:
    ops = serial_history()
    text = dumps(ops)
    assert loads(text) == ops
    for line in text.splitlines():
        assert history_errors(json.loads(line)) == []
    bad = json.loads(text.splitlines()[3])
    del bad["guards"]
    bad["op"] = "upsert"
    errors = history_errors(bad)
    assert any("'guards' is a required property" in e for e in errors)
    assert any("upsert" in e for e in errors)


def test_history_records_times_and_unfinished_operations() -> None:
    history = History()
    first = history.begin(0, "a", "", "commit")
    second = history.begin(1, "b", "s", "get", ori=False)
    history.end(second, "fail", 404, "ShardNotFound")
    assert [op.index for op in history] == [0, 1]
    assert second.complete_ns is not None and second.complete_ns >= second.invoke_ns
    assert (first.result, first.complete_ns) == ("info", None)
    assert loads(history.dumps()) == history.ops


def test_elle_export_shape() -> None:
    ops = serial_history()
    ops.append(mk(7, "commit", t=(150, 151), guards=[("x", 1)], writes=[("x", 2)], replay=True))
    document = to_elle(ops)
    assert elle_errors(document) == []
    assert [e["index"] for e in document] == list(range(len(document)))
    assert len(document) == 2 * 7  # the replay is left out
    commit = [e for e in document if e["time"] in (110, 111)]
    assert commit == [
        {
            "index": commit[0]["index"],
            "time": 110,
            "process": 0,
            "type": "invoke",
            "f": "txn",
            "value": [["r", "y", None], ["r", "x", None], ["w", "x", 1]],
        },
        {
            "index": commit[0]["index"] + 1,
            "time": 111,
            "process": 0,
            "type": "ok",
            "f": "txn",
            "value": [["r", "y", 0], ["r", "x", 0], ["w", "x", 1]],
        },
    ]
    failed = [e for e in document if e["time"] == 141]
    assert failed[0]["type"] == "fail"
    assert failed[0]["value"] == [["r", "x", None], ["r", "y", None]]


@pytest.mark.parametrize(
    ("event", "complaint"),
    [
        ({"type": "ok", "value": [["w", "x", None]]}, "is not valid"),
        ({"type": "ok", "value": [["r", "x", None]]}, "None is not of type 'integer'"),
        ({"type": "invoke", "value": [["r", "x", 3]]}, "3 is not of type 'null'"),
        ({"type": "done"}, "'done' is not one of"),
        ({"f": "read"}, "'txn' was expected"),
        ({"value": [["cas", "x", 1]]}, "is not valid"),
        ({"time": -1}, "-1 is less than the minimum"),
    ],
)
def test_elle_schema_rejects(event: dict[str, Any], complaint: str) -> None:
    base = {"index": 0, "time": 5, "process": 0, "type": "ok", "f": "txn", "value": []}
    errors = elle_errors([{**base, **event}])
    assert any(complaint in e for e in errors), errors


def test_verify_keeps_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SBUS_HISTORY_DIR", str(tmp_path))
    summary = verify(serial_history(), label="demo/serial")
    assert summary == summarize(serial_history())
    assert loads((tmp_path / "demo_serial.ndjson").read_text()) == serial_history()
    assert elle_errors(json.loads((tmp_path / "demo_serial.elle.json").read_text())) == []


def test_cli_check_and_export(tmp_path: Path) -> None:
    clean, dirty = tmp_path / "clean.ndjson", tmp_path / "dirty.ndjson"
    clean.write_text(dumps(serial_history()))
    dirty.write_text(dumps(stale_commit(True, (50, 60))))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tests.history", *args], capture_output=True, text=True
        )

    assert run("check", str(clean)).returncode == 0
    bad = run("check", str(dirty))
    assert bad.returncode == 1
    assert "ORILegal [stale-read-admitted]" in bad.stdout
    out = tmp_path / "clean.elle.json"
    assert run("elle", str(clean), str(out)).returncode == 0
    assert elle_errors(json.loads(out.read_text())) == []
    assert run("nonsense").returncode == 2
    assert run("check").returncode == 2  # no file: a usage error, not a traceback
    for command in ("check", "elle"):
        helped = run(command, "--help")
        assert helped.returncode == 0, helped.stderr
        assert f"usage: python -m tests.history {command}" in helped.stdout
    assert "--in-order" in run("check", "--help").stdout


def test_cli_file_problems_are_one_line(tmp_path: Path) -> None:
    """A file that cannot be read or written, or is not a history: one line naming it
    on stderr and exit 2, never a traceback."""
    clean, garbage = tmp_path / "clean.ndjson", tmp_path / "garbage.ndjson"
    clean.write_text(dumps(serial_history()))
    garbage.write_text("{not json\n")
    (tmp_path / "file").write_text("")
    missing = tmp_path / "nonexistent"
    cases = [
        (("check", str(missing)), f"cannot read {missing}: No such file or directory"),
        (("check", str(clean), str(tmp_path)), f"cannot read {tmp_path}: Is a directory"),
        (("check", str(garbage)), f"{garbage} is not a recorded history"),
        (("elle", str(missing), str(tmp_path / "out.json")), f"cannot read {missing}"),
        (("elle", str(clean), str(tmp_path / "file" / "out.json")), "cannot write"),
    ]
    for args, needle in cases:
        done = subprocess.run(
            [sys.executable, "-m", "tests.history", *args], capture_output=True, text=True
        )
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr, args
        lines = done.stderr.splitlines()
        assert len(lines) == 1, (args, lines)
        assert lines[0].startswith("python -m tests.history: " + needle), (args, lines)


def events(*spec: tuple[int, str, list[Any]]) -> list[dict[str, Any]]:
    """Elle events from (process, type, value), one nanosecond apart."""
    return [
        {"index": i, "time": i, "process": p, "type": kind, "f": "txn", "value": value}
        for i, (p, kind, value) in enumerate(spec)
    ]


W0: list[Any] = [["w", "x", 0]]


def test_structure_errors_catch_what_the_schema_cannot() -> None:
    assert structure_errors(events((0, "invoke", W0), (0, "ok", W0))) == []
    assert structure_errors(events((0, "invoke", W0), (0, "info", W0))) == []
    cases = {
        "not its position": [{**events((0, "invoke", W0))[0], "index": 3}],
        "time goes back": [
            *events((0, "invoke", W0)),
            {**events((0, "invoke", W0), (0, "ok", W0))[1], "time": -1},
        ],
        "previous operation is open": events((0, "invoke", W0), (0, "invoke", W0)),
        "does not repeat its invocation": events((0, "invoke", W0), (0, "ok", [["w", "x", 1]])),
        "x=0 already written": events(
            (0, "invoke", W0), (0, "ok", W0), (1, "invoke", W0), (1, "ok", W0)
        ),
        "after an info completion": events(
            (0, "invoke", W0), (0, "info", W0), (0, "invoke", []), (0, "ok", [])
        ),
        "without an invocation": events((0, "ok", W0)),
        "never completed": events((0, "invoke", W0)),
    }
    for complaint, history in cases.items():
        found = structure_errors(history)
        assert any(complaint in e for e in found), (complaint, found)
