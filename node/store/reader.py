"""Read a received dataset without trusting it: bounded, streaming, header only.

A C-STORE data set arrives as bytes in the accepted transfer syntax. Before
anything is written, :func:`read_dataset` walks it once, element by element:

* every element must fit: a length that runs past the end of the data, its
  item or its sequence means the data set is truncated or corrupt, and it is
  refused (pydicom itself reads such data sets "successfully");
* sequences are followed iteratively to :attr:`ReadLimits.max_depth` levels,
  so deep nesting is refused with a reason instead of a ``RecursionError``;
* values are skipped, never copied, except the few top-level attributes the
  index needs (a few KiB at most), so Pixel Data is never materialised;
* a deflated data set is inflated as a stream, in chunks, and refused as soon
  as its inflated size passes :attr:`ReadLimits.max_dataset_bytes` or its
  inflate ratio passes :attr:`ReadLimits.max_inflate_ratio` (a decompression
  bomb costs a few MiB of memory, not gigabytes).

The data set is read from memory (:func:`read_dataset`) or from the file it
was received into (:func:`read_dataset_file`: the C-STORE spool, only the
header bytes are read back). The kept values are decoded and checked for
consistency by :mod:`node.store.header` (UIDs present, numeric values within
their VR's range, Pixel Data as long as the Image Pixel attributes say).

Every refusal raises a :class:`~node.dicom.status.ServiceError` naming the
problem; nothing here writes to the disk or the database.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.datadict import dictionary_VR
from pydicom.uid import UID

from node.dicom.status import CannotUnderstand, DatasetTooLarge
from node.store.header import (
    TAGS,
    Header,
    HeaderValues,
    PixelInfo,
    check_pixels,
    decode_header,
)
from node.store.sources import (
    Ended,
    FileSource,
    InflateSource,
    MiB,
    RawSource,
    ReadLimits,
    Source,
)

__all__ = [
    "Header",
    "MiB",
    "ParsedDataset",
    "PixelInfo",
    "ReadLimits",
    "read_dataset",
    "read_dataset_file",
]

DEFLATED_EXPLICIT_LE = "1.2.840.10008.1.2.1.99"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_PIXEL_TAGS = {
    0x7FE00010: "PixelData",
    0x7FE00008: "FloatPixelData",
    0x7FE00009: "DoubleFloatPixelData",
}

#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())

#: Bytes of a wanted value kept for decoding (longer values are cut: index fields are short).
_KEEP = 4096


@dataclass(frozen=True)
class ParsedDataset:
    """What :func:`read_dataset` learnt: the header, the pixels, and any oddity tolerated."""

    header: Header
    pixel: PixelInfo | None
    #: Bytes walked: the data set as received, or inflated for a deflated one.
    walked_bytes: int
    elements: int
    #: Deviations accepted as they are (tolerant reading), recorded in the audit.
    oddities: tuple[str, ...] = ()


class _ImplicitInstead(Exception):
    """The first element of an explicit-VR data set has no valid VR: retry as implicit."""


# -- the walk -----------------------------------------------------------------------


@dataclass
class _Frame:
    """One level of the walk: the top-level data set, an item, a sequence, or fragments."""

    kind: str  # "dataset" | "item" | "sequence" | "fragments"
    tag: int
    end: int | None  # absolute end position for defined lengths
    implicit: bool
    little: bool


@dataclass
class _Walk:
    values: dict[int, tuple[str | None, bytes]] = field(default_factory=dict)
    pixel: PixelInfo | None = None
    elements: int = 0
    oddities: list[str] = field(default_factory=list)


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _is_sequence(tag: int, vr: str | None) -> bool:
    """Whether a defined-length element is a sequence (implicit VR: by the dictionary)."""
    if vr is not None:
        return vr == "SQ"
    if (tag >> 16) & 1:  # private: unknown, kept as bytes as pydicom does
        return False
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


def _walk(src: Source, implicit: bool, little: bool, limits: ReadLimits, wanted: set[int]) -> _Walk:
    """Walk every element of the data set; collect ``wanted`` top-level values."""
    out = _Walk()
    stack = [_Frame("dataset", 0, None, implicit, little)]
    current: int | None = None  # the element being read, for the truncation message
    try:
        while True:
            frame = stack[-1]
            if frame.end is not None and src.position >= frame.end:
                if src.position > frame.end:
                    raise CannotUnderstand(
                        f"data set is corrupt: content of {_tag_text(frame.tag)} runs past "
                        "its declared length"
                    )
                stack.pop()
                continue
            if frame.kind == "dataset" and src.exhausted():
                break
            fmt = "<" if frame.little else ">"
            current = None if frame.kind == "dataset" else frame.tag
            group, elem, length = struct.unpack(fmt + "HHL", src.read(8))
            tag = group << 16 | elem
            if frame.kind in ("sequence", "fragments"):
                current = frame.tag
                _sequence_item(src, out, stack, frame, tag, length)
                continue
            if tag == _ITEM_END and frame.kind == "item" and frame.end is None:
                stack.pop()
                continue
            if tag in (_ITEM, _ITEM_END, _SEQ_END):
                raise CannotUnderstand(f"data set is corrupt: {_tag_text(tag)} outside a sequence")
            current = tag
            vr, length = _vr_and_length(src, frame, fmt, group, elem, length, out.elements == 0)
            out.elements += 1
            if out.elements > limits.max_elements:
                raise DatasetTooLarge(f"data set has more than {limits.max_elements} elements")
            _element(src, out, stack, frame, tag, vr, length, limits, wanted)
    except Ended:
        where = "an element header" if current is None else _tag_text(current)
        raise CannotUnderstand(
            f"data set is truncated inside {where} at byte {src.position}"
        ) from None
    return out


def _sequence_item(
    src: Source, out: _Walk, stack: list[_Frame], frame: _Frame, tag: int, length: int
) -> None:
    """Inside a sequence or encapsulated Pixel Data: an item, a fragment, or the end."""
    if tag == _SEQ_END and frame.end is None:
        stack.pop()
    elif tag != _ITEM:
        raise CannotUnderstand(
            f"data set is corrupt: {_tag_text(tag)} inside sequence "
            f"{_tag_text(frame.tag)} where an item belongs"
        )
    elif frame.kind == "fragments":
        if length == _UNDEFINED:
            raise CannotUnderstand("data set is corrupt: a pixel fragment has no length")
        src.skip(length)
        _count_fragment(out, length)
    else:
        end = None if length == _UNDEFINED else src.position + length
        _fits(src, stack, end, _ITEM)
        stack.append(_Frame("item", frame.tag, end, frame.implicit, frame.little))


def _element(
    src: Source,
    out: _Walk,
    stack: list[_Frame],
    frame: _Frame,
    tag: int,
    vr: str | None,
    length: int,
    limits: ReadLimits,
    wanted: set[int],
) -> None:
    """One data element after its header: open it, note its pixels, keep or skip its value."""
    top = len(stack) == 1
    if length == _UNDEFINED:
        _open_undefined(out, stack, frame, tag, vr, top, limits)
    elif _is_sequence(tag, vr):
        end = src.position + length
        _fits(src, stack, end, tag)
        _push_sequence(stack, _Frame("sequence", tag, end, frame.implicit, frame.little), limits)
    elif top and tag in _PIXEL_TAGS:
        src.skip(length)
        if out.pixel is not None:
            out.oddities.append(f"second pixel data element {_tag_text(tag)}")
        out.pixel = PixelInfo(_PIXEL_TAGS[tag], False, length)
    elif top and tag in wanted:
        kept = src.read(min(length, _KEEP))
        src.skip(length - len(kept))
        out.values[tag] = (vr, kept)
    else:
        src.skip(length)


def _vr_and_length(
    src: Source, frame: _Frame, fmt: str, group: int, elem: int, length: int, first: bool
) -> tuple[str | None, int]:
    """The element's VR (None for implicit VR) and value length, after its tag.

    Raises :class:`_ImplicitInstead` when the data set's very first element has
    no valid VR: some senders encode Implicit VR under an explicit transfer
    syntax, and pydicom reads those files as implicit too.
    """
    if frame.implicit:
        return None, length
    # Explicit VR: the 4 bytes read as a length were VR (2) + length (2) or VR + reserved.
    raw = struct.pack(fmt + "L", length)
    vr_bytes = raw[:2]
    if vr_bytes in _LONG_VRS:
        (long_length,) = struct.unpack(fmt + "L", src.read(4))
        return vr_bytes.decode(), long_length
    if vr_bytes in _SHORT_VRS:
        (short_length,) = struct.unpack(fmt + "H", raw[2:])
        return vr_bytes.decode(), short_length
    if first and frame.little:
        raise _ImplicitInstead
    raise CannotUnderstand(
        f"data set is corrupt: element {_tag_text(group << 16 | elem)} has no valid VR "
        f"(is the transfer syntax right?)"
    )


def _open_undefined(
    out: _Walk,
    stack: list[_Frame],
    frame: _Frame,
    tag: int,
    vr: str | None,
    top: bool,
    limits: ReadLimits,
) -> None:
    """An undefined-length element: a sequence, an implicit-VR UN sequence, or fragments."""
    if top and tag == 0x7FE00010 and vr in ("OB", "OW", None):
        if out.pixel is not None:
            out.oddities.append("second pixel data element (7FE0,0010)")
        out.pixel = PixelInfo("PixelData", True, 0, -1)  # the first item is the offset table
        stack.append(_Frame("fragments", tag, None, frame.implicit, frame.little))
        return
    if vr in ("SQ", None):
        child = _Frame("sequence", tag, None, frame.implicit, frame.little)
    elif vr == "UN":  # PS3.5 6.2.2: undefined-length UN is a sequence in Implicit VR LE
        child = _Frame("sequence", tag, None, True, True)
    else:
        raise CannotUnderstand(
            f"data set is corrupt: {_tag_text(tag)} ({vr}) has an undefined length"
        )
    _push_sequence(stack, child, limits)


def _push_sequence(stack: list[_Frame], child: _Frame, limits: ReadLimits) -> None:
    depth = sum(1 for f in stack if f.kind == "sequence") + 1
    if depth > limits.max_depth:
        raise CannotUnderstand(
            f"data set nests sequences deeper than {limits.max_depth} levels "
            f"(at {_tag_text(child.tag)})"
        )
    stack.append(child)


def _count_fragment(out: _Walk, length: int) -> None:
    """Count one item of encapsulated Pixel Data (the first is the Basic Offset Table)."""
    pixel = out.pixel
    assert pixel is not None and pixel.encapsulated
    if pixel.fragments < 0:
        out.pixel = PixelInfo(pixel.keyword, True, 0, 0)
    else:
        out.pixel = PixelInfo(pixel.keyword, True, pixel.length + length, pixel.fragments + 1)


def _fits(src: Source, stack: list[_Frame], end: int | None, tag: int) -> None:
    """Refuse a defined length that cannot fit in its parent or in the data received."""
    if end is None:
        return
    parent_end = next((f.end for f in reversed(stack) if f.end is not None), None)
    if parent_end is not None and end > parent_end:
        raise CannotUnderstand(
            f"data set is corrupt: {_tag_text(tag)} is longer than the item holding it"
        )
    remaining = src.remaining()
    if remaining is not None and end - src.position > remaining:
        raise CannotUnderstand(
            f"data set is truncated: {_tag_text(tag)} declares {end - src.position} bytes, "
            f"{remaining} remain"
        )


def _source(raw: RawSource | FileSource, ts: UID, limits: ReadLimits) -> Source:
    if ts == DEFLATED_EXPLICIT_LE:
        return InflateSource(raw, limits)
    return raw


def _check_size(size: int, limits: ReadLimits) -> None:
    """Refuse a data set over the cap, or an empty one, before walking it."""
    if size > limits.max_dataset_bytes:
        raise DatasetTooLarge(
            f"data set is {size / MiB:.0f} MiB, over the "
            f"{limits.max_dataset_bytes // MiB} MiB cap (storage.max_dataset_mb)"
        )
    if size == 0:
        raise CannotUnderstand("data set is empty")


def _parse(
    open_raw: Callable[[], RawSource | FileSource], transfer_syntax: str, limits: ReadLimits
) -> ParsedDataset:
    """Walk the data set ``open_raw()`` reads from the start; decode and check its header."""
    ts = UID(transfer_syntax)
    implicit = ts == IMPLICIT_LE
    little = ts != EXPLICIT_BE
    wanted = set(TAGS.values())
    src = _source(open_raw(), ts, limits)
    try:
        walk = _walk(src, implicit, little, limits, wanted)
    except _ImplicitInstead:
        src = _source(open_raw(), ts, limits)
        walk = _walk(src, True, True, limits, wanted)
        walk.oddities.append(f"Implicit VR encoding under {ts.name}")
    if isinstance(src, InflateSource) and src.trailing_bytes:
        walk.oddities.append(f"{src.trailing_bytes} bytes after the deflate stream")
    values = HeaderValues(walk.values, walk.oddities, little)
    header = decode_header(values)
    check_pixels(header, walk.pixel, values, ts)
    return ParsedDataset(
        header=header,
        pixel=walk.pixel,
        walked_bytes=src.position,
        elements=walk.elements,
        oddities=tuple(values.oddities),
    )


def read_dataset(
    dataset: bytes | memoryview, transfer_syntax: str, limits: ReadLimits | None = None
) -> ParsedDataset:
    """Walk a received data set once and return its header and pixel facts.

    Parameters
    ----------
    dataset
        The data set bytes as received (no preamble or File Meta Information).
    transfer_syntax
        The accepted presentation context's transfer syntax UID.
    limits
        The caps; :class:`ReadLimits` defaults when omitted.

    Raises
    ------
    DatasetTooLarge
        Over :attr:`ReadLimits.max_dataset_bytes` (received or inflated), over the
        inflate ratio, or over the element count (0xA700-class).
    CannotUnderstand
        Not decodable: truncated, corrupt deflate stream, broken structure, too
        deeply nested, a required UID missing, or an image without Pixel Data.
    DataSetMismatch
        Values out of their range, or Pixel Data inconsistent with the Image
        Pixel attributes.
    """
    limits = limits or ReadLimits()
    view = memoryview(dataset).cast("B")
    _check_size(len(view), limits)
    return _parse(lambda: RawSource(view), transfer_syntax, limits)


def read_dataset_file(
    path: Path, offset: int, transfer_syntax: str, limits: ReadLimits | None = None
) -> ParsedDataset:
    """As :func:`read_dataset`, for a data set stored in ``path`` from ``offset`` to its end.

    Only the element headers and the few kept values are read: the walk seeks
    over everything else, so a large Pixel Data costs neither memory nor reads.
    Raises as :func:`read_dataset`; an unreadable file is an ``OSError``.
    """
    limits = limits or ReadLimits()
    with path.open("rb") as fh:
        size = max(0, fh.seek(0, io.SEEK_END) - offset)
        _check_size(size, limits)
        return _parse(lambda: FileSource(fh, offset, size), transfer_syntax, limits)
