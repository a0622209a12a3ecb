"""Blocking association threads (node.dicom.reactor) behind the guarded server, real peers.

The server is the node's GuardedAssociationServer with a bare AE (no database);
the peers are pynetdicom's SCU and raw sockets on loopback.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import MRImageStorage, Verification  # type: ignore[attr-defined]

from node.dicom.reactor import NodeAssociation, pynetdicom_drift
from node.dicom.transport import GuardedAssociationServer, TransportEvent, TransportLimits


def test_pynetdicom_internals_are_the_ones_the_reactor_was_written_for() -> None:
    drift = pynetdicom_drift()
    assert not drift, (
        "node/dicom/reactor.py copies and overrides pynetdicom internals that changed: "
        + "; ".join(drift)
        + ". Re-read them, adapt node/dicom/reactor.py, and update PYNETDICOM_SOURCES "
        "(until then serve falls back to pynetdicom's polling reactor)."
    )


@dataclass
class Server:
    """A guarded server on a free loopback port and what its handlers saw."""

    server: GuardedAssociationServer
    port: int
    stored: list[bytes] = field(default_factory=list)
    assocs: list[Association] = field(default_factory=list)
    events: list[TransportEvent] = field(default_factory=list)

    def last_assoc(self, timeout: float = 5.0) -> Association:
        deadline = time.monotonic() + timeout
        while not self.assocs and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.assocs[-1]


def serve(
    network_timeout: float = 30.0, acse_timeout: float = 30.0, store_s: float = 0.0
) -> Server:
    ae = AE("REACTOR")
    ae.network_timeout = network_timeout
    ae.acse_timeout = acse_timeout
    ae.maximum_pdu_size = 65536
    ae.add_supported_context(Verification)
    ae.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)
    box: dict[str, Server] = {}

    def on_open(event: Any) -> None:
        box["s"].assocs.append(event.assoc)

    def on_store(event: Any) -> int:
        box["s"].stored.append(event.request.DataSet.getvalue())
        time.sleep(store_s)  # a slow disk or index
        return 0x0000

    limits = TransportLimits((), 8, 8, 65536, 5.0, 5.0, network_timeout)
    server = ae.make_server(  # a GuardedAssociationServer
        ("127.0.0.1", 0),
        evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_C_STORE, on_store)],
        server_class=GuardedAssociationServer,
        limits=limits,
        on_events=lambda groups: box["s"].events.extend(e for e, _ in groups),
    )
    assert isinstance(server, GuardedAssociationServer)
    server.start()
    box["s"] = Server(server, server.server_address[1])
    return box["s"]


@pytest.fixture
def server() -> Iterator[Server]:
    s = serve()
    yield s
    s.server.shutdown()


def scu(port: int, max_pdu: int = 16384) -> Association:
    ae = AE("TESTSCU")
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="REACTOR")
    assert assoc.is_established
    return assoc


def threads_end(assoc: Association, within: float) -> bool:
    assoc.join(within)
    assoc.dul.join(max(0.0, within))
    return not assoc.is_alive() and not assoc.dul.is_alive()


def voluntary_switches(*threads: threading.Thread) -> int:
    """How often the threads gave up the CPU (each wait or sleep counts one)."""
    total = 0
    for thread in threads:
        status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("voluntary_ctxt_switches"))
        total += int(line.split()[1])
    return total


def test_an_idle_association_does_not_poll(server: Server) -> None:
    assoc = scu(server.port)
    try:
        remote = server.last_assoc()
        assert isinstance(remote, NodeAssociation)
        time.sleep(0.2)
        before = voluntary_switches(remote, remote.dul)
        time.sleep(1.0)
        woke = voluntary_switches(remote, remote.dul) - before
        # pynetdicom's reactors wake about 2,000 times a second (two 1 ms sleeps);
        # these wait on the socket and an event, 10 times a second at most each.
        assert woke < 60, f"the idle association's threads woke {woke} times in 1 s"
    finally:
        assoc.release()


def test_stores_arrive_whole_over_small_pdus_and_release_ends_both_threads(
    server: Server,
) -> None:
    assoc = scu(server.port, max_pdu=16384)
    remote = server.last_assoc()
    sent = []
    for i in range(3):
        ds = mr(i, bytes(range(256)) * (4096 + i))  # ~1 MiB: 64 PDUs of 16 KiB
        status = assoc.send_c_store(ds)
        assert status.Status == 0x0000
        sent.append(ds.PixelData)
    assoc.release()
    assert assoc.is_released
    assert [s.endswith(p) for s, p in zip(server.stored, sent, strict=True)] == [True] * 3
    assert threads_end(remote, 2.0), "the released association's threads are still running"


def test_a_peer_abort_ends_both_threads(server: Server) -> None:
    assoc = scu(server.port)
    remote = server.last_assoc()
    assoc.abort()
    assert threads_end(remote, 2.0), "the aborted association's threads are still running"
    assert remote.is_aborted


def test_the_network_timeout_still_aborts_an_idle_association() -> None:
    s = serve(network_timeout=0.6)
    try:
        assoc = scu(s.port)
        remote = s.last_assoc()
        started = time.monotonic()
        assert threads_end(remote, 5.0)
        elapsed = time.monotonic() - started
        assert remote.is_aborted
        assert 0.4 < elapsed < 2.5, f"aborted after {elapsed:.2f} s of a 0.6 s network timeout"
        assoc.join(5.0)
        assert assoc.is_aborted  # the peer heard the A-ABORT
    finally:
        s.server.shutdown()


def test_a_silent_connection_is_closed_by_the_acse_timeout() -> None:
    s = serve(acse_timeout=0.6)
    try:
        with socket.create_connection(("127.0.0.1", s.port)) as raw:
            raw.settimeout(5.0)
            started = time.monotonic()
            assert raw.recv(100) == b""
            elapsed = time.monotonic() - started
        assert 0.4 < elapsed < 2.5, f"closed after {elapsed:.2f} s of a 0.6 s ACSE timeout"
    finally:
        s.server.shutdown()


def test_an_oversized_pdu_is_still_aborted_before_its_body(server: Server) -> None:
    assoc = scu(server.port)
    remote = server.last_assoc()
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    assert sock is not None
    # A P-DATA-TF announcing 1 MiB against the 64 KiB this server accepts.
    sock.sendall(struct.pack(">BBL", 0x04, 0, 2**20) + b"\0" * 1024)
    assert threads_end(remote, 3.0)
    assoc.join(5.0)
    assert assoc.is_aborted  # the guard's A-ABORT
    server.server.reap()
    assert [e.reason for e in server.events] == [
        "P-DATA-TF of 1048576 bytes is over the 65536-byte limit"
    ]


def mr(number: int, pixels: bytes) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.PatientID, ds.InstanceNumber, ds.BitsAllocated = "REACTOR", number, 8
    ds.PixelData = pixels
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_a_store_slower_than_the_network_timeout_does_not_abort_its_waiting_peer() -> None:
    # pynetdicom counts its own handler's time as the peer's silence and aborts.
    s = serve(network_timeout=0.5, store_s=0.8)
    try:
        assoc = scu(s.port)
        statuses = [assoc.send_c_store(mr(i, b"\0" * 1024)).Status for i in range(2)]
        assert statuses == [0x0000, 0x0000]
        assert assoc.is_established
        assoc.release()
        assert assoc.is_released
    finally:
        s.server.shutdown()
