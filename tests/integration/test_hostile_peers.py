"""A real ``sarcnode serve`` against hostile peers on raw sockets (issue 13).

Memory and slots: an announced 512 MiB PDU, random bytes, idle, dripping and
connect-and-close connections; logs: AE titles with control characters and
patient-module values in hostile data sets. Honest senders are pynetdicom
SCUs, the "second peer" one bound to 127.0.0.2 (the transport limits key on the
source address; the association limit on address and calling AE).
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from tests.conftest import SARCNODE, NodeProcess, free_port
from tests.dicomgen import mr_dataset
from tests.fuzz.dimse import (
    CMD_FIELD,
    RawAssociation,
    command_set,
    p_data,
    store_rq_elements,
    uid_value,
)

pytestmark = pytest.mark.integration

VERIFICATION = "1.2.840.10008.1.1"
NodeFactory = Callable[..., NodeProcess]
Behaviour = Callable[[socket.socket, threading.Event], None]
# Short limits so the tests see set-up and PDU deadlines act within seconds.
FAST = {"setup_timeout_s": 2, "pdu_timeout_s": 2}


# -- raw DICOM upper layer -------------------------------------------------------


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(calling: bytes, called: bytes = b"SARCNODE") -> bytes:
    """An A-ASSOCIATE-RQ for Verification with raw 16-byte AE title fields."""
    context = (
        struct.pack(">BBBB", 1, 0, 0, 0)
        + _item(0x30, VERIFICATION.encode())
        + _item(0x40, b"1.2.840.10008.1.2")
    )
    user = _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.9999")
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16)[:16]
        + calling.ljust(16)[:16]
        + b"\0" * 32
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + _item(0x20, context)
        + _item(0x50, user)
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One PDU from ``sock``: (type, body); (0, b"") if the connection closed first."""
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return 0, b""
        header += chunk
    pdu_type, _, length = struct.unpack(">BBL", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return pdu_type, body


# -- the process under test -------------------------------------------------------


def proc_status(pid: int, key: str) -> int:
    """A value (kB) from /proc/<pid>/status, e.g. VmHWM (peak RSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def threads(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/task").iterdir())


def pid_of(node: NodeProcess) -> int:
    assert node.proc is not None
    return node.proc.pid


def wait_events(
    node: NodeProcess, action: str, done: Callable[[list[dict[str, Any]]], bool], timeout: float
) -> list[dict[str, Any]]:
    """Audit events of ``action`` once ``done(events)`` holds (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        events = node.json("audit", "--action", action, "--limit", "1000")
        if done(events):
            return events
        assert time.monotonic() < deadline, f"{action}: {events}"
        time.sleep(0.3)


def counted(events: list[dict[str, Any]], text: str = "") -> int:
    """How many connections the (coalesced) events stand for."""
    return sum(e["detail"].get("count", 1) for e in events if text in e["detail"]["reason"])


def honest_store(node: NodeProcess, *, source: str = "127.0.0.2", calling: str = "SCANNER2") -> int:
    """C-STORE one MR instance with pynetdicom from ``source``; the status."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, bind_address=(source, 0))
    assert assoc.is_established, "second peer could not associate"
    try:
        return int(assoc.send_c_store(mr_dataset(generate_uid(), generate_uid(), 0)).Status)
    finally:
        assoc.release()


@contextmanager
def hostile(
    count: int, behave: Callable[[socket.socket, threading.Event], None], port: int
) -> Iterator[list[socket.socket]]:
    """``count`` connections from 127.0.0.1, each run by ``behave`` in a thread."""
    stop = threading.Event()
    socks: list[socket.socket] = []
    workers = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        socks.append(sock)
        worker = threading.Thread(target=behave, args=(sock, stop), daemon=True)
        worker.start()
        workers.append(worker)
    try:
        yield socks
    finally:
        stop.set()
        for sock in socks:
            sock.close()
        for worker in workers:
            worker.join(5)


def idle(sock: socket.socket, stop: threading.Event) -> None:
    stop.wait(30)


def drip(sock: socket.socket, stop: threading.Event) -> None:
    """An A-ASSOCIATE-RQ, one byte every 20 s."""
    for byte in associate_rq(b"DRIPPER"):
        try:
            sock.send(bytes([byte]))
        except OSError:
            return
        if stop.wait(20):
            return


def connect_and_close(sock: socket.socket, stop: threading.Event) -> None:
    sock.close()


# -- memory ------------------------------------------------------------------------


def test_announced_512_mib_pdu_is_aborted_with_rss_bounded(node_factory: NodeFactory) -> None:
    node = node_factory({"dicom": FAST})
    node.start()
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(associate_rq(b"HOSTILE"))
        assert read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
        sock.sendall(struct.pack(">BBL", 0x04, 0, 512 * 2**20))
        sent, chunk = 0, b"\0" * 2**20
        with pytest.raises(OSError):  # the node stops reading and closes
            while sent < 64 * 2**20:  # a bounded amount: the node never waits for 512 MiB
                sock.sendall(chunk)
                sent += len(chunk)
                time.sleep(0.01)
    peak_mb = proc_status(pid_of(node), "VmHWM") / 1024
    assert peak_mb < 500, f"serve's peak RSS {peak_mb:.0f} MB"
    [event] = wait_events(node, "connection.aborted", bool, 5)
    assert event["detail"]["reason"] == "P-DATA-TF of 536870912 bytes is over the 262144-byte limit"
    assert honest_store(node, source="127.0.0.1") == 0x0000  # still serving


def test_random_byte_connections_cost_bounded_threads(node_factory: NodeFactory) -> None:
    node = node_factory({"dicom": FAST})
    node.start()
    pid = pid_of(node)
    # One store first: the node's long-lived threads (the fsync pool) start on the first
    # instance and are not the connections' threads this test bounds.
    assert honest_store(node) == 0x0000
    before = threads(pid)

    def garbage(sock: socket.socket, stop: threading.Event) -> None:
        try:
            sock.sendall(os.urandom(64))
        except OSError:
            return
        stop.wait(10)

    peak = before
    with hostile(50, garbage, node.port):
        for _ in range(10):
            peak = max(peak, threads(pid))
            time.sleep(0.1)
        assert honest_store(node) == 0x0000
    # Per address at most max_connections_per_ip (8) connections, 2 threads each
    # (+1 short-lived handler thread while one is set up): 58 threads before the guard.
    assert peak <= before + 3 * 8 + 2, (before, peak)
    refused = wait_events(node, "connection.refused", lambda e: counted(e) >= 42, 10)
    assert counted(refused, "already holds 8 connections (dicom.max_connections_per_ip)") >= 42
    deadline = time.monotonic() + 10
    while threads(pid) > before + 1:
        assert time.monotonic() < deadline, f"threads stay at {threads(pid)} (was {before})"
        time.sleep(0.3)


# -- slots ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "behave", [idle, drip, connect_and_close], ids=["idle", "drip", "connect-close"]
)
def test_sixteen_connections_from_one_peer_do_not_starve_another(
    node_factory: NodeFactory, behave: Behaviour
) -> None:
    node = node_factory({"dicom": FAST})
    node.start()
    with hostile(16, behave, node.port):
        time.sleep(0.3)
        started = time.monotonic()
        assert honest_store(node) == 0x0000
        assert time.monotonic() - started < 5
        if behave is not connect_and_close:
            refused = wait_events(node, "connection.refused", lambda e: counted(e) >= 8, 5)
            assert counted(refused, "peer 127.0.0.1 already holds 8 connections") == 8
            # The eight admitted ones are cut at the set-up limit (2 s), audited.
            aborted = wait_events(node, "connection.aborted", lambda e: counted(e) >= 8, 10)
            assert counted(aborted, "no complete A-ASSOCIATE-RQ within 2 s") == 8
            assert all(e["actor"] == "ip:127.0.0.1" for e in aborted)
    # Afterwards the hostile address gets its slots back.
    time.sleep(FAST["setup_timeout_s"] + 1)
    assert honest_store(node, source="127.0.0.1") == 0x0000


def test_associations_per_address_and_calling_ae_keep_slots_for_others(
    node_factory: NodeFactory,
) -> None:
    node = node_factory({"dicom": {"max_associations_per_peer": 2}})
    node.start()
    greedy = AE(ae_title="GREEDY")
    greedy.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    held = [greedy.associate("127.0.0.1", node.port, ae_title=node.ae_title) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        extra = greedy.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert extra.is_rejected
        assert honest_store(node, source="127.0.0.1", calling="MODEST") == 0x0000
    finally:
        for a in held:
            a.release()
    event = node.json("audit", "--action", "association.rejected")[-1]
    assert event["detail"]["reason"] == (
        "GREEDY from 127.0.0.1 already holds 2 associations (dicom.max_associations_per_peer)"
    )


# -- command sets ------------------------------------------------------------------------


def broken_commands(sop_uid: str) -> dict[str, bytes]:
    """Command sets pynetdicom's reader could not decode (its DUL thread raised, no answer)."""
    valid = command_set(store_rq_elements(MRImageStorage, sop_uid, 1))
    last = len(valid) - 8 - len(uid_value(sop_uid))  # the Affected SOP Instance UID
    overlong = bytearray(valid)
    struct.pack_into("<L", overlong, last + 4, 5000)
    no_field = {**store_rq_elements(MRImageStorage, sop_uid, 1), CMD_FIELD: None}
    return {
        "random bytes": bytes(range(7, 47)),
        "cut inside a value": valid[:-3],
        "cut inside an element header": valid[: last + 5],
        "element longer than the set": bytes(overlong),
        "no Command Field": command_set(no_field),
    }


def test_undecodable_command_sets_are_aborted_audited_and_serve_stays_healthy(
    node_factory: NodeFactory,
) -> None:
    node = node_factory()
    node.start()
    ds = mr_dataset(generate_uid(), generate_uid(), 0)
    cases = broken_commands(str(ds.SOPInstanceUID))
    for label, command in cases.items():
        assoc = RawAssociation.open(
            node.port, b"FUZZER", b"SARCNODE", [(MRImageStorage, ExplicitVRLittleEndian)]
        )
        assert isinstance(assoc, RawAssociation), assoc
        assoc.sock.sendall(b"".join(p_data(1, 0x03, command)))
        started = time.monotonic()
        pdu_type, _ = read_pdu(assoc.sock)
        assert pdu_type == 0x07, f"{label}: PDU 0x{pdu_type:02X} instead of an A-ABORT"
        assert time.monotonic() - started < 2, label
        assoc.close()
    aborted = wait_events(node, "connection.aborted", lambda e: counted(e) >= len(cases), 5)
    reasons = {e["detail"]["reason"] for e in aborted}
    assert reasons == {
        "command element (0807,0A09) runs past the end of the command set",  # random bytes
        "command element (0000,1000) runs past the end of the command set",
        "command set ends inside an element header",
        "command set has no Command Field",
    }, reasons
    closed = wait_events(node, "association.aborted", lambda e: len(e) >= len(cases), 5)
    assert len(closed) == len(cases)  # every association's row ended, none left "open"
    log = node.log()
    assert "ERROR" not in log and "Traceback" not in log, log[-3000:]
    assert honest_store(node, source="127.0.0.1") == 0x0000  # still serving
    assert threads(pid_of(node)) < 30


# -- logs -------------------------------------------------------------------------------

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def assert_every_line_is_a_record(log: str) -> None:
    for line in log.splitlines():
        assert LOG_LINE.match(line) or line.startswith("  | "), f"not a log record: {line!r}"


def test_ae_title_with_control_characters_cannot_forge_a_log_line(
    node_factory: NodeFactory,
) -> None:
    node = node_factory({"dicom": FAST})
    node.start()
    evil = b"A\r\nFORGED\x1b[31mXY"  # 16 bytes: CR/LF, then an ANSI colour code
    assert len(evil) == 16
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(associate_rq(evil))
        pdu_type, _ = read_pdu(sock)
    # pynetdicom refuses to decode such a request (A-ABORT); the SCP's own check
    # (an A-ASSOCIATE-RJ) stands behind it.
    assert pdu_type in (0x03, 0x07), pdu_type
    [event] = wait_events(node, "connection.aborted", bool, 5)
    assert event["detail"]["reason"] == "A-ASSOCIATE-RQ could not be decoded"
    log = node.log()
    assert "\x1b" not in log and "\r" not in log
    assert not [line for line in log.splitlines() if line.startswith("FORGED")]
    assert_every_line_is_a_record(log)


def _marked_datasets() -> tuple[list[tuple[pydicom.Dataset, bytes | None]], list[str]]:
    """Hostile data sets whose patient-module values are unique markers; the markers."""
    token = os.urandom(3).hex().upper()
    patient = {
        "PatientName": f"Probe{token}^Phineas^Zeta",
        "PatientID": f"PID{token}X",
        "IssuerOfPatientID": f"ISS{token}",
        "PatientBirthDate": "19580317",
        "PatientBirthTime": "231559",
        "PatientSex": f"S{token}",
        "PatientComments": f"comment {token} private",
    }
    markers = [patient[k] for k in patient] + [f"Probe{token}", f"PID{token}X"]
    study = generate_uid()

    def marked(**wrong: str) -> pydicom.Dataset:
        ds = mr_dataset(study, generate_uid(), 0)
        for keyword, value in patient.items():
            setattr(ds, keyword, value)
        for keyword, text in wrong.items():  # patient values in elements of other VRs, raw
            tag = Tag(cast(int, tag_for_keyword(keyword)))
            raw = text.encode() + b" " * (len(text) % 2)
            ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
        return ds

    from tests.integration.test_scp import encode

    name = patient["PatientName"]
    wrong_vr = marked(
        InstanceNumber=name,
        SeriesNumber=patient["PatientID"],
        SliceThickness=name,
        StudyDate=name,
        StudyTime=patient["PatientID"],
        SeriesDescription=name,
        FrameOfReferenceUID=name,
        SpecificCharacterSet=patient["PatientID"],
    )
    uid_is_a_name = marked(StudyInstanceUID=name, SeriesInstanceUID=patient["PatientID"])
    truncated = marked()
    whole = encode(truncated)
    cut = whole[: whole.index(name.encode()) + 5]  # ends inside Patient's Name
    return [(marked(), None), (wrong_vr, None), (uid_is_a_name, None), (truncated, cut)], markers


@pytest.mark.filterwarnings("ignore::UserWarning")  # the sender's own pydicom complains
def test_no_patient_value_reaches_the_log_after_hostile_input(
    node: NodeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.integration.test_scp import pynet_store

    datasets, markers = _marked_datasets()
    statuses = []
    for ds, wire in datasets:
        statuses.append(pynet_store(node, ds, wire, monkeypatch if wire is not None else None))
    assert statuses[0] == 0x0000 and all(s != 0x0000 for s in statuses[2:]), statuses
    time.sleep(0.5)
    log = node.log()
    # The hostile path did log, and what it quoted was withheld (pydicom's warning
    # about the Specific Character Set that holds a patient ID, at least).
    assert "refused with 0xC000" in log and "<value withheld>" in log
    leaked = [m for m in markers if m in log]
    assert not leaked, f"patient values in the log: {leaked}"
    assert_every_line_is_a_record(log)


# -- the demo's path on the embedded defaults ------------------------------------------------


@pytest.fixture
def demo_node(tmp_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """``sarcnode serve`` with no config file and the demo's environment."""
    from node.demo import node_env

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARCNODE_")}
    env |= node_env(tmp_path / "storage", port, [])
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([SARCNODE, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    heartbeat = tmp_path / "storage" / "run" / "serve.json"
    deadline = time.monotonic() + 60
    while not heartbeat.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (
            tmp_path / "serve.log"
        ).read_text()
        time.sleep(0.2)
    yield port, env
    proc.terminate()
    proc.wait(30)


def test_embedded_defaults_refuse_unknown_callers_and_the_demo_names_its_scanner(
    demo_node: tuple[int, dict[str, str]],
) -> None:
    from node.demo import DEMO_SCANNER
    from node.dicom.echo import echo

    port, env = demo_node
    assert echo("127.0.0.1", port, "SARCNODE", calling_ae=DEMO_SCANNER, timeout_s=10).ok
    refused = echo("127.0.0.1", port, "SARCNODE", calling_ae="INTRUDER", timeout_s=10)
    assert refused.rejected and not refused.ok
    # `status` still tells the node is up, though its own C-ECHO is refused.
    status = subprocess.run(
        [SARCNODE, "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    info = json.loads(status.stdout)  # one object (status is about one thing)
    assert status.returncode == 0 and info["scp_up"], info["scp"]
