"""Where one process finds the audit key and the head anchor.

Built once from the settings (``serve`` and the admin CLI) and handed to
:class:`node.db.session.Database`, which makes it reachable from every session
so :func:`node.audit.trail.record` keeps its signature. Job workers get a copy
without the anchor (:meth:`AuditConfig.for_worker`): they may run on another
machine, so they sign events but leave the anchor to the node.

The anchor is moved after a commit at most once per :data:`ANCHOR_INTERVAL_S`
(each write costs two fsyncs, several milliseconds), by a timer thread so the
committing thread never waits on it; a head committed and not yet written is
kept here and written by that timer, or when the database is disposed. Appends
check the chain against the newer of the file and that pending head, so a
truncation inside the interval is caught too; a ``kill -9`` only leaves the
file one interval behind, which the anchor's lower-bound rule allows.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from node.audit.anchor import HeadAnchor
from node.audit.keys import AuditKeyError, Keyring, load_keyring

if TYPE_CHECKING:
    from node.config import Settings

log = logging.getLogger(__name__)

#: Shortest time between two anchor writes of one process, in seconds.
ANCHOR_INTERVAL_S = 1.0


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
        #: Held while the anchor file is written (two fsyncs).
        self._anchor_lock = threading.Lock()
        #: Guards _pending, _last_write and _timer (never held across a write).
        self._state_lock = threading.Lock()
        self._pending: tuple[int, str] | None = None
        self._last_write = float("-inf")
        self._timer: threading.Timer | None = None

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

    @property
    def pending(self) -> tuple[int, str] | None:
        """The newest head this process committed but has not yet written to the anchor."""
        with self._state_lock:
            return self._pending

    def committed(self, seq: int, hash_: str, *, force: bool = False) -> None:
        """A commit appended events up to ``seq``: anchor it within the interval.

        The file is written by a timer thread (at once when the last write is
        older than the interval), never in the committing thread: its two
        fsyncs stay out of the commit path. ``force`` (an acknowledged break)
        writes at once, even an older head.

        Raises
        ------
        OSError
            The anchor file cannot be written (only with ``force``).
        """
        if self.anchor is None:
            return
        if force:
            with self._anchor_lock:
                with self._state_lock:
                    self._pending = None
                self.anchor.advance(seq, hash_, self.keyring, force=True)
                with self._state_lock:
                    self._last_write = time.monotonic()
            return
        with self._state_lock:
            if self._pending is None or seq > self._pending[0]:
                self._pending = (seq, hash_)
            if self._timer is None:
                self._start_timer_locked()

    def _start_timer_locked(self) -> None:
        wait = max(0.0, self._last_write + ANCHOR_INTERVAL_S - time.monotonic())
        self._timer = threading.Timer(wait, self._on_timer)
        self._timer.daemon = True
        self._timer.start()

    def flush(self) -> None:
        """Write the pending head to the anchor now (at stop, and from the timer).

        Raises
        ------
        OSError, node.audit.keys.AuditKeyError
            The anchor file cannot be written (the head stays pending).
        """
        with self._state_lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        self._write_pending()

    def _write_pending(self) -> None:
        with self._anchor_lock:
            with self._state_lock:
                head = self._pending
            if head is None or self.anchor is None:
                return
            self.anchor.advance(head[0], head[1], self.keyring)
            with self._state_lock:
                if self._pending == head:  # a newer head committed meanwhile stays pending
                    self._pending = None
                self._last_write = time.monotonic()

    def _on_timer(self) -> None:
        try:
            self._write_pending()
        except (OSError, AuditKeyError) as exc:
            log.error("audit anchor not written: %s", exc)
            with self._state_lock:
                self._last_write = time.monotonic()  # tried again after the interval
        with self._state_lock:
            self._timer = None
            if self._pending is not None:  # committed while this write ran
                self._start_timer_locked()

    def close(self) -> None:
        """Flush at the end of a process's use of the database; an error is logged, not raised.

        The events are committed either way: an unwritten anchor only lags.
        """
        try:
            self.flush()
        except (OSError, AuditKeyError) as exc:
            log.error("audit anchor not written: %s", exc)
