"""Where one process finds the audit key and the head anchor.

Built once from the settings (``serve`` and the admin CLI) and handed to
:class:`node.db.session.Database`, which makes it reachable from every session
so :func:`node.audit.trail.record` keeps its signature. Job workers get a copy
without the anchor (:meth:`AuditConfig.for_worker`): they may run on another
machine, so they sign events but leave the anchor to the node.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from node.audit.anchor import HeadAnchor
from node.audit.keys import Keyring, load_keyring

if TYPE_CHECKING:
    from node.config import Settings


@dataclass(frozen=True)
class AuditConfig:
    """Paths only (no secret), so it can travel to a job worker.

    Attributes
    ----------
    key_file
        The key file; ``$SARCNODE_AUDIT_KEY`` overrides it when set.
    anchor_file
        The head anchor; None: this process neither checks nor moves it.
    create_key
        Create ``key_file`` when no key exists yet.
    """

    key_file: Path
    anchor_file: Path | None
    create_key: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditConfig:
        """``audit.key_file``/``anchor_file``, defaulting to ``<storage.root>/audit/``."""
        folder = settings.storage.root / "audit"
        key_file = settings.audit.key_file or folder / "audit.key"
        anchor_file = settings.audit.anchor_file or folder / "head.json"
        return cls(key_file.absolute(), anchor_file.absolute())

    def for_worker(self) -> AuditConfig:
        """The same key, no anchor, and never a new key file (for job workers)."""
        return replace(self, anchor_file=None, create_key=False)


class AuditContext:
    """A process's audit key (loaded on first use) and anchor.

    Loading is lazy so that read-only admin commands neither need the key nor
    create one; ``serve`` loads it at start so a bad key stops it at once.
    """

    def __init__(self, config: AuditConfig) -> None:
        self.config = config
        self.anchor = HeadAnchor(config.anchor_file) if config.anchor_file else None
        self._keyring: Keyring | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditContext:
        """The context ``serve`` and the admin CLI use."""
        return cls(AuditConfig.from_settings(settings))

    def __repr__(self) -> str:
        return f"AuditContext({self.config!r})"

    @property
    def keyring(self) -> Keyring:
        """The keys, loaded (or created) on first use.

        Raises
        ------
        node.audit.keys.AuditKeyError
            See :func:`node.audit.keys.load_keyring`.
        """
        with self._lock:
            if self._keyring is None:
                self._keyring = load_keyring(self.config.key_file, create=self.config.create_key)
            return self._keyring

    def reload(self) -> Keyring:
        """Forget the loaded keys and load them again (after a rotation)."""
        with self._lock:
            self._keyring = None
        return self.keyring
