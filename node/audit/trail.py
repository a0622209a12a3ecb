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
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import event, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from node.audit.anchor import Anchor, AnchorError, HeadAnchor
from node.audit.context import AuditContext
from node.audit.keys import AuditKey, AuditKeyError, Keyring
from node.db.models import AuditEvent, utcnow

log = logging.getLogger(__name__)

GENESIS = "0" * 64
#: ``hash_alg`` of events chained by plain SHA-256 (before audit keys).
ALG_LEGACY = "sha256"
#: ``hash_alg`` of keyed events; ``key_id`` names the key.
ALG_HMAC = "hmac-sha256"
#: Action of the event an admin writes to continue after a break.
ACK_ACTION = "audit.break_acknowledged"
#: Arbitrary constant naming the PostgreSQL advisory lock of the audit chain.
_PG_LOCK_KEY = 0x5A4C_A0D1
_MAC_FORMAT = "sarcnode-audit-event/1"
#: Findings listed by :func:`verify` at most (the rest are counted).
MAX_FINDINGS = 50

# session.info keys: the process's AuditContext (set by Database), and
# per-transaction state the commit hooks read.
SESSION_KEY = "sarcnode.audit"
_CHECKED = "sarcnode.audit.checked"
_WROTE = "sarcnode.audit.wrote"
_TARGET = "sarcnode.audit.target"
_FORCE = "sarcnode.audit.force"

# Kinds of finding, as `audit verify` names them.
REHASHED = "rehashed"  # an anchored keyed event does not match its HMAC / the anchor
FORGED = "forged"  # beyond the anchor with a bad HMAC, or unkeyed after keyed events
EDITED = "edited"  # a legacy (plain SHA-256) event does not match its hash
LINK = "link"  # previous-hash link broken
GAP = "gap"  # missing sequence numbers (deleted, renumbered)
TRUNCATED = "truncated"  # chain shorter than the anchor
WIPED = "wiped"  # no events, the anchor says there were
ANCHOR = "anchor"  # anchor file missing or untrustworthy
UNVERIFIABLE = "unverifiable"  # signed by a key (or algorithm) this node does not hold


@dataclass(frozen=True)
class Finding:
    """One problem :func:`verify` found: its kind, where, and what it means."""

    kind: str
    seq: int | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"kind": self.kind, "seq": self.seq, "message": self.message}


class AuditBreakError(RuntimeError):
    """The database's chain head disagrees with the anchor: appending is refused.

    ``findings`` says how (truncated, wiped, rewritten, anchor missing...).
    """

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        more = f" (+{len(findings) - 1} more)" if len(findings) > 1 else ""
        super().__init__(
            f"audit chain break: {findings[0].message}{more}. Appending to this chain is "
            "refused. Investigate with `sarcnode audit verify`; once the cause is understood "
            "(e.g. the database was restored from a backup), `sarcnode audit "
            'acknowledge-break --reason "..."` continues from the database\'s newest event '
            "(the acknowledgement is itself audited)"
        )


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
    """The plain SHA-256 of one event's fields and the previous hash (legacy events)."""
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


