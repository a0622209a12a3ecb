"""Store one received instance: validate, write, index, track its series.

The order is the node's promise to the sender: the data set is read once,
bounded (:mod:`node.store.reader`: size and inflate caps, structure, Pixel
Data, value ranges), its SOP class checked against ``dicom.storage_sop_classes``
and the accepted presentation context, then the file is written to a
temporary path, and in one transaction the duplicate and series checks, the
rename into place, the row, the series' tracking and the audit event are
written, the file and its folder fsynced (together), and the transaction
committed, all before :meth:`Ingestor.store` returns, and only then does the
SCP answer Success. That transaction is shared with the instances arriving
at the same time on other associations (:mod:`node.store.group`: one
savepoint per instance, one commit per group). Any failure raises a
:class:`~node.dicom.status.ServiceError` that the SCP turns into a failure
status.

A kill or a crash between the rename and the commit leaves a file the index
does not know (complete or, after a power loss, not);
:func:`node.store.reconcile.reconcile` removes it at the next start (it was
never acknowledged).
"""

from __future__ import annotations

import enum
import io
import logging
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from node.audit.trail import record
from node.config import DEFAULT_STORAGE_CLASSES, Settings
from node.db.models import utcnow
from node.db.session import Database
from node.dicom.status import (
    DUPLICATE_KEPT_FIRST,
    CannotUnderstand,
    DataSetMismatch,
    DuplicateRefused,
    IndexFailure,
    OutOfResources,
    ShuttingDown,
    SOPClassNotSupported,
)
from node.dicom.validate import sop_class_uid, validate_uid
from node.store.files import InstanceFiles, Staged
from node.store.group import GroupCommitter
from node.store.index import (
    NODE_PEER,
    Peer,
    audit_instance,
    bump_association_counter,
    check_series,
    count_duplicate,
    index_instance,
    lock_instance,
    mark_stable_series,
    stored_instance,
)
from node.store.reader import (
    Header,
    MiB,
    ParsedDataset,
    ReadLimits,
    read_dataset,
    read_dataset_file,
)
from node.store.spool import Spool, file_meta_bytes

#: Re-exported: the SCP, the service and the tests import these from here.
__all__ = [
    "NODE_PEER",
    "IngestPolicy",
    "Ingestor",
    "Peer",
    "StoreOutcome",
    "bump_association_counter",
    "check_series",
    "encode_meta",
    "mark_stable_series",
]

log = logging.getLogger(__name__)


class StoreOutcome(enum.Enum):
    """What happened to an instance that was accepted."""

    STORED = "stored"
    #: Sent again with the same content: counted, nothing written.
    DUPLICATE = "duplicate"
    #: Sent again with other content: the first copy kept, the peer warned, both hashes audited.
    CONFLICT = "conflict"


@dataclass(frozen=True)
class IngestPolicy:
    """What the node accepts: SOP classes (as UIDs), read limits, duplicate handling."""

    storage_sop_classes: frozenset[str] = field(
        default_factory=lambda: frozenset(sop_class_uid(c) for c in DEFAULT_STORAGE_CLASSES)
    )
    limits: ReadLimits = field(default_factory=ReadLimits)
    duplicate_conflict: Literal["warn", "refuse"] = "warn"

    @classmethod
    def from_settings(cls, settings: Settings) -> IngestPolicy:
        """The policy ``serve`` applies, from ``dicom.*`` and ``storage.*``."""
        storage = settings.storage
        return cls(
            storage_sop_classes=frozenset(
                sop_class_uid(c) for c in settings.dicom.storage_sop_classes
            ),
            limits=ReadLimits(
                max_dataset_bytes=storage.max_dataset_mb * MiB,
                max_inflate_ratio=storage.max_inflate_ratio,
            ),
            duplicate_conflict=storage.duplicate_conflict,
        )


def _class_name(uid: str) -> str:
    """A SOP class for a reason text: its name when known, never raw untrusted bytes."""
    ok, _ = validate_uid(uid)
    return str(UID(uid).name) if ok else "(invalid UID)"


def _database_error(exc: BaseException) -> OutOfResources | IndexFailure | None:
    """The status for a database failure while indexing (None: not a database error).

    An operational error (disk full, read-only or locked database, server gone)
    is a resource the sender may retry against: 0xA700. Anything else the
    database refuses is our own fault: 0x0110.
    """
    if isinstance(exc, OperationalError):
        first_line = str(exc.orig).splitlines()[0][:120] if exc.orig else type(exc).__name__
        return OutOfResources(f"index database cannot be written: {first_line}")
    if isinstance(exc, SQLAlchemyError):
        return IndexFailure(f"database error: {type(exc).__name__}")
    return None


def encode_meta(file_meta: FileMetaDataset) -> bytes:
    """128-byte preamble, ``DICM`` and the File Meta Information group."""
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, file_meta, enforce_standard=True)  # type: ignore[arg-type]
    return out.getvalue()


