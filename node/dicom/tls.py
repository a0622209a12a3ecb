"""DICOM TLS: the Storage SCP's server context, and the client context of the node's own calls.

:func:`build_ssl_context` makes the server context from ``dicom.tls`` (TLS 1.2
or later, client certificates optional or required, a CA to check them
against). The context wraps accepted sockets as the transport guard's
:class:`~node.dicom.transport.GuardedSSLSocket` without handshaking;
:class:`AuditedTLSContext.handshake` does it later, in the connection's own
thread, under the set-up deadline, and reports a failure for the audit.
:func:`client_tls` is what the node's own associations (a delivery's
C-STORE, a prior's C-FIND and C-MOVE) hand pynetdicom as ``tls_args``.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any

from pynetdicom.association import Association

from node.config import DicomSettings
from node.config.dicom import TLSSettings
from node.dicom.transport import GuardedSSLSocket


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


def client_tls(tls: TLSSettings, host: str) -> tuple[ssl.SSLContext, str] | None:
    """``tls_args`` for an association to ``host`` (None when ``tls`` is off).

    The peer's certificate is checked against ``tls.ca`` (else the system's
    CAs) and its host name; ``tls.cert`` and ``tls.key``, when both are set,
    are the node's client certificate.
    """
    if not tls.enabled:
        return None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls.ca else None
    )
    if tls.cert and tls.key:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    return context, host


def tls_peer(assoc: Association) -> tuple[bool, str | None]:
    """Whether ``assoc`` runs over TLS, and its client certificate's common name."""
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    if not isinstance(sock, ssl.SSLSocket):
        return False, None
    cert = sock.getpeercert() or {}
    subject = dict(x[0] for x in cert.get("subject", ()))  # type: ignore[misc]
    return True, subject.get("commonName")
