"""Store one received instance: validate, write, index, track its series.

The order is the node's promise to the sender: the data set is read once,
bounded (:mod:`node.store.reader`: size and inflate caps, structure, Pixel
Data, value ranges), its SOP class checked against ``dicom.storage_sop_classes``
and the accepted presentation context, then the file is written and fsynced
to a temporary path, and in one transaction the duplicate and series checks,
the rename into place, the row, the series' tracking and the audit event are
committed, all before :meth:`Ingestor.store` returns, and only then does the
SCP answer Success. Any failure raises a :class:`~node.dicom.status.ServiceError`
that the SCP turns into a failure status.

A kill between the rename and the commit leaves a complete file that the
index does not know; :func:`node.store.reconcile.reconcile` removes it at the
next start (it was never acknowledged).
"""

from __future__ import annotations

import enum
import io
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from node.audit.trail import record
from node.config import DEFAULT_STORAGE_CLASSES, Settings
from node.db.models import Association, Instance, Series, Study, utcnow
from node.db.session import Database
from node.dicom.status import (
    DUPLICATE_KEPT_FIRST,
    DataSetMismatch,
    DuplicateRefused,
    IndexFailure,
    OutOfResources,
    SeriesConflict,
    ShuttingDown,
    SOPClassNotSupported,
)
from node.dicom.validate import sop_class_uid, validate_uid
from node.store.files import InstanceFiles, Staged
from node.store.reader import Header, MiB, ParsedDataset, ReadLimits, read_dataset

log = logging.getLogger(__name__)

#: Key space of the PostgreSQL advisory lock taken per SOP Instance UID while indexing.
_PG_SOP_LOCK_CLASS = 0x5C0D


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


@dataclass(frozen=True)
class Peer:
    """Who sent an instance: the association row and the calling AE/IP."""

    association_id: int | None
    calling_ae: str
    ip: str
    #: The node itself (re-indexing at start-up), not a network peer.
    internal: bool = False

    @property
    def actor(self) -> str:
        """Audit actor name for this peer."""
        return "node" if self.internal else f"ae:{self.calling_ae}"


#: The peer named when the node indexes a file itself (start-up reconciliation).
NODE_PEER = Peer(None, "", "", internal=True)


def bump_association_counter(
    s: Session,
    association_id: int | None,
    counter: Literal["instances_stored", "duplicates", "failures"],
) -> None:
    """Add one to an association's counter (no-op for instances stored outside one)."""
    if association_id is None:
        return
    column = getattr(Association, counter)
    s.connection().execute(
        update(Association).where(Association.id == association_id).values({column: column + 1})
    )


def _audit_instance(
    s: Session, action: str, peer: Peer, header: Header, detail: dict[str, Any], *, sop: bool = True
) -> None:
    """Audit an event about ``header``'s instance (or only its series, ``sop=False``)."""
    record(
        s,
        action,
        actor=peer.actor,
        actor_ip=peer.ip or None,
        study_instance_uid=header.study_instance_uid,
        series_instance_uid=header.series_instance_uid,
        sop_instance_uid=header.sop_instance_uid if sop else None,
        detail=detail,
    )


def _class_name(uid: str) -> str:
    """A SOP class for a reason text: its name when known, never raw untrusted bytes."""
    ok, _ = validate_uid(uid)
    return str(UID(uid).name) if ok else "(invalid UID)"


