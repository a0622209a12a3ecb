"""Instance files on disk: layout by UID, written atomically.

Layout: ``<root>/dicom/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``. Every
UID is validated before it becomes a path part, and the final path is checked
to lie under the root (defence in depth). A file is written to
``<root>/tmp`` (:meth:`InstanceFiles.stage`, or received there by a spool)
and renamed into place (:meth:`InstanceFiles.place`); before the row naming
it commits, the file and each folder given a new entry (the file's, and the
parent of a folder made for it) are fsynced, all at once
(:meth:`InstanceFiles.sync_placed`). So after a crash a path the index names
holds a complete file; a file placed whose row never committed (complete or
not) was never acknowledged, and start-up reconciliation removes it. Every
failure to write is an :class:`~node.dicom.status.OutOfResources` (0xA700),
read-only and full volumes included.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from node.dicom.status import CannotUnderstand, OutOfResources
from node.dicom.validate import validate_uid

log = logging.getLogger(__name__)

#: Files fsynced at once by :meth:`InstanceFiles.sync_placed` (one group commit's).
_FSYNC_THREADS = 4


@dataclass(frozen=True)
class Staged:
    """A complete, fsynced temporary file waiting to be placed."""

    path: Path
    size: int
    sha256: str


class InstanceFiles:
    """The instance folder tree under one storage root."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root.resolve()
        self.fsync = fsync
        self.dicom_dir = self.root / "dicom"
        self.tmp_dir = self.root / "tmp"
        self.dicom_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        #: Folders given an entry (a file or a folder) not yet fsynced.
        self._new_entries: set[Path] = set()
        self._entries_lock = threading.Lock()
        self._fsyncs: ThreadPoolExecutor | None = None
        self._fsyncs_pid = 0

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """The path of an instance relative to the root, after validating each UID.

        Raises
        ------
        CannotUnderstand
            A UID is missing or not a valid DICOM UID (so not a safe path part).
        """
        for name, value in (
            ("StudyInstanceUID", study_uid),
            ("SeriesInstanceUID", series_uid),
            ("SOPInstanceUID", sop_uid),
        ):
            ok, reason = validate_uid(value)
            if not ok:
                raise CannotUnderstand(f"{name} {reason}")
        rel = Path("dicom") / study_uid / series_uid / f"{sop_uid}.dcm"
        final = (self.root / rel).resolve()
        if not final.is_relative_to(self.dicom_dir):
            raise CannotUnderstand("instance path escapes the storage root")
        return rel

    def free_mb(self) -> float:
        """Free space on the storage volume, in MiB."""
        return shutil.disk_usage(self.root).free / (1024 * 1024)

    def stage(self, chunks: list[bytes | memoryview], *, sync: bool = True) -> Staged:
        """Write ``chunks`` to a temporary file, flushed and fsynced.

        ``sync=False``: not fsynced here; the caller fsyncs it once placed
        (:meth:`sync_placed`).

        Raises
        ------
        OutOfResources
            The file could not be written (disk full, permissions, I/O error).
        """
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        size = 0
        try:
            with tmp.open("wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                fh.flush()
                if self.fsync and sync:
                    os.fsync(fh.fileno())
        except OSError as exc:
            # On a read-only volume even this unlink fails: the status must still be A700.
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise OutOfResources(f"cannot write instance: {exc.strerror or exc}") from exc
        return Staged(tmp, size, digest.hexdigest())

    def place(self, staged: Staged, rel: Path, *, sync_folder: bool = True) -> None:
        """Rename a staged file to ``rel`` and fsync the folders given new entries (atomic).

        The file's folder always gets one; a folder created for it gives its
        parent one too. ``sync_folder=False``: the caller makes them durable
        before the row commits (:meth:`sync_placed`, once per group commit).

        Raises
        ------
        OutOfResources
            The folder could not be created or the rename failed.
        """
        final = self.root / rel
        try:
            try:
                staged.path.replace(final)
            except FileNotFoundError:
                if not staged.path.exists():
                    raise
                self._make_folders(final.parent)
                staged.path.replace(final)
            with self._entries_lock:
                self._new_entries.add(final.parent)
            if self.fsync and sync_folder:
                self.sync_folders()
        except OSError as exc:
            raise OutOfResources(f"cannot place instance: {exc.strerror or exc}") from exc

    def _make_folders(self, folder: Path) -> None:
        """Create ``folder`` and missing parents under the root; note their new entries."""
        missing: list[Path] = []
        while not folder.is_dir() and folder != self.root:
            missing.append(folder)
            folder = folder.parent
        for created in reversed(missing):
            created.mkdir(exist_ok=True)
            with self._entries_lock:
                self._new_entries.add(created.parent)

    def sync_placed(self, rels: list[Path]) -> None:
        """Make placed files durable before their rows commit: their data, their folders' entries.

        The files (relative paths) are fsynced on a small thread pool while
        this thread fsyncs the folders (:meth:`sync_folders`), so the file
        system commits them together: on ext4 one journal commit instead of
        one for the file before its rename and another for its folder after.

        Raises
        ------
        OutOfResources
            An fsync failed (I/O error, volume gone): the rows must not commit.
        """
        pool = self._pool()
        pending = [pool.submit(fsync_file, self.root / rel) for rel in rels]
        failure: OutOfResources | None = None
        try:
            self.sync_folders()
        except OutOfResources as exc:
            failure = exc
        for future in pending:
            try:
                future.result()
            except OSError as exc:
                failure = failure or OutOfResources(f"cannot write instance: {exc.strerror or exc}")
        if failure is not None:
            raise failure

    def _pool(self) -> ThreadPoolExecutor:
        """The fsync threads: made on first use, and again in a forked child (no threads there)."""
        with self._entries_lock:
            if self._fsyncs is None or self._fsyncs_pid != os.getpid():
                self._fsyncs = ThreadPoolExecutor(_FSYNC_THREADS, thread_name_prefix="fsync")
                self._fsyncs_pid = os.getpid()
            return self._fsyncs

    def sync_folders(self) -> None:
        """Flush (fsync) each folder given a new entry since the last sync (once each).

        A folder gets one when a file is placed in it or a folder is made in
        it. Called before the rows naming the placed files commit; a folder
        whose fsync failed stays for the next call.

        Raises
        ------
        OutOfResources
            An fsync failed (I/O error, volume gone).
        """
        with self._entries_lock:
            folders, self._new_entries = self._new_entries, set()
        try:
            for folder in sorted(folders):
                fsync_dir(folder)
        except OSError as exc:
            with self._entries_lock:
                self._new_entries |= folders
            raise OutOfResources(f"cannot write instance: {exc.strerror or exc}") from exc

    def discard(self, staged: Staged) -> None:
        """Remove a staged file that was not placed (no-op once placed).

        Never raises: a partial file it cannot remove (read-only or failing
        volume) is removed by :meth:`clean_tmp` at the next start.
        """
        try:
            staged.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove staged file %s: %s", staged.path.name, exc.strerror)

    def remove(self, rel: Path) -> None:
        """Remove a file written for an instance that could not be indexed.

        Never raises: a file it cannot remove is an orphan that start-up
        reconciliation (:mod:`node.store.reconcile`) removes.
        """
        try:
            (self.root / rel).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove unindexed file %s: %s", rel.as_posix(), exc.strerror)

    def clean_tmp(self) -> int:
        """Remove partial files left by a crash; return how many were removed."""
        removed = 0
        for part in self.tmp_dir.glob("*.part"):
            part.unlink(missing_ok=True)
            removed += 1
        return removed


def _fsync(path: Path) -> None:
    """Flush the file or folder at ``path`` through a descriptor of its own."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush the data and size of the file at ``path``.

    Its own name (not :func:`fsync_dir`'s) so tests and ``bench/store_spans.py``
    tell file syncs from folder syncs.
    """
    _fsync(path)


def fsync_dir(path: Path) -> None:
    """Flush the folder ``path`` itself, so that a file renamed into it survives a crash."""
    _fsync(path)
