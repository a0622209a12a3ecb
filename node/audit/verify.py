"""Verification of the whole audit chain: every event, every link, the head and its anchor.

One walk names every kind of tampering at once (see the finding kinds in
:mod:`node.audit.chain`); ``sarcnode audit verify`` prints the result.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.audit.anchor import Anchor, AnchorError, HeadAnchor
from node.audit.chain import (
    ACK_ACTION,
    ALG_HMAC,
    ALG_LEGACY,
    EDITED,
    FORGED,
    GAP,
    GENESIS,
    LINK,
    MAX_FINDINGS,
    REHASHED,
    UNVERIFIABLE,
    Finding,
    anchor_findings,
    context_of,
    event_mac,
    row_fields,
    stored_event_hash,
)
from node.audit.keys import AuditKeyError, Keyring
from node.db.models import AuditEvent


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


def _keys_and_anchor(
    session: Session,
    keyring: Keyring | None,
    anchor_file: HeadAnchor | None,
    walk: _Walk,
) -> tuple[Keyring | None, HeadAnchor | None, Anchor | None]:
    """The keyring and anchor file to verify with (the session's by default) and the anchor."""
    ctx = context_of(session)
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
            anchor = None  # reported by anchor_findings in verify
    return keyring, anchor_file, anchor


def _acknowledgement(ev: AuditEvent) -> dict[str, Any]:
    """An admin's acknowledged break, as ``audit verify`` lists it."""
    detail = json.loads(ev.detail)
    return {
        "seq": ev.seq,
        "ts": ev.ts.isoformat(timespec="seconds"),
        "actor": ev.actor,
        "reason": detail.get("reason"),
        "findings": [f.get("kind") for f in detail.get("findings", [])],
    }


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
    walk = _Walk()
    keyring, anchor_file, anchor = _keys_and_anchor(session, keyring, anchor_file, walk)
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
            acknowledged.append(_acknowledgement(ev))
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
    if event_mac(key, **row_fields(ev)) == ev.hash:
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
