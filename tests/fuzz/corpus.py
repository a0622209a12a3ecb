"""Base material for the fuzz: data sets as lists of top-level elements, refilled per input.

A :class:`Template` is one data set (synthetic, a real MR file, or one of
pydicom's odd test files) split into its top-level elements. Each input gets
a :meth:`Template.fresh` copy: new Study, Series and SOP Instance UIDs and new
patient-module values (PHI tokens the log is later searched for), written over
the old values at the same length, so an odd file keeps every oddity it has.
Mutations then work on the element list (:class:`Element`) and
:meth:`Instance.encode` writes it back in the template's transfer syntax.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from random import Random
from typing import BinaryIO, cast

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EncapsulatedPDFStorage,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    RTPlanStorage,
)

from node.config import DEFAULT_TRANSFER_SYNTAXES

MR_FAMILY = frozenset(
    {MRImageStorage, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage}
)
#: Not accepted by the node (proposed anyway, so a case can send on a rejected context).
FOREIGN_CLASSES = (CTImageStorage, EncapsulatedPDFStorage, RTPlanStorage)
NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
ACCEPTED_SYNTAXES = frozenset(DEFAULT_TRANSFER_SYNTAXES)

LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
SHORT_VRS = b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split()
ALL_VRS = (*SHORT_VRS, *sorted(LONG_VRS))

TAG_SOP_CLASS = 0x00080016
TAG_SOP_INSTANCE = 0x00080018
TAG_STUDY = 0x0020000D
TAG_SERIES = 0x0020000E
TAG_PIXEL_DATA = 0x7FE00010
UID_TAGS = (TAG_SOP_INSTANCE, TAG_STUDY, TAG_SERIES)

#: Patient-module elements planted with PHI tokens: tag -> (VR, keyword, length in templates).
PATIENT_ELEMENTS: dict[int, tuple[str, str, int]] = {
    0x00100010: ("PN", "PatientName", 24),
    0x00100020: ("LO", "PatientID", 14),
    0x00100021: ("LO", "IssuerOfPatientID", 12),
    0x00100030: ("DA", "PatientBirthDate", 8),
    0x00101000: ("LO", "OtherPatientIDs", 16),
    0x00101001: ("PN", "OtherPatientNames", 22),
    0x00101005: ("PN", "PatientBirthName", 20),
    0x00101040: ("LO", "PatientAddress", 32),
    0x00101060: ("PN", "PatientMotherBirthName", 22),
    0x00102154: ("SH", "PatientTelephoneNumbers", 14),
    0x00102160: ("SH", "EthnicGroup", 12),
    0x00104000: ("LT", "PatientComments", 40),
}
#: Every planted text value starts with this marker (A-Z and 2-7 follow), so a
#: log line that holds any part of one is found by one pattern.
MARKER = "ZQ"
_TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


# -- elements ------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How elements are encoded: Implicit or Explicit VR, little or big endian."""

    implicit: bool
    little: bool

    @property
    def fmt(self) -> str:
        """The struct byte order prefix."""
        return "<" if self.little else ">"

    @classmethod
    def of(cls, syntax: str) -> Layout:
        """The layout of the data set bytes (inflated) under ``syntax``."""
        return cls(implicit=syntax == ImplicitVRLittleEndian, little=syntax != ExplicitVRBigEndian)


@dataclass(frozen=True)
class Element:
    """One encoded top-level element: its header and its value bytes."""

    tag: int
    vr: bytes | None
    header: bytes
    value: bytes

    @property
    def raw(self) -> bytes:
        """Header and value."""
        return self.header + self.value


def element_header(tag: int, vr: bytes | None, length: int, layout: Layout) -> bytes:
    """The header of ``tag`` with ``vr`` (ignored for Implicit VR) and ``length``."""
    f = layout.fmt
    start = struct.pack(f + "HH", tag >> 16, tag & 0xFFFF)
    if layout.implicit or vr is None:
        return start + struct.pack(f + "L", length & 0xFFFFFFFF)
    if vr in LONG_VRS:
        return start + vr + b"\0\0" + struct.pack(f + "L", length & 0xFFFFFFFF)
    return start + vr + struct.pack(f + "H", length & 0xFFFF)


def make_element(tag: int, vr: bytes, value: bytes, layout: Layout) -> Element:
    """A consistent element (its length is its value's)."""
    return Element(
        tag, None if layout.implicit else vr, element_header(tag, vr, len(value), layout), value
    )


