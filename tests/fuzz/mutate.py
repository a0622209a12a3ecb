"""Structure-aware mutation of a data set: one change to its element list at a time.

The elements of a real MR file (or a synthetic one) are flipped, resized,
re-typed, deleted, duplicated, swapped, spliced from another file, cut, given
extreme numbers or an undefined length, always written back consistently
where the mutation is not the length itself.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from random import Random

from tests.fuzz.cases import STORED_OR_REFUSED, Case, store_case
from tests.fuzz.corpus import (
    ALL_VRS,
    TAG_PIXEL_DATA,
    Corpus,
    Element,
    Instance,
    Template,
    encode_elements,
    make_element,
    set_element,
    with_length,
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
        yield store_case("mutation", f"{t.name}: {'; '.join(done)}", inst, STORED_OR_REFUSED)
