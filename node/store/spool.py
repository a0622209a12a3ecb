"""A received data set written to disk as it arrives, so no peer's data set sits in memory.

pynetdicom joins a data set's P-DATA fragments in memory until the last one
has come, so every association sending a large instance held up to
``storage.max_dataset_mb`` of it, and the allocator kept much of that after an
abort. The inbound guard (:mod:`node.dicom.inbound`) instead gives each C-STORE
data set a :class:`Spool`: the fragments are appended to
``<root>/tmp/<uuid>.part`` behind the preamble and File Meta Information the
stored file will carry, and hashed as they come. The ingestor reads the header
back from the file, closes it (:meth:`Spool.finish`) and renames it into place
(fsynced there with its folder before the row commits),
so an instance is written once and never copied.

A spool that cannot be written (disk full, read-only, free disk under
``storage.min_free_mb``) becomes a sink: it drops the rest of the data set and
keeps the refusal, which the ingestor raises (0xA700) when the request reaches
the handler. A ``.part`` file left by a crash is removed at the next start
(:meth:`node.store.files.InstanceFiles.clean_tmp`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from node.dicom.status import OutOfResources, ServiceError
from node.store.files import Staged

log = logging.getLogger(__name__)

#: What every stored file starts with: the 128-byte preamble and the DICM prefix.
_PREFIX = b"\x00" * 128 + b"DICM"


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, Explicit VR Little Endian (value already padded to even)."""
    if vr == b"OB":  # 2 reserved bytes, 4-byte length
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def ui_value(uid: str) -> bytes:
    """A UID's value as DICOM stores it: ASCII, NUL-padded to even length (PS3.5 9.1)."""
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def file_meta_bytes(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID,
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION,
) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group of a received instance.

    The elements pynetdicom's ``create_file_meta`` sets (as its ``Event.file_meta``
    gives the handler), encoded as pydicom's ``write_file_meta_info`` encodes them,
    byte for byte, without building a Dataset: it runs once per C-STORE. The UIDs
    must be valid UIDs (the caller checks them).
    """
    version = implementation_version.encode("ascii")
    elements = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", ui_value(sop_class_uid)),
            _element(0x0003, b"UI", ui_value(sop_instance_uid)),
            _element(0x0010, b"UI", ui_value(transfer_syntax_uid)),
            _element(0x0012, b"UI", ui_value(implementation_uid)),
            _element(0x0013, b"SH", version + b" " if len(version) % 2 else version),
        )
    )
    group_length = _element(0x0000, b"UL", struct.pack("<I", len(elements)))
    return _PREFIX + group_length + elements


#: Free disk is checked again after this many bytes written to one spool.
FREE_CHECK_BYTES = 64 * 1024 * 1024


class Spool:
    """One data set being received into a temporary file (see the module docstring).

    ``head`` is what precedes the data set in the stored file (preamble and
    File Meta Information); empty when the command's UIDs cannot form one, and
    then the instance is never stored (:attr:`has_meta`). ``free_mb`` reports
    free disk, and ``min_free_mb`` is the floor under which the spool stops
    writing. pynetdicom appends fragments with ``write`` and calls
    ``file.flush()`` after each; it closes and unlinks :attr:`name` after the
    C-STORE handler (a file placed by then has another name).
    """

    def __init__(
        self,
        path: Path,
        head: bytes,
        *,
        free_mb: Callable[[], float],
        min_free_mb: float,
    ) -> None:
        self.path = path
        self.name = str(path)
        self.data_offset = len(head)
        self.has_meta = bool(head)
        self._free_mb = free_mb
        self._min_free_mb = min_free_mb
        self._digest = hashlib.sha256()
        self._size = 0
        self._since_check = 0
        #: Bytes of the data set received so far (written or dropped).
        self.received = 0
        #: Why the data set is not kept (the spool is a sink from then on).
        self.refusal: ServiceError | None = None
        self._fh: io.FileIO | None = None
        if not self._room():
            return
        try:
            # Unbuffered: each fragment is one write(2), so flush() has nothing to do.
            self._fh = path.open("xb", buffering=0)  # closed by finish/discard
            self._append(head)
        except OSError as exc:
            self._fail(exc)

    def __bool__(self) -> bool:
        """Always true (pynetdicom tests the file object before writing to it)."""
        return True

    @property
    def file(self) -> Spool:
        """What pynetdicom flushes after each fragment: the spool itself."""
        return self

    def write(self, data: bytes) -> int:
        """Append one data set fragment (dropped once the spool is a sink)."""
        self.received += len(data)
        if self._fh is None:
            return len(data)
        try:
            self._append(data)
        except OSError as exc:
            self._fail(exc)
            return len(data)
        self._since_check += len(data)
        if self._since_check >= FREE_CHECK_BYTES:
            self._since_check = 0
            self._room()
        return len(data)

    def _append(self, data: bytes) -> None:
        assert self._fh is not None
        view = memoryview(data)
        while view:
            written = self._fh.write(view)
            view = view[written or 0 :]
        self._digest.update(data)
        self._size += len(data)

    def flush(self) -> None:
        """Nothing to flush: writes are unbuffered (fsynced once, when placed or finished)."""

    def _room(self) -> bool:
        """Whether free disk is above the floor; below it the spool becomes a sink."""
        free = self._free_mb()
        if free >= self._min_free_mb:
            return True
        self._sink(
            OutOfResources(
                f"free disk {free:.0f} MiB is under the {self._min_free_mb:.0f} MiB floor"
            )
        )
        return False

    def _fail(self, exc: OSError) -> None:
        self._sink(OutOfResources(f"cannot write instance: {exc.strerror or exc}"))

    def _sink(self, refusal: ServiceError) -> None:
        """Stop writing, remove what was written, keep ``refusal`` for the handler."""
        if self.refusal is None:
            self.refusal = refusal
            log.warning("receiving a data set into %s stopped: %s", self.path.name, refusal.reason)
        self.discard()

    def finish(self, *, fsync: bool) -> Staged:
        """The complete file, closed (and fsynced when ``fsync``), ready to be placed.

        Raises
        ------
        OutOfResources
            The spool became a sink (the refusal it kept), or the fsync failed.
        """
        if self.refusal is not None:
            raise self.refusal
        assert self._fh is not None
        try:
            if fsync:
                os.fsync(self._fh.fileno())
            self._fh.close()
        except OSError as exc:
            self._fail(exc)
            assert self.refusal is not None
            raise self.refusal from exc
        return Staged(self.path, self._size, self._digest.hexdigest())

    def close(self) -> None:
        """Close the file (idempotent); pynetdicom calls this after the handler."""
        if self._fh is not None and not self._fh.closed:
            with contextlib.suppress(OSError):
                self._fh.close()

    def discard(self) -> None:
        """Close and remove the file unless it was placed (never raises)."""
        self.close()
        self._fh = None
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:  # removed by clean_tmp at the next start
            log.warning("cannot remove spool file %s: %s", self.path.name, exc.strerror)
