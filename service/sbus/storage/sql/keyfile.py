"""The open-mode signing secret of an SQLite deployment, kept in a file beside the
database (``<database>.key``, mode 0600) rather than in it: a copy of the database
handed on for debugging then carries nothing that signs for the deployment.

Every process that opens the database reads the same file, so a mandate one of them
issues verifies in all. The file appears whole or not at all: the secret is written
to a private temporary file (created with ``O_EXCL``, 0600) in the same directory and
hard-linked into place, which fails when the file already exists. Of processes racing
to make it exactly one succeeds, and every one of them then reads the winner's.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from sbus.core.errors import StoreMisconfigured

MODE = 0o600


def key_path(database: str) -> Path:
    return Path(database + ".key")


def shared_secret(path: Path, candidate: bytes) -> bytes:
    """The secret kept in ``path``, after storing ``candidate`` there if there was none.
    Raises :class:`OSError` (the caller's store error) or :class:`StoreMisconfigured`
    for a file that holds no secret."""
    if not path.exists():
        _create(path, candidate)
    return _read(path)


def _create(path: Path, secret: bytes) -> None:
    scratch = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, MODE)
    try:
        os.fchmod(fd, MODE)  # the umask may only have narrowed it; make it exact
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(secret.hex() + "\n")
            out.flush()
            os.fsync(out.fileno())
        # The loser of a race gets FileExistsError and reads the winner's.
        with contextlib.suppress(FileExistsError):
            os.link(scratch, path)
            _sync_directory(path.parent)
    finally:
        scratch.unlink(missing_ok=True)


def _sync_directory(directory: Path) -> None:
    """Make the new name durable, so a crash cannot bring back a database whose
    processes signed with a key that is gone."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    text = path.read_bytes().strip()
    try:
        secret = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        secret = b""
    if not secret:
        raise StoreMisconfigured(
            f"{path} does not hold an S-Bus signing key (hex digits); remove it and a new "
            "one is made"
        )
    return secret
