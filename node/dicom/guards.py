"""The guard on C-STORE requests below the service handler, where pynetdicom decides alone.

pynetdicom silently drops a C-STORE request it finds invalid (an empty or
missing Affected SOP Instance UID or SOP Class UID, no Message ID), and the
sender waits for an answer that never comes. :meth:`StoreGuard.on_dimse_recv`
answers such a request with 0xC000 and its reason (or aborts when the request
has no Message ID to answer to), and reports each refusal to ``on_refused``
(the SCP logs and audits it). It answers nothing else: a request without
Priority (pynetdicom assumes Low) or with Command Data Set Type "none" (an
empty data set) reaches the service handler, which answers it, and a second
answer from here would contradict it. (What arrives before the request is
decoded, command sets and data set sizes, is guarded by
:mod:`node.dicom.inbound`.)

pynetdicom's own logging handler for this event runs first and raises on a
request without an Affected SOP Instance UID, which would stop the guard from
running; :func:`drop_library_event_loggers` turns them off (their output is
below the level :mod:`node.logs` lets through for pynetdicom anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydicom.dataset import Dataset
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association as PynetAssociation
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from node.dicom.status import CannotUnderstand, ServiceError

log = logging.getLogger(__name__)

#: ``on_refused(association, command SOP Instance UID or "", error)``.
RefusalHook = Callable[[PynetAssociation, str, ServiceError], None]


def drop_library_event_loggers() -> None:
    """Stop pynetdicom binding its logging handlers to new associations.

    Its documented switch (``LOG_HANDLER_LEVEL``), set once by the SCP before
    it listens: those handlers only log at INFO/DEBUG, and the EVT_DIMSE_RECV
    one raises on a C-STORE request without a SOP Instance UID, which skips
    :meth:`StoreGuard.on_dimse_recv` and leaves the sender without an answer.
    """
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"


def _command_value(command: Dataset | None, keyword: str) -> object:
    """A command element's value, or None when absent, empty or unreadable."""
    if command is None:
        return None
    try:
        value = command.get(keyword)
    except (ValueError, TypeError, KeyError, OverflowError):
        return None
    return None if value in (None, "") else value


class StoreGuard:
    """Answers the C-STORE requests pynetdicom would drop (see the module docstring)."""

    def __init__(self, on_refused: RefusalHook) -> None:
        self.on_refused = on_refused

    def on_dimse_recv(self, event: Event) -> None:
        """EVT_DIMSE_RECV (DUL thread): answer a C-STORE request pynetdicom would drop."""
        message = event.message
        if not isinstance(message, C_STORE_RQ):
            return
        command = message.command_set
        # Only what makes pynetdicom drop the request (C_STORE.is_valid_request): the
        # handler answers everything else, and one request gets one response.
        missing = [
            name
            for name in ("AffectedSOPClassUID", "AffectedSOPInstanceUID")
            if _command_value(command, name) is None
        ]
        message_id = _command_value(command, "MessageID")
        context_id = message.context_id
        # pynetdicom drops a request without a Message ID too (is_valid_request), even
        # when nothing else is missing: no answer can name it, so the association ends.
        if not missing and isinstance(message_id, int) and context_id is not None:
            return
        assoc = event.assoc
        error = CannotUnderstand(f"C-STORE request without {', '.join(missing)}")
        if not isinstance(message_id, int) or context_id is None:
            assoc.abort()
            what = ", ".join([*missing, "Message ID"])
            error = CannotUnderstand(f"C-STORE request without {what}: association aborted")
        else:
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = message_id
            sop_class = _command_value(command, "AffectedSOPClassUID")
            if sop_class is not None:
                rsp.AffectedSOPClassUID = str(sop_class)
            rsp.Status = error.status
            rsp.ErrorComment = error.error_comment  # type: ignore[assignment]  # typed None upstream
            assoc.dimse.send_msg(rsp, context_id)
        sop_uid = _command_value(command, "AffectedSOPInstanceUID")
        self.on_refused(assoc, str(sop_uid or ""), error)