def with_length(el: Element, length: int, layout: Layout) -> Element:
    """``el`` with its length field set to ``length`` (value unchanged)."""
    return replace(el, header=element_header(el.tag, el.vr, length, layout))


def split_elements(raw: bytes, layout: Layout) -> list[Element]:
    """The top-level elements of a well-formed data set (pydicom finds where each ends)."""
    fp = DicomBytesIO(raw)
    fp.is_little_endian, fp.is_implicit_VR = layout.little, layout.implicit
    out: list[Element] = []
    start = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        elements = data_element_generator(
            cast(BinaryIO, fp), layout.implicit, layout.little, defer_size=None
        )
        for _ in elements:
            end = fp.tell()
            chunk = raw[start:end]
            (group, elem) = struct.unpack(layout.fmt + "HH", chunk[:4])
            tag = group << 16 | elem
            if layout.implicit:
                vr, head = None, 8
            else:
                vr = chunk[4:6]
                head = 12 if vr in LONG_VRS else 8
            out.append(Element(tag, vr, chunk[:head], chunk[head:]))
            start = end
    if start != len(raw):
        raise ValueError(f"{len(raw) - start} bytes after the last element")
    return out


def set_element(elements: list[Element], el: Element) -> list[Element]:
    """``elements`` with ``el`` replacing the element of its tag, or inserted in tag order."""
    out = [e for e in elements if e.tag != el.tag]
    at = next((i for i, e in enumerate(out) if e.tag > el.tag), len(out))
    out.insert(at, el)
    return out


def find(elements: Iterable[Element], tag: int) -> Element | None:
    """The element with ``tag``, if present."""
    return next((e for e in elements if e.tag == tag), None)


def encode_elements(elements: Iterable[Element]) -> bytes:
    """The data set bytes (not deflated)."""
    return b"".join(e.raw for e in elements)


def deflate(raw: bytes) -> bytes:
    """Raw deflate (PS3.5 A.5: no zlib header)."""
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return z.compress(raw) + z.flush()


def encode_dataset(ds: Dataset, syntax: str) -> bytes:
    """``ds`` written in ``syntax`` (inflated bytes for the deflated syntax)."""
    layout = Layout.of(syntax)
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = layout.implicit, layout.little
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dataset(buf, ds)
    return buf.getvalue()


# -- fresh values ----------------------------------------------------------------------


def new_uid(rng: Random, length: int) -> str:
    """A valid UID of exactly ``length`` characters (so it fits where another was)."""
    if length < 8:
        return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(length - 1))
    body = length - 5
    return (
        "2.25." + str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(body - 1))
    )


def random_uid(rng: Random) -> str:
    """A valid UID under 2.25 (about 40 characters)."""
    return new_uid(rng, rng.randint(30, 44))


def token(rng: Random, length: int) -> str:
    """A PHI token: the marker then ``length - 2`` characters of A-Z and 2-7."""
    return MARKER + "".join(rng.choice(_TOKEN_CHARS) for _ in range(max(2, length - 2)))


def birth_date(rng: Random) -> str:
    """A plausible birth date (YYYYMMDD)."""
    return f"{rng.randint(1920, 2015)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"


def phi_value(rng: Random, vr: str, length: int) -> tuple[str, list[str]]:
    """A patient value of ``vr`` exactly ``length`` characters long and the tokens in it."""
    if vr == "DA" and length >= 8:
        date = birth_date(rng)
        return date.ljust(length), [date]
    if vr == "PN" and length >= 10:
        first = (length - 1) // 2
        family, given = token(rng, first), token(rng, length - 1 - first)
        return f"{family}^{given}", [family, given]
    if length < 6:
        return " " * length, []  # too short to search a log for
    value = token(rng, length)
    return value, [value]


# -- templates and instances ------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A data set to derive inputs from (see the module docstring)."""

    name: str
    sop_class: str
    syntax: str
    elements: tuple[Element, ...]

    @property
    def layout(self) -> Layout:
        """Layout of the (inflated) element bytes."""
        return Layout.of(self.syntax)

    @property
    def deflated(self) -> bool:
        """Whether :meth:`Instance.encode` deflates."""
        return self.syntax == DeflatedExplicitVRLittleEndian

    def fresh(self, rng: Random) -> Instance:
        """A copy with new UIDs and new PHI tokens, each at the length of the old value."""
        uids: dict[int, str] = {}
        tokens: list[str] = []
        out: list[Element] = []
        for el in self.elements:
            if el.tag in UID_TAGS and len(el.value) >= 2:
                text = el.value.rstrip(b"\0 ")
                uid = new_uid(rng, len(text))
                uids[el.tag] = uid
                out.append(replace(el, value=uid.encode() + el.value[len(text) :]))
            elif el.tag in PATIENT_ELEMENTS and el.value:
                value, planted = phi_value(rng, PATIENT_ELEMENTS[el.tag][0], len(el.value))
                tokens += planted
                out.append(replace(el, value=value.encode("ascii")))
            else:
                out.append(el)
        return Instance(self, out, uids.get(TAG_SOP_INSTANCE, ""), tokens, uids)


