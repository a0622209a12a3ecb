"""A raw DICOM upper-layer client for the fuzz: every byte is the caller's choice.

pynetdicom's SCU validates and encodes what it sends (UIDs, command sets,
fragment sizes) and polls its DIMSE queue, so it can neither send what the fuzz
needs nor send it fast. This client writes the PDUs itself (PS3.8 9.3) and the
command set in Implicit VR Little Endian (PS3.7 6.3.1), sends data sets in
fragments no longer than the peer announced, and reads the answer back as one
of a few outcomes:

- an ``int``: the C-STORE/C-ECHO response's Status;
- :data:`ABORT`: an A-ABORT, or the connection ended, without an answer;
- :data:`REJECT`: an A-ASSOCIATE-RJ;
- :data:`TIMEOUT`: nothing within the client's limit (a request left unanswered);
- :data:`CLOSED`: the fuzz closed the connection itself (nothing to answer);
- :data:`DROPPED`: a connection closed before any PDU came back (refused when
  accepted, e.g. over the per-address connection limit).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

ABORT = "abort"
REJECT = "reject"
TIMEOUT = "timeout"
CLOSED = "closed"
#: The association was accepted (an A-ASSOCIATE-AC came back).
ACCEPTED = "accepted"
#: The connection was closed before any PDU came back (refused at TCP accept: a slot limit).
DROPPED = "dropped"

#: What one request came to: a status, or one of the outcome words above.
Outcome = int | str

VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.7433.13.10"
#: Largest PDU the fuzz client receives (announced in its A-ASSOCIATE-RQ).
CLIENT_MAX_PDU = 65536

PDU_ASSOCIATE_RQ = 0x01
PDU_ASSOCIATE_AC = 0x02
PDU_ASSOCIATE_RJ = 0x03
PDU_P_DATA = 0x04
PDU_RELEASE_RQ = 0x05
PDU_RELEASE_RP = 0x06
PDU_ABORT = 0x07

# Command set elements (group 0000), PS3.7 E.1.
CMD_GROUP_LENGTH = 0x0000
CMD_AFFECTED_SOP_CLASS = 0x0002
CMD_FIELD = 0x0100
CMD_MESSAGE_ID = 0x0110
CMD_MESSAGE_ID_RESPONDED = 0x0120
CMD_PRIORITY = 0x0700
CMD_DATA_SET_TYPE = 0x0800
CMD_STATUS = 0x0900
CMD_ERROR_COMMENT = 0x0902
CMD_AFFECTED_SOP_INSTANCE = 0x1000

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
DATA_SET_PRESENT = 0x0000
NO_DATA_SET = 0x0101


class PeerEnded(Exception):
    """The peer aborted or closed the connection (``outcome`` says which word applies)."""

    def __init__(self, outcome: str, detail: str = "", *, before_any_byte: bool = False) -> None:
        super().__init__(detail or outcome)
        self.outcome = outcome
        #: Nothing at all was read before the connection ended.
        self.before_any_byte = before_any_byte


# -- encoding ----------------------------------------------------------------------


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def ae_field(title: bytes) -> bytes:
    """A 16-byte AE title field: ``title`` padded with spaces or cut."""
    return title.ljust(16)[:16]


def associate_rq(
    calling: bytes,
    called: bytes,
    contexts: list[tuple[int, str, list[str]]],
    max_pdu: int = CLIENT_MAX_PDU,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing ``(context ID, abstract syntax, transfer syntaxes)``."""
    variable = _item(0x10, APPLICATION_CONTEXT.encode())
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        variable += struct.pack(">BBHBBBB", 0x20, 0, 4 + len(sub), cid, 0, 0, 0) + sub
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, IMPLEMENTATION_UID.encode())
    variable += _item(0x50, user)
    body = struct.pack(">HH", 1, 0) + ae_field(called) + ae_field(calling) + b"\0" * 32 + variable
    return struct.pack(">BBL", PDU_ASSOCIATE_RQ, 0, len(body)) + body


def p_data(cid: int, flags: int, fragment: bytes | memoryview) -> list[bytes | memoryview]:
    """A P-DATA-TF PDU with one PDV (header parts and fragment, for ``sendmsg``)."""
    header = struct.pack(">BBLLBB", PDU_P_DATA, 0, 6 + len(fragment), 2 + len(fragment), cid, flags)
    return [header, fragment]


