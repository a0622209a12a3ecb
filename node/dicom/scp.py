"""The Storage SCP: C-ECHO and C-STORE over plain TCP or DICOM TLS.

Who may connect, how many connections and how big and how fast their PDUs
may be is decided before any DICOM, by the transport guard
(:mod:`node.dicom.transport`: ``dicom.allowed_peers``, connections per address,
PDU size and set-up/PDU deadlines). Association policy (a valid calling AE on
the allow-list, the called AE title, associations per (address, calling AE))
is decided in one ``EVT_REQUESTED`` handler that rejects with the standard
A-ASSOCIATE-RJ reason and records an audit event. Peer strings (AE titles) are
escaped before they reach a log line, the database or the audit trail. Every
C-STORE goes through
:meth:`StorageSCP._handle_store`, the single place that turns a
:class:`~node.dicom.status.ServiceError` into a failure status with an Error
Comment, logs it (no PHI) and audits it. Success is answered only after
:meth:`node.store.ingest.Ingestor.store` has written and indexed the instance.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom import AE, evt
from pynetdicom.association import Association as PynetAssociation
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    Verification,
)
from sqlalchemy.exc import SQLAlchemyError

from node.audit.trail import record
from node.config import DicomSettings
from node.db.session import Database
from node.dicom.associations import record_end, write_association
from node.dicom.guards import StoreGuard, drop_library_event_loggers
from node.dicom.inbound import FastStore, InboundGuard
from node.dicom.status import (
    DUPLICATE_KEPT_FIRST,
    SUCCESS,
    IndexFailure,
    OutOfResources,
    ServiceError,
)
from node.dicom.tls import AuditedTLSContext, build_ssl_context, tls_peer
from node.dicom.transport import (
    GuardedAssociationServer,
    TransportEvent,
    TransportLimits,
    connection_of,
)
from node.dicom.validate import sop_class_uid, validate_ae_title
from node.logs import printable
from node.store.ingest import Ingestor, Peer, StoreOutcome, bump_association_counter
from node.store.spool import Spool

log = logging.getLogger(__name__)

#: The interpreter's thread switch interval in a process that receives (default 0.005 s).
#: Each association has two threads; with eight associations sixteen threads take the
#: GIL from each other every 5 ms, and the hand-overs cost more than they give: at 0.02 s
#: eight storescu associations stored 600 instances in 3.56-3.59 s instead of 3.77-4.04 s
#: (serve's CPU 6.8 -> 6.3 ms per instance), one association unchanged (2026-12-03,
#: 2-core VM). A thread waiting on I/O still gets the GIL back at once when it is free.
GIL_SWITCH_INTERVAL_S = 0.02

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
_RJ_CALLING_AE = (0x01, 0x01, 0x03)
_RJ_CALLED_AE = (0x01, 0x01, 0x07)
# Transient, DICOM UL service-provider (presentation), local limit exceeded.
_RJ_LOCAL_LIMIT = (0x02, 0x03, 0x02)


@dataclass
class _AssocInfo:
    row_id: int | None
    peer: Peer


def _rq(assoc: PynetAssociation) -> A_ASSOCIATE:
    """The peer's A-ASSOCIATE-RQ (always present once the association is requested)."""
    primitive = assoc.requestor.primitive
    assert primitive is not None
    return primitive


