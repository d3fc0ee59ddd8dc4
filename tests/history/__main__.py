"""Check saved histories offline, and export them for Elle.

    python -m tests.history check [--in-order] FILE.ndjson...
    python -m tests.history elle FILE.ndjson OUT.json

``check`` prints each violation and exits 1 if there is any (``--in-order`` takes the
file's index order as the commit order, for sequential histories). ``elle`` writes the
rw-register export, validated against its schema.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.history.check import check, summarize
from tests.history.elle import export
from tests.history.record import load


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "check":
        in_order = "--in-order" in argv
        bad = 0
        for name in [a for a in argv[1:] if a != "--in-order"]:
            ops = load(Path(name))
            found = check(ops, realtime=not in_order)
            print(f"{name}: {summarize(ops)}; {len(found)} violation(s)")
            for v in found:
                print(f"  {v.check} [{v.anomaly}] {v.detail} (ops {list(v.ops)})")
            bad += len(found)
        return 1 if bad else 0
    if len(argv) == 3 and argv[0] == "elle":
        document = export(load(Path(argv[1])), Path(argv[2]))
        print(f"{argv[2]}: {len(document)} events")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
