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
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association as PynetAssociation
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    Verification,
)
from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from node.audit.trail import record
from node.config import DicomSettings
from node.db.models import Association, utcnow
from node.db.session import Database
from node.dicom.guards import StoreGuard, drop_library_event_loggers
from node.dicom.status import DUPLICATE_KEPT_FIRST, SUCCESS, IndexFailure, ServiceError
from node.dicom.transport import (
    GuardedAssociationServer,
    GuardedSSLSocket,
    TransportEvent,
    TransportLimits,
    connection_of,
)
from node.dicom.validate import sop_class_uid, validate_ae_title
from node.logs import printable
from node.store.ingest import Ingestor, Peer, StoreOutcome, bump_association_counter

log = logging.getLogger(__name__)

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


class AuditedTLSContext(ssl.SSLContext):
    """Server TLS context that defers the handshake to the connection's own thread.

    pynetdicom wraps each accepted socket in the server's accept loop. Were the
    handshake done there, one client that connects and never speaks would hold
    up every other sender, and socketserver drops a failed handshake silently.
    So sockets are wrapped without handshaking; :meth:`StorageSCP._on_conn_open`
    (run in the connection's thread) performs it under the ACSE timeout and
    reports failures to ``on_failure`` (peer address, reason) for the audit.
    """

    on_failure: Callable[[str, str], None] | None = None
    # Accepted sockets get the transport guard (PDU limits on the decrypted stream).
    sslsocket_class = GuardedSSLSocket

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        """Wrap for TLS without handshaking (see the class docstring)."""
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)

    def handshake(self, sock: ssl.SSLSocket, timeout_s: float) -> bool:
        """Run the server handshake; on failure report it, shut the socket, return False."""
        try:
            peer = str(sock.getpeername()[0])
        except OSError:
            peer = "unknown"
        previous = sock.gettimeout()
        sock.settimeout(timeout_s)
        try:
            sock.do_handshake()
            return True
        except (ssl.SSLError, OSError) as exc:
            if self.on_failure is not None:
                reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
                self.on_failure(peer, str(reason))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()  # the association then sees a closed transport and ends quietly
            return False
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(previous)


