"""P-DATA as it arrives, before pynetdicom decodes it: command sets checked, data sets to disk.

pynetdicom hands every P-DATA primitive of an association to its DIMSE
provider (``assoc.dimse.receive_primitive``, in the association's DUL
thread), which joins command fragments and decodes the command set, then joins
the data set's fragments in memory until the last one. Two things went wrong
there, and :class:`InboundGuard` stands in front of it for each association:

* **Undecodable command sets.** A command set that does not decode, has no or
  an unknown Command Field, or no Command Data Set Type made pynetdicom raise
  inside its state machine: the DUL thread ended with a traceback and the peer
  got no answer. The guard collects the command fragments itself (at most
  :data:`MAX_COMMAND_BYTES`), decodes the complete command set, and aborts
  the association with the reason (A-ABORT, audited as ``connection.aborted``)
  when it is unusable, before pynetdicom sees it. A data fragment before the
  command set is complete, or a command fragment where data belongs, is
  aborted the same way; so is anything pynetdicom still fails to decode.
* **Data sets held in memory.** A C-STORE data set is received into a
  :class:`~node.store.spool.Spool` (``<root>/tmp/<uuid>.part``): the guard
  gives pynetdicom's message the spool as the file to write fragments to (the
  mechanism of pynetdicom's ``STORE_RECV_CHUNKED_DATASET``, with the node's own
  file), so the service handler gets ``event.dataset_path`` and the data set
  never sits in memory. Its bytes are counted as they arrive and the
  association aborted past ``storage.max_dataset_mb`` (audited as the
  instance refused, 0xA700). The data sets of other messages (a storage
  commitment report, a stray C-ECHO with a data set, and a C-STORE that never
  reaches the handler: on a context that is not a storage class's, or without
  a Message ID or Affected SOP Class/Instance UID) stay in memory and may not
  pass :data:`MAX_IN_MEMORY_DATA_SET`.

**The fast lane.** A plain C-STORE request (its command set read by
:func:`~node.dicom.dimse_fast.parse_store_request`, valid UIDs, the SOP class
the presentation context's) on an association whose reactor serves them
(:class:`~node.dicom.reactor.NodeAssociation`) never reaches pynetdicom's
DIMSE provider: the guard writes its data set fragments to the spool itself
and, with the last one, queues a :class:`FastStore` in the provider's message
queue, in order with pynetdicom's own messages. The reactor calls the store
handler with it and sends a hand-encoded response
(:func:`~node.dicom.dimse_fast.encode_store_response`). Everything else
(C-ECHO, storage commitment, a command split over PDUs that pynetdicom already
saw part of, anything odd) takes pynetdicom's path as before. Command
fragments are held until their command set is complete, so the choice is
made before pynetdicom sees any byte of the message.

So an association holds at most one PDU (``dicom.max_pdu_size``) of a
C-STORE and :data:`MAX_IN_MEMORY_DATA_SET` of anything else, however many
send at once. Spools of an association that ended before the handler took
them are removed when its threads have ended (:meth:`InboundGuard.release`,
from the transport's reaper), and any left by a crash at the next start.
"""

from __future__ import annotations

import logging
import struct
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pynetdicom.association import Association as PynetAssociation
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA

from node.dicom.dimse_fast import parse_store_request
from node.dicom.status import DatasetTooLarge, ServiceError
from node.dicom.validate import validate_uid
from node.store.spool import Spool

log = logging.getLogger(__name__)

#: Largest command set accepted (a C-STORE-RQ's is about 150 bytes).
MAX_COMMAND_BYTES = 64 * 1024
#: Largest data set of a message other than a C-STORE request (held in memory).
MAX_IN_MEMORY_DATA_SET = 4 * 1024 * 1024

C_STORE_RQ = 0x0001
NO_DATA_SET = 0x0101
#: Command Field values of DIMSE-C and DIMSE-N (PS3.7 E.1): requests, responses, C-CANCEL.
_COMMAND_FIELDS = frozenset(
    [0x0FFF]
    + [base | rsp for base in (0x0001, 0x0010, 0x0020, 0x0021, 0x0030) for rsp in (0, 0x8000)]
    + [base | rsp for base in range(0x0100, 0x0151, 0x10) for rsp in (0, 0x8000)]
)

#: ``on_refused(association, command SOP Instance UID or "", error)``: an instance refused.
RefusalHook = Callable[[PynetAssociation, str, ServiceError], None]
#: ``on_aborted(association, reason)``: an association aborted for what it sent.
AbortHook = Callable[[PynetAssociation, str], None]
#: ``open_spool(SOP class UID, SOP instance UID, transfer syntax UID)`` from the command.
SpoolFactory = Callable[[str, str, str], Spool]


