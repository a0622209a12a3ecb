"""The index rows of received instances: study, series, instance, counters, stable series.

What :class:`node.store.ingest.Ingestor` (and start-up reconciliation) write in
the transaction that places a file: the study and series rows (created or
updated, a stable series re-opened by a late instance), the instance row,
the association's counters and the audit events about the instance. The
caller holds the transaction; nothing here touches the disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from node.audit.trail import record
from node.db.models import Association, Instance, Series, Study, utcnow
from node.db.session import Database
from node.dicom.status import SeriesConflict
from node.store.header import Header


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


def audit_instance(
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


def index_instance(
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
    study_id = upsert_study(s, header, now)
    series_id = upsert_series(s, header, study_id, now, peer)
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


def count_duplicate(
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


def upsert_study(s: Session, header: Header, now: datetime) -> int:
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


def upsert_series(s: Session, header: Header, study_id: int, now: datetime, peer: Peer) -> int:
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
        audit_instance(
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
