"""The audit chain's head, anchored outside the database.

A keyed chain stops a database writer from re-hashing or forging events, but
not from deleting the newest ones (or all of them): what is left is still a
valid chain. The anchor is a small JSON file (``audit.anchor_file``, default
``<storage.root>/audit/head.json``) naming the newest event known to be
committed: its sequence number and hash, MAC'd with the audit key so it cannot
be written by someone without the key. A chain shorter than its anchor, or
whose event at the anchored sequence number has another hash, was truncated,
wiped or rewritten.

The file is replaced atomically (temp file, fsync, rename, fsync of the
folder) after commits that appended events (at most once a second per
process: :mod:`node.audit.context`), under an exclusive ``flock`` so
processes sharing it (``serve``, the admin CLI) only ever move it forward. It
is written *after* the database commit, so it may lag behind after a crash,
never run ahead: it is a lower bound, and events beyond it are allowed when
their HMACs verify.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from node.audit.keys import Keyring

log = logging.getLogger(__name__)

FORMAT = "sarcnode-audit-head/1"


class AnchorError(Exception):
    """The anchor file exists but cannot be trusted (unreadable, malformed or bad MAC)."""


@dataclass(frozen=True)
class Anchor:
    """What the anchor file says: the newest committed event's seq and hash."""

    seq: int
    hash: str
    key_id: str
    written_at: str


def _signed_bytes(body: dict[str, Any]) -> bytes:
    return (FORMAT + "\x1f" + json.dumps(body, sort_keys=True, separators=(",", ":"))).encode()


class HeadAnchor:
    """The anchor file at ``path``: read it, and move it forward after a commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")

    def __repr__(self) -> str:
        return f"HeadAnchor({str(self.path)!r})"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def exists(self) -> bool:
        """Whether the anchor file exists (an existing one may still be untrustworthy)."""
        return self.path.exists()

    def read(self, keyring: Keyring) -> Anchor | None:
        """The anchor, or None when the file does not exist.

        Raises
        ------
        AnchorError
            The file cannot be read or parsed, is signed by a key the keyring
            does not hold, or its MAC does not match (edited or forged).
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AnchorError(f"cannot read audit anchor {self.path}: {exc.strerror}") from exc
        try:
            data = json.loads(raw)
            body = {k: data[k] for k in ("seq", "hash", "key_id", "written_at")}
            mac = str(data["mac"])
            seq = int(body["seq"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AnchorError(f"audit anchor {self.path} is not a valid anchor file") from exc
        key = keyring.get(str(body["key_id"]))
        if key is None:
            raise AnchorError(
                f"audit anchor {self.path} is signed with key id {body['key_id']}, "
                f"which is not configured ({keyring.source})"
            )
        if mac != key.mac(_signed_bytes(body)):
            raise AnchorError(f"audit anchor {self.path} does not match its MAC (edited)")
        return Anchor(seq, str(body["hash"]), str(body["key_id"]), str(body["written_at"]))

    def advance(self, seq: int, hash_: str, keyring: Keyring, *, force: bool = False) -> bool:
        """Write ``seq``/``hash_`` as the new head if it is newer than the file's.

        ``force`` writes even an older head: only for an acknowledged break
        (``sarcnode audit acknowledge-break``). Returns whether it wrote.
        """
        with self._locked():
            if not force:
                try:
                    current = self.read(keyring)
                except AnchorError as exc:
                    # Never paper over a tampered anchor: appends are refused until
                    # an admin acknowledges the break (which forces the write).
                    log.error("audit anchor not moved to seq %d: %s", seq, exc)
                    return False
                if current is not None and current.seq >= seq:
                    return False
            key = keyring.current
            body = {
                "seq": seq,
                "hash": hash_,
                "key_id": key.key_id,
                "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            data = {"format": FORMAT, **body, "mac": key.mac(_signed_bytes(body))}
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, (json.dumps(data, indent=1) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.replace(self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return True
