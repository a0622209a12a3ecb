"""The transport guard on a socket pair: PDU framing, size caps, deadlines, slots."""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from node.dicom.transport import (
    MAX_ASSOCIATE_RQ,
    Connection,
    ConnectionRegistry,
    GuardedSocket,
    TransportEvent,
    TransportLimits,
    TransportViolation,
)


def limits(**overrides: object) -> TransportLimits:
    values: dict[str, object] = {
        "allowed_networks": (),
        "max_connections": 6,
        "max_connections_per_ip": 3,
        "max_pdu_size": 4096,
        "setup_timeout_s": 5.0,
        "pdu_timeout_s": 5.0,
        "idle_timeout_s": 5.0,
    }
    values.update(overrides)
    return TransportLimits(**values)  # type: ignore[arg-type]


class Pair:
    """A guarded server-side socket and the raw peer socket at its other end."""

    def __init__(self, lim: TransportLimits) -> None:
        a, self.peer = socket.socketpair()
        self.sock = GuardedSocket(a.family, a.type, a.proto, fileno=a.detach())
        self.registry = ConnectionRegistry(lim)
        conn = self.registry.admit("127.0.0.1", 40000)
        assert isinstance(conn, Connection)
        self.conn = conn
        conn.sock = self.sock
        self.sock.connection = conn

    def read(self, n: int) -> bytes:
        """Read ``n`` bytes the way pynetdicom does (repeated recv, 4 KiB at most)."""
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(min(4096, n - len(out)))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair(limits())
    yield p
    p.close()


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def test_whole_pdus_pass_through_in_any_pieces(pair: Pair) -> None:
    rq = pdu(0x01, b"r" * 300)
    data = pdu(0x04, b"d" * 4096)
    stream = rq + data

    def send_in_pieces() -> None:  # a peer may split anywhere, headers included
        for i in range(0, len(stream), 7):
            pair.peer.sendall(stream[i : i + 7])
            time.sleep(0.0005)

    sender = threading.Thread(target=send_in_pieces)
    sender.start()
    assert pair.read(6) + pair.read(300) == rq
    assert pair.conn.setup_done
    assert pair.read(6) + pair.read(4096) == data
    sender.join()
    assert pair.conn.violation is None
    assert pair.registry.sweep(time.monotonic()) == []


def test_pdu_over_the_cap_is_aborted_before_its_body_is_read(pair: Pair) -> None:
    pair.peer.sendall(struct.pack(">BBL", 0x04, 0, 512 * 2**20) + b"\0" * 1024)
    with pytest.raises(TransportViolation, match="536870912 bytes is over the 4096-byte limit"):
        pair.read(6)
    # The peer hears an A-ABORT (provider, invalid PDU parameter value), then EOF.
    assert pair.peer.recv(100) == bytes.fromhex("07000000000400000206")
    assert pair.peer.recv(100) == b""
    # pynetdicom may try again: the connection stays aborted, reported once.
    with pytest.raises(TransportViolation):
        pair.sock.recv(6)
    [(event, count)] = pair.registry.sweep(time.monotonic())
    assert (event.action, count) == ("connection.aborted", 1)
    assert "P-DATA-TF of 536870912 bytes" in event.reason


def test_association_request_has_its_own_cap(pair: Pair) -> None:
    pair.peer.sendall(struct.pack(">BBL", 0x01, 0, MAX_ASSOCIATE_RQ + 1))
    with pytest.raises(TransportViolation, match="A-ASSOCIATE-RQ"):
        pair.read(6)


def test_unknown_pdu_type_is_aborted(pair: Pair) -> None:
    pair.peer.sendall(b"\x99\x00\x00\x00\x00\x04abcd")
    with pytest.raises(TransportViolation, match="unknown PDU type 0x99"):
        pair.read(6)
    assert pair.peer.recv(100)[:1] == b"\x07"


def test_a_drip_inside_a_pdu_is_not_progress() -> None:
    p = Pair(limits(pdu_timeout_s=0.4))
    try:
        p.peer.sendall(pdu(0x01, b"r" * 10))
        p.read(16)
        p.peer.sendall(b"\x04\x00\x00")  # half a header, then one byte now and then
        started = time.monotonic()
        with pytest.raises(TransportViolation, match=r"not complete 0\.4 s after its first byte"):
            for _ in range(10):
                p.read(6)
                time.sleep(0.1)
                p.peer.sendall(b"\x00")
        assert time.monotonic() - started < 2
    finally:
        p.close()


def test_set_up_must_finish_in_time_even_when_bytes_keep_coming() -> None:
    p = Pair(limits(setup_timeout_s=0.5, pdu_timeout_s=60))
    try:
        p.peer.sendall(struct.pack(">BBL", 0x01, 0, 100))
        with pytest.raises(TransportViolation, match=r"no complete A-ASSOCIATE-RQ within 0\.5 s"):
            p.read(6)
            while True:
                p.peer.sendall(b"x")
                p.read(1)
                time.sleep(0.05)
    finally:
        p.close()


def test_admission_per_address_in_total_and_by_network() -> None:
    registry = ConnectionRegistry(limits())
    admitted = [registry.admit("10.0.0.1", 1000 + i) for i in range(4)]
    assert all(isinstance(c, Connection) for c in admitted[:3])
    assert admitted[3] == (
        "peer 10.0.0.1 already holds 3 connections (dicom.max_connections_per_ip)"
    )
    assert all(isinstance(registry.admit("10.0.0.2", i), Connection) for i in range(3))
    assert registry.admit("10.0.0.3", 1) == "6 connections open (the node's limit)"
    fenced = ConnectionRegistry(limits(allowed_networks=(ipaddress.ip_network("10.1.0.0/16"),)))
    assert fenced.admit("10.2.0.1", 1) == "peer 10.2.0.1 is not in dicom.allowed_peers"
    assert isinstance(fenced.admit("10.1.2.3", 1), Connection)


def test_associations_per_address_and_calling_ae() -> None:
    registry = ConnectionRegistry(limits(max_connections_per_ip=10, max_connections=20))
    conns = [registry.admit("10.0.0.1", i) for i in range(4)]
    first, second, third, other = (c for c in conns if isinstance(c, Connection))
    assert registry.claim_association(first, "GREEDY", 2) is None
    assert registry.claim_association(second, "GREEDY", 2) is None
    assert registry.claim_association(third, "GREEDY", 2) == 2
    assert registry.claim_association(other, "MODEST", 2) is None


def test_finished_connections_give_their_slot_back_and_events_coalesce() -> None:
    registry = ConnectionRegistry(limits())
    conn = registry.admit("10.0.0.1", 1)
    assert isinstance(conn, Connection)
    a, b = socket.socketpair()
    conn.sock = a
    for _ in range(5):
        registry.report(
            TransportEvent("connection.refused", "10.0.0.9", 5, "peer 10.0.0.9 holds 3 connections")
        )
    assert registry.open_connections() == 1
    a.close()  # no association was ever attached: closed means finished
    b.close()
    [(event, count)] = registry.sweep(time.monotonic())
    assert (event.ip, count) == ("10.0.0.9", 5)
    assert registry.open_connections() == 0
