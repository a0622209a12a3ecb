"""Group commit: instances that arrive together share one fsynced transaction.

Each C-STORE's indexing work (duplicate check, rename into place, rows,
audit event) joins a queue. A caller that finds no group committing becomes
the leader: it takes everything queued (its own work and whatever arrived
while the previous group committed; no deliberate wait), runs each item in
its own SAVEPOINT so one refused instance never fails its neighbours, fsyncs
the files it placed and the folders given new entries (each once, all at
once), and commits once. Only
then is every caller of the group released, so the promise stays: Success is
answered only after the file is durably placed and its row and audit event
are committed. One association alone commits in its own thread, as before.

Why: on SQLite every transaction is one WAL fsync and one write lock; with
several associations each taking the lock on its own, writers queued in
SQLite's busy handler (sleeps of 1 to 100 ms) and eight associations stored
fewer instances per second than one. A single writer thread has no lock
contention and turns N commits into one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from sqlalchemy.orm import Session

from node.db.session import Database

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Items committed in one transaction at most (bounds a group's latency).
MAX_GROUP = 64


@dataclass
class _Item(Generic[T]):
    """One caller's work, its result and the files it placed (relative paths)."""

    work: Callable[[Session, list[Path]], T]
    placed: list[Path] = field(default_factory=list)
    result: T | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class GroupCommitter(Generic[T]):
    """Runs index work of concurrent callers in shared transactions, one group at a time.

    ``remove`` deletes a placed file whose row did not commit; ``sync``
    makes the placed files (relative paths) and their folders' new entries
    durable before the commit
    (:meth:`node.store.files.InstanceFiles.sync_placed`; None when
    ``storage.fsync`` is off).
    """

    def __init__(
        self,
        db: Database,
        root: Path,
        remove: Callable[[Path], None],
        *,
        sync: Callable[[list[Path]], None] | None = None,
        max_group: int = MAX_GROUP,
    ) -> None:
        self.db = db
        self.root = root
        self.remove = remove
        self.sync = sync
        self.max_group = max_group
        self._cond = threading.Condition()
        self._queue: list[_Item[T]] = []
        self._busy = False
        #: Groups committed and items in them (for the bench and tests).
        self.groups = 0
        self.items = 0

    def run(self, work: Callable[[Session, list[Path]], T]) -> T:
        """Run ``work(session, placed)`` in the next group; return once that group committed.

        ``work`` appends the relative path of each file it places to
        ``placed`` (removed again if its row does not commit).

        Raises
        ------
        Exception
            What ``work`` raised (its savepoint rolled back, its files removed),
            or what the group's commit raised (nothing of the group kept).
        """
        item: _Item[T] = _Item(work)
        with self._cond:
            self._queue.append(item)
        while not item.done.is_set():
            with self._cond:
                while self._busy and not item.done.is_set():
                    self._cond.wait()
                if item.done.is_set():
                    break
                self._busy = True  # lead the next group (at most max_group, oldest first)
                group, self._queue = self._queue[: self.max_group], self._queue[self.max_group :]
            self._lead(group)
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[return-value]

    def _lead(self, group: list[_Item[T]]) -> None:
        """Commit ``group``, then release its callers and let the next leader in."""
        committed = False
        try:
            self._commit(group)
            committed = True
        finally:
            with self._cond:
                for member in group:
                    if not committed and member.error is None:  # interrupted (BaseException)
                        member.error = RuntimeError("group commit interrupted")
                    member.done.set()
                self._busy = False
                self._cond.notify_all()

    def _commit(self, group: list[_Item[T]]) -> None:
        """Each item in a savepoint, the placed files and their folders fsynced, one commit."""
        try:
            with self.db.session() as s:
                if len(group) == 1:  # alone: its failure rolls the transaction back
                    group[0].result = group[0].work(s, group[0].placed)
                else:
                    for item in group:
                        self._run_item(s, item)
                if self.sync is not None:
                    self.sync([rel for item in group if item.error is None for rel in item.placed])
        except Exception as exc:
            for item in group:
                if item.error is None:
                    item.error = exc
                    self._unplace(item)
            return
        self.groups += 1
        self.items += len(group)

    def _run_item(self, s: Session, item: _Item[T]) -> None:
        """``item`` in a savepoint: its failure undoes its own writes and files only."""
        try:
            with s.begin_nested():
                item.result = item.work(s, item.placed)
        except Exception as exc:
            item.error = exc
            self._unplace(item)

    def _unplace(self, item: _Item[T]) -> None:
        for rel in item.placed:  # placed, but its row did not commit: leave no orphan
            self.remove(rel)
        item.placed.clear()
