"""The Storage SCP's association rows: written when accepted or refused, closed at the end.

Each row (``associations``) counts what the association stored, its
duplicates and failures (:func:`node.store.index.bump_association_counter`);
every write is audited (``association.accepted``, ``.rejected``,
``.released``, ``.aborted``). Peer strings arrive escaped
(:func:`node.logs.printable`). A database that cannot be written is logged,
never raised: the association goes on.
"""

from __future__ import annotations

import logging
import os

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from node.audit.trail import record
from node.db.models import Association, utcnow
from node.db.session import Database
from node.store.index import Peer

log = logging.getLogger(__name__)


def write_association(
    db: Database,
    calling: str,
    called: str,
    ip: str,
    port: int,
    *,
    state: str,
    reason: str | None,
    tls: tuple[bool, str | None],
) -> int | None:
    """An association row in ``state`` (open or rejected), audited; its id (None: DB down)."""
    try:
        with db.session() as s:
            row = Association(
                calling_ae=calling[:16],
                called_ae=called[:16],
                peer_ip=ip,
                peer_port=port,
                tls=tls[0],
                tls_peer=tls[1],
                state=state,
                reason=reason,
                started_at=utcnow(),
                instances_stored=0,
                duplicates=0,
                failures=0,
            )
            s.add(row)
            s.flush()
            record(
                s,
                "association.rejected" if state == "rejected" else "association.accepted",
                actor=f"ae:{calling}",
                actor_ip=ip,
                outcome="refused" if state == "rejected" else "ok",
                detail={
                    "association": row.id,
                    "called_ae": called,
                    "tls": tls[0],
                    "tls_peer": tls[1],
                    # Which process received it (several with dicom.receivers > 1).
                    "pid": os.getpid(),
                    **({"reason": reason} if reason else {}),
                },
            )
            return row.id
    except SQLAlchemyError:
        log.exception("cannot record association from %s", ip)
        return None


def record_end(db: Database, row_id: int | None, peer: Peer, state: str) -> None:
    """Close the association's row as ``released`` or ``aborted``, audited."""
    if row_id is None:
        return
    try:
        with db.session() as s:
            s.execute(
                update(Association)
                .where(Association.id == row_id)
                .values(state=state, ended_at=utcnow())
            )
            row = s.get(Association, row_id)
            record(
                s,
                f"association.{state}",
                actor=peer.actor,
                actor_ip=peer.ip,
                outcome="ok" if state == "released" else "warning",
                detail={
                    "association": row_id,
                    "stored": row.instances_stored if row else None,
                    "duplicates": row.duplicates if row else None,
                    "failures": row.failures if row else None,
                },
            )
    except SQLAlchemyError:
        log.exception("cannot record end of association %s", row_id)
    log.info("association %s %s", row_id, state)
