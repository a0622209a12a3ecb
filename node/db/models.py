"""Database tables: the index of what was received, and the audit trail.

Pixel data never enters the database: an instance row points at its file.
Patient attributes live here (and in the files) so an admin can find a study;
they never go to log lines. ``jobs`` and ``deliveries`` are created now and
filled by the scheduler and the delivery outbox.

All timestamps are naive UTC (``datetime.now(UTC).replace(tzinfo=None)``), so
SQLite and PostgreSQL store and return the same value, which the audit hash
chain depends on.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal, get_args

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    """Naive UTC now, microsecond precision (what both backends store)."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    """Declarative base for all sarcnode tables."""


class Study(Base):
    """A study, as first seen on the wire; one row per Study Instance UID."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    study_date: Mapped[str | None] = mapped_column(String(8))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """A series with its arrival tracking.

    ``state`` is ``receiving`` while instances arrive and ``stable`` once
    ``scheduler.series_stable_seconds`` passed without one; a late instance
    puts it back to ``receiving`` and counts a re-open.
    """

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    duplicate_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    state: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    stable_at: Mapped[datetime | None] = mapped_column(DateTime)
    reopened_count: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One stored SOP instance; ``path`` is relative to the storage root."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    duplicate_count: Mapped[int] = mapped_column(Integer, default=0)

    series: Mapped[Series] = relationship(back_populates="instances")


class Association(Base):
    """One inbound association, accepted or rejected, with what it brought."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_ip: Mapped[str] = mapped_column(String(45))
    peer_port: Mapped[int] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    tls_peer: Mapped[str | None] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))  # open|released|aborted|rejected
    reason: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)


class AuditEvent(Base):
    """An append-only audit event, chained to the previous one (see :mod:`node.audit.trail`).

    ``seq`` counts from 1 without gaps; ``hash`` covers every other column and
    ``prev_hash``, so an edited, deleted or re-ordered row breaks the chain at
    the first event touched (``sarcnode audit verify``). ``hash_alg`` says what
    made ``hash``: ``hmac-sha256`` with the key named by ``key_id`` (kept
    outside the database), or ``sha256`` for events written before audit keys.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    ts: Mapped[datetime] = mapped_column(DateTime, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    actor_ip: Mapped[str | None] = mapped_column(String(45))
    action: Mapped[str] = mapped_column(String(64), index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="{}")
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    hash_alg: Mapped[str] = mapped_column(String(16), default="sha256", server_default="sha256")
    key_id: Mapped[str | None] = mapped_column(String(16))


#: Every state a job can be in, in lifecycle order (``sarcnode jobs --state`` takes these).
JobState = Literal["queued", "running", "done", "failed", "dead", "cancelled"]
JOB_STATES: tuple[str, ...] = get_args(JobState)
#: Every state an outbox row can be in (``sarcnode deliveries --state`` takes these).
DeliveryState = Literal["pending", "committing", "done", "dead"]
DELIVERY_STATES: tuple[str, ...] = get_args(DeliveryState)


class Job(Base):
    """A pipeline run over one study: ``queued -> running -> done | failed | dead | cancelled``.

    ``stage`` is the stage running (or last finished); ``inputs`` is JSON
    (role -> series UID); ``folder`` holds every stage's outputs.
    """

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("idempotency_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(128))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str | None] = mapped_column(String(32))
    priority: Mapped[str] = mapped_column(String(16), default="normal")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    inputs: Mapped[str | None] = mapped_column(Text)
    folder: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class JobStage(Base):
    """One stage of one job: state, timing, outputs (JSON), error."""

    __tablename__ = "job_stages"
    __table_args__ = (UniqueConstraint("job_id", "stage"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    stage: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))  # pending | running | done | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)
    outputs: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)


class Delivery(Base):
    """One outbox row per (result object, destination); see :mod:`node.delivery`.

    ``state``: ``pending`` (due at ``next_attempt_at``), ``committing``
    (stored; waiting for the destination's storage commitment report),
    ``done`` (the destination confirmed it), ``dead`` (``max_attempts`` failures; only
    ``sarcnode deliveries retry`` revives it).
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "destination"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(255))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str | None] = mapped_column(String(16))  # seg, sr, pdf
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime)
    commitment_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    commitment_requested_at: Mapped[datetime | None] = mapped_column(DateTime)