def release_rq() -> bytes:
    """An A-RELEASE-RQ PDU."""
    return struct.pack(">BBLL", PDU_RELEASE_RQ, 0, 4, 0)


def abort_pdu() -> bytes:
    """An A-ABORT PDU from the service user."""
    return struct.pack(">BBLBBBB", PDU_ABORT, 0, 4, 0, 0, 0, 0)


def uid_value(value: str | bytes) -> bytes:
    """A UI value as sent: ASCII (bytes as they are), padded with NUL to an even length."""
    raw = value.encode("latin-1") if isinstance(value, str) else value
    return raw + b"\0" if len(raw) % 2 else raw


def command_set(elements: dict[int, bytes | None]) -> bytes:
    """A group-0000 command set, Implicit VR LE, in tag order, with its group length.

    ``elements`` maps an element number to its encoded value (None: left out);
    the group length is computed unless the caller gives one.
    """
    body = b"".join(
        struct.pack("<HHL", 0, elem, len(value)) + value
        for elem, value in sorted(elements.items())
        if value is not None and elem != CMD_GROUP_LENGTH
    )
    length = elements.get(CMD_GROUP_LENGTH, struct.pack("<L", len(body)))
    if CMD_GROUP_LENGTH in elements and length is None:
        return body
    assert length is not None
    return struct.pack("<HHL", 0, CMD_GROUP_LENGTH, len(length)) + length + body


def us(value: int) -> bytes:
    """One US value, little endian."""
    return struct.pack("<H", value & 0xFFFF)


def store_rq_elements(
    sop_class: str | bytes, sop_instance: str | bytes, message_id: int
) -> dict[int, bytes | None]:
    """The elements of a well-formed C-STORE-RQ (callers change or drop some)."""
    return {
        CMD_AFFECTED_SOP_CLASS: uid_value(sop_class),
        CMD_FIELD: us(C_STORE_RQ),
        CMD_MESSAGE_ID: us(message_id),
        CMD_PRIORITY: us(0),
        CMD_DATA_SET_TYPE: us(DATA_SET_PRESENT),
        CMD_AFFECTED_SOP_INSTANCE: uid_value(sop_instance),
    }


def parse_command(raw: bytes) -> dict[int, bytes]:
    """Elements of an Implicit VR LE command set (a truncated tail is ignored)."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(raw):
        _group, elem, length = struct.unpack_from("<HHL", raw, pos)
        pos += 8
        out[elem] = raw[pos : pos + length]
        pos += length
    return out


# -- reading -----------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    """``n`` bytes before ``deadline``; :class:`PeerEnded` or ``TimeoutError`` otherwise."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(n - got, 1 << 20))
        except TimeoutError:
            raise
        except OSError as exc:  # reset by the peer
            raise PeerEnded(ABORT, f"connection reset: {exc}", before_any_byte=not got) from exc
        if not chunk:
            raise PeerEnded(ABORT, "connection closed", before_any_byte=not got)
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_pdu(sock: socket.socket, deadline: float) -> tuple[int, bytes]:
    """One PDU (type, body) before ``deadline``.

    Raises
    ------
    PeerEnded
        The connection ended first.
    TimeoutError
        Nothing complete before ``deadline``.
    """
    pdu_type, _, length = struct.unpack(">BBL", _recv_exact(sock, 6, deadline))
    if length > 16 * CLIENT_MAX_PDU:
        raise PeerEnded(ABORT, f"peer sent a {length}-byte PDU")
    return pdu_type, _recv_exact(sock, length, deadline)


