"""The ``dicom`` section: the node's DICOM identity, what its Storage SCP accepts, TLS."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from node.config.base import Section, ae_title, ip_address
from node.dicom.validate import validate_ae_title

#: Storage SOP classes accepted by default: the MR family the pipelines read.
DEFAULT_STORAGE_CLASSES = [
    "MRImageStorage",
    "EnhancedMRImageStorage",
    "LegacyConvertedEnhancedMRImageStorage",
]

#: Transfer syntaxes accepted as received: uncompressed, deflate, RLE, JPEG,
#: JPEG-LS, JPEG 2000 and HTJ2K. Pixel data is decoded later, by the pipelines.
DEFAULT_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old scanners)
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless P14
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
]


#: Bounds of ``dicom.max_pdu_size`` (dcmtk's own range starts at 4096 bytes; the
#: upper bound keeps one PDU's buffers far from the node's memory).
MIN_PDU_SIZE = 4096
MAX_PDU_SIZE = 64 * 2**20


class TLSSettings(Section):
    """DICOM TLS for the Storage SCP (PS3.15 B.1 secure transport).

    With ``enabled`` every association must be TLS; plain TCP is refused at the
    handshake. With ``ca`` set, the SCU must present a certificate signed by it.
    """

    enabled: bool = False
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = True

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLSSettings:
        if self.enabled:
            missing = [n for n in ("cert", "key") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"TLS is enabled but {' and '.join(missing)} not set")
            if self.require_client_cert and self.ca is None:
                raise ValueError("require_client_cert needs 'ca' (the CA that signs client certs)")
            for name in ("cert", "key", "ca"):
                path = getattr(self, name)
                if path is not None and not Path(path).is_file():
                    raise ValueError(f"TLS {name} file not found: {path}")
        return self


class DicomSettings(Section):
    """The node's DICOM identity and what its Storage SCP accepts."""

    ae_title: str = "SARCNODE"
    bind: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 11112
    allowed_calling_aes: list[str] = Field(
        default_factory=list,
        description="Calling AE titles that may associate (default-deny: empty refuses every "
        "one unless accept_any_calling_ae).",
    )
    accept_any_calling_ae: bool = Field(
        False,
        description="Accept every (valid) calling AE title: only for a closed network or a "
        "test bench, since a calling AE title is not authentication.",
    )
    allowed_peers: list[str] = Field(
        default_factory=list,
        description="IP addresses or networks (CIDR) allowed to connect, checked when the TCP "
        "connection is accepted, before any DICOM; empty: any.",
    )
    require_called_ae: bool = Field(
        True, description="Refuse associations addressed to another AE title."
    )
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 16
    receivers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        1,
        description="Storage SCP processes behind the one port (node/dicom/receivers.py): 1 "
        "receives in the serve process itself; N > 1 (or 'auto': one per CPU) starts N "
        "receiver processes that share the listening socket and the index. The connection "
        "limits (max_connections_per_ip, max_associations_per_peer, max_associations + "
        "max_connections_per_ip connections in all) stay node-wide, counted in shared memory; "
        "max_associations is pynetdicom's own count and applies per receiver (the node-wide "
        "connection limit bounds the sum).",
    )
    fast_store: bool = Field(
        True,
        description="Receive plain C-STORE requests without pynetdicom's DIMSE decoding "
        "(node/dicom/inbound.py, the fast lane): same checks, statuses and audit, about a "
        "third less CPU per instance. false = every request through pynetdicom.",
    )
    max_connections_per_ip: Annotated[int, Field(ge=1, le=1000)] = Field(
        8,
        description="Open TCP connections one source address may hold (checked at accept); "
        "below max_associations so that one peer cannot take every slot.",
    )
    max_associations_per_peer: Annotated[int, Field(ge=1, le=1000)] = Field(
        8, description="Concurrent associations of one (source address, calling AE) pair."
    )
    max_pdu_size: Annotated[int, Field(ge=MIN_PDU_SIZE, le=MAX_PDU_SIZE)] = Field(
        262_144,
        description="Largest PDU we receive: announced to the peer and enforced on every PDU's "
        "header before its body is read (a longer PDU aborts the association).",
    )
    setup_timeout_s: Annotated[float, Field(gt=0)] = Field(
        10.0,
        description="From TCP accept to a complete A-ASSOCIATE-RQ (TLS handshake included).",
    )
    pdu_timeout_s: Annotated[float, Field(gt=0)] = Field(
        15.0, description="From a PDU's first byte to its last: a slow drip is not progress."
    )
    network_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    acse_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    dimse_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    shutdown_grace_s: Annotated[float, Field(ge=0, le=600)] = Field(
        5.0,
        description="On SIGTERM: how long open associations (and running job stages) get to "
        "finish before they are aborted; new C-STOREs are refused (0xA700) meanwhile.",
    )
    storage_sop_classes: list[str] = Field(default_factory=lambda: list(DEFAULT_STORAGE_CLASSES))
    transfer_syntaxes: list[str] = Field(default_factory=lambda: list(DEFAULT_TRANSFER_SYNTAXES))
    tls: TLSSettings = Field(default_factory=TLSSettings)

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return ae_title(value)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _calling_aes(cls, values: list[str]) -> list[str]:
        for value in values:
            ok, reason = validate_ae_title(value)
            if not ok:
                raise ValueError(f"{value!r}: {reason}")
        return [v.strip() for v in values]

    @field_validator("max_pdu_size", mode="before")
    @classmethod
    def _pdu_size(cls, value: Any) -> Any:
        if value == 0:
            raise ValueError(
                "0 (unlimited) is not allowed: one PDU would be read whole into memory; "
                f"use {MIN_PDU_SIZE}-{MAX_PDU_SIZE} bytes (default 262144)"
            )
        return value

    @field_validator("allowed_peers")
    @classmethod
    def _peers(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError as exc:
                raise ValueError(f"{value!r} is not an IP address or network") from exc
        return values

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        return ip_address(value)

    @field_validator("storage_sop_classes")
    @classmethod
    def _sop_classes(cls, values: list[str]) -> list[str]:
        from node.dicom.validate import resolve_sop_class

        if not values:
            raise ValueError("at least one storage SOP class is needed")
        for value in values:
            ok, reason = resolve_sop_class(value)
            if not ok:
                raise ValueError(reason)
        return values

    @field_validator("transfer_syntaxes")
    @classmethod
    def _transfer_syntaxes(cls, values: list[str]) -> list[str]:
        from pydicom.uid import UID

        if not values:
            raise ValueError("at least one transfer syntax is needed")
        for value in values:
            if not UID(value).is_transfer_syntax:
                raise ValueError(f"{value!r} is not a known transfer syntax UID")
        return values
