"""The Storage SCP's transport guard: who may connect, how many, how big, how fast.

pynetdicom accepts every TCP connection, gives it two threads, and reads each
PDU whole into memory before anything looks at it; its set-up timer is not
checked while a read blocks. So one peer could hold every association slot with
idle or dripping connections, and one announced 512 MiB PDU cost gigabytes.
This module puts limits in front of it, without patching it:

- :class:`GuardedAssociationServer` (a pynetdicom server subclass, passed to
  ``AE.make_server``) checks the source address against ``dicom.allowed_peers``
  and counts open connections, in total and per source address, when the TCP
  connection is accepted, before any byte of DICOM (or TLS) is read. A refused
  connection is closed at once and costs no thread.
- Every admitted connection's socket is a :class:`GuardedSocket` (or
  :class:`GuardedSSLSocket`) whose ``recv`` follows the PDU framing: it checks
  each PDU header's type and length before the body is read (P-DATA-TF up to
  ``dicom.max_pdu_size``, the length we announce), and it gives every read a
  deadline: the A-ASSOCIATE-RQ must be complete ``setup_timeout_s`` after
  accept, and each PDU ``pdu_timeout_s`` after its first byte, so a drip is
  not progress. A broken limit sends an A-ABORT, closes the socket and raises
  :class:`TransportViolation` (an ``OSError``, which pynetdicom handles as a
  closed transport).
- A connection keeps its slot until its association threads have ended, so
  the number of threads is bounded: at most ``max_connections`` connections,
  each with pynetdicom's two threads (and a short-lived handler thread while it
  is set up). One reaper thread releases slots, stops connections that make no
  progress at all (a blocked send), and hands refusals and aborts to the
  caller in batches, so a flood of connections costs one audit row and one log
  line per source and reason, not one per connection.

The per-(address, calling AE) association limit needs the A-ASSOCIATE-RQ and is
applied by :class:`node.dicom.scp.StorageSCP` through
:meth:`ConnectionRegistry.claim_association`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pynetdicom.transport import ThreadedAssociationServer

from node.dicom.limits import (
    MAX_ASSOCIATE_RQ,
    MAX_CONTROL_PDU,
    PDU_NAMES,
    IPNetwork,
    TransportLimits,
)
from node.dicom.reactor import request_handler_class

if TYPE_CHECKING:
    from pynetdicom.association import Association

__all__ = [  # the limits are re-exported: the guard's users import them from here
    "MAX_ASSOCIATE_RQ",
    "MAX_CONTROL_PDU",
    "Connection",
    "ConnectionRegistry",
    "GuardedAssociationServer",
    "GuardedSSLSocket",
    "GuardedSocket",
    "IPNetwork",
    "TransportEvent",
    "TransportLimits",
    "TransportViolation",
    "connection_of",
    "peer_ip",
]

log = logging.getLogger(__name__)


_HEADER_LEN = 6
#: How long a refused or aborted event may wait for the reaper (seconds).
REAP_INTERVAL_S = 0.25
#: At most this many refusals and aborts wait for the reaper; more are counted only.
MAX_PENDING_EVENTS = 10_000

# A-ABORT reason/diagnostic values (PS3.8 9.3.8), sent with source 0x02 (provider).
ABORT_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNISED_PDU = 0x01
ABORT_INVALID_PARAMETER = 0x06


class TransportViolation(ConnectionAbortedError):
    """A peer broke a transport limit; its connection has been aborted and closed.

    Raised from a guarded socket's ``recv``. pynetdicom treats it as a closed
    transport (Evt17); the reason has already been logged and queued for the audit.
    """

    #: The record the library logs for this exception adds nothing to ours.
    already_logged = True


@dataclass(frozen=True)
class TransportEvent:
    """A refused or aborted connection, for the audit trail and the log.

    ``action`` is ``connection.refused`` (at accept, nothing read) or
    ``connection.aborted`` (a limit broken while reading or a stalled
    connection). ``calling_ae`` is known only once an association was requested.
    """

    action: str
    ip: str
    port: int
    reason: str
    calling_ae: str | None = None


def peer_ip(address: str) -> str:
    """The textual source address, IPv4-mapped IPv6 addresses written as IPv4."""
    try:
        addr = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _abort_pdu(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider with ``reason``."""
    return struct.pack(">BBLBBBB", 0x07, 0x00, 4, 0x00, 0x00, 0x02, reason)


