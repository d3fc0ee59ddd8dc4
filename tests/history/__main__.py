"""Check saved histories offline, and export them for Elle.

    python -m tests.history check [--in-order] FILE.ndjson...
    python -m tests.history elle FILE.ndjson OUT.json

``check`` prints each violation and exits 1 if there is any (``--in-order`` takes the
file's index order as the commit order, for sequential histories). ``elle`` writes the
rw-register export, validated against its schema. Usage errors, and files that cannot
be read or written, exit 2 with one line on stderr; every command has ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.history.check import check, summarize
from tests.history.elle import export
from tests.history.record import Op, load

PROG = "python -m tests.history"


class FileProblem(Exception):
    """A file that cannot be read (or written, or is not a history): one line, exit 2."""


def _load(path: Path) -> list[Op]:
    try:
        return load(path)
    except OSError as exc:
        raise FileProblem(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        # json, UTF-8 and field errors: a file this tool did not write.
        raise FileProblem(f"{path} is not a recorded history: {exc!r}") from exc


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog=PROG,
        description="Check recorded S-Bus histories (docs/isolation.md) or export them for Elle.",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    checking = commands.add_parser(
        "check",
        help="run the isolation checker; exit 1 on any violation",
        description="Run the isolation checker over each history; exit 1 on any violation.",
    )
    checking.add_argument(
        "--in-order",
        action="store_true",
        help="take each file's index order as the commit order (sequential histories)",
    )
    checking.add_argument("files", nargs="+", type=Path, metavar="FILE.ndjson")
    elle = commands.add_parser(
        "elle",
        help="write the Elle rw-register export of one history",
        description="Write the Elle rw-register export of one history, checked by its schema.",
    )
    elle.add_argument("file", type=Path, metavar="FILE.ndjson")
    elle.add_argument("out", type=Path, metavar="OUT.json")
    return top


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        return _run(args)
    except FileProblem as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "check":
        bad = 0
        for name in args.files:
            ops = _load(name)
            found = check(ops, realtime=not args.in_order)
            print(f"{name}: {summarize(ops)}; {len(found)} violation(s)")
            for v in found:
                print(f"  {v.check} [{v.anomaly}] {v.detail} (ops {list(v.ops)})")
            bad += len(found)
        return 1 if bad else 0
    ops = _load(args.file)
    try:
        document = export(ops, args.out)
    except OSError as exc:
        raise FileProblem(f"cannot write {args.out}: {exc.strerror or exc}") from exc
    print(f"{args.out}: {len(document)} events")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
