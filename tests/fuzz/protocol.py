"""Generators of protocol-level attacks: AE titles, command sets, raw sockets, oversize.

See :mod:`tests.fuzz.generator` for what each must get.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import replace
from random import Random

from pydicom.uid import (
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from tests.fuzz.cases import (
    CANNOT_UNDERSTAND,
    NOT_SUPPORTED,
    SUCCESS,
    AssociateCase,
    Case,
    NetCase,
    Step,
    store_case,
)
from tests.fuzz.corpus import (
    TAG_PIXEL_DATA,
    Corpus,
    make_element,
    set_element,
)
from tests.fuzz.dimse import (
    ABORT,
    ACCEPTED,
    CLOSED,
    CMD_AFFECTED_SOP_CLASS,
    CMD_AFFECTED_SOP_INSTANCE,
    CMD_DATA_SET_TYPE,
    CMD_FIELD,
    CMD_GROUP_LENGTH,
    CMD_MESSAGE_ID,
    CMD_PRIORITY,
    NO_DATA_SET,
    PDU_P_DATA,
    REJECT,
    Outcome,
    abort_pdu,
    associate_rq,
    command_set,
    p_data,
    release_rq,
    store_rq_elements,
    us,
)

_HOSTILE_AES: tuple[tuple[bytes, bytes | None], ...] = (
    (b"FUZZER\r\nINFO x", None),
    (b"\x1b[31mRED\x1b[0m", None),
    (b"\x1b]0;owned\x07", None),
    (b"", None),
    (b"    ", None),
    (b"FU\x00ZZER", None),
    (b"FUZ\\ZER", None),
    (b"\xc3\xa9\xc3\xa9\xc3\xa9", None),
    (b"\x80\x81\x82\xff", None),
    (b"NOT-ALLOWED", None),
    (b"fuzzer", None),
    (b"FUZZER\t", None),
    (b"FUZZER", b"OTHERNODE"),
    (b"FUZZER", b"SARC\r\nNODE"),
    (b"FUZZER", b""),
    (b"FUZZER", b"\x1b[2J"),
)


def ae_titles(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """Calling and called AE titles with control characters, or unknown ones."""
    for i in range(n):
        calling, called = _HOSTILE_AES[i % len(_HOSTILE_AES)]
        if i >= len(_HOSTILE_AES) and rng.random() < 0.5:  # random bytes, 16 of them
            calling = bytes(
                rng.choice([*range(0, 32), 0x5C, 0x7F, *range(0x80, 0x100)]) for _ in range(16)
            )
        # pynetdicom cannot decode an A-ASSOCIATE-RQ whose AE titles hold control
        # characters, a backslash, non-ASCII bytes or only spaces: it aborts before the
        # node's policy sees the request. A decodable but unknown title is rejected.
        titles = (calling, b"SARCNODE" if called is None else called)
        decodable = all(_printable_ae(t) for t in titles)
        expect: set[Outcome] = {REJECT} if decodable else {REJECT, ABORT}
        if titles[0].rstrip(b" \t\r\n\x0b\x0c") == b"FUZZER" and titles[1] == b"SARCNODE":
            expect.add(ACCEPTED)  # trailing white space is stripped as padding: FUZZER itself
        label = f"calling {calling!r} called {called!r}"
        yield AssociateCase("ae_titles", label, calling, called, frozenset(expect))


def _printable_ae(title: bytes) -> bool:
    """Whether ``title`` is a well-formed AE title (printable ASCII, no backslash, not blank)."""
    return bool(title.strip()) and all(0x20 <= b < 0x7F and b != 0x5C for b in title)


def command(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """C-STORE command sets a well-behaved SCU never sends."""
    t = next(s for s in corpus.synthetic if s.syntax == ExplicitVRLittleEndian)
    modes: list[tuple[str, tuple[tuple[int, bytes | None], ...], set[Outcome]]] = [
        ("no SOP Instance UID", ((CMD_AFFECTED_SOP_INSTANCE, None),), {CANNOT_UNDERSTAND}),
        ("empty SOP Instance UID", ((CMD_AFFECTED_SOP_INSTANCE, b""),), {CANNOT_UNDERSTAND}),
        ("no SOP Class UID", ((CMD_AFFECTED_SOP_CLASS, None),), {CANNOT_UNDERSTAND}),
        ("no Priority (Low assumed)", ((CMD_PRIORITY, None),), {SUCCESS}),
        ("no data set", ((CMD_DATA_SET_TYPE, us(NO_DATA_SET)),), {CANNOT_UNDERSTAND}),
        ("no Message ID", ((CMD_MESSAGE_ID, None),), {ABORT}),
        ("Message ID of 3 bytes", ((CMD_MESSAGE_ID, b"\x01\x00\x00"),), {ABORT}),
        ("no Command Field", ((CMD_FIELD, None),), {ABORT}),
        ("unknown Command Field", ((CMD_FIELD, us(0x0ABC)),), {ABORT}),
        (
            "C-FIND on a storage context",
            ((CMD_FIELD, us(0x0020)),),
            {ABORT, NOT_SUPPORTED, CANNOT_UNDERSTAND, 0x0211},
        ),
        ("C-ECHO with a data set", ((CMD_FIELD, us(0x0030)),), {ABORT, 0x0211}),
        ("no Command Data Set Type", ((CMD_DATA_SET_TYPE, None),), {ABORT}),
        (
            "group length 0xFFFFFFF0",
            ((CMD_GROUP_LENGTH, struct.pack("<L", 0xFFFFFFF0)),),
            {SUCCESS, ABORT, CANNOT_UNDERSTAND},
        ),
        (
            "SOP Instance UID of 200 characters",
            ((CMD_AFFECTED_SOP_INSTANCE, b"1." * 100),),
            {ABORT, CANNOT_UNDERSTAND},
        ),
    ]
    kinds = len(modes) + len(_BROKEN) + 1
    for i in range(n):
        inst = t.fresh(rng)
        pick = i % kinds if i < 2 * kinds else rng.randrange(kinds)
        if pick >= len(modes):
            if pick == kinds - 1:
                raw = rng.randbytes(rng.choice([0, 1, 3, 8, 12, 64, 300]))
                label = f"random command set ({len(raw)} bytes)"
            else:
                valid = command_set(store_rq_elements(t.sop_class, inst.sop_instance, 1))
                label, raw = _BROKEN[pick - len(modes)](rng, valid)
            yield store_case("command", label, inst, {ABORT}, raw_command=raw, own_association=True)
            continue
        label, changes, expect = modes[pick]
        own = ABORT in expect
        data = b"" if label == "no data set" else None
        case = store_case(
            "command", label, inst, expect, command_changes=changes, own_association=own
        )
        yield case if data is None else replace(case, data_set=None)


def _element_starts(command: bytes) -> list[int]:
    """Offsets of the elements of a well-formed command set."""
    starts, pos = [], 0
    while pos < len(command):
        starts.append(pos)
        pos += 8 + struct.unpack_from("<L", command, pos + 4)[0]
    return starts


def _cut_in_header(rng: Random, valid: bytes) -> tuple[str, bytes]:
    start = rng.choice(_element_starts(valid)[1:])
    return "command set cut inside an element header", valid[: start + rng.randint(1, 7)]


def _cut_in_value(rng: Random, valid: bytes) -> tuple[str, bytes]:
    last = _element_starts(valid)[-1]  # the Affected SOP Instance UID
    return "command set cut inside a value", valid[: rng.randint(last + 9, len(valid) - 1)]


def _overlong_element(rng: Random, valid: bytes) -> tuple[str, bytes]:
    raw = bytearray(valid)
    last = _element_starts(valid)[-1]
    struct.pack_into("<L", raw, last + 4, len(valid) + rng.randint(1, 5000))
    return "command element longer than the command set", bytes(raw)


def _oversized_command(rng: Random, valid: bytes) -> tuple[str, bytes]:
    size = rng.randint(65_536, 100_000)
    return "command set over 64 KiB", valid + struct.pack("<HHL", 0, 0x5000, size) + bytes(size)


#: Command sets that do not decode as they stand (pydicom would read them short):
#: the node must abort before pynetdicom sees them.
_BROKEN = (_cut_in_header, _cut_in_value, _overlong_element, _oversized_command)


# -- network, oversize ------------------------------------------------------------------------


#: A raw-socket attack: (label, steps, outcomes it may get, seconds it may take).
Attack = tuple[str, tuple[Step, ...], set[Outcome], float]


def _p_data_header(length: int) -> bytes:
    return struct.pack(">BBL", PDU_P_DATA, 0, length)


def _before_association(rng: Random, rq: bytes) -> list[Attack]:
    """Attacks before (or instead of) a complete A-ASSOCIATE-RQ."""
    command_pdv = struct.pack(">LBB", 2, 1, 0x03)
    p_data_header = _p_data_header
    return [
        ("connect and close", (("close", b""),), {CLOSED}, 5),
        ("idle after connect", (), {ABORT}, 10),
        (
            "random bytes first",
            (("send", bytes([rng.randint(8, 255)]) + rng.randbytes(rng.randint(5, 4000))),),
            {ABORT},
            10,
        ),
        (
            "A-ASSOCIATE-RQ of random content",
            (("send", struct.pack(">BBL", 1, 0, 200) + rng.randbytes(200)),),
            {ABORT, REJECT},
            10,
        ),
        (
            "A-ASSOCIATE-RQ announcing 300 kB",
            (("send", struct.pack(">BBL", 1, 0, 300_000) + rq[6:]),),
            {ABORT},
            10,
        ),
        (
            "unknown PDU type",
            (("send", struct.pack(">BBL", rng.randint(8, 255), 0, 4) + b"\0" * 4),),
            {ABORT},
            10,
        ),
        ("half a PDU header", (("send", rq[:3]),), {ABORT}, 10),
        ("A-ASSOCIATE-RQ dripped", (("drip", rq),), {ABORT}, 10),
        ("P-DATA before A-ASSOCIATE", (("send", p_data_header(6) + command_pdv),), {ABORT}, 10),
        ("A-RELEASE-RQ before A-ASSOCIATE", (("send", release_rq()),), {ABORT}, 10),
    ]


def _in_association(rng: Random, rq: bytes, data: bytes, sop_instance: str) -> list[Attack]:
    """Attacks on an accepted association: PDUs out of order, drips, broken P-DATA."""
    store_command = command_set(store_rq_elements(MRImageStorage, sop_instance, 1))
    p_data_header = _p_data_header
    return [
        (
            "announced 512 MiB P-DATA",
            (("associate", b""), ("send", p_data_header(512 << 20) + rng.randbytes(1024))),
            {ABORT},
            10,
        ),
        (
            "P-DATA dripped",
            (
                ("associate", b""),
                (
                    "drip",
                    p_data_header(len(data) + 6)
                    + struct.pack(">LBB", len(data) + 2, 1, 0x02)
                    + data,
                ),
            ),
            {ABORT},
            10,
        ),
        (
            "data set fragment before its command set",
            (("associate", b""), ("send", b"".join(p_data(1, 0x02, data[:512])))),
            {ABORT},
            10,
        ),
        (
            "command fragment inside a data set",
            (
                ("associate", b""),
                ("send", b"".join(p_data(1, 0x03, store_command))),
                ("send", b"".join(p_data(1, 0x00, data[:512]))),
                ("send", b"".join(p_data(1, 0x03, store_command))),
            ),
            {ABORT},
            10,
        ),
        (
            "PDV longer than its PDU",
            (
                ("associate", b""),
                ("send", p_data_header(6) + struct.pack(">LBB", 5000, 1, 0x03)),
            ),
            {ABORT},
            10,
        ),
        (
            "empty PDV",
            (("associate", b""), ("send", p_data_header(4) + struct.pack(">L", 0))),
            {ABORT},
            10,
        ),
        ("second A-ASSOCIATE-RQ", (("associate", b""), ("send", rq)), {ABORT}, 10),
        ("idle after A-ASSOCIATE", (("associate", b""),), {ABORT}, 20),
        (
            "A-ABORT mid data set",
            (("associate", b""), ("store_half", data), ("send", abort_pdu()), ("close", b"")),
            {CLOSED},
            5,
        ),
        (
            "close mid data set",
            (("associate", b""), ("store_half", data), ("close", b"")),
            {CLOSED},
            5,
        ),
    ]


def network(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """Raw-socket attacks on the upper layer."""
    t = next(s for s in corpus.synthetic if s.syntax == ExplicitVRLittleEndian)
    rq = associate_rq(b"FUZZER", b"SARCNODE", [(1, MRImageStorage, [ExplicitVRLittleEndian])])
    for i in range(n):
        inst = t.fresh(rng)
        attacks = _before_association(rng, rq) + _in_association(
            rng, rq, inst.encode(), inst.sop_instance
        )
        label, steps, expect, limit = (
            attacks[i % len(attacks)] if i < len(attacks) else rng.choice(attacks)
        )
        yield NetCase("network", label, steps, frozenset(expect), limit, tuple(inst.tokens))


def oversize(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """A data set over ``storage.max_dataset_mb`` (24 MiB in the fuzz config), aborted arriving."""
    t = next(s for s in corpus.synthetic if s.syntax == ExplicitVRLittleEndian)
    for _ in range(n):
        inst = t.fresh(rng)
        side = rng.choice([3600, 3800, 4000])
        layout = inst.layout
        inst.set(0x00280010, "US", struct.pack(layout.fmt + "H", side))
        inst.set(0x00280011, "US", struct.pack(layout.fmt + "H", side))
        pixels = bytes(side * side * 2)
        inst.elements = set_element(
            inst.elements, make_element(TAG_PIXEL_DATA, b"OW", pixels, layout)
        )
        yield store_case(
            "oversize",
            f"{side}x{side}x16 bits ({len(pixels) >> 20} MiB)",
            inst,
            {ABORT},
            own_association=True,
        )


#: Every class: its generator and its share of a long run's inputs.
