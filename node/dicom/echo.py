"""C-ECHO a peer (``sarcnode echo``), optionally over DICOM TLS."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


@dataclass(frozen=True)
class EchoResult:
    """Outcome of one C-ECHO: whether it succeeded and what the peer said."""

    ok: bool
    detail: str
    #: The peer answered with an A-ASSOCIATE-RJ: it is up, but refuses us.
    rejected: bool = False


def echo(
    host: str,
    port: int,
    called_ae: str,
    *,
    calling_ae: str = "SARCNODE",
    timeout_s: float = 10.0,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> EchoResult:
    """Open an association, send C-ECHO, release; never raises for network errors."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(Verification)
    tls_args = None
    if tls_ca is not None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls_ca))
        ctx.check_hostname = False
        if tls_cert is not None and tls_key is not None:
            ctx.load_cert_chain(str(tls_cert), str(tls_key))
        tls_args = (ctx, "")
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
    if not assoc.is_established:
        if assoc.is_rejected:
            return EchoResult(False, "association rejected", rejected=True)
        return EchoResult(False, "no association (connection refused, aborted or timed out)")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if status and getattr(status, "Status", None) == 0x0000:
        return EchoResult(True, "C-ECHO success")
    code = getattr(status, "Status", None)
    return EchoResult(False, f"C-ECHO status {code:#06x}" if code is not None else "no response")
