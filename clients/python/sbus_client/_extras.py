"""A clear error when an optional part is imported without its extra.

Without this, ``import sbus_client.mcp`` on a plain ``pip install sbus-client`` fails
deep inside the module with "No module named 'mcp'", which does not say which extra
brings it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def needs_extra(extra: str, part: str) -> Iterator[None]:
    """Around the imports of ``part`` (a module of this package): a missing third-party
    module becomes a ModuleNotFoundError naming ``pip install 'sbus-client[<extra>]'``."""
    try:
        yield
    except ModuleNotFoundError as missing:
        if (missing.name or "").partition(".")[0] == "sbus_client":
            raise  # our own bug, not a missing extra
        raise ModuleNotFoundError(
            f"{part} needs the '{extra}' extra ({missing.name} is not installed): "
            f"pip install 'sbus-client[{extra}]'",
            name=missing.name,
        ) from missing
