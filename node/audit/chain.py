"""The audit chain's parts: event hashes and HMACs, findings, the head and its anchor check.

Shared by appending (:mod:`node.audit.trail`, which says how the chain holds)
and verifying (:mod:`node.audit.verify`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.audit.anchor import Anchor, AnchorError, HeadAnchor
from node.audit.context import AuditContext
from node.audit.keys import AuditKey, Keyring
from node.db.direct import direct
from node.db.models import AuditEvent

GENESIS = "0" * 64
#: ``hash_alg`` of events chained by plain SHA-256 (before audit keys).
ALG_LEGACY = "sha256"
#: ``hash_alg`` of keyed events; ``key_id`` names the key.
ALG_HMAC = "hmac-sha256"
#: Action of the event an admin writes to continue after a break.
ACK_ACTION = "audit.break_acknowledged"
_MAC_FORMAT = "sarcnode-audit-event/1"
#: Findings listed by :func:`verify` at most (the rest are counted).
MAX_FINDINGS = 50

#: session.info key of the process's AuditContext (set by Database).
SESSION_KEY = "sarcnode.audit"

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


def row_fields(ev: AuditEvent) -> dict[str, Any]:
    """The columns an event's hash or HMAC covers, as keyword arguments."""
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
    return event_hash(**row_fields(ev))


def context_of(session: Session) -> AuditContext | None:
    """The audit context of ``session``'s database (None: no key, plain SHA-256)."""
    ctx = session.info.get(SESSION_KEY)
    return ctx if isinstance(ctx, AuditContext) else None


class Head(NamedTuple):
    """The newest event: its sequence number, hash and algorithm."""

    seq: int
    hash: str
    hash_alg: str


def head_row(session: Session) -> Head | None:
    """The newest event (None: the chain is empty)."""
    row = direct(session).one(  # read before every append: no statement compiling
        "SELECT seq, hash, hash_alg FROM audit_events ORDER BY seq DESC LIMIT 1"
    )
    return Head(int(row[0]), row[1], row[2]) if row else None


def head(session: Session) -> tuple[int, str]:
    """The newest event's sequence number and hash (0 and the genesis hash if none)."""
    row = head_row(session)
    return (row.seq, row.hash) if row else (0, GENESIS)


def _has_keyed_events(session: Session) -> bool:
    q = select(AuditEvent.seq).where(AuditEvent.hash_alg != ALG_LEGACY).limit(1)
    return session.connection().execute(q).first() is not None


#: anchor path -> (its file's identity, the keyring that checked it, what it said).
_ANCHORS: dict[Path, tuple[tuple[int, int, int, int], Keyring, Anchor | None]] = {}
_ANCHORS_LOCK = threading.Lock()


def _read_anchor(anchor_file: HeadAnchor, keyring: Keyring) -> Anchor | None:
    """:meth:`HeadAnchor.read`, parsed and MAC-checked again only when the file changed.

    Read before every append transaction; a ``stat`` (inode, size, mtime and
    ctime in ns) tells whether the file is the one already checked: a new
    anchor is a new file (written aside and renamed) and an edit in place
    moves its ctime. Two anchors written within one clock tick on a reused
    inode number could look alike: the older is kept, still an authentic lower
    bound of the chain. What was refused is never kept: it is read and
    refused again.

    Raises
    ------
    AnchorError
        As :meth:`HeadAnchor.read`.
    """
    try:
        st = anchor_file.path.stat()
    except OSError:
        return anchor_file.read(keyring)  # missing: None; unreadable: AnchorError
    identity = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _ANCHORS_LOCK:
        known = _ANCHORS.get(anchor_file.path)
    if known is not None and known[0] == identity and known[1] is keyring:
        return known[2]
    anchor = anchor_file.read(keyring)
    with _ANCHORS_LOCK:
        _ANCHORS[anchor_file.path] = (identity, keyring, anchor)
    return anchor


def anchor_findings(
    session: Session,
    anchor_file: HeadAnchor,
    keyring: Keyring,
    current: Head | None = None,
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
    current = current if current is not None else head_row(session)
    try:
        anchor = _read_anchor(anchor_file, keyring)
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
    anchored = direct(session).one("SELECT hash FROM audit_events WHERE seq = ?", (anchor.seq,))
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
