"""Acceptor associations whose two threads block instead of polling (pynetdicom 3.0.4).

pynetdicom gives each association two threads that poll: the DUL thread
(:class:`~pynetdicom.dul.DULServiceProvider`) checks its queues and the socket
with a zero-timeout ``select`` and sleeps 1 ms whenever nothing happened, and the
association thread (``Association._run_reactor``) sleeps 1 ms between looks at
its message queue. Each C-STORE therefore waits up to a millisecond at every
hand-over (PDU arrived, message complete, response queued), and every open
association burns CPU polling while idle: with eight associations in one process
the polling took about a quarter of the CPU (bench/README.md). pynetdicom also
reads a PDU's body 4 KiB per ``recv``: 136 reads per 0.5 MiB instance.

Here the same state machine and the same service code run, but:

- :class:`BlockingDUL` waits in ``select`` on the socket and on a wake-up pipe
  that :meth:`~BlockingDUL.send_pdu` (a primitive for the peer) and a kill
  write to; the wait ends at the ARTIM timer's expiry, and at
  :data:`MAX_WAIT_S` at the latest.
- :class:`NodeAssociation`'s reactor waits on an event that the DUL thread sets
  after every state-machine action (a message complete, a release or abort
  primitive, the DUL ending) and that :meth:`~NodeAssociation.kill` sets; the
  wait ends when the network (idle) timer expires, and at :data:`MAX_WAIT_S`.
- :class:`ChunkedAssociationSocket` reads a PDU's body with as few ``recv``
  calls as the kernel allows, through the transport guard
  (``GuardedSocket.recv_pdu_body``), which still sees and checks every PDU
  header before any byte of its body is read.

The ACSE, DIMSE and network timeouts, A-ABORT and A-RELEASE, TLS (data an
``SSLSocket`` holds already decrypted is read before waiting) and the
transport guard's limits behave as before. The classes copy or override
pynetdicom internals; :func:`pynetdicom_drift` compares those internals' source
with the version they were written against, and :func:`request_handler_class`
falls back to pynetdicom's own polling handler (with a warning) when they
differ, so a pynetdicom upgrade costs speed, never correctness.
tests/unit/test_reactor.py fails, naming what changed, in that case.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import logging
import os
import queue
import select
import ssl
import threading
from collections.abc import Callable
from copy import deepcopy
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.timer import Timer
from pynetdicom.transport import AssociationSocket, RequestHandler

from node.dicom.dimse_fast import encode_store_response
from node.dicom.inbound import FastStore

if TYPE_CHECKING:
    from pynetdicom.ae import ApplicationEntity
    from pynetdicom.pdu_primitives import _PDUPrimitiveType

__all__ = [
    "PYNETDICOM_VERSION",
    "BlockingDUL",
    "ChunkedAssociationSocket",
    "NodeAssociation",
    "NodeRequestHandler",
    "pynetdicom_drift",
    "request_handler_class",
]

log = logging.getLogger(__name__)

#: The pynetdicom release these classes were written against.
PYNETDICOM_VERSION = "3.0.4"
#: The longest either thread waits without looking at its queues and timers (seconds).
MAX_WAIT_S = 0.1
#: The shortest wait once a timer has expired (pynetdicom's own loop delay).
MIN_WAIT_S = 0.001

#: pynetdicom functions this module copies or whose behaviour it relies on, with
#: the SHA-256 of their source (first 16 hex digits) in :data:`PYNETDICOM_VERSION`. Reviewed against
#: that source: if one changes, re-read it, adapt the classes here, update the hash.
PYNETDICOM_SOURCES: dict[str, str] = {
    "pynetdicom.dul.DULServiceProvider.__init__": "c82dafa9438ddf70",
    "pynetdicom.dul.DULServiceProvider.run_reactor": "e3a10eb3a0931e48",
    "pynetdicom.dul.DULServiceProvider._is_transport_event": "8725ed03bb8fbdef",
    "pynetdicom.dul.DULServiceProvider._process_recv_primitive": "4c0ebbb3e646e35e",
    "pynetdicom.dul.DULServiceProvider._read_pdu_data": "19f2d4e38c13c835",
    "pynetdicom.dul.DULServiceProvider.send_pdu": "7cbce5da8594124e",
    "pynetdicom.dul.DULServiceProvider.kill_dul": "5ceccf8dd01c2072",
    "pynetdicom.dul.DULServiceProvider.stop_dul": "28a7e0be126e7b30",
    "pynetdicom.association.Association.__init__": "eb07516b8009ad8f",
    "pynetdicom.association.Association.kill": "8f9713666a7f4cff",
    "pynetdicom.association.Association.run_reactor": "ed8bbbe3b3d6ddae",
    "pynetdicom.association.Association._run_reactor": "f28838c5559e462a",
    "pynetdicom.association.Association.acse_timeout": "5633674fbb21bae5",
    "pynetdicom.association.Association.network_timeout": "5aa7c33171f1d0c9",
    "pynetdicom.transport.AssociationSocket.recv": "6bc20a33b1b7cfe7",
    "pynetdicom.transport.AssociationSocket.ready": "3eb58e3d39dc076d",
    "pynetdicom.transport.RequestHandler._create_association": "05c8d12b79863cdb",
    "pynetdicom.timer.Timer.remaining": "4556c335c34ee264",
    # What the fast lane (NodeAssociation._serve_fast, node.dicom.inbound) stands in for.
    "pynetdicom.association.Association._serve_request": "2f24c1759cdf6c8c",
    "pynetdicom.service_class.StorageServiceClass.SCP": "63afca7fc6c6e7ee",
    "pynetdicom.dimse.DIMSEServiceProvider.receive_primitive": "5f99c86b14a15cef",
    "pynetdicom.dimse_messages.DIMSEMessage.encode_msg": "73000c902c52832d",
}


def _source_of(qualname: str) -> str:
    """The source of ``pynetdicom.<module>.<Class>.<member>`` (a property: getter and setter)."""
    module_name, class_name, member = qualname.rsplit(".", 2)
    owner = getattr(importlib.import_module(module_name), class_name)
    obj = inspect.getattr_static(owner, member)
    if isinstance(obj, property):
        return "".join(inspect.getsource(f) for f in (obj.fget, obj.fset) if f is not None)
    return inspect.getsource(obj)


def source_hash(qualname: str) -> str:
    """SHA-256 (16 hex digits) of the source of ``qualname`` (see :data:`PYNETDICOM_SOURCES`)."""
    return hashlib.sha256(_source_of(qualname).encode()).hexdigest()[:16]


def pynetdicom_drift() -> list[str]:
    """What differs from the pynetdicom these classes were written for (empty: none).

    The installed version, and each function of :data:`PYNETDICOM_SOURCES`
    whose source is missing or has another hash.
    """
    drift = []
    if pynetdicom.__version__ != PYNETDICOM_VERSION:
        drift.append(f"pynetdicom {pynetdicom.__version__} (written for {PYNETDICOM_VERSION})")
    for name, expected in PYNETDICOM_SOURCES.items():
        try:
            actual = source_hash(name)
        except (AttributeError, ImportError, OSError, TypeError) as exc:
            drift.append(f"{name}: source not found ({type(exc).__name__})")
            continue
        if actual != expected:
            drift.append(f"{name}: source changed")
    return drift


_handler_choice: type[RequestHandler] | None = None
_choice_lock = threading.Lock()


def request_handler_class() -> type[RequestHandler]:
    """:class:`NodeRequestHandler`, or pynetdicom's own when its internals changed.

    Checked once per process; a fallback is logged as a warning naming the drift.
    """
    global _handler_choice
    with _choice_lock:
        if _handler_choice is None:
            drift = pynetdicom_drift()
            if drift:
                log.warning(
                    "pynetdicom's internals differ from what node.dicom.reactor was written "
                    "for (%s): using pynetdicom's polling reactor",
                    "; ".join(drift),
                )
                _handler_choice = RequestHandler
            else:
                _handler_choice = NodeRequestHandler
        return _handler_choice


def _time_left(timer: Timer) -> float | None:
    """Seconds until ``timer`` expires while it runs; None when it cannot expire."""
    if timer.timeout is None:
        return None
    return timer.remaining


def _wait_s(*left: float | None) -> float:
    """How long to wait: until the nearest deadline, within [MIN_WAIT_S, MAX_WAIT_S]."""
    wait = MAX_WAIT_S
    for value in left:
        if value is not None:
            wait = min(wait, value)
    return max(MIN_WAIT_S, wait)


class ChunkedAssociationSocket(AssociationSocket):
    """pynetdicom's socket wrapper, reading a PDU body in as few ``recv`` as possible.

    The wrapped socket's ``recv_pdu_body`` (the transport guard's) reads a body
    whose header it has checked; anything else is read as pynetdicom does.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        """``nr_bytes`` from the socket (fewer when the peer closed it)."""
        read_body: Callable[[int], bytearray | None] | None = getattr(
            self.socket, "recv_pdu_body", None
        )
        if read_body is not None:
            data = read_body(nr_bytes)
            if data is not None:
                return data
        return super().recv(nr_bytes)


