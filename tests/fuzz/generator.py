"""The seeded hostile-input generator: one stream of cases per attack class.

Every case says what it sends and which outcomes are right for it
(:attr:`StoreCase.expect`): a C-STORE status, :data:`~tests.fuzz.dimse.ABORT`
(the node ends the association without an answer: what a protocol violation
gets), :data:`~tests.fuzz.dimse.REJECT` (A-ASSOCIATE-RJ) or
:data:`~tests.fuzz.dimse.CLOSED` (the fuzz closed the connection itself).
0x0110 (our own fault) and :data:`~tests.fuzz.dimse.TIMEOUT` (a request left
unanswered) are never right. The classes and what they must get:

==================  ===================================================================
class               expected
==================  ===================================================================
truncated           0xC000: a real or synthetic data set cut before its Pixel Data ends
random_bytes        0xC000 (0xA900 when a valid prefix leads): random bytes as data set
hostile_uids        0xC000 (path, letters, control characters, > 64 characters, empty
                    components in a Study/Series/SOP Instance UID; 0xA900 too where
                    pydicom reads the command's value otherwise), 0x0122 or abort for
                    an unknown SOP class (pynetdicom has no service to hand it to),
                    0xA900 (command and data set differ), abort (a command UID over 64
                    characters: pynetdicom cannot decode it); 0x0000 for the tolerated
huge_lengths        0xC000 (a length past the end, an undefined length where none may
                    be), 0xA700 (over a million elements)
deep_nesting        0xC000 past 32 levels of sequences; 0x0000 for the controls within
corrupt_deflate     0xC000 (truncated, wrapped, random stream), 0x0000 (trailing bytes,
                    stored blocks), any of 0x0000/0xC000/0xA900 for flipped bits
deflate_bomb        0xA700: zero Pixel Data or a private OB inflating 17 MiB - 1 GiB
mutation            0x0000, 0xC000 or 0xA900: structure-aware mutations of real MR
                    files (and the synthetic ones) - never 0x0110, never no answer
odd_files           0x0122 for non-MR SOP classes; 0x0000/0xC000/0xA900 for MR ones
foreign_objects     0x0122 (CT, PDF, RT Plan or another MR class on a context),
                    0xA900 (a CT data set under an MR command), abort (a rejected or
                    unknown context ID)
foreign_series      0x0000 then 0xC000: a Series Instance UID reused under another study
duplicates          0x0000, 0x0000 again (same content), 0xB006 (other content, first kept)
phi_planted         0x0000 (PHI in patient, text, IS and private elements), 0xC000 /
                    0xA900 (PHI in UIDs or US elements): the log is then searched for it
ae_titles           reject (unknown calling or called AE title), or abort where
                    pynetdicom cannot decode the title (control characters, backslash,
                    non-ASCII, blank); FUZZER with trailing white space is FUZZER
command             0xC000 (no or empty SOP Instance/Class UID, no data set), abort
                    (undecodable command set, no Message ID, unknown command field);
                    0x0000 without Priority (pynetdicom assumes Low)
network             abort: raw-socket attacks (huge PDU lengths, unknown PDU types,
                    random bytes, drips, idle, PDUs out of order); closed for the
                    connections the fuzz itself closes (also mid-data-set)
oversize            abort: a data set over storage.max_dataset_mb, while it arrives
==================  ===================================================================

The stream of a class depends only on the seed, the class and the number of
inputs asked for (``random.Random(f"{seed}:{class}")``).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from random import Random
from typing import Any

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)

from tests.fuzz.corpus import (
    ALL_VRS,
    FOREIGN_CLASSES,
    MARKER,
    MR_FAMILY,
    PATIENT_ELEMENTS,
    TAG_PIXEL_DATA,
    TAG_SERIES,
    TAG_SOP_CLASS,
    TAG_SOP_INSTANCE,
    TAG_STUDY,
    Corpus,
    Element,
    Instance,
    Layout,
    OddFile,
    Template,
    deflate,
    element_header,
    encode_elements,
    make_element,
    random_uid,
    set_element,
    token,
    with_length,
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
    VERIFICATION,
    Outcome,
    abort_pdu,
    associate_rq,
    release_rq,
    uid_value,
    us,
)

SUCCESS = 0x0000
WARNING_KEPT_FIRST = 0xB006
OUT_OF_RESOURCES = 0xA700
MISMATCH = 0xA900
NOT_SUPPORTED = 0x0122
CANNOT_UNDERSTAND = 0xC000
#: A success or the failures a malformed but decodable data set may earn.
STORED_OR_REFUSED = frozenset({SUCCESS, CANNOT_UNDERSTAND, MISMATCH})

#: Every context the fuzz proposes: MR classes in every syntax the node accepts, plus
#: classes it refuses (so a case can send on a rejected context) and Verification.
STORAGE_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
)
PROPOSALS: tuple[tuple[str, str], ...] = (
    *((c, ts) for c in sorted(MR_FAMILY) for ts in STORAGE_SYNTAXES),
    *((c, ExplicitVRLittleEndian) for c in FOREIGN_CLASSES),
    (VERIFICATION, ImplicitVRLittleEndian),
)


@dataclass(frozen=True)
class StoreCase:
    """One C-STORE request, sent on the fuzz's (shared or own) association."""

    cls: str
    label: str
    #: The proposed context it is sent on: (abstract syntax, transfer syntax).
    context: tuple[str, str]
    sop_class: str | bytes | None
    sop_instance: str | bytes | None
    data_set: bytes | None
    expect: frozenset[Outcome]
    #: Command elements changed (a value) or dropped (None); Message ID is the runner's.
    command_changes: tuple[tuple[int, bytes | None], ...] = ()
    #: The whole command set, as sent (overrides everything above it).
    raw_command: bytes | None = None
    #: A context ID to use instead of the context's (e.g. one never proposed).
    context_id: int | None = None
    #: Sent on an association of its own (the expected outcome ends it).
    own_association: bool = False
    tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class AssociateCase:
    """An A-ASSOCIATE-RQ with raw AE title fields; the node must reject it."""

    cls: str
    label: str
    calling: bytes
    called: bytes | None
    expect: frozenset[Outcome]
    tokens: tuple[str, ...] = ()


