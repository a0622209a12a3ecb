"""Real peers the tests run against, and what happens when one is missing.

``make test`` installs them (Debian packages, as root). Locally a missing peer
skips its tests; under CI (``CI=true``) it fails them, so a CI run can never go
green by skipping the real-process tests.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

DCMTK_STORESCU = "/usr/bin/storescu"
DCMTK_ECHOSCU = "/usr/bin/echoscu"
DCMTK_STORESCP = "/usr/bin/storescp"
OPENSSL = "/usr/bin/openssl"


def require(path: str, what: str) -> str:
    """Return ``path`` if it exists; otherwise skip, or fail under CI."""
    if Path(path).exists() or shutil.which(path):
        return path
    message = f"{what} ({path}) is not installed; `make test` installs it when run as root"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
    raise AssertionError("unreachable")


def postgres_bindir() -> Path:
    """The newest Debian PostgreSQL server bin dir, or skip/fail."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        require("/usr/lib/postgresql/*/bin/initdb", "PostgreSQL server (Debian postgresql)")
    return found[-1].parent