class BlockingDUL(DULServiceProvider):
    """A DUL service provider that waits on its socket and a wake-up pipe, not a timer."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        # Made when the thread starts (a DUL never started holds no descriptor).
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._wake_lock = threading.Lock()

    # -- wake-ups from other threads ------------------------------------------------

    def _wake(self) -> None:
        """End the DUL thread's wait (a no-op before it starts and after it ends)."""
        with self._wake_lock:
            if self._wake_w is not None:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(self._wake_w, b"\0")  # a full pipe wakes it anyway

    def send_pdu(self, primitive: _PDUPrimitiveType) -> None:
        """Queue ``primitive`` for the peer (pynetdicom's) and wake the DUL thread."""
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        """Stop the DUL thread (pynetdicom's flag) and wake it to see it."""
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        """Stop the DUL thread if it is idle (``Sta1``) and wait for it to end.

        pynetdicom's version, which sleeps 1 ms at a time until the thread ends.
        """
        if self.state_machine.current_state != "Sta1":
            return False
        self.kill_dul()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        return True

    # -- the DUL thread ---------------------------------------------------------------

    def _notify_user(self, *, always: bool = True) -> None:
        """Wake the association thread: always, or when a message or primitive waits for it.

        After a state-machine action only a complete DIMSE message (the DIMSE
        provider's queue) or an A-RELEASE/A-ABORT primitive (the user queue)
        concerns the reactor; waking it for every P-DATA-TF PDU of a data set
        would only take the GIL from this thread.
        """
        wake = getattr(self.assoc, "wake_reactor", None)
        if wake is None:
            return
        if always or self.to_user_queue.queue or self.assoc.dimse.msg_queue.queue:
            wake()

    def run_reactor(self) -> None:
        """The DUL thread: pynetdicom's loop, waiting in ``select`` instead of sleeping.

        Each pass, as in pynetdicom: queue Evt18 if the ARTIM timer expired;
        turn one primitive from the local user into its event, or else read one
        PDU if the socket has data; run one event through the state machine.
        With no event to run, wait until the socket is readable, a wake-up
        comes, or the nearest timer is due.
        """
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._idle_timer.start()
        self.assoc._dul_ready.set()
        try:
            while not self._kill_thread:
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    self._abort_on_error(exc)
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    self._wait()
                    continue
                self.state_machine.do_action(event)
                self._notify_user(always=False)
        finally:
            with self._wake_lock:
                for fd in (self._wake_r, self._wake_w):
                    with contextlib.suppress(OSError):
                        os.close(fd)
                self._wake_r = self._wake_w = None
            self._notify_user()

    def _abort_on_error(self, exc: Exception) -> None:
        """An error outside the state machine: A-ABORT and stop, as pynetdicom does."""
        # Same words and steps as pynetdicom's run_reactor.
        log_dul = logging.getLogger("pynetdicom.dul")
        log_dul.error("Exception in DUL.run(), aborting association")
        log_dul.exception(exc)
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        cast(AssociationSocket, self.socket).send(abort_pdu.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True

    def _wait(self) -> None:
        """Wait for data from the peer, a wake-up, or the ARTIM timer (bounded)."""
        assert self._wake_r is not None
        sock = self.socket.socket if self.socket is not None else None
        readers: list[Any] = [self._wake_r]
        if sock is not None and sock.fileno() != -1:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes already buffered: select would not see them
            readers.append(sock)
        try:
            ready, _, _ = select.select(readers, [], [], _wait_s(_time_left(self.artim_timer)))
        except (OSError, ValueError):
            # The socket was closed under us; the next pass reports it (Evt17).
            ready = []
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError, OSError):
                os.read(self._wake_r, 4096)


