"""Real peers the tests run against, and what happens when one is missing.

``make test`` installs them (Debian packages, as root). Locally a missing peer
skips its tests; under CI (``CI=true``) it fails them, so a CI run can never go
green by skipping the real-process tests.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
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


#: Ports handed out by :func:`free_port` in this process (never twice).
_HANDED: set[int] = set()


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (32768 when unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, below the kernel's ephemeral range.

    A port from ``bind(0)`` is an ephemeral one: between its check here and the
    peer's own bind, any outgoing connection on the machine may take it (seen
    in a clean-clone run: Orthanc's HTTP port "already in use"). Ports below
    the ephemeral range are never given to outgoing connections, so one is
    drawn there at random, checked by binding it, and not handed out twice.
    """
    low = _ephemeral_low()
    draw = random.SystemRandom()
    for _ in range(200):
        port = draw.randrange(max(1024, low - 12000), low)
        if port in _HANDED:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED.add(port)
        return port
    with socket.socket() as s:  # a crowded range: the kernel's choice after all
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
