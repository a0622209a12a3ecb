"""Append-only audit trail, chained by SHA-256 so tampering is detectable.

Every event stores the hash of the event before it; its own hash covers its
sequence number, time, actor, action, outcome, UIDs, detail and that previous
hash. Editing, deleting or inserting a row breaks the chain at the first event
touched, which :func:`verify` names. (Removing the newest events leaves a
shorter but valid chain: anchor ``head()`` elsewhere, e.g. in a daily log
shipped off the node, to detect that too.)

Appends are serialised: SQLite transactions begin IMMEDIATE (one writer), and
on PostgreSQL a transaction-scoped advisory lock is taken before the chain head
is read, so two writers never chain onto the same event.
"""

from __future__ import annotations

import getpass
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session

from node.db.models import AuditEvent, utcnow

GENESIS = "0" * 64
#: Arbitrary constant naming the PostgreSQL advisory lock of the audit chain.
_PG_LOCK_KEY = 0x5A4C_A0D1


def canonical_detail(detail: dict[str, Any] | None) -> str:
    """Detail as canonical JSON (sorted keys, no spaces): what the hash covers."""
    return json.dumps(detail or {}, sort_keys=True, separators=(",", ":"), default=str)


def event_hash(
    *,
    seq: int,
    ts: datetime,
    actor: str,
    actor_ip: str | None,
    action: str,
    outcome: str,
    study_instance_uid: str | None,
    series_instance_uid: str | None,
    sop_instance_uid: str | None,
    detail: str,
    prev_hash: str,
) -> str:
    """The SHA-256 of one event's fields and the previous hash."""
    fields = [
        str(seq),
        ts.isoformat(timespec="microseconds"),
        actor,
        actor_ip or "",
        action,
        outcome,
        study_instance_uid or "",
        series_instance_uid or "",
        sop_instance_uid or "",
        detail,
        prev_hash,
    ]
    return hashlib.sha256("\x1f".join(fields).encode("utf-8")).hexdigest()


def stored_event_hash(ev: AuditEvent) -> str:
    """The hash a stored event's current column values give (what verify compares)."""
    return event_hash(
        seq=ev.seq,
        ts=ev.ts,
        actor=ev.actor,
        actor_ip=ev.actor_ip,
        action=ev.action,
        outcome=ev.outcome,
        study_instance_uid=ev.study_instance_uid,
        series_instance_uid=ev.series_instance_uid,
        sop_instance_uid=ev.sop_instance_uid,
        detail=ev.detail,
        prev_hash=ev.prev_hash,
    )


def os_actor() -> str:
    """The OS user, as the actor of events caused by an admin command."""
    try:
        return f"os:{getpass.getuser()}"
    except (KeyError, OSError):
        return "os:unknown"


def record(
    session: Session,
    action: str,
    *,
    actor: str,
    outcome: str = "ok",
    actor_ip: str | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    detail: dict[str, Any] | None = None,
) -> int:
    """Append one event in the caller's transaction (so it commits with the change it records).

    Parameters
    ----------
    action
        Dotted name, e.g. ``instance.stored``, ``association.rejected``.
    actor
        Who: ``ae:<calling AE>`` for network peers, ``os:<user>`` for admin
        commands, ``node`` for the service itself.
    outcome
        ``ok``, ``refused``, ``failed`` or ``warning``.
    detail
        Extra facts. Must not hold patient name, ID or birth date.

    Returns
    -------
    int
        The event's sequence number.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
    last_seq, prev_hash = head(session)
    seq = last_seq + 1
    ts = utcnow()
    detail_text = canonical_detail(detail)
    fields: dict[str, Any] = {
        "seq": seq,
        "ts": ts,
        "actor": actor[:64],
        "actor_ip": actor_ip,
        "action": action,
        "outcome": outcome,
        "study_instance_uid": study_instance_uid,
        "series_instance_uid": series_instance_uid,
        "sop_instance_uid": sop_instance_uid,
        "detail": detail_text,
        "prev_hash": prev_hash,
    }
    session.connection().execute(insert(AuditEvent).values(**fields, hash=event_hash(**fields)))
    return seq


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`: how many events were checked and the first break."""

    checked: int
    broken_seq: int | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        """True when the whole chain is intact."""
        return self.broken_seq is None


def _stream(session: Session, batch: int = 5000) -> Iterator[AuditEvent]:
    last = 0
    while True:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(batch)
        ).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].seq


def verify(session: Session) -> VerifyResult:
    """Walk the chain from the first event and report the first broken one."""
    expected_seq, prev_hash, checked = 1, GENESIS, 0
    for ev in _stream(session):
        if ev.seq != expected_seq:
            return VerifyResult(
                checked, expected_seq, f"event {expected_seq} is missing (next is {ev.seq})"
            )
        if ev.prev_hash != prev_hash:
            return VerifyResult(checked, ev.seq, "previous-hash link does not match")
        if stored_event_hash(ev) != ev.hash:
            return VerifyResult(checked, ev.seq, "content does not match its hash (edited)")
        prev_hash, expected_seq, checked = ev.hash, expected_seq + 1, checked + 1
    return VerifyResult(checked)


def head(session: Session) -> tuple[int, str]:
    """The newest event's sequence number and hash (0 and the genesis hash if none)."""
    row = (
        session.connection()
        .execute(  # Core statement: skip the ORM execution layer
            select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
        )
        .first()
    )
    return (row[0], row[1]) if row else (0, GENESIS)
