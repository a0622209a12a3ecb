"""The transport limits of the Storage SCP's listener, from ``dicom.*`` settings.

Used by the transport guard (:mod:`node.dicom.transport`): which source
networks may connect, how many connections in total and per address, how
long a PDU of each type may be, and the set-up, per-PDU and idle deadlines.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.config import DicomSettings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: PDU type -> name (PS3.8 9.3).
PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
#: Largest A-ASSOCIATE-RQ read: 128 presentation contexts with a dozen transfer
#: syntaxes each and a 64 KiB user-identity token still fit.
MAX_ASSOCIATE_RQ = 256 * 1024
#: Largest other control PDU (A-ASSOCIATE-AC/RJ, A-RELEASE, A-ABORT hold a few bytes).
MAX_CONTROL_PDU = 64 * 1024


@dataclass(frozen=True)
class TransportLimits:
    """The transport limits of one listener, from ``dicom.*`` settings.

    ``max_connections`` is every association slot plus one peer's worth of
    connections still in set-up or tear-down, so the DICOM-level limit (an
    A-ASSOCIATE-RJ transient, which a sender understands and retries) answers
    before the TCP-level one does.
    """

    allowed_networks: tuple[IPNetwork, ...]
    max_connections: int
    max_connections_per_ip: int
    max_pdu_size: int
    setup_timeout_s: float
    pdu_timeout_s: float
    idle_timeout_s: float

    @classmethod
    def from_settings(cls, settings: DicomSettings) -> TransportLimits:
        """The limits ``settings`` ask for."""
        return cls(
            allowed_networks=tuple(
                ipaddress.ip_network(p, strict=False) for p in settings.allowed_peers
            ),
            max_connections=settings.max_associations + settings.max_connections_per_ip,
            max_connections_per_ip=settings.max_connections_per_ip,
            max_pdu_size=settings.max_pdu_size,
            setup_timeout_s=settings.setup_timeout_s,
            pdu_timeout_s=settings.pdu_timeout_s,
            idle_timeout_s=settings.network_timeout_s,
        )

    @property
    def stall_timeout_s(self) -> float:
        """No byte in or out for this long: the connection is stopped by the reaper.

        Past pynetdicom's own idle timeout with room to spare; only a thread stuck
        in a blocking call (a send the peer never reads) gets this far.
        """
        return 2 * self.idle_timeout_s + self.pdu_timeout_s

    def pdu_limit(self, pdu_type: int) -> int | None:
        """Largest acceptable length of a PDU of ``pdu_type`` (None: unknown type)."""
        if pdu_type == 0x04:
            return self.max_pdu_size
        if pdu_type == 0x01:
            return MAX_ASSOCIATE_RQ
        if pdu_type in PDU_NAMES:
            return MAX_CONTROL_PDU
        return None