#: A raw-socket step: ("send", bytes), ("drip", bytes), ("sleep", seconds),
#: ("associate", b"") (send an A-ASSOCIATE-RQ and read the A-ASSOCIATE-AC), ("close", b"").
Step = tuple[str, bytes | float]


@dataclass(frozen=True)
class NetCase:
    """A raw-socket attack: steps, then wait (up to ``limit_s``) for the node to end it."""

    cls: str
    label: str
    steps: tuple[Step, ...]
    expect: frozenset[Outcome]
    limit_s: float = 10.0
    tokens: tuple[str, ...] = ()


Case = StoreCase | AssociateCase | NetCase
Generator = Callable[[Random, Corpus, int], Iterator[Case]]


def _store(
    cls: str,
    label: str,
    inst: Instance,
    expect: Iterable[Outcome],
    data: bytes | None = None,
    **changes: Any,
) -> StoreCase:
    """A C-STORE of ``inst`` (or ``data`` in its place) on its template's context.

    ``changes`` override the other :class:`StoreCase` fields (the command's UIDs...).
    """
    t = inst.template
    fields: dict[str, Any] = {
        "context": (t.sop_class if t.sop_class in MR_FAMILY else MRImageStorage, t.syntax),
        "sop_class": t.sop_class,
        "sop_instance": inst.sop_instance,
        "data_set": inst.encode() if data is None else data,
        "tokens": tuple(inst.tokens),
    }
    fields.update(changes)
    return StoreCase(cls=cls, label=label, expect=frozenset(expect), **fields)


def _native(templates: list[Template]) -> list[Template]:
    return [t for t in templates if not t.deflated]


def _pixel_end(elements: list[Element]) -> int:
    """Offset just after the Pixel Data element (the data set's length if it has none)."""
    pos = 0
    for el in elements:
        pos += len(el.raw)
        if el.tag == TAG_PIXEL_DATA:
            return pos
    return pos


# -- truncated, random bytes ---------------------------------------------------------------