def event_mac(
    key: AuditKey,
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
    """HMAC-SHA256 of one keyed event (fields as a JSON array, so no two events collide)."""
    fields = [
        _MAC_FORMAT,
        ALG_HMAC,
        key.key_id,
        seq,
        ts.isoformat(timespec="microseconds"),
        actor,
        actor_ip,
        action,
        outcome,
        study_instance_uid,
        series_instance_uid,
        sop_instance_uid,
        detail,
        prev_hash,
    ]
    return key.mac(json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode())


def _row_fields(ev: AuditEvent) -> dict[str, Any]:
    return {
        "seq": ev.seq,
        "ts": ev.ts,
        "actor": ev.actor,
        "actor_ip": ev.actor_ip,
        "action": ev.action,
        "outcome": ev.outcome,
        "study_instance_uid": ev.study_instance_uid,
        "series_instance_uid": ev.series_instance_uid,
        "sop_instance_uid": ev.sop_instance_uid,
        "detail": ev.detail,
        "prev_hash": ev.prev_hash,
    }


def stored_event_hash(ev: AuditEvent) -> str:
    """The plain SHA-256 a stored event's columns give (all a writer without the key can make)."""
    return event_hash(**_row_fields(ev))


def os_actor() -> str:
    """The OS user, as the actor of events caused by an admin command."""
    try:
        return f"os:{getpass.getuser()}"
    except (KeyError, OSError):
        return "os:unknown"


def context_of(session: Session) -> AuditContext | None:
    """The audit context of ``session``'s database (None: no key, plain SHA-256)."""
    ctx = session.info.get(SESSION_KEY)
    return ctx if isinstance(ctx, AuditContext) else None


class _Head(NamedTuple):
    seq: int
    hash: str
    hash_alg: str


def _head_row(session: Session) -> _Head | None:
    row = (
        session.connection()
        .execute(  # Core statement: skip the ORM execution layer
            select(AuditEvent.seq, AuditEvent.hash, AuditEvent.hash_alg)
            .order_by(AuditEvent.seq.desc())
            .limit(1)
        )
        .first()
    )
    return _Head(row[0], row[1], row[2]) if row else None


def head(session: Session) -> tuple[int, str]:
    """The newest event's sequence number and hash (0 and the genesis hash if none)."""
    row = _head_row(session)
    return (row.seq, row.hash) if row else (0, GENESIS)


def _lock(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})


def _has_keyed_events(session: Session) -> bool:
    q = select(AuditEvent.seq).where(AuditEvent.hash_alg != ALG_LEGACY).limit(1)
    return session.connection().execute(q).first() is not None


def anchor_findings(
    session: Session,
    anchor_file: HeadAnchor,
    keyring: Keyring,
    current: _Head | None = None,
    pending: tuple[int, str] | None = None,
) -> list[Finding]:
    """How the database's chain head disagrees with the anchor (empty: it agrees).

    Cheap (two indexed reads and the anchor file): run before every append
    transaction, at start and by ``audit verify``. ``pending`` is a head this
    process committed and has not written to the file yet; the newer of the two
    counts. Events *beyond* the anchor are not a finding here (the anchor may
    lag after a crash, and job workers do not move it); their HMACs are
    checked by :func:`verify`.
    """
    current = current if current is not None else _head_row(session)
    try:
        anchor = anchor_file.read(keyring)
    except AnchorError as exc:
        return [Finding(ANCHOR, None, f"{exc}: it can no longer vouch for the chain's head")]
    if pending is not None and (anchor is None or pending[0] > anchor.seq):
        anchor = Anchor(pending[0], pending[1], keyring.current.key_id, "(not yet written)")
    if anchor is None:
        if _has_keyed_events(session):
            return [
                Finding(
                    ANCHOR,
                    None,
                    f"the audit anchor {anchor_file.path} is missing but the database holds "
                    "keyed events: it was deleted or moved, so truncation cannot be ruled out",
                )
            ]
        return []
    seq = current.seq if current else 0
    if seq == 0 and anchor.seq > 0:
        return [
            Finding(
                WIPED,
                1,
                f"the audit table is empty but the anchor {anchor_file.path} says "
                f"{anchor.seq} event(s) were committed: every event was deleted",
            )
        ]
    if seq < anchor.seq:
        return [
            Finding(
                TRUNCATED,
                seq + 1,
                f"the chain ends at seq {seq} but the anchor {anchor_file.path} says seq "
                f"{anchor.seq} was committed: the newest {anchor.seq - seq} event(s) were "
                "deleted (or the database was restored from an older backup)",
            )
        ]
    if anchor.seq == 0:
        return []
    anchored = (
        session.connection()
        .execute(select(AuditEvent.hash).where(AuditEvent.seq == anchor.seq))
        .first()
    )
    if anchored is None:
        return [
            Finding(
                GAP,
                anchor.seq,
                f"the anchored event seq {anchor.seq} is missing (deleted, or the events "
                "after it renumbered)",
            )
        ]
    if anchored[0] != anchor.hash:
        return [
            Finding(
                REHASHED,
                anchor.seq,
                f"event seq {anchor.seq} no longer has the hash the anchor recorded: "
                "it (or the chain up to it) was rewritten after it was anchored",
            )
        ]
    return []


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
    _lock(session)
    current = _head_row(session)
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
    session.connection().execute(insert(AuditEvent).values(**values))
    return int(fields["seq"])


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
    _lock(session)
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
    current = _head_row(session)
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


