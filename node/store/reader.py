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

The header values are decoded here, not by pydicom's element machinery, so no
library warning ever prints an element value (patient data) to a log. The
result is checked for consistency: Pixel Data present for image objects and
as long as Rows x Columns x Samples x BitsAllocated x frames for native
transfer syntaxes, encapsulated for compressed ones, and numeric values
within their VR's range.

Every refusal raises a :class:`~node.dicom.status.ServiceError` naming the
problem; nothing here touches the disk or the database.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR
from pydicom.uid import UID
from pydicom.valuerep import PersonName

from node.dicom.status import CannotUnderstand, DataSetMismatch, DatasetTooLarge

MiB = 1024 * 1024

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

#: IS values are signed 32-bit integers (PS3.5 6.2); the index stores them as such.
_IS_MIN, _IS_MAX = -(2**31), 2**31 - 1
#: Bytes of a wanted value kept for decoding (longer values are cut: index fields are short).
_KEEP = 4096
#: Input fed to the inflater per step, and most output it may return per step.
_INFLATE_IN = 64 * 1024
_INFLATE_OUT = 1 * MiB


@dataclass(frozen=True)
class ReadLimits:
    """What one data set may cost to read; anything beyond is refused.

    ``max_dataset_bytes`` bounds the received data set and, for a deflated one,
    its inflated size. ``max_inflate_ratio`` (inflated / deflated bytes) is
    checked once ``ratio_floor_bytes`` have been inflated, so a small blank
    image that deflates very well is still accepted. ``max_depth`` bounds
    sequence nesting, ``max_elements`` the number of elements walked (CPU).
    """

    max_dataset_bytes: int = 512 * MiB
    max_inflate_ratio: float = 100.0
    ratio_floor_bytes: int = 16 * MiB
    max_depth: int = 32
    max_elements: int = 1_000_000

    def __post_init__(self) -> None:
        if self.max_dataset_bytes <= 0 or self.max_depth <= 0 or self.max_elements <= 0:
            raise ValueError("read limits must be positive")
        if self.max_inflate_ratio < 1:
            raise ValueError("max_inflate_ratio must be at least 1")


@dataclass(frozen=True)
class Header:
    """The attributes the index needs, read from the received dataset."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    instance_number: int | None
    patient_id: str | None
    patient_name: str | None
    study_date: str | None
    accession_number: str | None
    study_description: str | None


@dataclass(frozen=True)
class PixelInfo:
    """Where the pixels are: which element, native or encapsulated, how many bytes."""

    keyword: str
    encapsulated: bool
    #: Value length (native) or the sum of the fragments' lengths (encapsulated).
    length: int
    #: Fragments after the Basic Offset Table (encapsulated only).
    fragments: int = 0


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


# -- byte sources -------------------------------------------------------------------


class _Ended(Exception):
    """The source has fewer bytes than asked for (the caller names the element)."""


class _ImplicitInstead(Exception):
    """The first element of an explicit-VR data set has no valid VR: retry as implicit."""


class _RawSource:
    """A data set already in memory, read forward without copying."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self.position = 0

    def read(self, n: int) -> bytes:
        end = self.position + n
        if end > len(self._view):
            raise _Ended
        chunk = bytes(self._view[self.position : end])
        self.position = end
        return chunk

    def skip(self, n: int) -> None:
        if self.position + n > len(self._view):
            raise _Ended
        self.position += n

    def exhausted(self) -> bool:
        return self.position >= len(self._view)

    def remaining(self) -> int | None:
        return len(self._view) - self.position


