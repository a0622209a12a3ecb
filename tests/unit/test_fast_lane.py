"""The C-STORE fast lane: hand-read requests, hand-written responses, pynetdicom's path kept.

A real pynetdicom SCU talks to a real GuardedAssociationServer on loopback
whose associations are :class:`~node.dicom.reactor.NodeAssociation` with an
:class:`~node.dicom.inbound.InboundGuard` in front, as in ``serve``. The
response bytes are compared with pynetdicom's own encoder, the request
parser with the full pydicom decode.
"""

from __future__ import annotations

import io
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    Verification,
)

from node.dicom.dimse_fast import encode_store_response, parse_store_request
from node.dicom.inbound import FastStore, InboundGuard, decode_command
from node.dicom.transport import GuardedAssociationServer, TransportLimits
from node.store.spool import Spool, file_meta_bytes

MR = str(MRImageStorage)


def command_bytes(message: Any, primitive: Any) -> bytes:
    """The command set pynetdicom encodes for ``primitive``."""
    message.primitive_to_message(primitive)
    return b"".join(
        data[1:]
        for p in message.encode_msg(1, 16384)
        for _, data in p.presentation_data_value_list
        if data[0] & 0x01
    )


@pytest.mark.parametrize(
    ("status", "comment"),
    [
        (0x0000, None),
        (0xB000, "SOP Instance UID stored before with other content: first kept"),
        (0xA700, "free disk 12 MiB is under the 100 MiB floor"),  # odd length: padded
        (0xC000, "no"),
    ],
)
@pytest.mark.parametrize("instance", ["1.2.3.4", "1.2.826.0.1.3680043.8.498.12345"])
def test_responses_are_byte_for_byte_what_pynetdicom_sends(
    status: int, comment: str | None, instance: str
) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 513
    rsp.AffectedSOPClassUID = MR
    rsp.AffectedSOPInstanceUID = instance
    rsp.Status = status
    if comment is not None:
        rsp.ErrorComment = comment  # type: ignore[assignment]
    expected = command_bytes(C_STORE_RSP(), rsp)
    assert encode_store_response(513, MR, instance, status, comment) == expected


def store_request(**values: Any) -> bytes:
    rq = C_STORE()
    rq.MessageID = values.get("message_id", 7)
    rq.AffectedSOPClassUID = values.get("sop_class", MR)
    rq.AffectedSOPInstanceUID = values.get("sop_instance", "1.2.3.45")
    rq.Priority = values.get("priority", 2)
    if "move_ae" in values:
        rq.MoveOriginatorApplicationEntityTitle = values["move_ae"]
        rq.MoveOriginatorMessageID = 9
    rq.DataSet = io.BytesIO(b"\0\0")
    return command_bytes(C_STORE_RQ(), rq)


@pytest.mark.parametrize(
    "values",
    [{}, {"priority": 1}, {"move_ae": "ORTHANC"}, {"sop_instance": "1.2.3"}, {"message_id": 65535}],
)
def test_a_plain_store_request_reads_as_the_full_decode_reads_it(values: dict[str, Any]) -> None:
    raw = store_request(**values)
    quick = parse_store_request(raw)
    assert quick is not None
    full = decode_command(raw)  # the pydicom decode the guard used before
    assert (quick.message_id, quick.sop_class_uid, quick.sop_instance_uid) == (
        full.message_id,
        full.sop_class_uid,
        full.sop_instance_uid,
    )
    assert quick.data_set_type == full.data_set_type


def element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0, elem, len(value)) + value


def test_anything_but_a_plain_store_request_is_left_to_the_full_decode() -> None:
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = str(Verification)
    plain = store_request()
    cases = {
        "C-ECHO": command_bytes(C_ECHO_RQ(), echo),
        "unknown element": plain + element(0x5010, b"ab"),
        "US of 4 bytes": plain.replace(element(0x0700, b"\2\0"), element(0x0700, b"\2\0\0\0")),
        "element twice": plain + element(0x1000, b"1.2\0"),
        "cut short": plain[:-3],
        "not ASCII": plain.replace(b"1.2.3.45", b"1.2.3.\xe945"),
        "no instance UID": plain.replace(element(0x1000, b"1.2.3.45"), b""),
    }
    for name, raw in cases.items():
        assert parse_store_request(raw) is None, name


@dataclass
class Node:
    server: GuardedAssociationServer
    port: int
    guard: InboundGuard
    fast: list[tuple[str, bytes]] = field(default_factory=list)
    slow: list[str] = field(default_factory=list)
    #: What the handler answers next, by SOP Instance UID (default Success).
    answers: dict[str, tuple[int, str | None]] = field(default_factory=dict)