def check_series(s: Session, header: Header) -> None:
    """Refuse an instance whose series is already filed under another study.

    Raises
    ------
    SeriesConflict
        With both Study Instance UIDs in the audit detail; nothing is written.
    """
    filed = (
        s.connection()
        .execute(
            select(Study.study_instance_uid)
            .join(Series, Series.study_id == Study.id)
            .where(Series.series_instance_uid == header.series_instance_uid)
        )
        .scalar()
    )
    if filed is not None and filed != header.study_instance_uid:
        raise SeriesConflict(
            "SeriesInstanceUID is already filed under another study",
            detail={
                "series_instance_uid": header.series_instance_uid,
                "study_instance_uid": header.study_instance_uid,
                "filed_under_study": filed,
            },
        )


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

    def store(
        self,
        *,
        command_sop_class_uid: str,
        command_sop_instance_uid: str,
        file_meta: FileMetaDataset,
        dataset: bytes | memoryview,
        peer: Peer,
        context_sop_class_uid: str | None = None,
    ) -> StoreOutcome:
        """Store one instance received in a C-STORE request.

        ``context_sop_class_uid`` is the abstract syntax of the presentation
        context the request came on (None outside an association).

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
        ts_uid = str(file_meta.TransferSyntaxUID)
        parsed = read_dataset(dataset, ts_uid, self.policy.limits)
        header = parsed.header
        if header.sop_instance_uid != command_sop_instance_uid:
            raise DataSetMismatch("SOPInstanceUID differs from the C-STORE command")
        if header.sop_class_uid != command_sop_class_uid:
            raise DataSetMismatch("SOPClassUID differs from the C-STORE command")
        rel = self.files.relative_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        staged = self.files.stage([encode_meta(file_meta), dataset])
        placed: list[Path] = []
        try:
            with self.db.session() as s:
                outcome = self._index(s, parsed, rel, staged, ts_uid, peer, placed)
        except BaseException as exc:
            for path in placed:  # placed, but its row did not commit: leave no orphan
                self.files.remove(path)
            mapped = _database_error(exc)
            if mapped is None:
                raise
            raise mapped from exc
        finally:
            self.files.discard(staged)
        if outcome is StoreOutcome.CONFLICT and self.policy.duplicate_conflict == "refuse":
            raise DuplicateRefused(
                "SOP Instance UID already stored with other content (first kept)",
                detail={"received_sha256": staged.sha256},
            )
        return outcome

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
        if s.get_bind().dialect.name == "postgresql":
            # SQLite's BEGIN IMMEDIATE already serialises writers; PostgreSQL needs
            # this so two copies of one instance are never placed on one path.
            s.execute(
                text("SELECT pg_advisory_xact_lock(:k, hashtext(:uid))"),
                {"k": _PG_SOP_LOCK_CLASS, "uid": header.sop_instance_uid},
            )
        existing = (
            s.connection()
            .execute(
                select(Instance.id, Instance.series_id, Instance.sha256).where(
                    Instance.sop_instance_uid == header.sop_instance_uid
                )
            )
            .first()
        )
        if existing is not None:
            if existing.sha256 == staged.sha256:
                self._count_duplicate(s, existing.id, existing.series_id, header, peer)
                return StoreOutcome.DUPLICATE
            self._record_conflict(s, existing.sha256, header, staged, ts_uid, peer)
            return StoreOutcome.CONFLICT
        check_series(s, header)
        # Placed while the transaction holds the write lock, so a concurrent
        # duplicate cannot replace the file of the instance being indexed.
        placed.append(rel)
        self.files.place(staged, rel)
        detail: dict[str, Any] = {
            "sop_class": header.sop_class_uid,
            "transfer_syntax": ts_uid,
            "bytes": staged.size,
        }
        if parsed.oddities:
            detail["oddities"] = list(parsed.oddities)
        self.index_instance(s, header, rel, staged.size, staged.sha256, ts_uid, peer, now)
        bump_association_counter(s, peer.association_id, "instances_stored")
        _audit_instance(s, "instance.stored", peer, header, detail)
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

    def index_instance(
        self,
        s: Session,
        header: Header,
        rel: Path,
        size: int,
        sha256: str,
        ts_uid: str,
        peer: Peer,
        now: datetime,
    ) -> None:
        """Write the study, series and instance rows for a file placed at ``rel``."""
        study_id = self._upsert_study(s, header, now)
        series_id = self._upsert_series(s, header, study_id, now, peer)
        s.connection().execute(
            insert(Instance).values(
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid,
                series_id=series_id,
                instance_number=header.instance_number,
                transfer_syntax_uid=ts_uid,
                path=rel.as_posix(),
                size_bytes=size,
                sha256=sha256,
                received_at=now,
                association_id=peer.association_id,
                duplicate_count=0,
            )
        )

    @staticmethod
    def _count_duplicate(
        s: Session, instance_id: int, series_id: int, header: Header, peer: Peer
    ) -> None:
        """Count a re-sent instance; its stored file is kept as it is."""
        s.connection().execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(duplicate_count=Instance.duplicate_count + 1)
        )
        s.connection().execute(
            update(Series)
            .where(Series.id == series_id)
            .values(duplicate_count=Series.duplicate_count + 1)
        )
        if peer.association_id is not None:
            s.connection().execute(
                update(Association)
                .where(Association.id == peer.association_id)
                .values(duplicates=Association.duplicates + 1)
            )
        times = s.connection().scalar(
            select(Instance.duplicate_count).where(Instance.id == instance_id)
        )
        record(
            s,
            "instance.duplicate",
            actor=peer.actor,
            actor_ip=peer.ip or None,
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            sop_instance_uid=header.sop_instance_uid,
            detail={"times_received": (times or 0) + 1},
        )

    @staticmethod
    def _upsert_study(s: Session, header: Header, now: datetime) -> int:
        study_id = s.connection().scalar(
            select(Study.id).where(Study.study_instance_uid == header.study_instance_uid)
        )
        if study_id is not None:
            s.connection().execute(
                update(Study).where(Study.id == study_id).values(last_received_at=now)
            )
            return int(study_id)
        return int(
            s.connection()
            .execute(
                insert(Study)
                .values(
                    study_instance_uid=header.study_instance_uid,
                    patient_id=header.patient_id,
                    patient_name=header.patient_name,
                    study_date=header.study_date,
                    accession_number=header.accession_number,
                    study_description=header.study_description,
                    first_received_at=now,
                    last_received_at=now,
                )
                .returning(Study.id)
            )
            .scalar_one()
        )

    @staticmethod
    def _upsert_series(s: Session, header: Header, study_id: int, now: datetime, peer: Peer) -> int:
        row = (
            s.connection()
            .execute(
                select(
                    Series.id,
                    Series.state,
                    Series.instance_count,
                    Series.stable_at,
                    Series.reopened_count,
                ).where(Series.series_instance_uid == header.series_instance_uid)
            )
            .first()
        )
        if row is None:
            return int(
                s.connection()
                .execute(
                    insert(Series)
                    .values(
                        series_instance_uid=header.series_instance_uid,
                        study_id=study_id,
                        modality=header.modality,
                        series_number=header.series_number,
                        series_description=header.series_description,
                        instance_count=1,
                        duplicate_count=0,
                        first_received_at=now,
                        last_received_at=now,
                        state="receiving",
                        reopened_count=0,
                    )
                    .returning(Series.id)
                )
                .scalar_one()
            )
        values: dict[str, Any] = {
            "instance_count": Series.instance_count + 1,
            "last_received_at": now,
        }
        if row.state == "stable":
            values |= {
                "state": "receiving",
                "reopened_count": row.reopened_count + 1,
                "stable_at": None,
            }
            _audit_instance(
                s,
                "series.reopened",
                peer,
                header,
                {
                    "instances_before": row.instance_count,
                    "stable_since": row.stable_at,
                    "reopened_count": row.reopened_count + 1,
                },
                sop=False,
            )
        s.connection().execute(update(Series).where(Series.id == row.id).values(**values))
        return int(row.id)


def mark_stable_series(db: Database, stable_seconds: float) -> list[str]:
    """Mark series with no new instance for ``stable_seconds`` as stable.

    Returns the Series Instance UIDs that became stable in this call; each
    gets a ``series.stable`` audit event. Called by the scheduler tick.
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=stable_seconds)
    with db.session() as s:
        rows = s.scalars(
            select(Series).where(Series.state == "receiving", Series.last_received_at <= cutoff)
        ).all()
        for series in rows:
            series.state = "stable"
            series.stable_at = now
            record(
                s,
                "series.stable",
                actor="node",
                study_instance_uid=series.study.study_instance_uid,
                series_instance_uid=series.series_instance_uid,
                detail={
                    "instances": series.instance_count,
                    "quiet_seconds": stable_seconds,
                    "reopened_count": series.reopened_count,
                },
            )
        return [r.series_instance_uid for r in rows]
