"""The few header values the index needs, decoded from a walked data set, and the pixel check.

:func:`node.store.reader.read_dataset` walks a received data set and keeps the
raw bytes of a handful of top-level attributes (:data:`TAGS`). They are
decoded here, not by pydicom's element machinery, so no library warning ever
prints an element value (patient data) to a log, and checked: the four UIDs
present, IS values within 32 bits, US values one value long, and Pixel Data
present for image objects and as long as Rows x Columns x Samples x
BitsAllocated x frames for native transfer syntaxes (encapsulated for
compressed ones).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.uid import UID
from pydicom.valuerep import PersonName

from node.dicom.status import CannotUnderstand, DataSetMismatch

#: IS values are signed 32-bit integers (PS3.5 6.2); the index stores them as such.
_IS_MIN, _IS_MAX = -(2**31), 2**31 - 1


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


#: The top-level attributes the walk keeps the raw bytes of (keyword -> tag).
TAGS = {
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


class HeaderValues:
    """Decoders for the collected raw values (never through pydicom's validators)."""

    def __init__(
        self, raw: dict[int, tuple[str | None, bytes]], oddities: list[str], little: bool
    ) -> None:
        self._raw = raw
        self._fmt = "<" if little else ">"
        self.oddities = oddities
        charset = self._ascii("SpecificCharacterSet")
        terms = [t.strip() for t in charset.split("\\")] if charset else None
        if terms and not all(t.isascii() and t.isprintable() for t in terms):
            # pydicom would warn with the raw term: keep control characters out of logs
            self.oddities.append("SpecificCharacterSet is not printable (default used)")
            terms = None
        self.encodings = convert_encodings(terms)

    def present(self, keyword: str) -> bool:
        return TAGS[keyword] in self._raw

    def _bytes(self, keyword: str) -> bytes | None:
        entry = self._raw.get(TAGS[keyword])
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


def decode_header(values: HeaderValues) -> Header:
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


def _needs_pixels(sop_class_uid: str, values: HeaderValues) -> bool:
    """Image objects carry pixels: by their SOP class name, or by Rows and Columns."""
    name = UID(sop_class_uid).name
    return "Image Storage" in name or (values.present("Rows") and values.present("Columns"))


def check_pixels(
    header: Header, pixel: PixelInfo | None, values: HeaderValues, transfer_syntax: UID
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