@pytest.fixture
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Node]:
    options = getattr(request, "param", {})
    fast_on = options.get("fast", True)
    ae = AE("FASTLANE")
    ae.network_timeout = options.get("network_timeout", 30.0)
    ae.maximum_pdu_size = 16384  # data sets arrive in many PDUs
    ae.add_supported_context(Verification)
    ae.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    box: dict[str, Node] = {}

    def open_spool(sop_class: str, sop_instance: str, syntax: str) -> Spool:
        head = file_meta_bytes(sop_class, sop_instance, syntax)
        path = tmp_path / f"{sop_instance}-{time.monotonic_ns()}.part"
        return Spool(path, head, free_mb=lambda: 1e9, min_free_mb=1)

    def serve_fast(assoc: Any, rq: FastStore) -> tuple[int, str | None]:
        spool = box["n"].guard.take_spool(assoc, rq.spool.path)
        assert spool is not None
        staged = spool.finish(fsync=False)
        box["n"].fast.append((rq.sop_instance_uid, staged.path.read_bytes()))
        spool.discard()
        time.sleep(options.get("store_s", 0.0))  # a slow disk or index
        return box["n"].answers.get(rq.sop_instance_uid, (0x0000, None))

    def on_store(event: Any) -> Dataset:
        spool = box["n"].guard.take_spool(event.assoc, event.request._dataset_path)
        if spool is not None:
            spool.discard()
        box["n"].slow.append(str(event.request.AffectedSOPInstanceUID))
        status = Dataset()
        code, comment = box["n"].answers.get(str(event.request.AffectedSOPInstanceUID), (0, None))
        status.Status = code
        if comment is not None:
            status.ErrorComment = comment
        return status

    guard = InboundGuard(
        max_dataset_bytes=64 * 1024 * 1024,
        storage_classes=frozenset([MR, str(CTImageStorage)]),
        open_spool=open_spool,
        on_refused=lambda *a: None,
        on_aborted=lambda *a: None,
        serve_fast=serve_fast if fast_on else None,
    )
    server = ae.make_server(
        ("127.0.0.1", 0),
        evt_handlers=[
            (evt.EVT_CONN_OPEN, lambda event: guard.attach(event.assoc)),
            (evt.EVT_C_STORE, on_store),
        ],
        server_class=GuardedAssociationServer,
        limits=TransportLimits((), 8, 8, 16384, 5.0, 5.0, ae.network_timeout or 30.0),
        on_events=lambda groups: None,
    )
    assert isinstance(server, GuardedAssociationServer)
    server.start()
    box["n"] = Node(server, server.server_address[1], guard)
    yield box["n"]
    server.shutdown()


def mr(uid: str, size: int = 40_000) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MR
    ds.SOPInstanceUID = uid
    ds.PatientID = "FAST"
    ds.StudyInstanceUID = "1.2.3.1"
    ds.SeriesInstanceUID = "1.2.3.1.1"
    ds.Rows, ds.Columns, ds.BitsAllocated = 100, size // 200, 16
    ds.PixelData = bytes(range(256)) * (size // 256) + b"\0" * (size % 256)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(MR)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    return ds


def associate(port: int, max_pdu: int = 16384) -> Any:
    ae = AE("SCANNER")
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="FASTLANE")
    assert assoc.is_established
    return assoc


def test_stores_take_the_fast_lane_whole_in_order_with_the_statuses_the_handler_gave(
    node: Node,
) -> None:
    uids = [str(generate_uid()) for _ in range(3)]
    node.answers[uids[1]] = (
        0xB000,
        "SOP Instance UID stored before with other content: first kept",
    )
    node.answers[uids[2]] = (0xA700, "free disk 12 MiB is under the 100 MiB floor")
    assoc = associate(node.port)
    try:
        answers = []
        for k, uid in enumerate(uids):
            ds = mr(uid, 40_000 + 2 * k)  # about three 16 KiB PDUs each
            answers.append(assoc.send_c_store(ds))
            assert assoc.send_c_echo().Status == 0x0000  # pynetdicom's path in between
    finally:
        assoc.release()
    assert [(a.Status, a.get("ErrorComment")) for a in answers] == [
        (0x0000, None),
        (0xB000, node.answers[uids[1]][1]),
        (0xA700, node.answers[uids[2]][1]),
    ]
    assert node.guard.fast_stores == 3 and node.slow == []
    for k, (uid, stored) in enumerate(node.fast):
        assert uid == uids[k]
        # The spool holds preamble + File Meta + the data set exactly as sent.
        sent = io.BytesIO()
        dcmwrite(sent, mr(uids[k], 40_000 + 2 * k), enforce_file_format=True)
        back = dcmread(io.BytesIO(stored))
        assert back.SOPInstanceUID == uid and back.PixelData == mr(uid, 40_000 + 2 * k).PixelData
        assert stored.endswith(sent.getvalue()[-(40_000 + 2 * k) :])