class _Violation(Exception):
    """What a peer sent cannot be served; the reason names it (no values)."""


#: A presentation data value as pynetdicom's P-DATA primitive lists it.
_PDV = tuple[int, bytes]


@dataclass
class FastStore:
    """A C-STORE request the guard received whole (the fast lane, see the module docstring).

    Queued in the association's DIMSE message queue in place of pynetdicom's
    C-STORE primitive; :class:`~node.dicom.reactor.NodeAssociation` serves it
    with :attr:`serve` and answers with the status it returns.
    """

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    #: The presentation context's abstract and transfer syntax.
    context_sop_class_uid: str
    transfer_syntax_uid: str
    spool: Spool
    #: ``serve(association, request) -> (status, error comment or None)``.
    serve: Callable[[PynetAssociation, FastStore], tuple[int, str | None]]


@dataclass
class _Message:
    """The DIMSE message arriving on an association."""

    command: bytearray = field(default_factory=bytearray)
    #: The command set is complete (a data set may follow).
    command_done: bool = False
    #: A C-STORE request whose data set goes to :attr:`spool`.
    spool: Spool | None = None
    sop_instance_uid: str = ""
    data_bytes: int = 0
    #: Command fragments not yet given to pynetdicom (until the command set is complete).
    held: list[_PDV] = field(default_factory=list)
    #: Received by the guard alone (:class:`FastStore`), none of it given to pynetdicom.
    fast: FastStore | None = None


@dataclass
class _Inbound:
    """One association's state: the message arriving, the spools waiting for the handler."""

    message: _Message = field(default_factory=_Message)
    waiting: dict[Path, Spool] = field(default_factory=dict)
    aborted: bool = False


@dataclass(frozen=True)
class Command:
    """What the guard needs of a decoded command set."""

    field: int
    data_set_type: int
    sop_class_uid: str
    sop_instance_uid: str
    message_id: int | None


def _check_structure(raw: bytes) -> None:
    """Every element of the command set (tag, 4-byte length, value) fits it exactly."""
    pos = 0
    while pos < len(raw):
        if pos + 8 > len(raw):
            raise _Violation("command set ends inside an element header")
        group, elem, length = struct.unpack_from("<HHL", raw, pos)
        pos += 8 + length
        if pos > len(raw):
            raise _Violation(
                f"command element ({group:04X},{elem:04X}) runs past the end of the command set"
            )


def decode_command(raw: bytes) -> Command:
    """Decode a complete command set (Implicit VR Little Endian) as pynetdicom will.

    Stricter than pydicom, which reads a value cut short or an element longer
    than the command set as far as the bytes go.

    Raises
    ------
    _Violation
        An element does not fit in the command set, it does not decode, an
        element's value does not, the Command Field is missing or unknown, or
        the Command Data Set Type is missing.
    """
    quick = parse_store_request(raw)
    if quick is not None:  # a plain C-STORE-RQ: the same answer without pydicom
        return Command(
            C_STORE_RQ,
            quick.data_set_type,
            quick.sop_class_uid,
            quick.sop_instance_uid,
            quick.message_id,
        )
    _check_structure(raw)
    try:
        command = decode(BytesIO(raw), True, True)
        for elem in command:  # every value, as pynetdicom's message_to_primitive reads them
            _ = elem.value
        field_value = command.get("CommandField")
        data_set_type = command.get("CommandDataSetType")
        message_id = command.get("MessageID")
    except Exception as exc:
        raise _Violation(f"command set cannot be decoded ({type(exc).__name__})") from None
    if not isinstance(field_value, int):
        raise _Violation("command set has no Command Field")
    if field_value not in _COMMAND_FIELDS:
        raise _Violation(f"command set has an unknown Command Field 0x{field_value:04X}")
    if not isinstance(data_set_type, int):
        raise _Violation("command set has no Command Data Set Type")

    def text(keyword: str) -> str:
        value = command.get(keyword)
        return str(value).strip("\0 ") if isinstance(value, str) else ""

    return Command(
        field_value,
        data_set_type,
        text("AffectedSOPClassUID"),
        text("AffectedSOPInstanceUID"),
        message_id if isinstance(message_id, int) else None,
    )


def _p_data(values: list[_PDV]) -> P_DATA:
    """A P-DATA primitive carrying ``values`` (a part of one received from the peer)."""
    primitive = P_DATA()
    # pynetdicom's setter wants [id, bytes] lists (its annotation says tuples).
    primitive.presentation_data_value_list = cast(Any, [[cid, data] for cid, data in values])
    return primitive