class StorageSCP:
    """The node's DICOM listener; start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(
        self,
        settings: DicomSettings,
        db: Database,
        ingestor: Ingestor,
        *,
        on_commitment: Callable[[str, list[str], dict[str, int], str], int] | None = None,
    ) -> None:
        """``on_commitment(transaction, committed, failed, actor)`` records commitment reports."""
        self.on_commitment = on_commitment
        self.settings = settings
        self.db = db
        self.ingestor = ingestor
        self._assocs: weakref.WeakKeyDictionary[PynetAssociation, _AssocInfo] = (
            weakref.WeakKeyDictionary()
        )
        # pynetdicom runs EVT_ACCEPTED in the association's thread while its DUL
        # thread already reads P-DATA: an abort may come first.
        self._ended_early: weakref.WeakKeyDictionary[PynetAssociation, str] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._server: GuardedAssociationServer | None = None
        self._store_guard = StoreGuard(self._on_store_guard_refusal)
        self._inbound = InboundGuard(
            max_dataset_bytes=ingestor.policy.limits.max_dataset_bytes,
            storage_classes=frozenset(sop_class_uid(c) for c in settings.storage_sop_classes),
            open_spool=ingestor.open_spool,
            on_refused=self._on_store_guard_refusal,
            on_aborted=self._on_inbound_abort,
            serve_fast=self._serve_fast if settings.fast_store else None,
        )
        self.ae = self._build_ae()
        #: The server class and its extra arguments: a receiver process
        #: (:mod:`node.dicom.receivers`) serves on the parent's listening socket.
        self.server_class: type[GuardedAssociationServer] = GuardedAssociationServer
        self.server_options: dict[str, Any] = {}

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu_size
        ae.network_timeout = s.network_timeout_s
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        # Called-AE and calling-AE checks happen in _on_requested (audited).
        ae.require_called_aet = False
        ae.add_supported_context(Verification)
        # Storage commitment reports (N-EVENT-REPORT) from destinations we asked:
        # the destination opens the association in the SCP role of the SOP class.
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        for name in s.storage_sop_classes:
            ae.add_supported_context(sop_class_uid(name), s.transfer_syntaxes)
        return ae

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start listening (non-blocking): the server runs in its own thread.

        A C-STORE that takes the fast lane (:mod:`node.dicom.inbound`) fires
        none of pynetdicom's ``EVT_C_STORE``, ``EVT_DIMSE_RECV`` or
        ``EVT_DIMSE_SENT``: a handler bound to those sees only the requests
        pynetdicom's path serves.
        """
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected_by_limit),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_DIMSE_RECV, self._store_guard.on_dimse_recv),
            (evt.EVT_N_EVENT_REPORT, self._handle_event_report),
        ]
        drop_library_event_loggers()  # they would keep the store guard from running
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # process-wide: see the constant
        server = cast(
            GuardedAssociationServer,
            self.ae.make_server(
                (self.settings.bind, self.settings.port),
                evt_handlers=handlers,
                ssl_context=build_ssl_context(self.settings, self._on_tls_failure),
                server_class=self.server_class,
                limits=TransportLimits.from_settings(self.settings),
                on_events=self._on_transport_events,
                on_released=self._inbound.release,
                **self.server_options,
            ),
        )
        server.start()
        self._server = server
        log.info(
            "storage SCP %s listening on %s:%d%s",
            self.settings.ae_title,
            self.settings.bind,
            self.settings.port,
            " (TLS)" if self.settings.tls.enabled else "",
        )

    def drain(self, grace_s: float) -> tuple[int, int]:
        """Stop accepting, let open associations end within ``grace_s``, abort the rest.

        The caller refuses new C-STOREs first (``Ingestor.closing``), so an
        association that stays open stores nothing more; what was answered
        Success is already committed. Returns (associations open when the
        drain began, associations aborted at its end).
        """
        server = self._server
        if server is None:
            return 0, 0
        # The accept loop ends and the listener closes; open associations go on.
        socketserver.BaseServer.shutdown(server)
        if server.socket is not None:
            with contextlib.suppress(OSError):
                server.socket.close()
        open_at_start = len(self.ae.active_associations)
        deadline = time.monotonic() + grace_s
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self.ae.active_associations
        for assoc in left:
            log.warning(
                "aborting association from %s: the node is stopping", assoc.requestor.address
            )
            assoc.abort()
        self.stop()
        return open_at_start, len(left)

    def stop(self) -> None:
        """Stop accepting and close the listener."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- association events -------------------------------------------------

    def _on_conn_open(self, event: Event) -> None:
        """A connection the guard admitted: inbound guard, set-up deadline, TCP_NODELAY, TLS.

        The association's ACSE timeout (its wait for the A-ASSOCIATE-RQ, and
        pynetdicom's ARTIM timer) is cut to what is left of
        ``dicom.setup_timeout_s``; :meth:`_on_requested` restores it.
        """
        assoc = event.assoc
        self._inbound.attach(assoc)  # before any P-DATA can arrive
        sock = assoc.dul.socket.socket if assoc.dul.socket else None
        if sock is None:
            return
        conn = connection_of(assoc)
        if conn is not None:
            conn.assoc = assoc
        setup_left = conn.setup_time_left() if conn else self.settings.setup_timeout_s
        # Without TCP_NODELAY every C-STORE response waits on Nagle + delayed ACK.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(sock, ssl.SSLSocket) and isinstance(sock.context, AuditedTLSContext):
            handshaken = sock.context.handshake(sock, max(0.1, setup_left))
            if conn is not None:
                if not handshaken:  # audited as association.tls_failed
                    conn.violation = "TLS handshake failed"
                setup_left = conn.setup_time_left()
        assoc.acse_timeout = max(0.1, setup_left)

    def _policy_reason(self, calling: str, called: str) -> tuple[tuple[int, int, int], str] | None:
        """Why this association must be refused, or None to let it through.

        ``calling`` and ``called`` are as received (stripped); reasons quote them escaped.
        """
        s = self.settings
        ok, why = validate_ae_title(calling)
        if not ok:
            return (
                _RJ_CALLING_AE,
                f"calling AE '{printable(calling)}' is not a valid AE title: {why}",
            )
        if not s.accept_any_calling_ae and calling not in s.allowed_calling_aes:
            return _RJ_CALLING_AE, f"calling AE '{calling}' is not in dicom.allowed_calling_aes"
        if s.require_called_ae and called != s.ae_title:
            return _RJ_CALLED_AE, f"called AE '{printable(called)}' is not this node ({s.ae_title})"
        return None

    def _peer_limit_reason(self, assoc: PynetAssociation, calling: str) -> str | None:
        """Count this association against its (address, calling AE); why not, if over."""
        conn = connection_of(assoc)
        if conn is None or self._server is None:
            return None
        limit = self.settings.max_associations_per_peer
        held = self._server.registry.claim_association(conn, calling, limit)
        if held is None:
            return None
        return (
            f"{calling} from {conn.ip} already holds {held} associations "
            "(dicom.max_associations_per_peer)"
        )

    def _on_requested(self, event: Event) -> None:
        assoc = event.assoc
        # Set-up is over: the ACSE timeout is the configured one again (release, ARTIM).
        assoc.acse_timeout = self.settings.acse_timeout_s
        conn = connection_of(assoc)
        if conn is not None:
            conn.requested = True
        # requestor.ae_title is only filled in during negotiation, after this event.
        raw_calling = _rq(assoc).calling_ae_title.strip()
        raw_called = _rq(assoc).called_ae_title.strip()
        calling, called = printable(raw_calling), printable(raw_called)
        ip, port = assoc.requestor.address, assoc.requestor.port
        verdict = self._policy_reason(raw_calling, raw_called)
        if verdict is None:
            limit_reason = self._peer_limit_reason(assoc, raw_calling)
            if limit_reason is None:
                return
            verdict = _RJ_LOCAL_LIMIT, limit_reason
        (result, source, diagnostic), reason = verdict
        log.warning("refusing association from %s (%s): %s", calling, ip, reason)
        assoc.acse.send_reject(result, source, diagnostic)
        # As pynetdicom's own rejection path does: wait until the A-ASSOCIATE-RJ
        # has gone out before the server closes the socket.
        assoc.kill()
        write_association(
            self.db, calling, called, ip, port, state="rejected", reason=reason, tls=tls_peer(assoc)
        )

    def _on_tls_failure(self, ip: str, reason: str) -> None:
        reason = printable(reason)
        log.warning("TLS handshake from %s failed: %s", ip, reason)
        try:
            with self.db.session() as s:
                record(
                    s,
                    "association.tls_failed",
                    actor=f"ip:{ip}",
                    actor_ip=ip,
                    outcome="refused",
                    detail={"reason": reason},
                )
        except SQLAlchemyError:
            log.exception("cannot audit a failed TLS handshake from %s", ip)

    def _on_rejected_by_limit(self, event: Event) -> None:
        # pynetdicom rejects by itself only when max_associations is reached.
        assoc = event.assoc
        reason = f"maximum associations ({self.settings.max_associations}) reached"
        log.warning("refusing association from %s: %s", assoc.requestor.address, reason)
        write_association(
            self.db,
            printable(_rq(assoc).calling_ae_title.strip()),
            printable(_rq(assoc).called_ae_title.strip()),
            assoc.requestor.address,
            assoc.requestor.port,
            state="rejected",
            reason=reason,
            tls=tls_peer(assoc),
        )

    def _on_accepted(self, event: Event) -> None:
        assoc = event.assoc
        calling = printable(assoc.requestor.ae_title.strip())
        called = printable(_rq(assoc).called_ae_title.strip())
        ip, port = assoc.requestor.address, assoc.requestor.port
        row_id = write_association(
            self.db, calling, called, ip, port, state="open", reason=None, tls=tls_peer(assoc)
        )
        info = _AssocInfo(row_id, Peer(row_id, calling, ip))
        with self._lock:
            ended = self._ended_early.pop(assoc, None)
            if ended is None:
                self._assocs[assoc] = info
        log.info("association %s accepted from %s (%s:%d)", row_id, calling, ip, port)
        if ended is not None:
            record_end(self.db, info.row_id, info.peer, ended)

    def _on_closed(self, event: Event) -> None:
        state = "released" if event.event is evt.EVT_RELEASED else "aborted"
        with self._lock:
            info = self._assocs.pop(event.assoc, None)
            if info is None:  # ended (aborted by a guard) before EVT_ACCEPTED was handled
                self._ended_early[event.assoc] = state
        if info is not None:
            record_end(self.db, info.row_id, info.peer, state)

    def _on_transport_events(self, groups: Sequence[tuple[TransportEvent, int]]) -> None:
        """Audit connections the transport guard refused or aborted (from its reaper thread).

        One row per (action, address, reason, calling AE) and batch, with the count,
        so that a flood of connections cannot flood the trail.
        """
        for event, count in groups:
            times = f" ({count} times)" if count > 1 else ""
            verb = "refused" if event.action == "connection.refused" else "aborted"
            log.warning("%s connection from %s%s: %s", verb, event.ip, times, event.reason)
        try:
            with self.db.session() as s:
                for event, count in groups:
                    record(
                        s,
                        event.action,
                        actor=f"ae:{event.calling_ae}" if event.calling_ae else f"ip:{event.ip}",
                        actor_ip=event.ip,
                        outcome="refused" if event.action == "connection.refused" else "failed",
                        detail={"reason": event.reason, "count": count, "port": event.port},
                    )
        except SQLAlchemyError:
            log.exception("cannot audit %d refused or aborted connection event(s)", len(groups))

    def _peer(self, assoc: PynetAssociation) -> Peer:
        with self._lock:
            info = self._assocs.get(assoc)
        if info is not None:
            return info.peer
        return Peer(None, assoc.requestor.ae_title.strip(), assoc.requestor.address)

    # -- DIMSE services -------------------------------------------------------

    @staticmethod
    def _handle_echo(event: Event) -> int:
        return SUCCESS

    def _handle_store(self, event: Event) -> Dataset:
        """C-STORE through pynetdicom's service class: store and index, or a failure status.

        The data set is the spool it was received into (:mod:`node.dicom.inbound`),
        or the bytes pynetdicom holds when there is none. The fast lane's
        requests come to :meth:`_serve_fast` instead; both end in :meth:`_store`.
        """
        req = cast(C_STORE, event.request)
        spool = self._inbound.take_spool(event.assoc, req._dataset_path)  # type: ignore[arg-type]
        dataset: bytes | memoryview | Spool | None = spool
        if spool is None and req._dataset_path is None:
            assert req.DataSet is not None  # pynetdicom only calls us with a data set
            dataset = req.DataSet.getbuffer()
        code, comment = self._store(
            event.assoc,
            sop_class_uid=str(req.AffectedSOPClassUID),
            sop_instance_uid=str(req.AffectedSOPInstanceUID),
            context_sop_class_uid=str(event.context.abstract_syntax),
            dataset=dataset,
            file_meta=event.file_meta,
        )
        status = Dataset()
        status.Status = code
        if comment is not None:
            status.ErrorComment = comment
        return status

    def _serve_fast(self, assoc: PynetAssociation, request: FastStore) -> tuple[int, str | None]:
        """A C-STORE the inbound guard received whole (the fast lane): status, Error Comment."""
        return self._store(
            assoc,
            sop_class_uid=request.sop_class_uid,
            sop_instance_uid=request.sop_instance_uid,
            context_sop_class_uid=request.context_sop_class_uid,
            dataset=self._inbound.take_spool(assoc, request.spool.path),
            transfer_syntax_uid=request.transfer_syntax_uid,
        )

    def _store(
        self,
        assoc: PynetAssociation,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        context_sop_class_uid: str,
        dataset: bytes | memoryview | Spool | None,
        file_meta: FileMetaDataset | None = None,
        transfer_syntax_uid: str | None = None,
    ) -> tuple[int, str | None]:
        """Store and index one instance: (status, Error Comment or None), refusals audited.

        ``dataset`` None: its spool was removed when its association ended. A
        re-sent instance with other content is answered with the warning
        :data:`~node.dicom.status.DUPLICATE_KEPT_FIRST` (the first copy kept).
        """
        try:
            peer = self._peer(assoc)
        except Exception:
            if isinstance(dataset, Spool):
                dataset.discard()
            raise
        try:
            if dataset is None:
                raise OutOfResources("the received data set is no longer available")
            outcome = self.ingestor.store(
                command_sop_class_uid=sop_class_uid,
                command_sop_instance_uid=sop_instance_uid,
                file_meta=file_meta,
                transfer_syntax_uid=transfer_syntax_uid,
                dataset=dataset,
                peer=peer,
                context_sop_class_uid=context_sop_class_uid,
            )
        except ServiceError as exc:
            return self._refused(peer, sop_instance_uid, exc)
        except Exception as exc:
            log.exception("unexpected error storing an instance from %s", peer.calling_ae)
            err = IndexFailure(f"internal error: {type(exc).__name__}")
            return self._refused(peer, sop_instance_uid, err)
        finally:
            if isinstance(dataset, Spool):
                dataset.discard()  # nothing left once placed; else the refused data set
        if outcome is StoreOutcome.CONFLICT:
            comment = "SOP Instance UID stored before with other content: first kept"
            return DUPLICATE_KEPT_FIRST, comment
        return SUCCESS, None

    def _refused(self, peer: Peer, sop_uid: str, exc: ServiceError) -> tuple[int, str]:
        """``exc``'s failure status and Error Comment, audited."""
        self._audit_failure(peer, sop_uid, exc)
        return exc.status, exc.error_comment

    def _on_inbound_abort(self, assoc: PynetAssociation, reason: str) -> None:
        """An association aborted for what it sent (:mod:`node.dicom.inbound`): audit it.

        Through the transport guard's batches (one row per address and reason,
        however many), as its own aborts are.
        """
        conn = connection_of(assoc)
        ip, port = assoc.requestor.address, assoc.requestor.port
        event = TransportEvent(
            "connection.aborted", ip, port, reason, conn.calling_ae if conn else None
        )
        if conn is not None:
            conn.registry.report(event)
        else:
            self._on_transport_events([(event, 1)])

    def _on_store_guard_refusal(
        self, assoc: PynetAssociation, command_sop_uid: str, exc: ServiceError
    ) -> None:
        """A C-STORE refused below the handler (see :mod:`node.dicom.guards`): log, audit."""
        self._audit_failure(self._peer(assoc), command_sop_uid, exc)

    def _handle_event_report(self, event: Event) -> tuple[int, Dataset | None]:
        """N-EVENT-REPORT of a storage commitment we asked for (PS3.4 J.3.3)."""
        peer = self._peer(event.assoc)
        if (
            self.on_commitment is None
            or str(event.request.AffectedSOPClassUID) != StorageCommitmentPushModel
        ):
            return 0x0112, None  # No such SOP instance: nothing here expects reports
        try:
            info = event.event_information
            transaction = str(info.TransactionUID)
            committed = [
                str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])
            ]
            failed = {
                str(i.ReferencedSOPInstanceUID): int(i.get("FailureReason", 0x0110))
                for i in info.get("FailedSOPSequence", [])
            }
        except (AttributeError, ValueError) as exc:
            log.warning("unreadable storage commitment report from %s: %s", peer.calling_ae, exc)
            return 0x0110, None  # Processing failure
        settled = self.on_commitment(transaction, committed, failed, peer.actor)
        log.info(
            "storage commitment report from %s: %d committed, %d failed, %d row(s) settled",
            peer.calling_ae,
            len(committed),
            len(failed),
            settled,
        )
        return SUCCESS, None

    def _audit_failure(self, peer: Peer, command_sop_uid: str, exc: ServiceError) -> None:
        log.warning(
            "C-STORE from %s refused with 0x%04X (%s): %s",
            peer.calling_ae,
            exc.status,
            exc.kind,
            exc.reason,
        )
        try:
            with self.db.session() as s:
                bump_association_counter(s, peer.association_id, "failures")
                record(
                    s,
                    "instance.refused",
                    actor=peer.actor,
                    actor_ip=peer.ip,
                    outcome="failed",
                    # The command's UID is untrusted: kept only in the detail, as text.
                    detail={
                        "status": f"0x{exc.status:04X}",
                        "kind": exc.kind,
                        "reason": exc.reason,
                        "command_sop_instance_uid": command_sop_uid[:128],
                        **exc.detail,
                    },
                )
        except SQLAlchemyError:
            log.exception("cannot audit a refused instance (database unavailable)")