def test_a_peer_with_a_tiny_maximum_pdu_still_gets_its_answer(node: Node) -> None:
    uid = generate_uid()
    node.answers[uid] = (0xA700, "x" * 60)  # response over the peer's 128-byte PDUs
    assoc = associate(node.port, max_pdu=128)
    try:
        answer = assoc.send_c_store(mr(uid, 2_000))
    finally:
        assoc.release()
    assert (answer.Status, answer.ErrorComment) == (0xA700, "x" * 60)
    assert node.guard.fast_stores == 1


def test_a_store_whose_class_is_not_its_contexts_takes_pynetdicoms_path(node: Node) -> None:
    uid = generate_uid()
    ds = mr(uid, 2_000)
    assoc = associate(node.port)
    try:
        ct = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage)
        rq = C_STORE()
        rq.MessageID, rq.Priority = 5, 2
        rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = MR, uid  # MR on the CT context
        buf = io.BytesIO()
        dcmwrite(buf, ds, little_endian=True, implicit_vr=False)
        rq.DataSet = io.BytesIO(buf.getvalue())
        # As pynetdicom's send_* do: pause the SCU's reactor, or it takes the response.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.001)
        try:
            assoc.dimse.send_msg(rq, ct.context_id)
            _, answer = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
    finally:
        assoc.release()
    assert answer is not None and answer.Status == 0x0000
    assert node.guard.fast_stores == 0 and node.slow == [uid]


@pytest.mark.parametrize("node", [{"fast": False}], indirect=True)
def test_with_the_fast_lane_off_every_store_goes_through_pynetdicom(node: Node) -> None:
    uid = generate_uid()
    assoc = associate(node.port)
    try:
        assert assoc.send_c_store(mr(uid, 20_000)).Status == 0x0000
    finally:
        assoc.release()
    assert node.guard.fast_stores == 0 and node.slow == [uid] and node.fast == []


@pytest.mark.parametrize("node", [{"network_timeout": 0.5, "store_s": 0.8}], indirect=True)
def test_a_fast_store_slower_than_the_network_timeout_does_not_abort_its_waiting_peer(
    node: Node,
) -> None:
    assoc = associate(node.port)
    try:
        answers = [assoc.send_c_store(mr(str(generate_uid()), 2_000)) for _ in range(2)]
        established = assoc.is_established
    finally:
        if assoc.is_established:
            assoc.release()
    # The peer waited for each answer: the store's time is not the peer's silence.
    assert [a.get("Status") for a in answers] == [0x0000, 0x0000] and established
    assert node.guard.fast_stores == 2


def send_raw(assoc: Any, pdus: list[list[tuple[int, bytes]]], answers: int) -> list[Any]:
    """Send P-DATA-TF PDUs as given (fragments as the peer cut them); the responses."""
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)
    got = []
    try:
        for pdvs in pdus:
            primitive = P_DATA()
            primitive.presentation_data_value_list = [[cid, data] for cid, data in pdvs]  # type: ignore[misc]
            assoc.dul.send_pdu(primitive)
        for _ in range(answers):
            _, rsp = assoc.dimse.get_msg(block=True)
            if rsp is None:
                break
            got.append((rsp.MessageIDBeingRespondedTo, rsp.Status))
    finally:
        assoc._reactor_checkpoint.set()
    return got


def test_command_sets_cut_across_pdus_still_reach_pynetdicom_whole_and_in_order(
    node: Node,
) -> None:
    def echo(message_id: int) -> bytes:
        rq = C_ECHO()
        rq.MessageID = message_id
        rq.AffectedSOPClassUID = str(Verification)
        return command_bytes(C_ECHO_RQ(), rq)

    one, two = echo(1), echo(2)
    assoc = associate(node.port)
    try:
        cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == Verification)
        cid = int(cx.context_id)
        # Echo 1's command over two PDUs, the second also starting echo 2's: as many
        # values reach pynetdicom from that PDU as it holds, but not the same ones.
        got = send_raw(
            assoc,
            [
                [(cid, b"\x01" + one[:40])],
                [(cid, b"\x03" + one[40:]), (cid, b"\x01" + two[:40])],
                [(cid, b"\x03" + two[40:])],
            ],
            answers=2,
        )
        aborted = assoc.is_aborted
    finally:
        if assoc.is_established:
            assoc.release()
    assert got == [(1, 0x0000), (2, 0x0000)] and not aborted
