"""The delivery outbox: results reach every destination, once, even when one is down.

One row per (object, destination) in ``deliveries``; enqueueing the same
object again is a no-op (the unique key), so a re-run never sends twice. A
due row is sent; success marks it ``done``, a failure schedules the next try
with exponential back-off and jitter, and ``max_attempts`` failures make it
``dead`` until an admin runs ``sarcnode deliveries retry``. Every attempt is
an audit event. Destinations are in the node configuration (``destinations:``).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.audit.trail import record
from node.config import DeliverySettings, DestinationSettings, Settings
from node.db.models import Delivery, utcnow
from node.db.session import Database
from node.delivery.senders import DeliveryError, request_commitment, send

ACTOR = "node"
KINDS = {  # SOP class -> the short kind shown in listings
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",
    "1.2.840.10008.5.1.4.1.1.104.1": "pdf",
}

__all__ = [
    "DeliveryError",
    "Outcome",
    "backoff",
    "commitment_report",
    "deliver_due",
    "enqueue",
    "expire_commitments",
    "retry",
    "send",
]


@dataclass(frozen=True)
class Outcome:
    """What one attempt did."""

    delivery_id: int
    destination: str
    ok: bool
    state: str
    error: str | None = None


def _audit(
    session: Session, row: Delivery, action: str, actor: str, *, outcome: str = "ok", **facts: Any
) -> None:
    """One audit event about an outbox row: its object, destination and ``facts``."""
    record(
        session,
        action,
        actor=actor,
        outcome=outcome,
        study_instance_uid=row.study_instance_uid,
        sop_instance_uid=row.sop_instance_uid,
        detail={"delivery": row.id, "destination": row.destination, **facts},
    )


def backoff(attempts: int, policy: DeliverySettings, rng: random.Random | None = None) -> float:
    """Seconds before try ``attempts + 1``: base x 2^(attempts-1), capped, +/- jitter."""
    delay = min(policy.backoff_max_s, policy.backoff_base_s * 2.0 ** max(attempts - 1, 0))
    spread = float((rng or random).uniform(-policy.jitter, policy.jitter))
    return max(0.0, delay * (1.0 + spread))


def enqueue(
    db: Database,
    files: Iterable[Path],
    destinations: Sequence[str],
    *,
    job_id: int | None = None,
    settings: Settings | None = None,
) -> list[int]:
    """Add one pending row per (file, destination); existing pairs are left alone.

    Returns the ids of the rows created. Unknown destination names raise
    ``KeyError`` before anything is written.
    """
    if settings is not None:
        for name in destinations:
            settings.destination(name)
    created: list[int] = []
    now = utcnow()
    with db.session() as session:
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=None)
            sop_uid, sop_class = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
            for name in destinations:
                existing = session.scalar(
                    select(Delivery).where(
                        Delivery.sop_instance_uid == sop_uid, Delivery.destination == name
                    )
                )
                if existing is not None:
                    if existing.path != str(path) and existing.state != "done":
                        existing.path, existing.updated_at = str(path), now
                    continue
                row = Delivery(
                    job_id=job_id,
                    sop_instance_uid=sop_uid,
                    sop_class_uid=sop_class,
                    study_instance_uid=str(ds.StudyInstanceUID),
                    kind=KINDS.get(sop_class, "other"),
                    path=str(path),
                    destination=name,
                    state="pending",
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                )
                session.add(row)
                session.flush()
                created.append(row.id)
                _audit(session, row, "delivery.queued", ACTOR, kind=row.kind)
    return created


def deliver_due(
    db: Database,
    settings: Settings,
    *,
    now: datetime | None = None,
    limit: int = 100,
    rng: random.Random | None = None,
) -> list[Outcome]:
    """Send every pending row whose time has come (oldest first); return what happened."""
    moment = now or utcnow()
    with db.session() as session:
        rows = session.scalars(
            select(Delivery)
            .where(Delivery.state == "pending", Delivery.next_attempt_at <= moment)
            .order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(limit)
        ).all()
        due = [(r.id, r.destination, r.path) for r in rows]
    outcomes = []
    for delivery_id, name, path in due:
        try:
            destination: DestinationSettings | None = settings.destination(name)
        except KeyError:
            destination = None
        error: str | None = None
        transaction: str | None = None
        if destination is None:
            error = f"destination {name!r} is no longer configured"
        else:
            try:
                send(Path(path), destination, calling_ae=settings.dicom.ae_title)
            except DeliveryError as exc:
                error = str(exc)
            if error is None and destination.storage_commitment:
                transaction = str(generate_uid())
        # Committed to the row before the N-ACTION: the report can arrive at once.
        outcome = _settle(db, delivery_id, error, settings.delivery, rng, commitment=transaction)
        if transaction is not None and destination is not None:
            try:
                request_commitment(Path(path), destination, settings.dicom.ae_title, transaction)
            except DeliveryError as exc:
                outcome = _settle(db, delivery_id, str(exc), settings.delivery, rng, counted=False)
        outcomes.append(outcome)
    outcomes += expire_commitments(db, settings, now=moment, rng=rng)
    return outcomes


def expire_commitments(
    db: Database,
    settings: Settings,
    *,
    now: datetime | None = None,
    rng: random.Random | None = None,
) -> list[Outcome]:
    """Rows whose commitment report did not come in time count as a failed attempt."""
    moment = now or utcnow()
    limit = moment - timedelta(seconds=settings.delivery.commitment_timeout_s)
    with db.session() as session:
        late = session.scalars(
            select(Delivery.id).where(
                Delivery.state == "committing", Delivery.commitment_requested_at <= limit
            )
        ).all()
    error = (
        f"no storage commitment report within {settings.delivery.commitment_timeout_s:g} s "
        "(does the destination know this node's AE title, host and port?)"
    )
    return [_settle(db, i, error, settings.delivery, rng, counted=False) for i in late]


def commitment_report(
    db: Database,
    transaction_uid: str,
    committed: Sequence[str],
    failed: dict[str, int],
    *,
    actor: str,
    policy: DeliverySettings,
) -> int:
    """Record a destination's N-EVENT-REPORT: committed rows are done, failed ones retry.

    Returns how many outbox rows the report settled.
    """
    with db.session() as session:
        rows = session.scalars(
            select(Delivery).where(
                Delivery.commitment_uid == transaction_uid, Delivery.state == "committing"
            )
        ).all()
        sops = {r.id: r.sop_instance_uid for r in rows}
    settled = 0
    for delivery_id, sop in sops.items():
        if sop in committed:
            _commit_done(db, delivery_id, actor)
            settled += 1
        elif sop in failed:
            error = f"storage commitment failed (failure reason 0x{failed[sop]:04X})"
            _settle(db, delivery_id, error, policy, None, counted=False)
            settled += 1
    return settled


def _commit_done(db: Database, delivery_id: int, actor: str) -> None:
    now = utcnow()
    with db.session() as session:
        row = session.get(Delivery, delivery_id)
        if row is None or row.state != "committing":
            return
        row.state, row.delivered_at, row.updated_at, row.last_error = "done", now, now, None
        _audit(session, row, "delivery.committed", actor, transaction=row.commitment_uid)


def _settle(
    db: Database,
    delivery_id: int,
    error: str | None,
    policy: DeliverySettings,
    rng: random.Random | None,
    *,
    commitment: str | None = None,
    counted: bool = True,
) -> Outcome:
    """Record one attempt's result on the row and in the audit trail, in one transaction.

    ``commitment``: the object is stored and its storage commitment asked
    under that transaction UID (state ``committing``). ``counted=False``: the
    attempt was already counted when the object was sent (a late or failed
    commitment report).
    """
    now = utcnow()
    with db.session() as session:
        row = session.get(Delivery, delivery_id)
        assert row is not None
        if counted:
            row.attempts += 1
        row.updated_at = now
        if error is None and commitment is not None:
            row.state, row.commitment_uid = "committing", commitment
            row.commitment_requested_at, row.last_error, row.next_attempt_at = now, None, None
        elif error is None:
            row.state, row.delivered_at = "done", now
            row.last_error, row.next_attempt_at = None, None
        else:
            row.last_error = error[:2000]
            row.state, row.commitment_uid = "pending", None
            if row.attempts >= policy.max_attempts:
                row.state, row.next_attempt_at = "dead", None
            else:
                row.next_attempt_at = now + timedelta(seconds=backoff(row.attempts, policy, rng))
        facts: dict[str, Any] = {"attempt": row.attempts, "state": row.state}
        if error:
            facts["error"] = error[:500]
        if row.next_attempt_at:
            facts["next_attempt_at"] = row.next_attempt_at.isoformat()
        action = "delivery.sent" if error is None else "delivery.failed"
        _audit(session, row, action, ACTOR, outcome="ok" if error is None else "failed", **facts)
        return Outcome(row.id, row.destination, error is None, row.state, error)


def retry(
    db: Database, ids: Sequence[int] = (), *, all_dead: bool = False, actor: str
) -> list[int]:
    """Make dead (or given) rows pending again, due now, with a fresh attempt count."""
    now = utcnow()
    with db.session() as session:
        query = select(Delivery)
        if all_dead:
            query = query.where(Delivery.state == "dead")
        else:
            query = query.where(Delivery.id.in_(list(ids)))
        rows = session.scalars(query).all()
        missing = sorted(set(ids) - {r.id for r in rows})
        if missing:
            raise KeyError(f"no delivery with id {', '.join(map(str, missing))}")
        for row in rows:
            if row.state == "done":
                raise ValueError(f"delivery {row.id} is already done; nothing to retry")
            row.state, row.attempts, row.next_attempt_at, row.updated_at = "pending", 0, now, now
            _audit(session, row, "delivery.retry", actor)
        return [r.id for r in rows]