def truncated(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """A data set cut at a random offset before its Pixel Data ends."""
    for _ in range(n):
        t = rng.choice(corpus.mr)
        inst = t.fresh(rng)
        if t.deflated:
            sent = inst.encode()
            cut = rng.randrange(len(sent))
            yield _store(
                "truncated",
                f"{t.name} deflate stream cut at {cut}",
                inst,
                {CANNOT_UNDERSTAND},
                sent[:cut],
            )
            continue
        raw = inst.inflated()
        end = _pixel_end(inst.elements)
        cut = rng.choice([rng.randrange(end), rng.randrange(max(1, end - 64), end), 0])
        yield _store(
            "truncated", f"{t.name} cut at {cut} of {end}", inst, {CANNOT_UNDERSTAND}, raw[:cut]
        )


def random_bytes(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """Random bytes as the data set, alone or after a valid prefix of elements."""
    for _ in range(n):
        t = rng.choice(corpus.synthetic)
        inst = t.fresh(rng)
        size = int(2 ** rng.uniform(0, 16))
        mode = rng.choice(["random", "random", "prefix", "zeros", "ones", "pattern"])
        if mode == "random":
            data = rng.randbytes(size)
        elif mode == "zeros":
            data = bytes(size)
        elif mode == "ones":
            data = b"\xff" * size
        elif mode == "pattern":
            data = (rng.randbytes(rng.randint(1, 12)) * size)[:size]
        else:
            keep = rng.randint(1, max(1, len(inst.elements) - 1))
            data = encode_elements(inst.elements[:keep]) + rng.randbytes(size)
        if t.deflated and mode != "prefix":
            data = rng.choice([data, deflate(data)])
        elif t.deflated:
            data = deflate(data)
        expect = {CANNOT_UNDERSTAND, MISMATCH} if mode == "prefix" else {CANNOT_UNDERSTAND}
        yield _store("random_bytes", f"{t.name} {mode} {size} bytes", inst, expect, data)


# -- hostile UIDs ------------------------------------------------------------------------

#: (value, tolerated): a UID a peer may send; True when the node may store it
#: (valid, or padding it strips), None when either answer is defensible. In the
#: values it may store, ``#`` becomes random digits and ``@`` 63 of them, so that
#: no two inputs share a UID (a second one would rightly be a duplicate).
HOSTILE_UIDS: tuple[tuple[bytes, bool | None], ...] = (
    (b"../../../../../../../tmp/sarcnode-fuzz-escape", False),
    (b"../../../sarcnode-fuzz-escape", False),
    (b"/tmp/sarcnode-fuzz-escape", False),
    (b"1.2.3/../../sarcnode-fuzz-escape", False),
    (b"1.2.3\\..\\..\\sarcnode-fuzz-escape", False),
    (b"..", False),
    (b".", False),
    (b"1.2..3", False),
    (b".1.2.3", False),
    (b"1.2.3.", False),
    (b"1.2.3\x00evil", False),
    (b"1.2.3\r\nINFO forged", False),
    (b"1.2.\x1b[31m3", False),
    (b"1.2.3\\1.2.4", False),
    (b"1.2.3 4", False),
    (b"%2e%2e%2f", False),
    (b"1.2.3;rm -rf /", False),
    (b"1.2.3$(id)", False),
    (b"\xef\xbc\x91.\xef\xbc\x92", False),  # full-width digits in UTF-8
    (b"\xff\xfe1.2", False),
    (b"1" * 65, False),
    (b"1." * 32 + b"1", False),
    (b"CON", False),
    (b"0x1.0x2", False),
    (b"-1.2.3", False),
    (b"1.2.3.# ", True),  # trailing space: padding
    (b"1.2.3.#\x00", True),  # trailing NUL: padding
    (b"1.02.003.#", None),  # leading zeros: tolerated from old devices
    (b"0.0.#", None),
    (b"1@", None),  # 64 characters
)


def hostile_uids(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """Hostile values in the UIDs that become paths, in the SOP class, and in the command."""
    for i in range(n):
        t = rng.choice(corpus.synthetic)
        inst = t.fresh(rng)
        raw, tolerated = (
            HOSTILE_UIDS[i % len(HOSTILE_UIDS)]
            if i < len(HOSTILE_UIDS)
            else rng.choice(HOSTILE_UIDS)
        )
        raw = raw.replace(b"#", str(rng.getrandbits(64)).encode())
        raw = raw.replace(b"@", "".join(str(rng.randint(0, 9)) for _ in range(63)).encode())
        if rng.random() < 0.1:  # a patient's name where a UID belongs
            raw, tolerated = token(rng, rng.randint(8, 30)).encode(), False
            inst.tokens.append(raw.decode())
        value = uid_value(raw)
        where = rng.choice(
            [
                "sop_instance",
                "study",
                "series",
                "sop_class",
                "command_instance",
                "command_class",
                "data_class",
            ]
        )
        label = f"{where} = {raw[:24]!r}"
        path_ok = {True: {SUCCESS}, False: {CANNOT_UNDERSTAND}, None: {SUCCESS, CANNOT_UNDERSTAND}}[
            tolerated
        ]
        if where == "sop_instance":
            inst.set(TAG_SOP_INSTANCE, "UI", value)
            # pynetdicom cannot decode a command UID over 64 characters: it aborts. A
            # backslash, NUL or non-ASCII byte changes the command's value as pydicom
            # reads it, so the data set's differs from it: 0xA900 is a refusal too.
            expect = path_ok | ({ABORT} if len(raw) > 64 else set())
            if not tolerated:
                expect.add(MISMATCH)
            yield _store(
                "hostile_uids", label, inst, expect, sop_instance=raw, own_association=len(raw) > 64
            )
        elif where in ("study", "series"):
            inst.set(TAG_STUDY if where == "study" else TAG_SERIES, "UI", value)
            yield _store("hostile_uids", label, inst, path_ok)
        elif where in ("sop_class", "command_class"):
            # A class pynetdicom has no service for is aborted by it before the node's
            # handler can answer 0x0122: both are refusals.
            if where == "sop_class":
                inst.set(TAG_SOP_CLASS, "UI", value)
            expect = {NOT_SUPPORTED, ABORT}
            yield _store("hostile_uids", label, inst, expect, sop_class=raw, own_association=True)
        elif where == "command_instance":
            expect = {MISMATCH, CANNOT_UNDERSTAND} | ({ABORT} if len(raw) > 64 else set())
            if tolerated:
                expect.add(SUCCESS)
            yield _store(
                "hostile_uids", label, inst, expect, sop_instance=raw, own_association=len(raw) > 64
            )
        else:
            inst.set(TAG_SOP_CLASS, "UI", value)
            yield _store("hostile_uids", label, inst, {MISMATCH})


# -- huge lengths, deep nesting ------------------------------------------------------------

_HUGE = (0xFFFFFFFF, 0xFFFFFFFE, 0x80000000, 0x7FFFFFFF, 0x10000000, 0x01000000)


def huge_lengths(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """An element's length field set past the end of the data set (or undefined)."""
    for _ in range(n):
        t = rng.choice(_native(corpus.mr))
        inst = t.fresh(rng)
        layout = inst.layout
        if rng.random() < 0.02:  # an element-count bomb: 1.1 million empty elements
            filler = element_header(0x00091010, b"LO", 0, layout) * 1_100_000
            data = inst.inflated() + filler
            yield _store(
                "huge_lengths", f"{t.name} + 1.1M empty elements", inst, {OUT_OF_RESOURCES}, data
            )
            continue
        index = rng.randrange(len(inst.elements))
        el = inst.elements[index]
        after = sum(len(e.raw) for e in inst.elements[index + 1 :]) + len(el.value)
        short = (
            not layout.implicit
            and el.vr is not None
            and el.vr
            not in (
                b"OB",
                b"OD",
                b"OF",
                b"OL",
                b"OV",
                b"OW",
                b"SQ",
                b"SV",
                b"UC",
                b"UN",
                b"UR",
                b"UT",
                b"UV",
            )
        )
        if short:
            length = rng.choice([0xFFFF, 0xFFFE, min(0xFFFF, after + rng.randint(1, 64))])
        else:
            length = rng.choice([*_HUGE, after + rng.randint(1, 4096)])
        if element_header(el.tag, el.vr, length, layout) == el.header:
            length = length - 1  # already that length (an undefined one): change it all the same
        inst.elements[index] = with_length(el, length, layout)
        within = length < after
        expect = {CANNOT_UNDERSTAND, MISMATCH} if within else {CANNOT_UNDERSTAND}
        label = (
            f"{t.name} ({el.tag >> 16:04X},{el.tag & 0xFFFF:04X}) length {length:#x} ({after} left)"
        )
        yield _store("huge_lengths", label, inst, expect)


def nested(depth: int, layout: Layout, mode: str, rng: Random) -> bytes:
    """A sequence nested ``depth`` levels deep: undefined, defined or mixed lengths."""
    f = layout.fmt
    tag = 0x0040A730  # Content Sequence (SQ in the dictionary: Implicit VR reads it too)

    def item_header(length: int) -> bytes:
        return struct.pack(f + "HHL", 0xFFFE, 0xE000, length)

    item_end = struct.pack(f + "HHL", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack(f + "HHL", 0xFFFE, 0xE0DD, 0)
    inner = b""
    for level in range(depth):
        undefined = mode == "undefined" or (mode == "mixed" and rng.random() < 0.5)
        if undefined:
            item = item_header(0xFFFFFFFF) + inner + item_end
            inner = element_header(tag, b"SQ", 0xFFFFFFFF, layout) + item + seq_end
        else:
            item = item_header(len(inner)) + inner
            inner = element_header(tag, b"SQ", len(item), layout) + item
        if mode == "unterminated" and level == depth - 1:
            inner = element_header(tag, b"SQ", 0xFFFFFFFF, layout) + item_header(0xFFFFFFFF) * depth
    return inner


def deep_nesting(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """Sequences nested past the reader's 32 levels (and controls within them)."""
    for _ in range(n):
        t = rng.choice([s for s in corpus.synthetic if not s.deflated])
        inst = t.fresh(rng)
        control = rng.random() < 0.15
        depth = rng.randint(1, 32) if control else rng.choice([33, 34, 40, 100, 1000, 5000, 20000])
        mode = rng.choice(["undefined", "defined", "mixed"] + ([] if control else ["unterminated"]))
        seq = nested(depth, inst.layout, mode, rng)
        at = next(
            (i for i, e in enumerate(inst.elements) if e.tag > 0x0040A730), len(inst.elements)
        )
        data = encode_elements(inst.elements[:at]) + seq + encode_elements(inst.elements[at:])
        expect = {SUCCESS} if control and mode != "unterminated" else {CANNOT_UNDERSTAND}
        yield _store("deep_nesting", f"{t.name} depth {depth} {mode}", inst, expect, data)


# -- deflate -------------------------------------------------------------------------------


def corrupt_deflate(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """Corrupt, truncated, wrapped and oddly framed deflate streams."""
    t = next(s for s in corpus.synthetic if s.deflated)
    for _ in range(n):
        inst = t.fresh(rng)
        raw = inst.inflated()
        stream = deflate(raw)
        mode = rng.choice(
            ["flip", "flip", "truncate", "zlib", "gzip", "random", "trailing", "stored", "empty"]
        )
        expect: set[Outcome] = {CANNOT_UNDERSTAND}
        if mode == "flip":
            flipped = bytearray(stream)
            for _ in range(rng.randint(1, 8)):
                flipped[rng.randrange(max(1, len(flipped) // 4))] ^= 1 << rng.randrange(8)
            data = bytes(flipped)
            expect = set(STORED_OR_REFUSED)
        elif mode == "truncate":
            data = stream[: rng.randrange(len(stream))]
        elif mode == "zlib":
            data = zlib.compress(raw)
        elif mode == "gzip":
            import gzip

            data = gzip.compress(raw)
        elif mode == "random":
            data = rng.randbytes(rng.randint(1, 4096))
        elif mode == "trailing":
            data = stream + rng.randbytes(rng.randint(1, 512))
            expect = {SUCCESS}
        elif mode == "stored":
            z = zlib.compressobj(0, zlib.DEFLATED, -zlib.MAX_WBITS)
            data = z.compress(raw) + z.flush()
            expect = {SUCCESS}
        else:
            z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
            data = z.compress(b"") + z.flush()
        yield _store("corrupt_deflate", f"deflate {mode} ({len(data)} bytes)", inst, expect, data)


_BOMB_MIB = (17, 20, 24, 32, 33, 64, 256, 1024)


def deflate_bomb(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """Deflated data sets whose zero Pixel Data (or a private OB) inflates 17 MiB - 1 GiB."""
    t = next(s for s in corpus.synthetic if s.deflated)
    layout = t.layout
    for _ in range(n):
        inst = t.fresh(rng)
        mib = rng.choice(_BOMB_MIB)
        size = mib << 20
        head_elements = [e for e in inst.elements if e.tag != TAG_PIXEL_DATA]
        private = rng.random() < 0.3
        tag = 0x00091010 if private else TAG_PIXEL_DATA
        if private:  # the bomb before the real Pixel Data: it must still be refused
            head_elements = set_element(
                head_elements, make_element(0x00090010, b"LO", b"FUZZ", layout)
            )
        at = next((i for i, e in enumerate(head_elements) if e.tag > tag), len(head_elements))
        head = encode_elements(head_elements[:at]) + element_header(tag, b"OB", size, layout)
        z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = z.compress(head) + z.flush(zlib.Z_SYNC_FLUSH) + corpus.bomb_tail(size)
        where = "private OB" if private else "Pixel Data"
        yield _store(
            "deflate_bomb",
            f"{where} inflating {mib} MiB from {len(data) >> 10} KiB",
            inst,
            {OUT_OF_RESOURCES},
            data,
        )


# -- structure-aware mutation -------------------------------------------------------------------

_IS_VALUES = (
    b"99999999999999999999",
    b"18446744073709551617",
    b"-2147483649",
    b"2147483648",
    b"1e400",
    b"NaN ",
    b"-0",
    b"0x10",
    b" 12 ",
    b"3.0 ",
    b"",
)
_US_TAGS = (0x00280010, 0x00280011, 0x00280100, 0x00280002, 0x00280101, 0x00280102)
_IS_TAGS = (0x00200011, 0x00200013, 0x00280008)


def _mutate(rng: Random, inst: Instance, others: list[Template]) -> str:
    """Apply one structure-aware mutation to ``inst.elements``; a short description."""
    els = inst.elements
    layout = inst.layout
    if not els:
        return "empty"
    i = rng.randrange(len(els))
    el = els[i]
    name = f"({el.tag >> 16:04X},{el.tag & 0xFFFF:04X})"
    op = rng.choice(
        [
            "flip",
            "length",
            "vr",
            "delete",
            "duplicate",
            "swap",
            "value",
            "resize",
            "insert",
            "pixels",
            "number",
            "splice",
            "tail",
            "undefined",
        ]
    )
    if op == "flip":
        raw = bytearray(el.raw)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        els[i] = Element(el.tag, el.vr, bytes(raw[: len(el.header)]), bytes(raw[len(el.header) :]))
    elif op == "length":
        delta = rng.choice([-16, -2, -1, 1, 2, 16, -len(el.value)])
        els[i] = with_length(el, max(0, len(el.value) + delta), layout)
    elif op == "vr":
        if layout.implicit:
            return _mutate(rng, inst, others)
        vr = rng.choice([*ALL_VRS, b"\x00\x00", b"ZZ", b"sq"])
        els[i] = Element(el.tag, vr, el.header[:4] + vr + el.header[6:], el.value)
    elif op == "delete":
        del els[i]
    elif op == "duplicate":
        els.insert(i, el)
    elif op == "swap" and len(els) > 1:
        j = rng.randrange(len(els))
        els[i], els[j] = els[j], els[i]
    elif op == "value":
        els[i] = Element(el.tag, el.vr, el.header, rng.randbytes(len(el.value)))
    elif op == "resize":
        vr = el.vr or b"UN"
        els[i] = make_element(el.tag, vr, rng.randbytes(rng.choice([0, 1, 3, 7, 64, 1000])), layout)
    elif op == "insert":
        tag = rng.choice(
            [rng.getrandbits(32), 0x00091000 | rng.getrandbits(8), 0x00080016, 0x7FE00010]
        )
        vr = rng.choice(ALL_VRS)
        els.insert(i, make_element(tag, vr, rng.randbytes(rng.choice([0, 2, 4, 16, 100])), layout))
        name = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    elif op == "pixels":
        pixel = next((k for k, e in enumerate(els) if e.tag == TAG_PIXEL_DATA), None)
        if (
            pixel is None
            or len(els[pixel].value) < 4
            or els[pixel].header[-4:] == b"\xff\xff\xff\xff"
        ):
            return _mutate(rng, inst, others)
        keep = rng.randrange(len(els[pixel].value) // 2) * 2
        els[pixel] = make_element(
            TAG_PIXEL_DATA, els[pixel].vr or b"OW", els[pixel].value[:keep], layout
        )
        name = f"Pixel Data cut to {keep}"
    elif op == "number":
        if rng.random() < 0.5:
            tag = rng.choice(_US_TAGS)
            value = struct.pack(layout.fmt + "H", rng.choice([0, 1, 3, 7, 12, 33, 0x7FFF, 0xFFFF]))
            inst.elements = set_element(els, make_element(tag, b"US", value, layout))
        else:
            tag = rng.choice(_IS_TAGS)
            value = rng.choice(_IS_VALUES)
            inst.elements = set_element(
                els, make_element(tag, b"IS", value + b" " * (len(value) % 2), layout)
            )
        return f"number ({tag >> 16:04X},{tag & 0xFFFF:04X}) = {value!r}"
    elif op == "splice":
        other = rng.choice(others)
        if other.layout != layout:
            return _mutate(rng, inst, others)
        els.insert(i, rng.choice(other.elements))
    elif op == "tail":
        cut = rng.randint(1, min(64, len(encode_elements(els))))
        last = els[-1]
        els[-1] = Element(
            last.tag, last.vr, last.header, last.value[: max(0, len(last.value) - cut)]
        )
        name = f"last {cut} bytes"
    elif op == "undefined":
        els[i] = with_length(el, 0xFFFFFFFF, layout)
    return f"{op} {name}"


def mutation(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """One to three structure-aware mutations of a real MR file (or a synthetic one)."""
    for _ in range(n):
        t = rng.choice(corpus.mr)
        inst = t.fresh(rng)
        done = [_mutate(rng, inst, corpus.mr) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        yield _store("mutation", f"{t.name}: {'; '.join(done)}", inst, STORED_OR_REFUSED)


# -- odd files, foreign objects, foreign series, duplicates ------------------------------------


def odd_files(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """pydicom's odd test files and the odd files beside the real MR ones, as they are."""
    if not corpus.odd:
        return
    for i in range(n):
        odd: OddFile = (
            corpus.odd[i % len(corpus.odd)] if i < len(corpus.odd) else rng.choice(corpus.odd)
        )
        if odd.template is not None:
            inst = odd.template.fresh(rng)
            data, sop_instance, tokens = (
                inst.encode(),
                inst.sop_instance or random_uid(rng),
                inst.tokens,
            )
        else:
            data, sop_instance, tokens = odd.raw, random_uid(rng), []
        command_class: str = odd.sop_class or MRImageStorage
        under_mr = command_class not in MR_FAMILY and rng.random() < 0.3
        if under_mr:  # its data set under an MR command: a mismatch (or undecodable)
            command_class, expect = MRImageStorage, {CANNOT_UNDERSTAND, MISMATCH}
        elif command_class in MR_FAMILY:
            expect = set(STORED_OR_REFUSED)
        else:
            expect = {NOT_SUPPORTED}
        context_class = command_class if command_class in MR_FAMILY else MRImageStorage
        label = f"{odd.name}{' under an MR command' if under_mr else ''}"
        if not command_class.isascii() or len(command_class) > 64:
            command_class = MRImageStorage
        yield StoreCase(
            cls="odd_files",
            label=label,
            context=(context_class, odd.syntax),
            sop_class=command_class,
            sop_instance=sop_instance,
            data_set=data,
            expect=frozenset(expect),
            tokens=tuple(tokens),
        )


def foreign_objects(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """Objects that do not belong in an MR series, on MR contexts and on refused ones."""
    mr = next(s for s in corpus.synthetic if s.syntax == ExplicitVRLittleEndian)
    mr_context = (MRImageStorage, ExplicitVRLittleEndian)
    for _ in range(n):
        foreign_class = rng.choice(FOREIGN_CLASSES)
        name = UID(foreign_class).name
        foreign_modes = ("on_mr_context", "under_mr_command", "rejected_context")
        mode = rng.choice(
            [*foreign_modes, "other_mr_class", "mr_on_enhanced", "unknown_context", "control"]
        )
        inst = (corpus.foreign[foreign_class] if mode in foreign_modes else mr).fresh(rng)
        table: dict[str, tuple[str, tuple[str, str], str, set[Outcome]]] = {
            "on_mr_context": (
                f"{name} on an MR context",
                mr_context,
                foreign_class,
                {NOT_SUPPORTED},
            ),
            "under_mr_command": (
                f"{name} data set under an MR command",
                mr_context,
                MRImageStorage,
                {MISMATCH},
            ),
            "rejected_context": (
                f"{name} on its own (rejected) context",
                (foreign_class, ExplicitVRLittleEndian),
                foreign_class,
                {ABORT, NOT_SUPPORTED},
            ),
            "other_mr_class": (
                "Enhanced MR command on an MR context",
                mr_context,
                EnhancedMRImageStorage,
                {NOT_SUPPORTED},
            ),
            "mr_on_enhanced": (
                "MR on an Enhanced MR context",
                (EnhancedMRImageStorage, ExplicitVRLittleEndian),
                MRImageStorage,
                {NOT_SUPPORTED},
            ),
            "unknown_context": (
                "MR on a context ID never proposed",
                mr_context,
                MRImageStorage,
                {ABORT},
            ),
            "control": ("MR control", mr_context, MRImageStorage, {SUCCESS}),
        }
        label, context, sop_class, expect = table[mode]
        yield _store(
            "foreign_objects",
            label,
            inst,
            expect,
            context=context,
            sop_class=sop_class,
            context_id=255 if mode == "unknown_context" else None,
            own_association=ABORT in expect,
        )


def _with_uids(inst: Instance, study: str | None = None, series: str | None = None) -> Instance:
    """``inst`` with its Study and/or Series Instance UID replaced."""
    if study is not None:
        inst.set(TAG_STUDY, "UI", uid_value(study))
    if series is not None:
        inst.set(TAG_SERIES, "UI", uid_value(series))
    return inst


def foreign_series(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """A Series Instance UID filed under one study, then sent under another."""
    native = [s for s in corpus.synthetic]
    sent = 0
    while sent < n:
        study, other, series = random_uid(rng), random_uid(rng), random_uid(rng)
        group = [
            ("first instance of the series", study, {SUCCESS}),
            ("the series under another study", other, {CANNOT_UNDERSTAND}),
            ("the series again under its study", study, {SUCCESS}),
            ("the series under another study again", other, {CANNOT_UNDERSTAND}),
        ]
        for label, study_uid, expect in group[: rng.choice([2, 3, 4])]:
            if sent == n:
                return
            inst = _with_uids(rng.choice(native).fresh(rng), study_uid, series)
            yield _store("foreign_series", label, inst, expect)
            sent += 1


def duplicates(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """An instance sent again: the same bytes (Success), other content (0xB006, first kept)."""
    sent = 0
    while sent < n:
        t = rng.choice(corpus.synthetic)
        first = t.fresh(rng)
        original = first.encode()
        other = Instance(first.template, list(first.elements), first.sop_instance, first.tokens)
        change = rng.choice(["description", "pixel", "syntax"])
        if change == "description":
            other.set(0x0008103E, "LO", b"RESENT OTHER   ")
            other_data = other.encode()
        elif change == "pixel":
            pixel = next(k for k, e in enumerate(other.elements) if e.tag == TAG_PIXEL_DATA)
            el = other.elements[pixel]
            value = bytearray(el.value)
            value[rng.randrange(len(value))] ^= 0xFF
            other.elements[pixel] = Element(el.tag, el.vr, el.header, bytes(value))
            other_data = other.encode()
        else:  # the same content in another encoding: other bytes
            other_data = deflate(first.inflated()) if not t.deflated else first.inflated()
        steps: list[tuple[str, bytes, set[Outcome], str]] = [
            ("first", original, {SUCCESS}, t.syntax),
            ("same bytes again", original, {SUCCESS}, t.syntax),
            (f"other content ({change})", other_data, {WARNING_KEPT_FIRST}, t.syntax),
            ("first bytes once more", original, {SUCCESS}, t.syntax),
        ]
        if change == "syntax":
            other_syntax: str = (
                DeflatedExplicitVRLittleEndian if not t.deflated else ExplicitVRLittleEndian
            )
            if t.syntax != ExplicitVRLittleEndian and not t.deflated:
                # Only Explicit VR LE inflates to the same bytes: resend plain other content.
                other.set(0x0008103E, "LO", b"RESENT OTHER   ")
                other_data, other_syntax = other.encode(), t.syntax
            steps[2] = (
                "same data set in another syntax",
                other_data,
                {WARNING_KEPT_FIRST},
                other_syntax,
            )
        for label, data, expect, syntax in steps:
            if sent == n:
                return
            yield StoreCase(
                cls="duplicates",
                label=label,
                context=(MRImageStorage, syntax),
                sop_class=MRImageStorage,
                sop_instance=first.sop_instance,
                data_set=data,
                expect=frozenset(expect),
                tokens=tuple(first.tokens),
            )
            sent += 1


# -- PHI, AE titles, commands ------------------------------------------------------------------


def phi_planted(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """Patient values (tokens) in the patient module and where pydicom would quote them."""
    t = next(s for s in corpus.synthetic if s.syntax == ExplicitVRLittleEndian)
    for _ in range(n):
        inst = t.fresh(rng)
        tok = token(rng, rng.randint(8, 24))
        inst.tokens.append(tok)
        value = tok.encode()
        padded = value + b" " * (len(value) % 2)
        where = rng.choice(
            [
                "clean",
                "sop_instance",
                "data_sop_instance",
                "command_instance",
                "study",
                "series",
                "instance_number",
                "series_number",
                "study_date",
                "modality",
                "description",
                "charset",
                "rows",
                "private",
                "nested",
                "long_name",
                "bad_encoding",
                "control_name",
            ]
        )
        expect: set[Outcome] = {SUCCESS}
        kwargs: dict[str, Any] = {}
        if where == "sop_instance":
            inst.set(TAG_SOP_INSTANCE, "UI", uid_value(value))
            kwargs["sop_instance"], expect = value, {CANNOT_UNDERSTAND}
        elif where == "data_sop_instance":
            inst.set(TAG_SOP_INSTANCE, "UI", uid_value(value))
            expect = {MISMATCH}
        elif where == "command_instance":
            kwargs["sop_instance"], expect = value, {MISMATCH}
        elif where in ("study", "series"):
            inst.set(TAG_STUDY if where == "study" else TAG_SERIES, "UI", uid_value(value))
            expect = {CANNOT_UNDERSTAND}
        elif where == "instance_number":
            inst.set(0x00200013, "IS", padded)
        elif where == "series_number":
            inst.set(0x00200011, "IS", padded)
        elif where == "study_date":
            inst.set(0x00080020, "DA", padded)
        elif where == "modality":
            inst.set(0x00080060, "CS", padded)
        elif where == "description":
            inst.set(0x0008103E, "LO", padded)
        elif where == "charset":
            inst.set(0x00080005, "CS", padded)
        elif where == "rows":
            inst.set(0x00280010, "US", padded)
            expect = {MISMATCH}
        elif where == "private":
            inst.set(0x00090010, "LO", b"FUZZ")
            inst.set(0x00091010, "LO", padded)
        elif where == "nested":  # Other Patient IDs Sequence: an item with a name and an ID
            layout = inst.layout
            item = make_element(0x00100020, b"LO", padded, layout).raw
            seq = struct.pack(layout.fmt + "HHL", 0xFFFE, 0xE000, len(item)) + item
            inst.elements = set_element(inst.elements, make_element(0x00101002, b"SQ", seq, layout))
        elif where == "long_name":
            long_name = (tok + "^") * 400
            inst.tokens.append(tok)
            inst.set(0x00100010, "PN", long_name.encode()[:4000])
        elif where == "bad_encoding":  # Latin-1 bytes under UTF-8 (ISO_IR 192)
            inst.set(0x00100010, "PN", padded[:-1] + b"\xe9" if len(padded) > 2 else padded)
        elif where == "control_name":
            inst.set(0x00100010, "PN", value + b"\r\nINFO forged\x1b[2J ")
        yield _store("phi_planted", f"token in {where}", inst, expect, **kwargs)


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
    for i in range(n):
        inst = t.fresh(rng)
        pick = i % (len(modes) + 1) if i < 2 * (len(modes) + 1) else rng.randrange(len(modes) + 1)
        if pick == len(modes):
            raw = rng.randbytes(rng.choice([0, 1, 3, 8, 12, 64, 300]))
            label = f"random command set ({len(raw)} bytes)"
            yield _store("command", label, inst, {ABORT}, raw_command=raw, own_association=True)
            continue
        label, changes, expect = modes[pick]
        own = ABORT in expect
        data = b"" if label == "no data set" else None
        case = _store("command", label, inst, expect, command_changes=changes, own_association=own)
        yield case if data is None else replace(case, data_set=None)


# -- network, oversize ------------------------------------------------------------------------


def network(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """Raw-socket attacks on the upper layer."""
    t = next(s for s in corpus.synthetic if s.syntax == ExplicitVRLittleEndian)
    rq = associate_rq(b"FUZZER", b"SARCNODE", [(1, MRImageStorage, [ExplicitVRLittleEndian])])

    def p_data_header(length: int) -> bytes:
        return struct.pack(">BBL", PDU_P_DATA, 0, length)

    for i in range(n):
        inst = t.fresh(rng)
        data = inst.encode()
        command_pdv = struct.pack(">LBB", 2, 1, 0x03)
        attacks: list[tuple[str, tuple[Step, ...], set[Outcome], float]] = [
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
        yield _store(
            "oversize",
            f"{side}x{side}x16 bits ({len(pixels) >> 20} MiB)",
            inst,
            {ABORT},
            own_association=True,
        )


#: Every class: its generator and its share of a long run's inputs.
CLASSES: dict[str, tuple[Generator, float]] = {
    "truncated": (truncated, 10),
    "random_bytes": (random_bytes, 8),
    "hostile_uids": (hostile_uids, 8),
    "huge_lengths": (huge_lengths, 8),
    "deep_nesting": (deep_nesting, 6),
    "corrupt_deflate": (corrupt_deflate, 7),
    "deflate_bomb": (deflate_bomb, 3),
    "mutation": (mutation, 20),
    "odd_files": (odd_files, 6),
    "foreign_objects": (foreign_objects, 5),
    "foreign_series": (foreign_series, 5),
    "duplicates": (duplicates, 5),
    "phi_planted": (phi_planted, 8),
    "ae_titles": (ae_titles, 2),
    "command": (command, 3),
    "network": (network, 1.2),
    "oversize": (oversize, 0.3),
}


def counts_for(total: int) -> dict[str, int]:
    """Inputs per class for a run of about ``total`` inputs (each class at least 1)."""
    weight = sum(w for _, w in CLASSES.values())
    return {name: max(1, round(total * w / weight)) for name, (_, w) in CLASSES.items()}


def generate(name: str, seed: int, n: int, corpus: Corpus) -> Iterator[Case]:
    """The ``n`` cases of class ``name`` for ``seed``."""
    gen, _ = CLASSES[name]
    return gen(Random(f"{seed}:{name}"), corpus, n)


__all__ = [
    "CLASSES",
    "MARKER",
    "PATIENT_ELEMENTS",
    "PROPOSALS",
    "AssociateCase",
    "Case",
    "NetCase",
    "StoreCase",
    "counts_for",
    "generate",
]