def _check_command(header: Header, sop_class_uid: str, sop_instance_uid: str) -> None:
    """The data set must be the instance the C-STORE command names.

    Raises
    ------
    DataSetMismatch
        Its SOP Instance or SOP Class UID differs from the command's.
    """
    if header.sop_instance_uid != sop_instance_uid:
        raise DataSetMismatch("SOPInstanceUID differs from the C-STORE command")
    if header.sop_class_uid != sop_class_uid:
        raise DataSetMismatch("SOPClassUID differs from the C-STORE command")


class Ingestor:
    """Stores received instances under one storage root and indexes them in the DB."""

    def __init__(
        self,
        db: Database,
        files: InstanceFiles,
        *,
        min_free_mb: int,
        policy: IngestPolicy | None = None,
    ) -> None:
        self.db = db
        self.files = files
        self.min_free_mb = min_free_mb
        self.policy = policy or IngestPolicy()
        #: Set when the node stops: every C-STORE from then on is refused (0xA700).
        self.closing = threading.Event()
        #: Runs each instance's indexing in the transaction of the group it joins.
        self.committer: GroupCommitter[StoreOutcome] = GroupCommitter(
            db, files.root, files.remove, sync=files.sync_placed if files.fsync else None
        )

    def open_spool(
        self, command_sop_class_uid: str, command_sop_instance_uid: str, transfer_syntax_uid: str
    ) -> Spool:
        """A spool for a C-STORE data set about to arrive (see :mod:`node.store.spool`).

        It starts with the preamble and the File Meta Information the command's
        UIDs and the context's transfer syntax give (as pynetdicom's
        ``Event.file_meta``); when a command UID is not a valid UID there is no
        File Meta Information, the data set is still received to disk and the
        instance is refused by :meth:`store`.
        """
        head = b""
        uids = (command_sop_class_uid, command_sop_instance_uid, transfer_syntax_uid)
        if all(validate_uid(u)[0] for u in uids):
            head = file_meta_bytes(*uids)
        return Spool(
            self.files.tmp_dir / f"{uuid.uuid4().hex}.part",
            head,
            free_mb=self.files.free_mb,
            min_free_mb=self.min_free_mb,
        )

    def store(
        self,
        *,
        command_sop_class_uid: str,
        command_sop_instance_uid: str,
        file_meta: FileMetaDataset | None = None,
        dataset: bytes | memoryview | Spool,
        peer: Peer,
        context_sop_class_uid: str | None = None,
        transfer_syntax_uid: str | None = None,
    ) -> StoreOutcome:
        """Store one instance received in a C-STORE request.

        ``dataset`` is the data set as received: bytes, or the :class:`Spool`
        it was received into (then written nowhere else: checked in place,
        fsynced and renamed). ``context_sop_class_uid`` is the abstract syntax
        of the presentation context the request came on (None outside an
        association). The transfer syntax is ``transfer_syntax_uid`` or
        ``file_meta``'s (pynetdicom's ``Event.file_meta``); a data set in
        memory needs ``file_meta``, a spool carries its own.

        Returns
        -------
        StoreOutcome
            ``STORED``; ``DUPLICATE`` (same content again: Success);
            ``CONFLICT`` (other content under a stored SOP Instance UID, the
            first kept: the SCP answers :data:`~node.dicom.status.DUPLICATE_KEPT_FIRST`).

        Raises
        ------
        OutOfResources
            Free disk under ``storage.min_free_mb``; the file or the index cannot
            be written (disk full, read-only); the data set over the size or
            inflate caps (:class:`~node.dicom.status.DatasetTooLarge`).
        SOPClassNotSupported
            The SOP class is not in ``dicom.storage_sop_classes`` or is not the
            presentation context's.
        CannotUnderstand
            Not decodable (truncated, corrupt, too deep), a UID missing or
            invalid, or an image without Pixel Data.
        DataSetMismatch
            The data set's SOP Class/Instance UID differ from the command's, a
            value is out of range, or Pixel Data disagrees with Rows x Columns...
        SeriesConflict
            The Series Instance UID is already filed under another study.
        DuplicateRefused
            Other content under a stored SOP Instance UID and
            ``storage.duplicate_conflict`` is ``refuse`` (the first is kept).
        IndexFailure
            The database refused the row for a reason of ours (the file is removed).
        ShuttingDown
            The node is stopping (:attr:`closing`): an 0xA700 the sender retries.
        """
        if self.closing.is_set():
            raise ShuttingDown("the node is shutting down: send again later")
        free = self.files.free_mb()
        if free < self.min_free_mb:
            raise OutOfResources(
                f"free disk {free:.0f} MiB is under the {self.min_free_mb} MiB floor"
            )
        self._check_sop_class(command_sop_class_uid, context_sop_class_uid)
        if transfer_syntax_uid is not None:
            ts_uid = transfer_syntax_uid
        elif file_meta is not None:
            ts_uid = str(file_meta.TransferSyntaxUID)
        else:
            raise TypeError("store() needs file_meta or transfer_syntax_uid")
        parsed = self._read(dataset, ts_uid)
        header = parsed.header
        _check_command(header, command_sop_class_uid, command_sop_instance_uid)
        rel = self.files.relative_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        if isinstance(dataset, Spool):
            if not dataset.has_meta:  # the UIDs are checked above: the transfer syntax
                raise CannotUnderstand("no File Meta Information for this presentation context")
            staged = dataset.finish(fsync=False)  # fsynced once placed, with its folder
        else:
            if file_meta is None:
                raise TypeError("a data set in memory needs its file_meta")
            staged = self.files.stage([encode_meta(file_meta), dataset], sync=False)
        outcome = self._commit(parsed, rel, staged, ts_uid, peer)
        if outcome is StoreOutcome.CONFLICT and self.policy.duplicate_conflict == "refuse":
            raise DuplicateRefused(
                "SOP Instance UID already stored with other content (first kept)",
                detail={"received_sha256": staged.sha256},
            )
        return outcome

    def _read(self, dataset: bytes | memoryview | Spool, ts_uid: str) -> ParsedDataset:
        """Walk the received data set (in memory or in its spool file) within the limits."""
        if not isinstance(dataset, Spool):
            return read_dataset(dataset, ts_uid, self.policy.limits)
        if dataset.refusal is not None:
            raise dataset.refusal
        try:
            parsed = read_dataset_file(
                dataset.path, dataset.data_offset, ts_uid, self.policy.limits
            )
        except OSError as exc:
            raise OutOfResources(f"cannot read received data set: {exc.strerror or exc}") from exc
        return parsed

    def _commit(
        self, parsed: ParsedDataset, rel: Path, staged: Staged, ts_uid: str, peer: Peer
    ) -> StoreOutcome:
        """Index ``staged`` (placing it at ``rel``) in the next group's transaction.

        Returns once that transaction committed. The staged file is removed
        whatever happens, the placed one too when its row does not commit.
        """

        def work(s: Session, placed: list[Path]) -> StoreOutcome:
            return self._index(s, parsed, rel, staged, ts_uid, peer, placed)

        try:
            return self.committer.run(work)
        except BaseException as exc:
            mapped = _database_error(exc)
            if mapped is None:
                raise
            raise mapped from exc
        finally:
            self.files.discard(staged)

    def _check_sop_class(self, command_class: str, context_class: str | None) -> None:
        """The command's SOP class must be configured and be its context's abstract syntax."""
        if command_class not in self.policy.storage_sop_classes:
            raise SOPClassNotSupported(
                f"SOP class {_class_name(command_class)} is not in dicom.storage_sop_classes"
            )
        if context_class is not None and command_class != context_class:
            raise SOPClassNotSupported(
                f"{_class_name(command_class)} sent on a {_class_name(context_class)} "
                "presentation context"
            )

    def _index(
        self,
        s: Session,
        parsed: ParsedDataset,
        rel: Path,
        staged: Staged,
        ts_uid: str,
        peer: Peer,
        placed: list[Path],
    ) -> StoreOutcome:
        """In one transaction: a duplicate or conflict counted, or the file placed and indexed."""
        header = parsed.header
        now = utcnow()
        lock_instance(s, header.sop_instance_uid)
        existing = stored_instance(s, header.sop_instance_uid)
        if existing is not None:
            if existing.sha256 == staged.sha256:
                count_duplicate(s, existing.id, existing.series_id, header, peer)
                return StoreOutcome.DUPLICATE
            self._record_conflict(s, existing.sha256, header, staged, ts_uid, peer)
            return StoreOutcome.CONFLICT
        filed = check_series(s, header)
        # Placed while the transaction holds the write lock, so a concurrent
        # duplicate cannot replace the file of the instance being indexed.
        placed.append(rel)
        self.files.place(staged, rel, sync_folder=False)  # the group fsyncs its folders
        detail: dict[str, Any] = {
            "sop_class": header.sop_class_uid,
            "transfer_syntax": ts_uid,
            "bytes": staged.size,
        }
        if parsed.oddities:
            detail["oddities"] = list(parsed.oddities)
        index_instance(s, header, rel, staged.size, staged.sha256, ts_uid, peer, now, filed)
        bump_association_counter(s, peer.association_id, "instances_stored")
        audit_instance(s, "instance.stored", peer, header, detail)
        return StoreOutcome.STORED

    def _record_conflict(
        self,
        s: Session,
        stored_sha256: str,
        header: Header,
        staged: Staged,
        ts_uid: str,
        peer: Peer,
    ) -> None:
        """Audit a re-sent SOP Instance UID whose content differs; the stored file stays."""
        refuse = self.policy.duplicate_conflict == "refuse"
        if not refuse:  # a refusal is counted as a failure by the SCP
            bump_association_counter(s, peer.association_id, "duplicates")
        record(
            s,
            "instance.duplicate_conflict",
            actor=peer.actor,
            actor_ip=peer.ip or None,
            outcome="refused" if refuse else "warning",
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            sop_instance_uid=header.sop_instance_uid,
            detail={
                "stored_sha256": stored_sha256,
                "received_sha256": staged.sha256,
                "received_bytes": staged.size,
                "transfer_syntax": ts_uid,
                "kept": "first",
                "policy": self.policy.duplicate_conflict,
                "status": f"0x{DuplicateRefused.status if refuse else DUPLICATE_KEPT_FIRST:04X}",
            },
        )
