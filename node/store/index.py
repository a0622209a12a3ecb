"""The index rows of received instances: study, series, instance, counters, stable series.

What :class:`node.store.ingest.Ingestor` (and start-up reconciliation) write in
the transaction that places a file: the study and series rows (created or
updated, a stable series re-opened by a late instance), the instance row,
the association's counters and the audit events about the instance. The
caller holds the transaction; nothing here touches the disk. The statements
run on the connection's DBAPI cursor (:mod:`node.db.direct`): they run for
every received instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.audit.trail import lock_chain, record
from node.db.direct import Direct, direct
from node.db.models import Series, utcnow
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

#: Key space of the PostgreSQL advisory lock taken per SOP Instance UID while indexing.
_PG_SOP_LOCK_CLASS = 0x5C0D


def lock_instance(s: Session, sop_instance_uid: str) -> None:
    """On PostgreSQL, the locks a store takes before it looks anything up (SQLite: none).

    SQLite's ``BEGIN IMMEDIATE`` already serialises writers. On PostgreSQL the
    audit chain's lock comes first, the order every transaction takes its locks
    in, so receivers in several processes never insert one new study or series
    twice; the instance's own lock keeps two copies of it off one path.
    """
    d = direct(s)
    if d.postgresql:
        lock_chain(s)
        d.run(
            "SELECT pg_advisory_xact_lock(?, hashtext(?))", (_PG_SOP_LOCK_CLASS, sop_instance_uid)
        )


#: The statement adding one to each association counter.
_BUMP = {
    name: f"UPDATE associations SET {name} = {name} + 1 WHERE id = ?"  # noqa: S608 (fixed names)
    for name in ("instances_stored", "duplicates", "failures")
}


def bump_association_counter(
    s: Session,
    association_id: int | None,
    counter: Literal["instances_stored", "duplicates", "failures"],
) -> None:
    """Add one to an association's counter (no-op for instances stored outside one)."""
    if association_id is None:
        return
    direct(s).run(_BUMP[counter], (association_id,))


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


class StoredInstance(NamedTuple):
    """The row of an instance already indexed: what a re-sent copy is compared with."""

    id: int
    series_id: int
    sha256: str


def stored_instance(s: Session, sop_instance_uid: str) -> StoredInstance | None:
    """The indexed instance with this SOP Instance UID, if any."""
    row = direct(s).one(
        "SELECT id, series_id, sha256 FROM instances WHERE sop_instance_uid = ?",
        (sop_instance_uid,),
    )
    return StoredInstance(*row) if row is not None else None


class FiledSeries(NamedTuple):
    """A series row with its tracking and the Study Instance UID it is filed under."""

    id: int
    study_id: int
    state: str
    instance_count: int
    stable_at: datetime | None
    reopened_count: int
    study_instance_uid: str


_FILED_SERIES = (
    "SELECT se.id, se.study_id, se.state, se.instance_count, se.stable_at, "
    "se.reopened_count, st.study_instance_uid FROM series se "
    "JOIN studies st ON st.id = se.study_id WHERE se.series_instance_uid = ?"
)


def filed_series(s: Session, series_instance_uid: str) -> FiledSeries | None:
    """The series row with this Series Instance UID and its study's UID, if any."""
    d = direct(s)
    row = d.one(_FILED_SERIES, (series_instance_uid,))
    if row is None:
        return None
    id_, study_id, state, count, stable_at, reopened, study_uid = row
    return FiledSeries(id_, study_id, state, count, d.datetime_of(stable_at), reopened, study_uid)


def check_series(s: Session, header: Header) -> FiledSeries | None:
    """Refuse an instance whose series is already filed under another study.

    Returns the series row when the series is known (for :func:`index_instance`).

    Raises
    ------
    SeriesConflict
        With both Study Instance UIDs in the audit detail; nothing is written.
    """
    filed = filed_series(s, header.series_instance_uid)
    if filed is not None and filed.study_instance_uid != header.study_instance_uid:
        raise SeriesConflict(
            "SeriesInstanceUID is already filed under another study",
            detail={
                "series_instance_uid": header.series_instance_uid,
                "study_instance_uid": header.study_instance_uid,
                "filed_under_study": filed.study_instance_uid,
            },
        )
    return filed


