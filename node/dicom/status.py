"""DICOM failure statuses for the Storage SCP, mapped in one place.

Handlers raise a :class:`ServiceError` subclass; :func:`node.dicom.scp`'s
single wrapper turns it into the C-STORE response status with an Error
Comment, logs it and writes the audit event. Nothing else decides a status.
Codes from PS3.4 Annex B.2.3 (Storage Service Class) and PS3.7 Annex C.
"""

from __future__ import annotations

from typing import Any

SUCCESS = 0x0000
#: General failure status: a processing failure that is not the sender's fault.
PROCESSING_FAILURE = 0x0110
#: Warning: a re-sent SOP Instance UID with other content; the first copy is kept and
#: what was sent is discarded (PS3.4 B.2.3 "Elements Discarded").
DUPLICATE_KEPT_FIRST = 0xB006


class ServiceError(Exception):
    """A request that must be answered with a failure status and a reason."""

    status: int = PROCESSING_FAILURE
    #: Short name for the audit trail and logs.
    kind: str = "processing-failure"

    def __init__(self, reason: str, *, detail: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        #: Extra facts for the audit event (UIDs, sizes); never sent to the peer.
        self.detail = detail or {}

    @property
    def error_comment(self) -> str:
        """The reason cut to the 64 characters an Error Comment (LO) may hold."""
        text = self.reason.replace("\\", "/")
        return text if len(text) <= 64 else text[:61] + "..."


class OutOfResources(ServiceError):
    """0xA700 Refused: Out of Resources (disk under the floor, storage or index unwritable)."""

    status = 0xA700
    kind = "out-of-resources"


class ShuttingDown(OutOfResources):
    """0xA700 Refused: the node is stopping (SIGTERM); the sender should send again later."""

    kind = "shutting-down"


class DatasetTooLarge(OutOfResources):
    """0xA700 Refused: the data set (received or inflated) is over the node's caps."""

    kind = "too-large"


class SOPClassNotSupported(ServiceError):
    """0x0122 Refused: SOP Class not supported (not configured, or not the context's)."""

    status = 0x0122
    kind = "sop-class-not-supported"


class DataSetMismatch(ServiceError):
    """0xA900 Error: Data Set does not match SOP Class (or the command's UIDs)."""

    status = 0xA900
    kind = "dataset-mismatch"


class CannotUnderstand(ServiceError):
    """0xC000 Error: Cannot understand (not decodable, truncated, missing or invalid UIDs)."""

    status = 0xC000
    kind = "cannot-understand"


class SeriesConflict(ServiceError):
    """0xC000 Error: the Series Instance UID is already filed under another study."""

    status = 0xC000
    kind = "series-conflict"


class DuplicateRefused(ServiceError):
    """0x0111 Duplicate SOP Instance: already stored with other content (first kept)."""

    status = 0x0111
    kind = "duplicate-conflict"


class IndexFailure(ServiceError):
    """0x0110 Processing failure: the file was written but could not be indexed."""

    status = PROCESSING_FAILURE
    kind = "index-failure"