class _InflateSource:
    """A deflated data set (PS3.5 A.5), inflated in chunks as it is read.

    Only the bytes not yet read are buffered (at most ~1 MiB), so skipping a
    gigabyte of inflated Pixel Data costs CPU, never memory; the size and ratio
    limits stop a bomb long before that.
    """

    def __init__(self, view: memoryview, limits: ReadLimits) -> None:
        self._in = view
        self._in_pos = 0
        self._limits = limits
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._buf_pos = 0
        self.position = 0
        self.inflated = 0
        self.trailing_bytes = 0

    def _more(self) -> bool:
        """Inflate the next chunk into the buffer; False once the stream has ended."""
        if self._z.eof:
            return False
        data: bytes | memoryview = self._z.unconsumed_tail
        if not data:
            if self._in_pos >= len(self._in):
                raise CannotUnderstand("deflated data set is truncated (the stream does not end)")
            data = self._in[self._in_pos : self._in_pos + _INFLATE_IN]
            self._in_pos += len(data)
        try:
            out = self._z.decompress(data, _INFLATE_OUT)
        except zlib.error as exc:
            raise CannotUnderstand(f"deflated data set cannot be inflated: {exc}") from exc
        self.inflated += len(out)
        self._check_limits()
        if self._buf_pos > _INFLATE_OUT:
            del self._buf[: self._buf_pos]
            self._buf_pos = 0
        self._buf += out
        if self._z.eof:
            self.trailing_bytes = len(self._z.unused_data) + len(self._in) - self._in_pos
        return True

    def _check_limits(self) -> None:
        limits = self._limits
        if self.inflated > limits.max_dataset_bytes:
            raise DatasetTooLarge(
                f"deflated data set inflates past the {limits.max_dataset_bytes // MiB} MiB "
                "cap (storage.max_dataset_mb)"
            )
        if self.inflated > limits.ratio_floor_bytes:
            consumed = max(1, self._in_pos - len(self._z.unconsumed_tail))
            ratio = self.inflated / consumed
            if ratio > limits.max_inflate_ratio:
                raise DatasetTooLarge(
                    f"deflated data set inflates {ratio:.0f}:1, over the "
                    f"{limits.max_inflate_ratio:g}:1 cap (storage.max_inflate_ratio)"
                )

    def _buffered(self) -> int:
        return len(self._buf) - self._buf_pos

    def read(self, n: int) -> bytes:
        while self._buffered() < n:
            if not self._more():
                raise _Ended
        chunk = bytes(self._buf[self._buf_pos : self._buf_pos + n])
        self._buf_pos += n
        self.position += n
        return chunk

    def skip(self, n: int) -> None:
        left = n
        while left:
            if not self._buffered() and not self._more():
                raise _Ended
            step = min(left, self._buffered())
            self._buf_pos += step
            self.position += step
            left -= step

    def exhausted(self) -> bool:
        while not self._buffered():
            if not self._more():
                return True
        return False

    def remaining(self) -> int | None:
        return None


_Source = _RawSource | _InflateSource


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


def _walk(
    src: _Source, implicit: bool, little: bool, limits: ReadLimits, wanted: set[int]
) -> _Walk:
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
                if tag == _SEQ_END and frame.end is None:
                    stack.pop()
                elif tag != _ITEM:
                    raise CannotUnderstand(
                        f"data set is corrupt: {_tag_text(tag)} inside sequence "
                        f"{_tag_text(frame.tag)} where an item belongs"
                    )
                elif frame.kind == "fragments":
                    if length == _UNDEFINED:
                        raise CannotUnderstand(
                            "data set is corrupt: a pixel fragment has no length"
                        )
                    current = frame.tag
                    src.skip(length)
                    _count_fragment(out, length)
                else:
                    end = None if length == _UNDEFINED else src.position + length
                    _fits(src, stack, end, _ITEM)
                    stack.append(_Frame("item", frame.tag, end, frame.implicit, frame.little))
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
            top = len(stack) == 1
            if length == _UNDEFINED:
                _open_undefined(out, stack, frame, tag, vr, top, limits)
            elif _is_sequence(tag, vr):
                end = src.position + length
                _fits(src, stack, end, tag)
                _push_sequence(
                    stack, _Frame("sequence", tag, end, frame.implicit, frame.little), limits
                )
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
    except _Ended:
        where = "an element header" if current is None else _tag_text(current)
        raise CannotUnderstand(
            f"data set is truncated inside {where} at byte {src.position}"
        ) from None
    return out