def index_instance(
    s: Session,
    header: Header,
    rel: Path,
    size: int,
    sha256: str,
    ts_uid: str,
    peer: Peer,
    now: datetime,
    filed: FiledSeries | None = None,
) -> None:
    """Write the study, series and instance rows for a file placed at ``rel``.

    ``filed``: the series row :func:`check_series` returned in this
    transaction (saves looking it up again); None looks it up.
    """
    d = direct(s)
    if filed is None:
        filed = filed_series(s, header.series_instance_uid)
    if filed is None:
        series_id = _new_series(d, header, _upsert_study(d, header, now), now)
    else:
        d.run("UPDATE studies SET last_received_at = ? WHERE id = ?", (d.when(now), filed.study_id))
        _update_series(s, d, filed, header, now, peer)
        series_id = filed.id
    d.run(
        "INSERT INTO instances (sop_instance_uid, sop_class_uid, series_id, instance_number, "
        "transfer_syntax_uid, path, size_bytes, sha256, received_at, association_id, "
        "duplicate_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
        (
            header.sop_instance_uid,
            header.sop_class_uid,
            series_id,
            header.instance_number,
            ts_uid,
            rel.as_posix(),
            size,
            sha256,
            d.when(now),
            peer.association_id,
        ),
    )


def count_duplicate(
    s: Session, instance_id: int, series_id: int, header: Header, peer: Peer
) -> None:
    """Count a re-sent instance; its stored file is kept as it is."""
    d = direct(s)
    d.run("UPDATE instances SET duplicate_count = duplicate_count + 1 WHERE id = ?", (instance_id,))
    d.run("UPDATE series SET duplicate_count = duplicate_count + 1 WHERE id = ?", (series_id,))
    bump_association_counter(s, peer.association_id, "duplicates")
    times = d.scalar("SELECT duplicate_count FROM instances WHERE id = ?", (instance_id,))
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


def _upsert_study(d: Direct, header: Header, now: datetime) -> int:
    """The study's id: its row's last arrival moved to ``now``, or a new row."""
    study_id = d.scalar(
        "SELECT id FROM studies WHERE study_instance_uid = ?", (header.study_instance_uid,)
    )
    if study_id is not None:
        d.run("UPDATE studies SET last_received_at = ? WHERE id = ?", (d.when(now), study_id))
        return int(study_id)
    return d.insert(
        "INSERT INTO studies (study_instance_uid, patient_id, patient_name, study_date, "
        "accession_number, study_description, first_received_at, last_received_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (
            header.study_instance_uid,
            header.patient_id,
            header.patient_name,
            header.study_date,
            header.accession_number,
            header.study_description,
            d.when(now),
            d.when(now),
        ),
    )


def _new_series(d: Direct, header: Header, study_id: int, now: datetime) -> int:
    """Insert the row of a series seen for the first time; its id."""
    return d.insert(
        "INSERT INTO series (series_instance_uid, study_id, modality, series_number, "
        "series_description, instance_count, duplicate_count, first_received_at, "
        "last_received_at, state, reopened_count) "
        "VALUES (?, ?, ?, ?, ?, 1, 0, ?, ?, 'receiving', 0) RETURNING id",
        (
            header.series_instance_uid,
            study_id,
            header.modality,
            header.series_number,
            header.series_description,
            d.when(now),
            d.when(now),
        ),
    )


def _update_series(
    s: Session, d: Direct, row: FiledSeries, header: Header, now: datetime, peer: Peer
) -> None:
    """Count one more instance; a stable series is re-opened (and that audited)."""
    if row.state != "stable":
        d.run(
            "UPDATE series SET instance_count = instance_count + 1, last_received_at = ? "
            "WHERE id = ?",
            (d.when(now), row.id),
        )
        return
    d.run(
        "UPDATE series SET instance_count = instance_count + 1, last_received_at = ?, "
        "state = 'receiving', reopened_count = ?, stable_at = NULL WHERE id = ?",
        (d.when(now), row.reopened_count + 1, row.id),
    )
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