def build_ssl_context(
    settings: DicomSettings, on_failure: Callable[[str, str], None] | None = None
) -> ssl.SSLContext | None:
    """The server TLS context from ``dicom.tls`` (None when TLS is off)."""
    tls = settings.tls
    if not tls.enabled:
        return None
    ctx = AuditedTLSContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.on_failure = on_failure
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    assert tls.cert is not None and tls.key is not None  # guaranteed by TLSSettings
    ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    if tls.ca is not None:
        ctx.load_verify_locations(cafile=str(tls.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


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
        self._lock = threading.Lock()
        self._server: GuardedAssociationServer | None = None
        self._store_guard = StoreGuard(
            ingestor.policy.limits.max_dataset_bytes, self._on_store_guard_refusal
        )
        self.ae = self._build_ae()

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
        """Start listening (non-blocking): the server runs in its own thread."""
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected_by_limit),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_PDU_RECV, self._store_guard.on_pdu_recv),
            (evt.EVT_DIMSE_RECV, self._store_guard.on_dimse_recv),
            (evt.EVT_N_EVENT_REPORT, self._handle_event_report),
        ]
        drop_library_event_loggers()  # they would keep the store guard from running
        server = cast(
            GuardedAssociationServer,
            self.ae.make_server(
                (self.settings.bind, self.settings.port),
                evt_handlers=handlers,
                ssl_context=build_ssl_context(self.settings, self._on_tls_failure),
                server_class=GuardedAssociationServer,
                limits=TransportLimits.from_settings(self.settings),
                on_events=self._on_transport_events,
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
        """A connection the guard admitted: set-up deadline, TCP_NODELAY, TLS handshake.

        The association's ACSE timeout (its wait for the A-ASSOCIATE-RQ, and
        pynetdicom's ARTIM timer) is cut to what is left of
        ``dicom.setup_timeout_s``; :meth:`_on_requested` restores it.
        """
        assoc = event.assoc
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
        self._write_association(
            calling, called, ip, port, state="rejected", reason=reason, tls=self._tls_peer(assoc)
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
        self._write_association(
            printable(_rq(assoc).calling_ae_title.strip()),
            printable(_rq(assoc).called_ae_title.strip()),
            assoc.requestor.address,
            assoc.requestor.port,
            state="rejected",
            reason=reason,
            tls=self._tls_peer(assoc),
        )

    @staticmethod
    def _tls_peer(assoc: PynetAssociation) -> tuple[bool, str | None]:
        sock = assoc.dul.socket.socket if assoc.dul.socket else None
        if not isinstance(sock, ssl.SSLSocket):
            return False, None
        cert = sock.getpeercert() or {}
        subject = dict(x[0] for x in cert.get("subject", ()))  # type: ignore[misc]
        return True, subject.get("commonName")

    def _write_association(
        self,
        calling: str,
        called: str,
        ip: str,
        port: int,
        *,
        state: str,
        reason: str | None,
        tls: tuple[bool, str | None],
    ) -> int | None:
        try:
            with self.db.session() as s:
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
                        **({"reason": reason} if reason else {}),
                    },
                )
                return row.id
        except SQLAlchemyError:
            log.exception("cannot record association from %s", ip)
            return None

    def _on_accepted(self, event: Event) -> None:
        assoc = event.assoc
        calling = printable(assoc.requestor.ae_title.strip())
        called = printable(_rq(assoc).called_ae_title.strip())
        ip, port = assoc.requestor.address, assoc.requestor.port
        row_id = self._write_association(
            calling, called, ip, port, state="open", reason=None, tls=self._tls_peer(assoc)
        )
        with self._lock:
            self._assocs[assoc] = _AssocInfo(row_id, Peer(row_id, calling, ip))
        log.info("association %s accepted from %s (%s:%d)", row_id, calling, ip, port)

    def _on_closed(self, event: Event) -> None:
        with self._lock:
            info = self._assocs.pop(event.assoc, None)
        if info is None or info.row_id is None:
            return
        state = "released" if event.event is evt.EVT_RELEASED else "aborted"
        try:
            with self.db.session() as s:
                s.execute(
                    update(Association)
                    .where(Association.id == info.row_id)
                    .values(state=state, ended_at=utcnow())
                )
                row = s.get(Association, info.row_id)
                record(
                    s,
                    f"association.{state}",
                    actor=info.peer.actor,
                    actor_ip=info.peer.ip,
                    outcome="ok" if state == "released" else "warning",
                    detail={
                        "association": info.row_id,
                        "stored": row.instances_stored if row else None,
                        "duplicates": row.duplicates if row else None,
                        "failures": row.failures if row else None,
                    },
                )
        except SQLAlchemyError:
            log.exception("cannot record end of association %s", info.row_id)
        log.info("association %s %s", info.row_id, state)

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
        """C-STORE: store and index, or answer a failure status with its reason.

        A re-sent instance with other content is answered with the warning
        :data:`~node.dicom.status.DUPLICATE_KEPT_FIRST` (the first copy kept).
        """
        req = cast(C_STORE, event.request)
        assert req.DataSet is not None  # pynetdicom only calls us with a data set
        peer = self._peer(event.assoc)
        status = Dataset()
        try:
            outcome = self.ingestor.store(
                command_sop_class_uid=str(req.AffectedSOPClassUID),
                command_sop_instance_uid=str(req.AffectedSOPInstanceUID),
                file_meta=event.file_meta,
                dataset=req.DataSet.getbuffer(),
                peer=peer,
                context_sop_class_uid=str(event.context.abstract_syntax),
            )
        except ServiceError as exc:
            status.Status = exc.status
            status.ErrorComment = exc.error_comment
            self._audit_failure(peer, str(req.AffectedSOPInstanceUID), exc)
            return status
        except Exception as exc:
            log.exception("unexpected error storing an instance from %s", peer.calling_ae)
            err = IndexFailure(f"internal error: {type(exc).__name__}")
            status.Status = err.status
            status.ErrorComment = err.error_comment
            self._audit_failure(peer, str(req.AffectedSOPInstanceUID), err)
            return status
        if outcome is StoreOutcome.CONFLICT:
            status.Status = DUPLICATE_KEPT_FIRST
            status.ErrorComment = "SOP Instance UID stored before with other content: first kept"
            return status
        status.Status = SUCCESS
        return status

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
