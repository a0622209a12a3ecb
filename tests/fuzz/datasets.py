"""Generators of hostile data sets: what a C-STORE carries (see :mod:`tests.fuzz.generator`).

Truncations, random bytes, hostile UIDs, huge lengths, deep nesting, corrupt
and bomb deflate streams, odd files, foreign objects, foreign-study series,
duplicates and planted patient values; structure-aware mutation is in
:mod:`tests.fuzz.mutate`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from random import Random
from typing import Any

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from tests.fuzz.cases import (
    CANNOT_UNDERSTAND,
    MISMATCH,
    NOT_SUPPORTED,
    OUT_OF_RESOURCES,
    STORED_OR_REFUSED,
    SUCCESS,
    WARNING_KEPT_FIRST,
    Case,
    StoreCase,
    native,
    pixel_end,
    store_case,
)
from tests.fuzz.corpus import (
    FOREIGN_CLASSES,
    MR_FAMILY,
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
    Outcome,
    uid_value,
)

# -- truncated, random bytes ---------------------------------------------------------------


def truncated(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """A data set cut at a random offset before its Pixel Data ends."""
    for _ in range(n):
        t = rng.choice(corpus.mr)
        inst = t.fresh(rng)
        if t.deflated:
            sent = inst.encode()
            cut = rng.randrange(len(sent))
            yield store_case(
                "truncated",
                f"{t.name} deflate stream cut at {cut}",
                inst,
                {CANNOT_UNDERSTAND},
                sent[:cut],
            )
            continue
        raw = inst.inflated()
        end = pixel_end(inst.elements)
        cut = rng.choice([rng.randrange(end), rng.randrange(max(1, end - 64), end), 0])
        yield store_case(
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
        yield store_case("random_bytes", f"{t.name} {mode} {size} bytes", inst, expect, data)


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
            yield store_case(
                "hostile_uids", label, inst, expect, sop_instance=raw, own_association=len(raw) > 64
            )
        elif where in ("study", "series"):
            inst.set(TAG_STUDY if where == "study" else TAG_SERIES, "UI", value)
            yield store_case("hostile_uids", label, inst, path_ok)
        elif where in ("sop_class", "command_class"):
            # A class pynetdicom has no service for is aborted by it before the node's
            # handler can answer 0x0122: both are refusals.
            if where == "sop_class":
                inst.set(TAG_SOP_CLASS, "UI", value)
            expect = {NOT_SUPPORTED, ABORT}
            yield store_case(
                "hostile_uids", label, inst, expect, sop_class=raw, own_association=True
            )
        elif where == "command_instance":
            expect = {MISMATCH, CANNOT_UNDERSTAND} | ({ABORT} if len(raw) > 64 else set())
            if tolerated:
                expect.add(SUCCESS)
            yield store_case(
                "hostile_uids", label, inst, expect, sop_instance=raw, own_association=len(raw) > 64
            )
        else:
            inst.set(TAG_SOP_CLASS, "UI", value)
            yield store_case("hostile_uids", label, inst, {MISMATCH})


# -- huge lengths, deep nesting ------------------------------------------------------------

_HUGE = (0xFFFFFFFF, 0xFFFFFFFE, 0x80000000, 0x7FFFFFFF, 0x10000000, 0x01000000)


def huge_lengths(rng: Random, corpus: Corpus, n: int) -> Iterator[Case]:
    """An element's length field set past the end of the data set (or undefined)."""
    for _ in range(n):
        t = rng.choice(native(corpus.mr))
        inst = t.fresh(rng)
        layout = inst.layout
        if rng.random() < 0.02:  # an element-count bomb: 1.1 million empty elements
            filler = element_header(0x00091010, b"LO", 0, layout) * 1_100_000
            data = inst.inflated() + filler
            yield store_case(
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
        yield store_case("huge_lengths", label, inst, expect)


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
        yield store_case("deep_nesting", f"{t.name} depth {depth} {mode}", inst, expect, data)


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
        yield store_case(
            "corrupt_deflate", f"deflate {mode} ({len(data)} bytes)", inst, expect, data
        )


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
        yield store_case(
            "deflate_bomb",
            f"{where} inflating {mib} MiB from {len(data) >> 10} KiB",
            inst,
            {OUT_OF_RESOURCES},
            data,
        )


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
        yield store_case(
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
            yield store_case("foreign_series", label, inst, expect)
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


# -- PHI ------------------------------------------------------------------


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
        yield store_case("phi_planted", f"token in {where}", inst, expect, **kwargs)
