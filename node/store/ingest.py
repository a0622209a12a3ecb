"""Store one received instance: validate, write, index, track its series.

The order is the node's promise to the sender: the file is written and
fsynced to a temporary path, then in one transaction the duplicate check, the
rename into place, the row, the series' tracking and the audit event are
committed, all before :meth:`Ingestor.store` returns, and only then does the SCP
answer Success. Any failure raises a :class:`~node.dicom.status.ServiceError`
that the SCP turns into a failure status.
"""

from __future__ import annotations

import enum
import io
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import write_file_meta_info
from sqlalchemy import insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from node.audit.trail import record
from node.db.models import Association, Instance, Series, Study, utcnow
from node.db.session import Database
from node.dicom.status import CannotUnderstand, DataSetMismatch, IndexFailure, OutOfResources
from node.store.files import InstanceFiles, Staged

log = logging.getLogger(__name__)

#: Header attributes read from each instance (pixel data is never parsed here).
_HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "InstanceNumber",
    "PatientID",
    "PatientName",
    "StudyDate",
    "AccessionNumber",
    "StudyDescription",
]


class StoreOutcome(enum.Enum):
    """What happened to an instance that was accepted."""

    STORED = "stored"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Peer:
    """Who sent an instance: the association row and the calling AE/IP."""

    association_id: int | None
    calling_ae: str
    ip: str

    @property
    def actor(self) -> str:
        """Audit actor name for this peer."""
        return f"ae:{self.calling_ae}"


@dataclass(frozen=True)
class Header:
    """The attributes the index needs, read from the received dataset."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    instance_number: int | None
    patient_id: str | None
    patient_name: str | None
    study_date: str | None
    accession_number: str | None
    study_description: str | None


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


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
        actor_ip=peer.ip,
        study_instance_uid=header.study_instance_uid,
        series_instance_uid=header.series_instance_uid,
        sop_instance_uid=header.sop_instance_uid if sop else None,
        detail=detail,
    )


def read_header(preamble_and_meta: bytes, dataset: bytes | memoryview) -> Header:
    """Parse the header attributes of a received dataset.

    Raises
    ------
    CannotUnderstand
        The bytes are not a DICOM dataset, or a required UID is missing.
    """
    buffer = io.BytesIO(preamble_and_meta + bytes(dataset))
    try:
        ds = pydicom.dcmread(buffer, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        uids = {k: ds.get(k) for k in _HEADER_TAGS[:4]}
    except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OSError) as exc:
        raise CannotUnderstand(f"dataset cannot be parsed: {exc}") from exc
    missing = [k for k, v in uids.items() if not v]
    if missing:
        raise CannotUnderstand(f"dataset has no {', '.join(missing)}")
    return Header(
        sop_class_uid=str(uids["SOPClassUID"]),
        sop_instance_uid=str(uids["SOPInstanceUID"]),
        study_instance_uid=str(uids["StudyInstanceUID"]),
        series_instance_uid=str(uids["SeriesInstanceUID"]),
        modality=_text(ds, "Modality", 16),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription", 64),
        instance_number=_int(ds, "InstanceNumber"),
        patient_id=_text(ds, "PatientID", 64),
        patient_name=_text(ds, "PatientName", 324),
        study_date=_text(ds, "StudyDate", 8),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_description=_text(ds, "StudyDescription", 64),
    )


def encode_meta(file_meta: FileMetaDataset) -> bytes:
    """128-byte preamble, ``DICM`` and the File Meta Information group."""
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, file_meta, enforce_standard=True)  # type: ignore[arg-type]
    return out.getvalue()


class Ingestor:
    """Stores received instances under one storage root and indexes them in the DB."""

    def __init__(self, db: Database, files: InstanceFiles, *, min_free_mb: int) -> None:
        self.db = db
        self.files = files
        self.min_free_mb = min_free_mb

    def store(
        self,
        *,
        command_sop_class_uid: str,
        command_sop_instance_uid: str,
        file_meta: FileMetaDataset,
        dataset: bytes | memoryview,
        peer: Peer,
    ) -> StoreOutcome:
        """Store one instance received in a C-STORE request.

        Raises
        ------
        OutOfResources
            Free disk is under ``storage.min_free_mb`` or the write failed.
        CannotUnderstand
            Not DICOM, or a UID is missing or invalid.
        DataSetMismatch
            The dataset's SOP Class/Instance UID differ from the command's.
        IndexFailure
            The database could not record the instance (the file is removed).
        """
        free = self.files.free_mb()
        if free < self.min_free_mb:
            raise OutOfResources(
                f"free disk {free:.0f} MiB is under the {self.min_free_mb} MiB floor"
            )
        meta = encode_meta(file_meta)
        header = read_header(meta, dataset)
        if header.sop_instance_uid != command_sop_instance_uid:
            raise DataSetMismatch("SOPInstanceUID differs from the C-STORE command")
        if header.sop_class_uid != command_sop_class_uid:
            raise DataSetMismatch("SOPClassUID differs from the C-STORE command")
        rel = self.files.relative_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        staged = self.files.stage([meta, dataset])
        placed: list[Path] = []
        try:
            with self.db.session() as s:
                return self._index(
                    s, header, rel, staged, str(file_meta.TransferSyntaxUID), peer, placed
                )
        except SQLAlchemyError as exc:
            for path in placed:  # placed, but its row did not commit: leave no orphan
                self.files.remove(path)
            raise IndexFailure(f"database error: {type(exc).__name__}") from exc
        finally:
            self.files.discard(staged)

    def _index(
        self,
        s: Session,
        header: Header,
        rel: Path,
        staged: Staged,
        ts_uid: str,
        peer: Peer,
        placed: list[Path],
    ) -> StoreOutcome:
        """In one transaction: count a duplicate, or place the file and index it."""
        now = utcnow()
        existing = (
            s.connection()
            .execute(
                select(Instance.id, Instance.series_id).where(
                    Instance.sop_instance_uid == header.sop_instance_uid
                )
            )
            .first()
        )
        if existing is not None:
            self._count_duplicate(s, existing.id, existing.series_id, header, peer)
            return StoreOutcome.DUPLICATE
        # Placed while the transaction holds the write lock, so a concurrent
        # duplicate cannot replace the file of the instance being indexed.
        self.files.place(staged, rel)
        placed.append(rel)
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
                size_bytes=staged.size,
                sha256=staged.sha256,
                received_at=now,
                association_id=peer.association_id,
                duplicate_count=0,
            )
        )
        bump_association_counter(s, peer.association_id, "instances_stored")
        _audit_instance(
            s,
            "instance.stored",
            peer,
            header,
            {"sop_class": header.sop_class_uid, "transfer_syntax": ts_uid, "bytes": staged.size},
        )
        return StoreOutcome.STORED

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
            actor_ip=peer.ip,
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
