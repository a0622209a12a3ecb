"""Append-only audit trail: a hash chain keyed with HMAC-SHA256, anchored outside the DB.

Every event stores the hash of the event before it; its own hash covers its
sequence number, time, actor, action, outcome, UIDs, detail, that previous
hash, and the algorithm and key id that made it. Three things make the chain
hold against someone who can write the database but cannot read the node's
files:

- **The hash is an HMAC** with a key kept outside the database
  (:mod:`node.audit.keys`): an edited event cannot be re-hashed, a deleted one
  cannot be hidden by renumbering and re-hashing the rest, and no event can be
  forged.
- **The head is anchored** in a file outside the database
  (:mod:`node.audit.anchor`), moved forward after commits that appended
  events (at most once a second per process), and logged (``audit head
  seq=... hash=...``) at start, stop and every ``audit.head_log_minutes`` so a
  log shipped off the node anchors it too. A chain shorter than its anchor was
  truncated or wiped.
- **Appends refuse a broken head**: a process with the anchor checks, before
  the first append of each transaction, that the database's newest events are
  still those the anchor names. If not, it raises :class:`AuditBreakError`
  (``serve`` refuses to start) until an admin runs ``sarcnode audit
  acknowledge-break --reason ...``, itself an audited event.

Events written before keys existed are plain SHA-256 (``hash_alg``
``sha256``); they still verify, and are reported as legacy: they show no edit,
but cannot prove a database writer did not re-hash them. A plain event after a
keyed one is a forgery (or a process writing without the key).

Appends are serialised: SQLite transactions begin IMMEDIATE (one writer), and
on PostgreSQL a transaction-scoped advisory lock is taken before the chain head
is read, so two writers never chain onto the same event.
"""

from __future__ import annotations

import getpass
import logging
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from node.audit.anchor import Anchor, AnchorError
from node.audit.chain import (
    ACK_ACTION,
    ALG_HMAC,
    ALG_LEGACY,
    ANCHOR,
    EDITED,
    FORGED,
    GAP,
    GENESIS,
    LINK,
    MAX_FINDINGS,
    REHASHED,
    SESSION_KEY,
    TRUNCATED,
    UNVERIFIABLE,
    WIPED,
    AuditBreakError,
    Finding,
    Head,
    anchor_findings,
    canonical_detail,
    context_of,
    event_hash,
    event_mac,
    head,
    head_row,
    stored_event_hash,
)
from node.audit.context import AuditContext
from node.audit.keys import AuditKeyError
from node.audit.verify import Segment, VerifyResult, verify
from node.db.direct import direct
from node.db.models import AuditEvent, utcnow

# What callers import from here (the chain's parts and its verification live beside it).
__all__ = [
    "ACK_ACTION",
    "ALG_HMAC",
    "ALG_LEGACY",
    "ANCHOR",
    "EDITED",
    "FORGED",
    "GAP",
    "GENESIS",
    "LINK",
    "MAX_FINDINGS",
    "REHASHED",
    "SESSION_KEY",
    "TRUNCATED",
    "UNVERIFIABLE",
    "WIPED",
    "AuditBreakError",
    "Finding",
    "Segment",
    "VerifyResult",
    "acknowledge_break",
    "anchor_findings",
    "attach",
    "canonical_detail",
    "check_head",
    "context_of",
    "event_hash",
    "event_mac",
    "head",
    "head_line",
    "lock_chain",
    "os_actor",
    "record",
    "stored_event_hash",
    "verify",
]

log = logging.getLogger(__name__)

#: Arbitrary constant naming the PostgreSQL advisory lock of the audit chain.
_PG_LOCK_KEY = 0x5A4C_A0D1

# session.info keys: per-transaction state the commit hooks read.
_CHECKED = "sarcnode.audit.checked"
_WROTE = "sarcnode.audit.wrote"
_TARGET = "sarcnode.audit.target"
_FORCE = "sarcnode.audit.force"