class NodeAssociation(Association):
    """An acceptor association whose reactor waits on an event instead of polling.

    It also serves the C-STORE requests the inbound guard received whole
    (:class:`~node.dicom.inbound.FastStore`, the fast lane): see :meth:`_serve_fast`.
    """

    #: The inbound guard may queue :class:`~node.dicom.inbound.FastStore` requests here.
    serves_fast_stores = True

    def __init__(self, ae: ApplicationEntity, mode: str) -> None:
        super().__init__(ae, mode)
        self._reactor_wake = threading.Event()
        self.dul = BlockingDUL(self)
        # The timeouts' setters configured the replaced DUL's timers: again on this one.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def wake_reactor(self) -> None:
        """The DUL thread acted, or the association is being killed: look again."""
        self._reactor_wake.set()

    def kill(self) -> None:
        """Stop the association's threads (pynetdicom's), waking the reactor first."""
        self._kill = True
        self._reactor_wake.set()
        super().kill()

    def _run_reactor(self) -> None:
        """The acceptor loop of pynetdicom; between passes it waits for the DUL to act.

        Each pass, as in pynetdicom: serve one complete DIMSE message; answer a
        release request; end on an abort (from the peer or the provider), when
        the DUL thread has ended, or when the network timeout expired. Unlike
        pynetdicom, the network timer restarts when a request has been served,
        so a handler slower than the timeout does not abort a peer that was
        waiting for its answer. A pass that served nothing waits for
        :meth:`wake_reactor` or the network timer. ``_is_paused`` is true while
        it waits, so a local ``send_*`` call (which pauses the reactor first)
        does not wait for the timeout.
        """
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            self._reactor_wake.clear()

            context_id, msg = self.dimse.get_msg(block=False)
            if isinstance(msg, FastStore):
                self._serve_fast(msg)
            elif msg:
                self._serve_request(msg, cast(int, context_id))
            if msg:
                # The network timeout is the peer's silence while we wait for it:
                # time spent serving (a slow store, a busy disk) is not the peer's.
                self.dul._idle_timer.restart()

            if self._reactor_pass_ends():
                return
            if not msg:
                self._is_paused = True
                self._reactor_wake.wait(_wait_s(_time_left(self.dul._idle_timer)))

    def _serve_fast(self, request: FastStore) -> None:
        """Store a fast-lane C-STORE request and answer it with a hand-encoded response.

        What pynetdicom's ``_serve_request`` and storage service class do for
        a C-STORE, without the pydicom work: ignored during a release we sent;
        the handler's exception answered 0xC211; no answer once the
        association is no longer established. The response is one P-DATA-TF
        through the DUL's state machine, or pynetdicom's encoder when the
        peer's maximum PDU is too small for it in one.
        """
        if self._sent_release:
            logging.getLogger("pynetdicom.association").warning(
                "C-STORE message received during association release, ignoring"
            )
            return
        self.dimse.cancel_req = {}
        self._is_paused = True
        try:
            status, comment = request.serve(self, request)
        except Exception:
            log.exception("the C-STORE handler failed")
            status, comment = 0xC211, None
        finally:
            self._is_paused = False
            self.dimse.cancel_req = {}
        if not self.is_established:
            return
        payload = encode_store_response(
            request.message_id,
            request.sop_class_uid,
            request.sop_instance_uid,
            status,
            comment,
        )
        peer_max = self.requestor.maximum_length or 0  # 0: no limit (PS3.8 D.1)
        if peer_max and len(payload) + 6 > peer_max:
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = request.message_id
            rsp.AffectedSOPClassUID = request.sop_class_uid
            rsp.AffectedSOPInstanceUID = request.sop_instance_uid
            rsp.Status = status
            if comment is not None:
                rsp.ErrorComment = comment  # type: ignore[assignment]
            self.dimse.send_msg(rsp, request.context_id)
            return
        primitive = P_DATA()
        # Command, last fragment (PS3.8 E.2); pynetdicom's setter wants [id, bytes] lists.
        pdv: Any = [request.context_id, b"\x03" + payload]
        primitive.presentation_data_value_list = [pdv]
        self.dul.send_pdu(primitive)

    def _reactor_pass_ends(self) -> bool:
        """The end-of-pass checks of pynetdicom's ``_run_reactor``; True: the reactor ends."""
        log_assoc = logging.getLogger("pynetdicom.association")
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            log_assoc.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return True
        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            log_assoc.info(log_msg)
            self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for subscribers
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return True
        if not self.dul.is_alive():
            self.kill()
            return True
        if self.dul.idle_timer_expired():
            log_assoc.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return True
        return False


class NodeRequestHandler(RequestHandler):
    """pynetdicom's request handler, building a :class:`NodeAssociation`."""

    def _create_association(self) -> Association:
        """Pynetdicom 3.0.4's ``RequestHandler._create_association`` with this module's classes."""
        assoc = NodeAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server

        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"

        sock = ChunkedAssociationSocket(assoc, client_socket=self.request)
        assoc.set_socket(sock)

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)

        assoc.requestor.address_info = self.remote

        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    handler = cast(evt._HandlerBase, handler)
                    assoc.bind(event, handler[0], handler[1])

        return assoc