@dataclass
class Instance:
    """A fresh copy of a template: its elements (mutable), SOP Instance UID and tokens."""

    template: Template
    elements: list[Element]
    sop_instance: str
    tokens: list[str]
    uids: dict[int, str] = field(default_factory=dict)

    @property
    def layout(self) -> Layout:
        """The template's layout."""
        return self.template.layout

    def set(self, tag: int, vr: str, value: bytes) -> None:
        """Set (or insert) a top-level element to ``value`` as it is (no padding added)."""
        self.elements = set_element(
            self.elements, make_element(tag, vr.encode(), value, self.layout)
        )

    def inflated(self) -> bytes:
        """The data set bytes before any deflate."""
        return encode_elements(self.elements)

    def encode(self) -> bytes:
        """The data set bytes as sent (deflated for a deflated template)."""
        raw = self.inflated()
        return deflate(raw) if self.template.deflated else raw


def template_of(name: str, raw: bytes, syntax: str, sop_class: str) -> Template:
    """A template from the (inflated) data set bytes ``raw`` in ``syntax``."""
    return Template(name, sop_class, syntax, tuple(split_elements(raw, Layout.of(syntax))))


def _plant_placeholders(ds: Dataset) -> None:
    """Patient-module values of template lengths (refilled by :meth:`Template.fresh`)."""
    for tag, (vr, keyword, length) in PATIENT_ELEMENTS.items():
        value = "19000101" if vr == "DA" else "X" * length
        ds.add_new(tag, vr, value)
        del keyword