# -- verification ------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A run of consecutive events made by the same algorithm and key."""

    first_seq: int
    last_seq: int
    hash_alg: str
    key_id: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "hash_alg": self.hash_alg,
            "key_id": self.key_id,
        }


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`: events checked, every finding, and what was seen.

    ``ok`` is True when there is no finding. ``broken_seq`` and ``reason``
    describe the first finding (kept for callers that want one line).
    """

    checked: int
    findings: tuple[Finding, ...] = ()
    more_findings: int = 0
    segments: tuple[Segment, ...] = ()
    anchor: Anchor | None = None
    anchor_path: str | None = None
    acknowledged: tuple[dict[str, Any], ...] = ()
    beyond_anchor: int = 0
    keys: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when the whole chain is intact (and agrees with its anchor)."""
        return not self.findings

    @property
    def broken_seq(self) -> int | None:
        """The sequence number of the first finding (None when intact or not tied to one)."""
        if not self.findings:
            return None
        return next((f.seq for f in self.findings if f.seq is not None), None)

    @property
    def reason(self) -> str:
        """The first finding's message ('' when intact)."""
        return self.findings[0].message if self.findings else ""

    @property
    def legacy(self) -> int:
        """How many events are plain SHA-256 (written before audit keys)."""
        return sum(s.last_seq - s.first_seq + 1 for s in self.segments if s.hash_alg == ALG_LEGACY)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``sarcnode audit verify --json``)."""
        return {
            "ok": self.ok,
            "checked": self.checked,
            "findings": [f.as_dict() for f in self.findings],
            "more_findings": self.more_findings,
            "segments": [s.as_dict() for s in self.segments],
            "legacy_events": self.legacy,
            "anchor": (
                {"path": self.anchor_path, "seq": self.anchor.seq, "hash": self.anchor.hash}
                if self.anchor
                else {"path": self.anchor_path, "seq": None}
            ),
            "beyond_anchor": self.beyond_anchor,
            "acknowledged": list(self.acknowledged),
            "keys": list(self.keys),
        }


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


class _Walk:
    """Collects findings and segments while :func:`verify` walks the chain."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.more = 0
        self.segments: list[Segment] = []
        self.unverifiable: dict[str, list[int]] = {}

    def add(self, kind: str, seq: int | None, message: str) -> None:
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append(Finding(kind, seq, message))
        else:
            self.more += 1

    def segment(self, seq: int, alg: str, key_id: str | None) -> None:
        last = self.segments[-1] if self.segments else None
        if last and last.hash_alg == alg and last.key_id == key_id and last.last_seq == seq - 1:
            self.segments[-1] = Segment(last.first_seq, seq, alg, key_id)
        else:
            self.segments.append(Segment(seq, seq, alg, key_id))


def verify(
    session: Session,
    *,
    keyring: Keyring | None = None,
    anchor_file: HeadAnchor | None = None,
) -> VerifyResult:
    """Walk the whole chain and check it against the keys and the anchor.

    Every event is checked on its own (its hash or HMAC, its link to the one
    before, its sequence number), and the head against the anchor, so one
    verification names every kind of tampering at once: re-hashed or edited
    events, forged ones, gaps, truncation and wiping. ``keyring`` and
    ``anchor_file`` default to the session's audit context; without any, only
    plain SHA-256 events can be checked and keyed ones are unverifiable.
    """
    ctx = context_of(session)
    walk = _Walk()
    if keyring is None and ctx is not None:
        try:
            keyring = ctx.keyring
        except AuditKeyError as exc:
            walk.add(UNVERIFIABLE, None, str(exc))
    if anchor_file is None and ctx is not None:
        anchor_file = ctx.anchor
    anchor: Anchor | None = None
    if anchor_file is not None and keyring is not None:
        try:
            anchor = anchor_file.read(keyring)
        except AnchorError:
            anchor = None  # reported by anchor_findings below
    anchored_seq = anchor.seq if anchor else None

    expected_seq, prev_hash, checked = 1, GENESIS, 0
    seen_keyed = False
    acknowledged: list[dict[str, Any]] = []
    for ev in _stream(session):
        if ev.seq != expected_seq:
            walk.add(
                GAP,
                expected_seq,
                f"event {expected_seq} is missing (next is {ev.seq}): deleted, or events "
                "renumbered",
            )
        elif ev.prev_hash != prev_hash:  # after a gap the link cannot match: not repeated
            walk.add(
                LINK,
                ev.seq,
                "previous-hash link does not match the event before it (that event was "
                "replaced or re-hashed)",
            )
        walk.segment(ev.seq, ev.hash_alg, ev.key_id)
        verified = _check_event(ev, keyring, walk, seen_keyed, anchored_seq)
        seen_keyed = seen_keyed or ev.hash_alg != ALG_LEGACY
        if verified and ev.action == ACK_ACTION:
            detail = json.loads(ev.detail)
            acknowledged.append(
                {
                    "seq": ev.seq,
                    "ts": ev.ts.isoformat(timespec="seconds"),
                    "actor": ev.actor,
                    "reason": detail.get("reason"),
                    "findings": [f.get("kind") for f in detail.get("findings", [])],
                }
            )
        prev_hash, expected_seq, checked = ev.hash, ev.seq + 1, checked + 1
    for key_id, seqs in walk.unverifiable.items():
        walk.add(
            UNVERIFIABLE,
            seqs[0],
            f"{len(seqs)} event(s) from seq {seqs[0]} are signed with key id {key_id}, which "
            "is not configured: restore that key (keep old keys after a rotation)",
        )
    if anchor_file is not None and keyring is not None:
        for finding in anchor_findings(session, anchor_file, keyring):
            if finding not in walk.findings:
                walk.add(finding.kind, finding.seq, finding.message)
    last_seq = expected_seq - 1
    return VerifyResult(
        checked=checked,
        findings=tuple(walk.findings),
        more_findings=walk.more,
        segments=tuple(walk.segments),
        anchor=anchor,
        anchor_path=str(anchor_file.path) if anchor_file else None,
        acknowledged=tuple(acknowledged),
        beyond_anchor=max(0, last_seq - anchored_seq) if anchored_seq is not None else 0,
        keys=tuple(keyring.key_ids) if keyring else (),
    )


def _check_event(
    ev: AuditEvent,
    keyring: Keyring | None,
    walk: _Walk,
    seen_keyed: bool,
    anchored_seq: int | None,
) -> bool:
    """Check one event's own hash; add a finding and return False if it does not verify."""
    if ev.hash_alg == ALG_LEGACY:
        if seen_keyed:
            walk.add(
                FORGED,
                ev.seq,
                "plain SHA-256 event after keyed events: forged by a writer without the key "
                "(or written by a process without the audit key)",
            )
            return False
        if stored_event_hash(ev) != ev.hash:
            walk.add(EDITED, ev.seq, "content does not match its hash (edited)")
            return False
        return True
    if ev.hash_alg != ALG_HMAC:
        walk.add(UNVERIFIABLE, ev.seq, f"unknown hash algorithm {ev.hash_alg!r}")
        return False
    key = keyring.get(ev.key_id or "") if keyring else None
    if key is None:
        walk.unverifiable.setdefault(ev.key_id or "(none)", []).append(ev.seq)
        return False
    if event_mac(key, **_row_fields(ev)) == ev.hash:
        return True
    if anchored_seq is not None and ev.seq > anchored_seq:
        walk.add(
            FORGED,
            ev.seq,
            f"event beyond the anchored head (seq {anchored_seq}) does not match its HMAC: "
            "appended or edited by a writer without the key",
        )
    else:
        walk.add(
            REHASHED,
            ev.seq,
            "content does not match its HMAC: edited, renumbered or re-hashed without the key",
        )
    return False