def _parse_ac(body: bytes) -> tuple[dict[int, tuple[int, str]], int]:
    """Presentation context results ``{cid: (result, transfer syntax)}`` and max PDU length."""
    results: dict[int, tuple[int, str]] = {}
    max_pdu = 0
    pos = 68
    while pos + 4 <= len(body):
        item_type, _, length = struct.unpack_from(">BBH", body, pos)
        value = body[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if item_type == 0x21:
            cid, _, result, _ = struct.unpack_from(">BBBB", value)
            ts = ""
            if len(value) > 8 and value[4] == 0x40:
                (ts_len,) = struct.unpack_from(">H", value, 6)
                ts = value[8 : 8 + ts_len].decode("ascii", "replace").rstrip("\0 ")
            results[cid] = (result, ts)
        elif item_type == 0x50:
            sub = 0
            while sub + 4 <= len(value):
                sub_type, _, sub_len = struct.unpack_from(">BBH", value, sub)
                if sub_type == 0x51 and sub_len == 4:
                    (max_pdu,) = struct.unpack_from(">L", value, sub + 4)
                sub += 4 + sub_len
    return results, max_pdu


def _fragments(parts: Sequence[bytes | memoryview], size: int) -> Iterator[tuple[memoryview, bool]]:
    """``parts`` joined, cut in fragments of ``size`` bytes: (fragment, is it the last).

    An empty data set is one empty last fragment. Fragments are views of the
    parts, joined (copied) only where a fragment spans two parts.
    """
    views = [memoryview(p).cast("B") for p in parts]
    total = sum(len(v) for v in views)
    if not total:
        yield memoryview(b""), True
        return
    sent = 0
    pending: list[memoryview] = []
    pending_len = 0
    for view in views:
        while len(view):
            take = min(size - pending_len, len(view))
            pending.append(view[:take])
            pending_len += take
            view = view[take:]
            if pending_len == size or sent + pending_len == total:
                piece = pending[0] if len(pending) == 1 else memoryview(b"".join(pending))
                sent += pending_len
                yield piece, sent == total
                pending, pending_len = [], 0


# -- an association ----------------------------------------------------------------


@dataclass
class RawAssociation:
    """An association opened by :meth:`open`; send requests until it ends."""

    sock: socket.socket
    #: ``(abstract syntax, transfer syntax) -> context ID`` for every proposed context.
    proposed: dict[tuple[str, str], int]
    #: Context IDs the peer accepted.
    accepted: set[int]
    #: The peer's maximum PDU length (0: unlimited).
    peer_max_pdu: int
    timeout_s: float
    next_message_id: int = 1
    ended: bool = False
    #: When the last request's answer came (the node closes associations idle too long).
    last_used: float = field(default_factory=time.monotonic)
    #: The last response's Error Comment (empty when none).
    last_comment: str = ""
    sent_bytes: int = field(default=0)
    #: Responses to another Message ID than the request's (skipped).
    stray_responses: int = 0

    @classmethod
    def open(
        cls,
        port: int,
        calling: bytes,
        called: bytes,
        proposals: list[tuple[str, str]],
        *,
        source: str | None = None,
        timeout_s: float = 10.0,
    ) -> RawAssociation | str:
        """Associate, proposing one context per ``(abstract, transfer syntax)`` pair.

        Returns the association, or :data:`REJECT` / :data:`ABORT` / :data:`TIMEOUT`.
        """
        if len(proposals) > 128:
            raise ValueError("at most 128 presentation contexts")
        contexts = [(2 * i + 1, a, [t]) for i, (a, t) in enumerate(proposals)]
        sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout_s, source_address=(source, 0) if source else None
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + timeout_s
        try:
            sock.sendall(associate_rq(calling, called, contexts))
            pdu_type, body = read_pdu(sock, deadline)
        except PeerEnded as exc:
            sock.close()
            return DROPPED if exc.before_any_byte else exc.outcome
        except TimeoutError:
            sock.close()
            return TIMEOUT
        except OSError:
            sock.close()
            return ABORT
        if pdu_type != PDU_ASSOCIATE_AC:
            sock.close()
            return REJECT if pdu_type == PDU_ASSOCIATE_RJ else ABORT
        results, max_pdu = _parse_ac(body)
        return cls(
            sock=sock,
            proposed={(a, t[0]): cid for cid, a, t in contexts},
            accepted={cid for cid, (result, _) in results.items() if result == 0},
            peer_max_pdu=max_pdu,
            timeout_s=timeout_s,
        )

    def context_id(self, abstract: str, syntax: str) -> int | None:
        """The ID of the proposed context ``(abstract, syntax)`` (accepted or not)."""
        return self.proposed.get((abstract, syntax))

    def _send(self, parts: list[bytes | memoryview]) -> None:
        total = sum(len(p) for p in parts)
        sent = self.sock.sendmsg(parts)
        while sent < total:  # a partial sendmsg: send the rest plainly
            flat = b"".join(bytes(p) for p in parts)
            self.sock.sendall(flat[sent:])
            sent = total
        self.sent_bytes += total

    def request(
        self,
        cid: int,
        command: bytes,
        data_set: bytes | memoryview | Sequence[bytes | memoryview] | None,
        message_id: int | None = None,
    ) -> Outcome:
        """Send one DIMSE request (command, then the data set in fragments); the outcome.

        ``data_set`` may be given in parts (sent as one data set: a large one
        need not be joined in memory). With ``message_id``, a response to
        another Message ID is counted in :attr:`stray_responses` and skipped.
        The association is marked ended after an abort or a timeout.
        """
        self.last_comment = ""
        deadline = time.monotonic() + self.timeout_s
        self.sock.settimeout(self.timeout_s)
        fragment = (self.peer_max_pdu or 1 << 20) - 6
        try:
            self._send(p_data(cid, 0x03, command))
            if data_set is not None:
                parts = [data_set] if isinstance(data_set, bytes | memoryview) else data_set
                for piece, last in _fragments(parts, fragment):
                    self._send(p_data(cid, 0x02 if last else 0x00, piece))
            outcome = self._response(deadline, message_id)
            self.last_used = time.monotonic()
            return outcome
        except TimeoutError:
            self.close()
            return TIMEOUT
        except PeerEnded as exc:
            self.close()
            return exc.outcome
        except OSError:  # the peer aborted and closed while we were still sending
            self.close()
            return ABORT

    def _response(self, deadline: float, message_id: int | None) -> Outcome:
        """Read PDUs until a complete response command (to ``message_id``); its Status."""
        command = b""
        while True:
            pdu_type, body = read_pdu(self.sock, deadline)
            if pdu_type == PDU_ABORT:
                raise PeerEnded(ABORT, "A-ABORT")
            if pdu_type != PDU_P_DATA:
                raise PeerEnded(ABORT, f"unexpected PDU 0x{pdu_type:02X}")
            pos = 0
            done = False
            while pos + 6 <= len(body):
                (length,) = struct.unpack_from(">L", body, pos)
                flags = body[pos + 5]
                if flags & 0x01:
                    command += body[pos + 6 : pos + 4 + length]
                    done = done or bool(flags & 0x02)
                pos += 4 + length
            if done:
                elements = parse_command(command)
                command = b""
                answered = elements.get(CMD_MESSAGE_ID_RESPONDED)
                if message_id is not None and answered != us(message_id):
                    self.stray_responses += 1
                    continue
                self.last_comment = (
                    elements.get(CMD_ERROR_COMMENT, b"").decode("latin-1").rstrip("\0 ")
                )
                status = elements.get(CMD_STATUS)
                if status is None or len(status) != 2:
                    raise PeerEnded(ABORT, "response without a Status")
                return int(struct.unpack("<H", status)[0])

    def c_echo(self) -> Outcome:
        """A C-ECHO on the Verification context (must have been proposed)."""
        cid = self.context_id(VERIFICATION, "1.2.840.10008.1.2")
        assert cid is not None, "Verification was not proposed"
        message_id = self.take_message_id()
        command = command_set(
            {
                CMD_AFFECTED_SOP_CLASS: uid_value(VERIFICATION),
                CMD_FIELD: us(C_ECHO_RQ),
                CMD_MESSAGE_ID: us(message_id),
                CMD_DATA_SET_TYPE: us(NO_DATA_SET),
            }
        )
        return self.request(cid, command, None, message_id)

    def take_message_id(self) -> int:
        """The next Message ID of this association."""
        mid = self.next_message_id
        self.next_message_id = mid % 0xFFFF + 1
        return mid

    def release(self) -> None:
        """A-RELEASE-RQ, wait (briefly) for the A-RELEASE-RP, close."""
        if self.ended:
            return
        try:
            self.sock.sendall(release_rq())
            read_pdu(self.sock, time.monotonic() + 5.0)
        except (PeerEnded, TimeoutError, OSError):
            pass
        self.close()

    def close(self) -> None:
        """Close the socket (no release)."""
        self.ended = True
        with contextlib.suppress(OSError):
            self.sock.close()