def os_actor() -> str:
    """The OS user, as the actor of events caused by an admin command."""
    try:
        return f"os:{getpass.getuser()}"
    except (KeyError, OSError):
        return "os:unknown"


def lock_chain(session: Session) -> None:
    """On PostgreSQL, take the audit chain's transaction lock (no-op on SQLite).

    SQLite's ``BEGIN IMMEDIATE`` already holds the only write lock. Taken
    before the chain head is read, so two writers never chain onto one event;
    a transaction may take it earlier to order its other locks after it.
    """
    d = direct(session)
    if d.postgresql:
        d.run("SELECT pg_advisory_xact_lock(CAST(? AS bigint))", (_PG_LOCK_KEY,))


_INSERT_EVENT = (
    "INSERT INTO audit_events (seq, ts, actor, actor_ip, action, outcome, "
    "study_instance_uid, series_instance_uid, sop_instance_uid, detail, prev_hash, hash, "
    "hash_alg, key_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def check_head(session: Session) -> list[Finding]:
    """:func:`anchor_findings` with the session's context (empty without an anchor).

    Raises
    ------
    node.audit.keys.AuditKeyError
        The key cannot be loaded.
    """
    ctx = context_of(session)
    if ctx is None or ctx.anchor is None:
        return []
    return anchor_findings(session, ctx.anchor, ctx.keyring, pending=ctx.pending)


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

    With an audit context (``serve``, the admin CLI, job workers) the event is
    keyed; the first append of a transaction checks the chain head against the
    anchor, and the commit moves the anchor forward. Without one (a bare
    :class:`~node.db.session.Database`, as in some tests) it is plain SHA-256,
    which is refused once the chain is keyed.

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

    Raises
    ------
    AuditBreakError
        The database's chain head disagrees with the anchor (truncated, wiped,
        rewritten); nothing is appended until an admin acknowledges it.
    node.audit.keys.AuditKeyError
        No usable key, or no key in this process while the chain is keyed.
    """
    ctx = context_of(session)
    lock_chain(session)
    current = head_row(session)
    fields: dict[str, Any] = {
        "seq": (current.seq if current else 0) + 1,
        "ts": utcnow(),
        "actor": actor[:64],
        "actor_ip": actor_ip,
        "action": action,
        "outcome": outcome,
        "study_instance_uid": study_instance_uid,
        "series_instance_uid": series_instance_uid,
        "sop_instance_uid": sop_instance_uid,
        "detail": canonical_detail(detail),
        "prev_hash": current.hash if current else GENESIS,
    }
    if ctx is None:
        if current is not None and current.hash_alg != ALG_LEGACY:
            raise AuditKeyError(
                "this process has no audit key but the audit chain is keyed: open the "
                "database with the node's audit context (audit key and anchor)"
            )
        values = {**fields, "hash": event_hash(**fields), "hash_alg": ALG_LEGACY, "key_id": None}
    else:
        values = _keyed(session, ctx, current, fields)
    d = direct(session)  # run for every received instance: no statement compiling
    d.run(
        _INSERT_EVENT,
        (
            values["seq"],
            d.when(values["ts"]),
            values["actor"],
            values["actor_ip"],
            values["action"],
            values["outcome"],
            values["study_instance_uid"],
            values["series_instance_uid"],
            values["sop_instance_uid"],
            values["detail"],
            values["prev_hash"],
            values["hash"],
            values["hash_alg"],
            values["key_id"],
        ),
    )
    return int(fields["seq"])


def _keyed(
    session: Session, ctx: AuditContext, current: Head | None, fields: dict[str, Any]
) -> dict[str, Any]:
    """A keyed event's columns; the transaction's first append checks the head first."""
    keyring = ctx.keyring
    if ctx.anchor is not None and not session.info.get(_CHECKED):
        if not session.info.get(_FORCE):
            findings = anchor_findings(session, ctx.anchor, keyring, current, ctx.pending)
            if findings:
                raise AuditBreakError(findings)
            if ctx.pending is None and not ctx.anchor.exists():
                # First keyed append: anchor the head it builds on *before* it
                # commits (the write lock is held), so no other process ever
                # sees keyed events without an anchor file.
                ctx.anchor.advance(fields["seq"] - 1, fields["prev_hash"], keyring)
        session.info[_CHECKED] = True
    key = keyring.current
    values = {
        **fields,
        "hash": event_mac(key, **fields),
        "hash_alg": ALG_HMAC,
        "key_id": key.key_id,
    }
    session.info[_WROTE] = True
    return values


def acknowledge_break(session: Session, reason: str, *, actor: str) -> tuple[int, list[Finding]]:
    """Record an admin's acknowledgement of a chain break and re-anchor at the new event.

    The event (``audit.break_acknowledged``) names the reason, what was found
    and what the anchor said; :func:`verify` lists it ever after. Returns its
    seq and the findings, or ``(0, [])`` when there is no break to acknowledge.

    Raises
    ------
    ValueError
        ``reason`` is empty, or this process has no anchor configured.
    """
    reason = reason.strip()
    if not reason:
        raise ValueError("a reason is required")
    ctx = context_of(session)
    if ctx is None or ctx.anchor is None:
        raise ValueError("no audit anchor is configured for this database")
    keyring = ctx.keyring
    lock_chain(session)
    findings = anchor_findings(session, ctx.anchor, keyring)
    if not findings:
        return 0, []
    try:
        anchor: Anchor | None = ctx.anchor.read(keyring)
    except AnchorError:
        anchor = None
    session.info[_FORCE] = True
    seq = record(
        session,
        ACK_ACTION,
        actor=actor,
        outcome="warning",
        detail={
            "reason": reason[:1000],
            "findings": [f.as_dict() for f in findings],
            "anchor": {"seq": anchor.seq, "hash": anchor.hash} if anchor else None,
            "anchor_file": str(ctx.anchor.path),
        },
    )
    return seq, findings


def attach(sessions: sessionmaker[Session]) -> None:
    """Install the commit hooks that move the anchor (called by ``Database``)."""
    event.listen(sessions, "before_commit", _before_commit)
    event.listen(sessions, "after_commit", _after_commit)
    event.listen(sessions, "after_rollback", _after_rollback)


def _before_commit(session: Session) -> None:
    # The head to anchor is read inside the transaction (the write lock is
    # held): a savepoint rolled back after an append cannot mislead it.
    if session.in_nested_transaction() or not session.info.get(_WROTE):
        return
    ctx = context_of(session)
    if ctx is None or ctx.anchor is None:
        return
    current = head_row(session)
    if current is not None:
        session.info[_TARGET] = (current.seq, current.hash)


def _after_commit(session: Session) -> None:
    if session.in_nested_transaction():
        return
    target = session.info.pop(_TARGET, None)
    force = bool(session.info.pop(_FORCE, False))
    session.info.pop(_WROTE, None)
    session.info.pop(_CHECKED, None)
    ctx = context_of(session)
    if target is None or ctx is None or ctx.anchor is None:
        return
    try:
        ctx.committed(target[0], target[1], force=force)
    except (OSError, AuditKeyError) as exc:
        # The events are committed; the anchor lags (allowed) until the next write.
        log.error("audit anchor %s not moved to seq %d: %s", ctx.anchor.path, target[0], exc)


def _after_rollback(session: Session) -> None:
    if session.in_nested_transaction():
        return
    for key in (_TARGET, _FORCE, _WROTE, _CHECKED):
        session.info.pop(key, None)


def head_line(session: Session) -> str:
    """``audit head seq=N hash=H alg=A key=K``: the line logged to anchor the chain off-node."""
    row = (
        session.connection()
        .execute(
            select(AuditEvent.seq, AuditEvent.hash, AuditEvent.hash_alg, AuditEvent.key_id)
            .order_by(AuditEvent.seq.desc())
            .limit(1)
        )
        .first()
    )
    if row is None:
        return f"audit head seq=0 hash={GENESIS}"
    return f"audit head seq={row[0]} hash={row[1]} alg={row[2]} key={row[3] or '-'}"