class Connection:
    """One admitted TCP connection: its peer, its slot and its PDU framing.

    Created by :meth:`ConnectionRegistry.admit`; the guarded socket calls
    :meth:`before_read` and :meth:`after_read` around every ``recv`` (always
    from the one DUL thread that reads it), the SCP sets :attr:`assoc` and
    :attr:`calling_ae`, the reaper releases it.
    """

    def __init__(self, registry: ConnectionRegistry, ip: str, port: int) -> None:
        self.registry = registry
        self.limits = registry.limits
        self.ip = ip
        self.port = port
        self.accepted_at = time.monotonic()
        #: Last time a byte was read or sent (the reaper's stall check).
        self.last_progress = self.accepted_at
        #: The pynetdicom association serving this connection (set at EVT_CONN_OPEN).
        self.assoc: Association | None = None
        #: The calling AE once its association passed the per-peer limit.
        self.calling_ae: str | None = None
        #: Why the connection was aborted by a limit (None while it keeps them).
        self.violation: str | None = None
        self.sock: socket.socket | None = None
        self.setup_done = False
        #: The peer closed its side (a read returned end of file).
        self.peer_closed = False
        #: The A-ASSOCIATE-RQ was decoded and reached the SCP's policy (EVT_REQUESTED).
        self.requested = False
        self._header = bytearray()
        self._pdu_type = 0
        self._remaining = 0
        self._pdu_started = 0.0

    def setup_time_left(self) -> float:
        """Seconds left of the set-up limit (may be negative)."""
        return self.accepted_at + self.limits.setup_timeout_s - time.monotonic()

    def _deadline(self) -> tuple[float | None, str]:
        """When the read in progress must be done, and what it means if it is not."""
        limits = self.limits
        deadline: float | None = None
        why = ""
        if not self.setup_done:
            deadline = self.accepted_at + limits.setup_timeout_s
            why = f"no complete A-ASSOCIATE-RQ within {limits.setup_timeout_s:g} s of connecting"
        if self._header or self._remaining:
            pdu_deadline = self._pdu_started + limits.pdu_timeout_s
            if deadline is None or pdu_deadline < deadline:
                deadline = pdu_deadline
                name = PDU_NAMES.get(self._pdu_type, "PDU") if self._remaining else "PDU header"
                why = f"{name} not complete {limits.pdu_timeout_s:g} s after its first byte"
        return deadline, why

    def before_read(self, sock: socket.socket, bufsize: int) -> int:
        """Give the coming ``recv`` its deadline; return how many bytes it may ask for.

        Never more than the rest of the current header or body, so that every
        header is seen whole before any byte after it is read.

        Raises
        ------
        TransportViolation
            The deadline has already passed, or the connection was aborted
            before (pynetdicom may try to read a closed transport again).
        """
        if self.violation is not None:
            raise TransportViolation(self.violation)
        deadline, why = self._deadline()
        if deadline is None:
            # pynetdicom reads only when data is waiting; this bounds a stray block.
            sock.settimeout(self.limits.idle_timeout_s)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                self.abort(sock, why, ABORT_NOT_SPECIFIED)
            sock.settimeout(left)
        if self._remaining:
            return min(bufsize, self._remaining)
        return min(bufsize, _HEADER_LEN - len(self._header))

    def body_left(self) -> int:
        """Bytes of the current PDU's body not read yet (0 between PDUs)."""
        return self._remaining

    def timed_out(self, sock: socket.socket) -> None:
        """The read of :meth:`before_read` hit its deadline: abort with the reason."""
        _, why = self._deadline()
        self.abort(sock, why or "read timed out", ABORT_NOT_SPECIFIED)

    def after_read(self, sock: socket.socket, data: bytes | memoryview) -> None:
        """Follow the PDU framing over ``data``; check each header as it completes.

        Raises
        ------
        TransportViolation
            An unknown PDU type, or a length over the limit for its type.
        """
        if not data:
            self.peer_closed = True
            return
        now = time.monotonic()
        self.last_progress = now
        if self._remaining:
            self._remaining -= len(data)
            if not self._remaining:
                self._pdu_done(sock)
            return
        if not self._header:
            self._pdu_started = now
        self._header += data
        if len(self._header) < _HEADER_LEN:
            return
        pdu_type, _, length = struct.unpack(">BBL", self._header)
        self._header.clear()
        limit = self.limits.pdu_limit(pdu_type)
        if limit is None:
            self.abort(sock, f"unknown PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNISED_PDU)
        elif length > limit:
            self.abort(
                sock,
                f"{PDU_NAMES[pdu_type]} of {length} bytes is over the {limit}-byte limit",
                ABORT_INVALID_PARAMETER,
            )
        self._pdu_type = pdu_type
        self._remaining = length
        if not length:
            self._pdu_done(sock)

    def _pdu_done(self, sock: socket.socket) -> None:
        if self._pdu_type == 0x01:
            self.setup_done = True
        # Sends (responses) then block at most as long as pynetdicom's idle timeout.
        sock.settimeout(self.limits.idle_timeout_s)

    def sent(self) -> None:
        """Bytes went out: the connection is making progress."""
        self.last_progress = time.monotonic()

    def abort(self, sock: socket.socket, reason: str, diagnostic: int) -> None:
        """Send an A-ABORT (best effort), close the transport, queue the event, raise.

        Raises
        ------
        TransportViolation
            Always: the caller's read is over.
        """
        self.violation = reason
        with contextlib.suppress(OSError, ValueError):
            sock.settimeout(0.5)
            sock.sendall(_abort_pdu(diagnostic))
        with contextlib.suppress(OSError, ValueError):
            sock.shutdown(socket.SHUT_RDWR)
        # Logged and audited by the reaper, coalesced per address and reason.
        self.registry.report(
            TransportEvent("connection.aborted", self.ip, self.port, reason, self.calling_ae)
        )
        raise TransportViolation(reason)


class GuardedSocket(socket.socket):
    """A TCP socket whose reads follow and limit the DICOM PDU framing.

    :class:`GuardedSSLSocket` puts these methods before :class:`ssl.SSLSocket`'s,
    so on TLS the limits apply to the decrypted stream.
    """

    connection: Connection | None = None

    def recv(self, bufsize: int = 1024, flags: int = 0) -> bytes:
        """``recv`` within the connection's PDU limits and deadlines."""
        conn = self.connection
        if conn is None:
            return super().recv(bufsize, flags)
        want = conn.before_read(self, bufsize)
        try:
            data = super().recv(want, flags)
        except TimeoutError:
            conn.timed_out(self)
            raise  # not reached: timed_out raises
        conn.after_read(self, data)
        return data

    def recv_pdu_body(self, nbytes: int) -> bytearray | None:
        """The next ``nbytes`` of a PDU body whose header was checked, in few ``recv`` calls.

        pynetdicom reads a body 4 KiB per ``recv``; this reads it into one buffer
        as fast as the bytes arrive, each read within the connection's
        deadlines. Fewer bytes when the peer closed the connection. None when
        ``nbytes`` is not (within) a body the guard has checked: the caller
        reads it with :meth:`recv`.
        """
        conn = self.connection
        if conn is None or not 0 < nbytes <= conn.body_left():
            return None
        buf = bytearray(nbytes)
        view = memoryview(buf)
        got = 0
        try:
            while got < nbytes:
                want = conn.before_read(self, nbytes - got)
                try:
                    n = super().recv_into(view[got:], want)
                except TimeoutError:
                    conn.timed_out(self)
                    raise  # not reached: timed_out raises
                conn.after_read(self, view[got : got + n])
                if not n:
                    break
                got += n
        finally:
            view.release()
        del buf[got:]
        return buf

    def send(self, data: Any, flags: int = 0) -> int:
        """``send``, noting progress."""
        sent = super().send(data, flags)
        if self.connection is not None:
            self.connection.sent()
        return sent


class GuardedSSLSocket(GuardedSocket, ssl.SSLSocket):
    """The TLS counterpart of :class:`GuardedSocket` (limits on the decrypted stream)."""


def connection_of(assoc: Association) -> Connection | None:
    """The guarded connection an acceptor association runs on (None once it is closed)."""
    transport = assoc.dul.socket
    sock = transport.socket if transport is not None else None
    conn = getattr(sock, "connection", None)
    return conn if isinstance(conn, Connection) else None


class ConnectionRegistry:
    """Open connections by source address and calling AE; the events waiting for the audit."""

    def __init__(
        self, limits: TransportLimits, on_finished: Callable[[Association], None] | None = None
    ) -> None:
        """``on_finished(association)``: a connection's threads have ended (reaper thread)."""
        self.limits = limits
        self.on_finished = on_finished
        self._lock = threading.Lock()
        self._open: list[Connection] = []
        self._events: deque[TransportEvent] = deque()
        self._uncounted = 0

    def _refusal(self, ip: str) -> str | None:
        """Why a connection from ``ip`` may not be admitted now (lock held)."""
        limits = self.limits
        if limits.allowed_networks:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                return f"peer address {ip} is not an IP address"
            if not any(addr in net for net in limits.allowed_networks):
                return f"peer {ip} is not in dicom.allowed_peers"
        if len(self._open) >= limits.max_connections:
            return f"{limits.max_connections} connections open (the node's limit)"
        held = sum(1 for c in self._open if c.ip == ip)
        if held >= limits.max_connections_per_ip:
            return f"peer {ip} already holds {held} connections (dicom.max_connections_per_ip)"
        return None

    def admit(self, ip: str, port: int) -> Connection | str:
        """A new connection's slot, or the reason it is refused."""
        with self._lock:
            reason = self._refusal(ip)
            if reason is not None:
                return reason
            conn = Connection(self, ip, port)
            self._open.append(conn)
            return conn

    def claim_association(self, conn: Connection, calling_ae: str, limit: int) -> int | None:
        """Count ``conn`` as an association of (its address, ``calling_ae``).

        Returns None when it fits under ``limit``, else how many that pair holds.
        """
        with self._lock:
            held = sum(
                1
                for c in self._open
                if c is not conn and c.ip == conn.ip and c.calling_ae == calling_ae
            )
            if held >= limit:
                return held
            conn.calling_ae = calling_ae
            return None

    def report(self, event: TransportEvent) -> None:
        """Queue an event for the next :meth:`sweep` (counted only when the queue is full)."""
        with self._lock:
            if len(self._events) < MAX_PENDING_EVENTS:
                self._events.append(event)
            else:
                self._uncounted += 1

    def open_connections(self, ip: str | None = None) -> int:
        """How many connections hold a slot (from ``ip``, or in total)."""
        with self._lock:
            return sum(1 for c in self._open if ip is None or c.ip == ip)

    @staticmethod
    def _finished(conn: Connection, now: float) -> bool:
        """Whether ``conn``'s threads are gone, so its slot can be given back."""
        assoc = conn.assoc
        grace = conn.limits.setup_timeout_s + 5.0
        if assoc is None or assoc.ident is None:
            # Never handed to an association (refused by the OS, handler failed)
            # or not started: done once closed, or stuck past set-up.
            closed = conn.sock is None or conn.sock.fileno() == -1
            return (assoc is None and closed) or now - conn.accepted_at > grace
        return not assoc.is_alive() and not assoc.dul.is_alive()

    def _silent_end(self, conn: Connection) -> str | None:
        """Why a finished connection ended, when no limit and no DICOM event said so."""
        if conn.violation or conn.assoc is None or conn.requested:
            return None
        if conn.setup_done:
            # pynetdicom aborts a request it cannot decode (an AE title with
            # control characters, say) before any association event.
            return "A-ASSOCIATE-RQ could not be decoded"
        if not conn.peer_closed:
            # Silent until pynetdicom's set-up timer (cut to setup_timeout_s) closed it.
            return (
                f"no complete A-ASSOCIATE-RQ within {self.limits.setup_timeout_s:g} s of connecting"
            )
        return None

    def sweep(self, now: float) -> list[tuple[TransportEvent, int]]:
        """Release finished connections, stop stalled ones, drain the events.

        Returns
        -------
        list of (TransportEvent, int)
            The queued events, one per (action, address, reason, calling AE),
            with how many times each happened since the last sweep.
        """
        with self._lock:
            finished = [c for c in self._open if self._finished(c, now)]
            for conn in finished:
                self._open.remove(conn)
            stalled = [
                c
                for c in self._open
                if c.violation is None and now - c.last_progress > self.limits.stall_timeout_s
            ]
            events = list(self._events)
            self._events.clear()
            uncounted, self._uncounted = self._uncounted, 0
        for conn in finished:
            if conn.sock is not None:
                with contextlib.suppress(OSError):
                    conn.sock.close()
            if conn.assoc is not None and self.on_finished is not None:
                self.on_finished(conn.assoc)
            reason = self._silent_end(conn)
            if reason is not None:
                events.append(TransportEvent("connection.aborted", conn.ip, conn.port, reason))
        for conn in stalled:
            conn.violation = f"no byte in or out for {self.limits.stall_timeout_s:g} s"
            if conn.sock is not None:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked send or recv
            events.append(
                TransportEvent(
                    "connection.aborted", conn.ip, conn.port, conn.violation, conn.calling_ae
                )
            )
        if uncounted:
            log.warning("%d refused or aborted connections were not itemised", uncounted)
        grouped: dict[tuple[str, str, str, str | None], tuple[TransportEvent, int]] = {}
        for event in events:
            key = (event.action, event.ip, event.reason, event.calling_ae)
            first, count = grouped.get(key, (event, 0))
            grouped[key] = (first, count + 1)
        return list(grouped.values())


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the transport guard in front of it.

    Build it with ``AE.make_server(..., server_class=GuardedAssociationServer,
    limits=..., on_events=...)`` and run it with :meth:`start`. ``on_events``
    receives batches of (event, count) from the reaper thread; it is where the
    audit rows are written, away from the accept loop.
    """

    #: Pending connections the kernel queues while the accept loop works.
    request_queue_size = 64

    def __init__(
        self,
        *args: Any,
        limits: TransportLimits,
        on_events: Callable[[Sequence[tuple[TransportEvent, int]]], None],
        on_released: Callable[[Association], None] | None = None,
        **kwargs: Any,
    ) -> None:
        """``args``/``kwargs`` as pynetdicom's ``AssociationServer``; then the guard's own."""
        self.limits = limits
        self.registry = ConnectionRegistry(limits, on_released)
        self.on_events = on_events
        self._stopping = threading.Event()
        # Associations whose threads block on the socket instead of polling.
        kwargs.setdefault("request_handler", request_handler_class())
        super().__init__(*args, **kwargs)

    def service_actions(self) -> None:
        """Nothing between accepts (pynetdicom's runs a full ``gc.collect()`` every 60th).

        That full collection holds the GIL for 0.1-0.3 s in ``serve`` (its heap
        holds SQLAlchemy, pydicom, the audit trail...), stalling every open
        association mid-transfer (py-spy, 2026-12-03: 10 % of the receive
        path's CPU in a 600-instance sample). Python's own cyclic collector
        frees the same ended associations, in small generations.
        """

    def start(self) -> None:
        """Serve in a background thread, with the reaper beside it."""
        for target, name in ((self.serve_forever, "accept"), (self._reap_forever, "reaper")):
            thread = threading.Thread(target=target, name=f"sarcnode-scp-{name}", daemon=True)
            thread.start()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection as a guarded socket (TLS-wrapped without handshake)."""
        assert self.socket is not None
        raw, address = self.socket.accept()
        sock: socket.socket = GuardedSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the connection or refuse it before any DICOM (socketserver then closes it)."""
        ip, port = peer_ip(str(client_address[0])), int(client_address[1])
        if not isinstance(request, GuardedSocket):
            log.error("connection from %s is not guarded (TLS context type?): refused", ip)
            return False
        verdict = self.registry.admit(ip, port)
        if isinstance(verdict, str):
            self.registry.report(TransportEvent("connection.refused", ip, port, verdict))
            return False
        verdict.sock = request
        request.connection = verdict
        return True

    def _reap_forever(self) -> None:
        while not self._stopping.wait(REAP_INTERVAL_S):
            self.reap()

    def reap(self) -> None:
        """One sweep of the registry; events to ``on_events`` (a failure there is logged)."""
        groups = self.registry.sweep(time.monotonic())
        if not groups:
            return
        try:
            self.on_events(groups)
        except Exception:
            log.exception("cannot record %d refused or aborted connection event(s)", len(groups))

    def shutdown(self) -> None:
        """Stop accepting, close the listener, flush the pending events."""
        self._stopping.set()
        # pynetdicom's shutdown also removes the server from the AE's list of
        # start_server() servers, which make_server() never put it in.
        with contextlib.suppress(ValueError):
            super().shutdown()
        self.reap()