def _same_values(forward: list[_PDV], pdvs: list[tuple[int, bytes]]) -> bool:
    """``forward`` is exactly the primitive's own values (none held back, none carried over)."""
    return len(forward) == len(pdvs) and all(
        f[1] is p[1] for f, p in zip(forward, pdvs, strict=True)
    )


class InboundGuard:
    """Stands in front of each association's DIMSE provider (see the module docstring)."""

    def __init__(
        self,
        *,
        max_dataset_bytes: int,
        storage_classes: frozenset[str],
        open_spool: SpoolFactory,
        on_refused: RefusalHook,
        on_aborted: AbortHook,
        serve_fast: Callable[[PynetAssociation, FastStore], tuple[int, str | None]] | None = None,
    ) -> None:
        """``serve_fast`` stores a :class:`FastStore`; None turns the fast lane off."""
        self.max_dataset_bytes = max_dataset_bytes
        #: Abstract syntaxes whose C-STORE requests reach the handler (and are spooled).
        self.storage_classes = storage_classes
        self.open_spool = open_spool
        self.on_refused = on_refused
        self.on_aborted = on_aborted
        self.serve_fast = serve_fast
        #: C-STORE requests received by the fast lane since start (for tests and benches).
        self.fast_stores = 0
        self._state: weakref.WeakKeyDictionary[PynetAssociation, _Inbound] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def attach(self, assoc: PynetAssociation) -> None:
        """Put the guard in front of ``assoc``'s DIMSE provider (before any P-DATA)."""
        state = _Inbound()
        with self._lock:
            self._state[assoc] = state
        dimse = assoc.dimse
        original = dimse.receive_primitive

        def receive_primitive(primitive: P_DATA) -> None:
            self._receive(assoc, state, original, primitive)

        # An instance attribute: the state machine calls assoc.dimse.receive_primitive.
        dimse.receive_primitive = receive_primitive  # type: ignore[method-assign]

    def take_spool(self, assoc: PynetAssociation, path: Path | None) -> Spool | None:
        """The spool a complete C-STORE data set was received into; the caller owns it now."""
        if path is None:
            return None
        with self._lock:
            state = self._state.get(assoc)
            return None if state is None else state.waiting.pop(Path(path), None)

    def release(self, assoc: PynetAssociation) -> None:
        """``assoc``'s threads have ended: remove the spools no handler took."""
        with self._lock:
            state = self._state.pop(assoc, None)
            if state is None:
                return
            left = [*state.waiting.values(), state.message.spool]
            state.waiting.clear()
            state.message = _Message()
        for spool in left:
            if spool is not None:
                spool.discard()

    # -- the DUL thread ----------------------------------------------------------------

    def _receive(
        self,
        assoc: PynetAssociation,
        state: _Inbound,
        original: Callable[[P_DATA], None],
        primitive: P_DATA,
    ) -> None:
        if state.aborted:
            return  # the A-ABORT is on its way: nothing more is decoded
        pdvs = primitive.presentation_data_value_list
        #: The values pynetdicom gets, in order (given to it before any fast-lane store).
        forward: list[_PDV] = []
        try:
            for context_id, data in pdvs:
                self._fragment(assoc, state, context_id, data, forward, original)
            if _same_values(forward, pdvs):  # the usual case: pass the primitive on as it is
                self._forward(original, primitive)
            elif forward:
                self._forward(original, _p_data(forward))
        except _Violation as exc:
            self._abort(assoc, state, str(exc))
        except DatasetTooLarge as exc:
            sop_uid = state.message.sop_instance_uid
            self._abort(assoc, state, None)
            self.on_refused(assoc, sop_uid, exc)

    @staticmethod
    def _forward(original: Callable[[P_DATA], None], primitive: P_DATA) -> None:
        """Give pynetdicom's DIMSE provider ``primitive``; what it cannot decode aborts."""
        try:
            original(primitive)
        except Exception as exc:  # what pynetdicom still cannot decode: abort, never hang
            raise _Violation(f"DIMSE message cannot be decoded ({type(exc).__name__})") from None

    def _fragment(
        self,
        assoc: PynetAssociation,
        state: _Inbound,
        context_id: int,
        data: bytes,
        forward: list[_PDV],
        original: Callable[[P_DATA], None],
    ) -> None:
        """Follow one presentation data value (PS3.8 E.2) of the message arriving.

        What pynetdicom is to decode goes to ``forward``; command fragments
        wait in the message until its command set is complete.
        """
        if not data:
            raise _Violation("empty presentation data value")
        message = state.message
        last = bool(data[0] & 0x02)
        if data[0] & 0x01:
            if message.command_done:
                raise _Violation("command fragment inside a data set")
            message.command += data[1:]
            message.held.append((context_id, data))
            if len(message.command) > MAX_COMMAND_BYTES:
                raise _Violation(f"command set longer than {MAX_COMMAND_BYTES} bytes")
            if last:
                # pynetdicom gets the messages before this one first: its current
                # message is then this one's, and a fast-lane store queues after them.
                if forward:
                    self._forward(original, _p_data(forward))
                    forward.clear()
                self._command_done(assoc, state, context_id)
                if message.fast is None:
                    forward.extend(message.held)
                message.held = []
            return
        if not message.command_done:
            raise _Violation("data set fragment before its command set")
        message.data_bytes += len(data) - 1
        if message.spool is not None:
            if message.data_bytes > self.max_dataset_bytes:
                raise DatasetTooLarge(
                    f"data set passed the {self.max_dataset_bytes // (1024 * 1024)} MiB cap "
                    "(storage.max_dataset_mb) while arriving: association aborted"
                )
        elif message.data_bytes > MAX_IN_MEMORY_DATA_SET:
            raise _Violation(
                f"data set over {MAX_IN_MEMORY_DATA_SET} bytes in a message that is not "
                "a C-STORE the node can store"
            )
        fast = message.fast
        if fast is None:
            forward.append((context_id, data))
        else:  # on whatever context it came, as pynetdicom's decode_msg takes it
            fast.spool.write(data[1:])
        if last:
            if message.spool is not None:
                with self._lock:
                    state.waiting[message.spool.path] = message.spool
            state.message = _Message()
            if fast is not None:
                with self._lock:
                    self.fast_stores += 1
                assoc.dimse.msg_queue.put((fast.context_id, fast))  # type: ignore[arg-type]

    def _command_done(self, assoc: PynetAssociation, state: _Inbound, context_id: int) -> None:
        """The command set is complete: check it; spool the data set of a C-STORE request.

        A plain C-STORE request on an association that serves them becomes a
        :class:`FastStore` (:attr:`_Message.fast`); pynetdicom never sees it.
        """
        message = state.message
        command = decode_command(bytes(message.command))
        if command.data_set_type == NO_DATA_SET:
            state.message = _Message()
            return
        message.command_done = True
        message.sop_instance_uid = command.sop_instance_uid
        if command.field != C_STORE_RQ:
            return
        context = next((c for c in assoc.accepted_contexts if c.context_id == context_id), None)
        if not (
            command.message_id is not None
            and command.sop_class_uid
            and command.sop_instance_uid
            and context is not None
            and str(context.abstract_syntax) in self.storage_classes
        ):
            # Never handed to the C-STORE handler (pynetdicom drops, refuses or aborts
            # it): held in memory like any other message's data set, and capped the same.
            return
        syntax = str(context.transfer_syntax[0])
        spool = self.open_spool(command.sop_class_uid, command.sop_instance_uid, syntax)
        message.spool = spool
        dimse = assoc.dimse
        if (
            self.serve_fast is not None
            and getattr(assoc, "serves_fast_stores", False)
            and dimse.message is None  # pynetdicom holds no part of any message
            and command.sop_class_uid == str(context.abstract_syntax)
            and spool.has_meta  # both command UIDs valid (see Ingestor.open_spool)
            and validate_uid(command.sop_class_uid)[0]
        ):
            message.fast = FastStore(
                context_id,
                command.message_id,
                command.sop_class_uid,
                command.sop_instance_uid,
                str(context.abstract_syntax),
                syntax,
                spool,
                self.serve_fast,
            )
            return
        if dimse.message is None:  # pynetdicom makes one only when it has none
            dimse.message = DIMSEMessage()
        # Where pynetdicom's decode_msg writes data set fragments when set (its
        # STORE_RECV_CHUNKED_DATASET path); it passes both on to the C-STORE request.
        pending: Any = dimse.message
        pending._data_set_file = spool
        pending._data_set_path = spool.path

    def _abort(self, assoc: PynetAssociation, state: _Inbound, reason: str | None) -> None:
        """A-ABORT the association; drop the data set arriving; report ``reason`` if given."""
        state.aborted = True
        spool = state.message.spool
        state.message = _Message()
        if spool is not None:
            spool.discard()
        assoc.abort(block=False)  # queued for the DUL thread, which is the caller
        if reason is not None:
            self.on_aborted(assoc, reason)