def synthetic_mr(rng_seed: int = 0, size: int = 64, frames: int = 1) -> Dataset:
    """A small MR image with placeholder UIDs and patient values."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = "2.25." + "1" * 38
    ds.StudyDate = "20260101"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "MR"
    ds.StudyDescription = "MR THIGH"
    ds.SeriesDescription = "AX T2 FS"
    _plant_placeholders(ds)
    ds.StudyInstanceUID = "2.25." + "2" * 38
    ds.SeriesInstanceUID = "2.25." + "3" * 38
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.8, 0.8]
    ds.SliceThickness = 5.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    pixels = np.random.default_rng(rng_seed).integers(
        0, 4095, (frames, size, size), dtype=np.uint16
    )
    ds.PixelData = pixels.tobytes()
    return ds


def synthetic_foreign(sop_class: str) -> Dataset:
    """A small CT image, Encapsulated PDF or RT Plan (objects that must not enter an MR series)."""
    ds = synthetic_mr()
    ds.SOPClassUID = sop_class
    if sop_class == CTImageStorage:
        ds.Modality = "CT"
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        return ds
    for keyword in (
        "PixelData",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
    ):
        delattr(ds, keyword)
    if sop_class == EncapsulatedPDFStorage:
        ds.Modality = "DOC"
        ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        ds.DocumentTitle = "REPORT"
        ds.EncapsulatedDocument = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    else:
        ds.Modality = "RTPLAN"
        ds.RTPlanLabel = "PLAN1"
        ds.RTPlanGeometry = "PATIENT"
    return ds


# -- files --------------------------------------------------------------------------------


def split_meta(data: bytes) -> tuple[str | None, str | None, bytes]:
    """(transfer syntax, media SOP class, data set bytes) of a Part 10 file (or a bare data set)."""
    pos = 132 if data[128:132] == b"DICM" else 0
    syntax = sop_class = None
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        (elem,) = struct.unpack_from("<H", data, pos + 2)
        vr = data[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<L", data, pos + 8)
            head = 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            head = 8
        value = data[pos + head : pos + head + length].decode("ascii", "replace").strip("\0 ")
        if elem == 0x0010:
            syntax = value
        elif elem == 0x0002:
            sop_class = value
        pos += head + length
    return syntax, sop_class, data[pos:]


@dataclass(frozen=True)
class OddFile:
    """A test file sent as it is (re-UIDed through its template when it splits cleanly)."""

    name: str
    syntax: str
    sop_class: str | None
    raw: bytes
    template: Template | None


def load_odd_file(path: Path) -> OddFile | None:
    """An :class:`OddFile` for ``path``; None when its transfer syntax cannot be sent."""
    data = path.read_bytes()
    syntax, media_class, raw = split_meta(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        except Exception:  # an odd file indeed: sent without knowing more
            ds = None
        if syntax is None and ds is not None:
            implicit, little = ds.original_encoding
            if implicit is None:
                return None
            syntax = (
                ImplicitVRLittleEndian
                if implicit
                else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
            )
        sop_class = media_class
        if ds is not None:
            try:
                sop_class = str(ds.get("SOPClassUID", "") or "") or media_class
            except Exception:
                sop_class = media_class
    if syntax is None or syntax not in ACCEPTED_SYNTAXES or not raw:
        return None
    inflated = raw
    if syntax == DeflatedExplicitVRLittleEndian:
        try:
            inflated = zlib.decompress(raw, -zlib.MAX_WBITS)
        except zlib.error:
            return OddFile(path.name, syntax, sop_class, raw, None)
    try:
        template: Template | None = template_of(path.name, inflated, syntax, sop_class or "")
    except Exception:  # does not split: sent as it is
        template = None
    return OddFile(path.name, syntax, sop_class, raw, template)


@dataclass
class Corpus:
    """Everything the generators derive inputs from; loaded once per campaign."""

    #: Well-formed MR templates: synthetic in every native syntax and deflated, real files.
    mr: list[Template]
    #: The synthetic MR templates only (small: the classes that send many inputs).
    synthetic: list[Template]
    foreign: dict[str, Template]
    odd: list[OddFile]
    #: Deflated zero Pixel Data per inflated size (cached: a bomb's tail).
    _bomb_tails: dict[int, bytes] = field(default_factory=dict)

    @classmethod
    def load(cls, shared_dicom: Path | None) -> Corpus:
        """Synthetic templates, real MR files under ``shared_dicom``, pydicom's test files."""
        synthetic = []
        for syntax in (*NATIVE_SYNTAXES, DeflatedExplicitVRLittleEndian):
            ds = synthetic_mr()
            synthetic.append(
                template_of(
                    f"synthetic {syntax}", encode_dataset(ds, syntax), syntax, MRImageStorage
                )
            )
        multi = synthetic_mr(1, size=32, frames=3)
        synthetic.append(
            template_of(
                "synthetic 3-frame",
                encode_dataset(multi, ExplicitVRLittleEndian),
                ExplicitVRLittleEndian,
                MRImageStorage,
            )
        )
        mr = list(synthetic)
        odd: list[OddFile] = []
        if shared_dicom is not None and shared_dicom.is_dir():
            for path in sorted(shared_dicom.rglob("*.dcm")):
                odd_file = load_odd_file(path)
                if odd_file is None:
                    continue
                if (
                    odd_file.template is not None
                    and odd_file.sop_class in MR_FAMILY
                    and "short" not in path.name
                ):
                    mr.append(odd_file.template)
                else:
                    odd.append(odd_file)
        odd += pydicom_test_files()
        foreign = {
            str(c): template_of(
                f"synthetic {c}",
                encode_dataset(synthetic_foreign(c), ExplicitVRLittleEndian),
                ExplicitVRLittleEndian,
                c,
            )
            for c in FOREIGN_CLASSES
        }
        return cls(mr=mr, synthetic=synthetic, foreign=foreign, odd=odd)

    def bomb_tail(self, inflated: int) -> bytes:
        """A final deflate stream of ``inflated`` zero bytes (to follow a sync-flushed head)."""
        if inflated not in self._bomb_tails:
            z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
            chunk = bytes(1 << 20)
            parts = [z.compress(chunk) for _ in range(inflated >> 20)]
            parts.append(z.compress(bytes(inflated & ((1 << 20) - 1))))
            self._bomb_tails[inflated] = b"".join(parts) + z.flush()
        return self._bomb_tails[inflated]


def pydicom_test_files() -> list[OddFile]:
    """pydicom's odd test files (truncated, bad VR, no meta, deflated...), when installed."""
    try:
        from pydicom.data import get_testdata_file  # noqa: F401
    except ImportError:
        return []
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    out = []
    for path in sorted(folder.glob("*.dcm")):
        odd = load_odd_file(path)
        if odd is not None:
            out.append(odd)
    return out
