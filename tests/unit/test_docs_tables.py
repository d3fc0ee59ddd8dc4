"""The tables in docs/ that mirror a table in the code stay identical to it.

docs/errors.md is the error table clients read; the server's is the class tree of
``sbus.core.errors`` (and ``sbus.security``) with the status map of
``sbus.api.problems``: every code the server can emit has a row with its status, no row
names a code the server lacks, and every row sits inside the one table. The rights table
of docs/security.md has one row per right of ``sbus.core.rights.Right``."""

from __future__ import annotations

import re
import subprocess
from collections import defaultdict
from pathlib import Path

import sbus.bootstrap  # noqa: F401  (imports every module that defines an error class)
from sbus.api.problems import status_of
from sbus.core import errors as e
from sbus.core.rights import Right

DOCS = Path(__file__).resolve().parents[2] / "docs"
ERRORS_MD = DOCS / "errors.md"
HEADER = "| status | `error` | when | extra fields |"

# Codes of classes that are never sent as such: the roots of the tree, and the key
# configuration error, which refuses startup instead of answering a request.
NOT_EMITTED = {"SBusError", "BadRequest", "StateError", "KeyConfigError"}


def _subclasses(root: type[e.SBusError]) -> list[type[e.SBusError]]:
    found: list[type[e.SBusError]] = []
    for cls in root.__subclasses__():
        found.append(cls)
        found.extend(_subclasses(cls))
    return found


def server_table() -> dict[str, set[int]]:
    """code -> the statuses the server answers it with."""
    table: dict[str, set[int]] = defaultdict(set)
    classes: list[type[e.SBusError]] = [e.SBusError, *_subclasses(e.SBusError)]
    for cls in classes:
        if cls.code in NOT_EMITTED:
            continue
        # status_of only looks at the type; __new__ skips each class's own __init__.
        table[cls.code].add(status_of(cls.__new__(cls)))
    return dict(table)


def table_lines(text: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(HEADER)
    end = start + 2
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[start + 2 : end]


def docs_table() -> dict[str, set[int]]:
    table: dict[str, set[int]] = defaultdict(set)
    for line in table_lines(ERRORS_MD.read_text(encoding="utf-8")):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        codes = re.findall(r"`([A-Za-z]+)`", cells[1])
        assert codes, f"row names no code: {line}"
        for code in codes:
            table[code].add(int(cells[0]))
    return dict(table)


def test_every_server_code_is_documented_with_its_status() -> None:
    server, docs = server_table(), docs_table()
    missing = {code: statuses for code, statuses in server.items() if code not in docs}
    assert missing == {}, f"codes without a row in docs/errors.md: {missing}"
    wrong = {code: (docs[code], server[code]) for code in server if docs[code] != server[code]}
    assert wrong == {}, f"docs/errors.md status != server status (docs, server): {wrong}"


def test_no_row_names_an_unknown_code() -> None:
    unknown = set(docs_table()) - set(server_table())
    assert unknown == set(), f"docs/errors.md rows for codes the server lacks: {unknown}"


def test_every_row_is_inside_the_table() -> None:
    text = ERRORS_MD.read_text(encoding="utf-8")
    inside = set(table_lines(text))
    outside = [line for line in text.splitlines() if line.startswith("|") and line not in inside]
    assert outside == [HEADER, "|---|---|---|---|"]


def test_the_server_table_is_what_the_code_says() -> None:
    """Guard the walk itself: a few known codes with their statuses."""
    server = server_table()
    assert server["CrossShardStale"] == {409}
    assert server["MandateHolderMismatch"] == {403}
    assert server["Unauthorized"] == {401}
    assert server["SigningUnavailable"] == {503}
    assert server["ValidationError"] == {422}
    assert "BadRequest" not in server


def test_security_rights_table_lists_every_right() -> None:
    lines = (DOCS / "security.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("| right | routes |")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line.strip("|").split("|")[0].strip())
    named = {row.split()[0] for row in rows if row != "any valid token"}
    assert named == {right.value for right in Right}


ROOT = DOCS.parent
PAGES = sorted([ROOT / "README.md", ROOT / "loadtest" / "README.md", ROOT / "formal" / "README.md"])
PAGES += sorted(DOCS.glob("*.md"))
# The protocol reference is docs/protocol.md; the documents, and the code and its
# comments, cite nothing outside the repository and speak of no one's role. The
# capitalised acronym is matched as a whole word only: TLA+'s SPECIFICATION keyword and
# the plain word "spec" pass.
OUTSIDE = re.compile(r"\bSPEC\b|(?i:\bthe issue\b|\blead engineer\b|\bthe lead\b|\blead's\b)")
# Every text file of the repository in these places.
SCANNED = ("README.md", "docs", "formal", "service", "tests", "loadtest", "migrations", "scripts")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _scanned_files() -> list[Path]:
    """The text files in SCANNED that git tracks or would (not those it ignores, such
    as .venv or caches)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *SCANNED],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    files = []
    for name in filter(None, listed.split("\0")):
        path = ROOT / name
        if path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            files.append(path)
    return files


def test_the_scan_covers_the_repository() -> None:
    files = {f.relative_to(ROOT).as_posix() for f in _scanned_files()}
    for expected in (
        "README.md",
        "docs/protocol.md",
        "formal/SBus.tla",
        "service/sbus/api/app.py",
        "tests/unit/test_docs_tables.py",
        "loadtest/bench.py",
        "scripts/with-services.sh",
    ):
        assert expected in files, expected
    assert any(name.startswith("migrations/") for name in files)


def test_documents_and_code_cite_only_the_repository() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _scanned_files()
        for number, line in enumerate(
            path.read_text(encoding="utf-8", errors="replace").splitlines(), 1
        )
        if OUTSIDE.search(line)
    ]
    assert found == []


def test_relative_links_resolve() -> None:
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in PAGES
        for target in LINK.findall(page.read_text(encoding="utf-8"))
        if "://" not in target and not (page.parent / target).exists()
    ]
    assert broken == []


# The gate's refusals in the order it makes them (tests/api/test_check_order.py shows it).
GATE_ORDER = [
    "401",
    "403 `HostNotAllowed`",
    "403 `CrossSiteRequest`",
    "422 (a query string",
    "503 `StoreUnavailable`",
    "413 `RequestTooLarge`",
    "400/415/422",
    "403 `AgentMismatch`",
]


def test_order_of_checks_names_the_gate_refusals() -> None:
    text = (DOCS / "errors.md").read_text(encoding="utf-8")
    start = text.index("Order of checks")
    paragraph = " ".join(text[start : text.index("\n\n", start)].split())
    position = 0
    for step in GATE_ORDER:
        assert step in paragraph[position:], (step, paragraph[position:])
        position = paragraph.index(step, position) + len(step)
