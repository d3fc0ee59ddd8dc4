"""The repository itself: the licence the package declares is the one shipped, and the
private keys the README has users write are never committed by accident."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_license_file_is_the_declared_apache_2() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert declared == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text.splitlines()[1]
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "APPENDIX: How to apply the Apache License to your work." in text


def test_private_key_files_are_ignored_by_git() -> None:
    for name in ("sbus-key.pem", "keys/other.pem"):
        done = subprocess.run(
            ["git", "check-ignore", "--no-index", "-q", name], cwd=ROOT, check=False
        )
        assert done.returncode == 0, f"{name} is not ignored"
    done = subprocess.run(["git", "check-ignore", "-q", "README.md"], cwd=ROOT, check=False)
    assert done.returncode == 1


def test_the_virtualenv_is_never_tracked_whatever_its_kind() -> None:
    """A worktree whose .venv is a symlink once committed it ('.venv/' matches only a
    directory), and checking that commit out replaced other worktrees' virtualenvs."""
    # examples/.venv does not exist, so git cannot see it is a directory: as a symlink.
    for name in (".venv", ".venv/bin/python", "examples/.venv"):
        done = subprocess.run(
            ["git", "check-ignore", "--no-index", "-q", name], cwd=ROOT, check=False
        )
        assert done.returncode == 0, f"{name} is not ignored"
    tracked = subprocess.run(
        ["git", "ls-files", "--", ".venv"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    assert tracked == b""


def test_every_phony_make_target_has_a_rule() -> None:
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.MULTILINE)
    assert phony is not None
    rules = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, re.MULTILINE))
    missing = [name for name in phony.group(1).split() if name not in rules]
    assert missing == [], f".PHONY targets without a rule: {missing}"


def test_every_client_package_ships_in_the_distribution() -> None:
    """setuptools installs only the packages listed, so a subpackage (an integration such
    as sbus_client.langgraph) missing from the list works editable and is absent from a
    real ``pip install ./clients/python``."""
    client = ROOT / "clients" / "python"
    listed = tomllib.loads((client / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]
    found = sorted(
        ".".join(init.parent.relative_to(client).parts)
        for init in (client / "sbus_client").rglob("__init__.py")
    )
    assert sorted(listed) == found