def _vr_and_length(
    src: _Source, frame: _Frame, fmt: str, group: int, elem: int, length: int, first: bool
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


def _fits(src: _Source, stack: list[_Frame], end: int | None, tag: int) -> None:
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


# -- decoding the few values the index needs ---------------------------------------------

_TAGS = {
    "SpecificCharacterSet": 0x00080005,
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "StudyDate": 0x00080020,
    "AccessionNumber": 0x00080050,
    "Modality": 0x00080060,
    "StudyDescription": 0x00081030,
    "SeriesDescription": 0x0008103E,
    "PatientName": 0x00100010,
    "PatientID": 0x00100020,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "SeriesNumber": 0x00200011,
    "InstanceNumber": 0x00200013,
    "SamplesPerPixel": 0x00280002,
    "NumberOfFrames": 0x00280008,
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "BitsAllocated": 0x00280100,
    "PhotometricInterpretation": 0x00280004,
}
#: Bytes after which an ISO 2022 code extension resets (PS3.5 6.1.2.5.3): TAB, LF, FF,
#: CR, and the value separator.
_TEXT_DELIMITERS = {0x09, 0x0A, 0x0C, 0x0D, 0x5C}
_SUBSAMPLED_422 = ("YBR_FULL_422", "YBR_PARTIAL_422")
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class _Values:
    """Decoders for the collected raw values (never through pydicom's validators)."""

    def __init__(self, walk: _Walk, little: bool) -> None:
        self._raw = walk.values
        self._fmt = "<" if little else ">"
        self.oddities = walk.oddities
        charset = self._ascii("SpecificCharacterSet")
        terms = [t.strip() for t in charset.split("\\")] if charset else None
        if terms and not all(t.isascii() and t.isprintable() for t in terms):
            # pydicom would warn with the raw term: keep control characters out of logs
            self.oddities.append("SpecificCharacterSet is not printable (default used)")
            terms = None
        self.encodings = convert_encodings(terms)

    def present(self, keyword: str) -> bool:
        return _TAGS[keyword] in self._raw

    def _bytes(self, keyword: str) -> bytes | None:
        entry = self._raw.get(_TAGS[keyword])
        return None if entry is None else entry[1]

    def _ascii(self, keyword: str) -> str | None:
        raw = self._bytes(keyword)
        if raw is None:
            return None
        return raw.decode("ascii", "replace").strip("\x00 ")

    def uid(self, keyword: str) -> str | None:
        return self._ascii(keyword) or None

    def code(self, keyword: str) -> str | None:
        return self._ascii(keyword) or None

    def text(self, keyword: str, limit: int) -> str | None:
        raw = self._bytes(keyword)
        if raw is None:
            return None
        if keyword == "PatientName":
            value = str(PersonName(raw, self.encodings, validation_mode=pydicom_config.IGNORE))
        else:
            value = decode_bytes(raw, self.encodings, _TEXT_DELIMITERS)
        value = value.strip("\x00 ")
        return value[:limit] or None

    def integer_string(self, keyword: str) -> int | None:
        """An IS value; out of range refused, unreadable tolerated (None, an oddity)."""
        text = self._ascii(keyword)
        if not text:
            return None
        try:
            value = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                self.oddities.append(f"{keyword} is not a number")
                return None
            if not number.is_integer():
                self.oddities.append(f"{keyword} is not an integer")
                return None
            value = int(number)
        if not _IS_MIN <= value <= _IS_MAX:
            shown = text if len(text) <= 24 else text[:21] + "..."
            raise DataSetMismatch(f"{keyword} {shown} is outside the IS range (32-bit)")
        return value

    def unsigned_short(self, keyword: str) -> int | None:
        raw = self._bytes(keyword)
        if raw is None or len(raw) == 0:
            return None
        if len(raw) != 2:
            raise DataSetMismatch(f"{keyword} is {len(raw)} bytes long, not one US value")
        return int(struct.unpack(self._fmt + "H", raw)[0])


def _header(values: _Values) -> Header:
    uids = {k: values.uid(k) for k in _REQUIRED_UIDS}
    missing = [k for k, v in uids.items() if not v]
    if missing:
        raise CannotUnderstand(f"dataset has no {', '.join(missing)}")
    return Header(
        sop_class_uid=str(uids["SOPClassUID"]),
        sop_instance_uid=str(uids["SOPInstanceUID"]),
        study_instance_uid=str(uids["StudyInstanceUID"]),
        series_instance_uid=str(uids["SeriesInstanceUID"]),
        modality=values.text("Modality", 16),
        series_number=values.integer_string("SeriesNumber"),
        series_description=values.text("SeriesDescription", 64),
        instance_number=values.integer_string("InstanceNumber"),
        patient_id=values.text("PatientID", 64),
        patient_name=values.text("PatientName", 324),
        study_date=values.text("StudyDate", 8),
        accession_number=values.text("AccessionNumber", 16),
        study_description=values.text("StudyDescription", 64),
    )


def _needs_pixels(sop_class_uid: str, values: _Values) -> bool:
    """Image objects carry pixels: by their SOP class name, or by Rows and Columns."""
    name = UID(sop_class_uid).name
    return "Image Storage" in name or (values.present("Rows") and values.present("Columns"))


def _check_pixels(
    header: Header, pixel: PixelInfo | None, values: _Values, transfer_syntax: UID
) -> None:
    """Refuse image objects without pixels, or with fewer pixel bytes than their header says.

    Raises
    ------
    CannotUnderstand
        An image object has no Pixel Data (truncated, or a header only).
    DataSetMismatch
        Pixel Data and the Image Pixel attributes disagree.
    """
    if pixel is None:
        if _needs_pixels(header.sop_class_uid, values):
            raise CannotUnderstand("image has no Pixel Data (truncated or header only)")
        return
    rows, columns = values.unsigned_short("Rows"), values.unsigned_short("Columns")
    bits = values.unsigned_short("BitsAllocated")
    samples = values.unsigned_short("SamplesPerPixel")
    frames = values.integer_string("NumberOfFrames")
    if not rows or not columns or not bits:
        raise DataSetMismatch(f"{pixel.keyword} without valid Rows, Columns and BitsAllocated")
    if bits != 1 and (bits % 8 or bits > 64):
        raise DataSetMismatch(f"BitsAllocated {bits} is not 1 or a multiple of 8 up to 64")
    if samples is None:
        values.oddities.append("SamplesPerPixel missing (1 assumed)")
        samples = 1
    if not 1 <= samples <= 4:
        raise DataSetMismatch(f"SamplesPerPixel {samples} is not 1 to 4")
    if frames is not None and frames < 1:
        raise DataSetMismatch(f"NumberOfFrames {frames} is not positive")
    frames = frames or 1
    if pixel.encapsulated:
        if not transfer_syntax.is_encapsulated:
            raise DataSetMismatch(
                f"{pixel.keyword} is encapsulated but {transfer_syntax.name} is native"
            )
        if pixel.fragments < 1 or pixel.length == 0:
            raise DataSetMismatch(f"encapsulated {pixel.keyword} has no fragments")
        if pixel.fragments < frames:
            raise DataSetMismatch(
                f"encapsulated {pixel.keyword} has {pixel.fragments} fragments for {frames} frames"
            )
        return
    if transfer_syntax.is_encapsulated and pixel.keyword == "PixelData":
        raise DataSetMismatch(f"native Pixel Data under compressed {transfer_syntax.name}")
    if samples == 3 and values.code("PhotometricInterpretation") in _SUBSAMPLED_422:
        samples = 2  # PS3.3 C.7.6.3.1.2: two luminance values share one Cb and one Cr
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if pixel.length < expected:
        raise DataSetMismatch(
            f"{pixel.keyword} is {pixel.length} bytes; Rows x Columns x Samples x Bits x "
            f"Frames needs {expected}"
        )
    if pixel.length > expected + 1:
        values.oddities.append(f"{pixel.keyword} has {pixel.length - expected} bytes to spare")


def _source(view: memoryview, ts: UID, limits: ReadLimits) -> _Source:
    if ts == DEFLATED_EXPLICIT_LE:
        return _InflateSource(view, limits)
    return _RawSource(view)


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
    if len(view) > limits.max_dataset_bytes:
        raise DatasetTooLarge(
            f"data set is {len(view) / MiB:.0f} MiB, over the "
            f"{limits.max_dataset_bytes // MiB} MiB cap (storage.max_dataset_mb)"
        )
    if len(view) == 0:
        raise CannotUnderstand("data set is empty")
    ts = UID(transfer_syntax)
    implicit = ts == IMPLICIT_LE
    little = ts != EXPLICIT_BE
    src = _source(view, ts, limits)
    try:
        walk = _walk(src, implicit, little, limits, set(_TAGS.values()))
    except _ImplicitInstead:
        src = _source(view, ts, limits)
        walk = _walk(src, True, True, limits, set(_TAGS.values()))
        walk.oddities.append(f"Implicit VR encoding under {ts.name}")
    if isinstance(src, _InflateSource) and src.trailing_bytes:
        walk.oddities.append(f"{src.trailing_bytes} bytes after the deflate stream")
    values = _Values(walk, little)
    header = _header(values)
    _check_pixels(header, walk.pixel, values, ts)
    return ParsedDataset(
        header=header,
        pixel=walk.pixel,
        walked_bytes=src.position,
        elements=walk.elements,
        oddities=tuple(values.oddities),
    )
