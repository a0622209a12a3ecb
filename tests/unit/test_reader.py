"""The bounded data set reader: what it accepts, what it refuses and with which status."""

from __future__ import annotations

import random
import struct
import tracemalloc
import zlib

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    generate_uid,
)

from node.dicom.status import CannotUnderstand, DataSetMismatch, DatasetTooLarge
from node.store.reader import MiB, ReadLimits, read_dataset
from tests.dicomgen import PATIENT_NAME, mr_dataset

ENCODINGS = {
    ExplicitVRLittleEndian: (False, True),
    ImplicitVRLittleEndian: (True, True),
    ExplicitVRBigEndian: (False, False),
}


def encode(ds: Dataset, ts: str = ExplicitVRLittleEndian) -> bytes:
    """``ds`` as the bytes of a C-STORE data set in ``ts`` (deflated when asked)."""
    implicit, little = ENCODINGS.get(ts, (False, True))
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = implicit, little
    write_dataset(buf, ds)
    raw = buf.getvalue()
    if ts == DeflatedExplicitVRLittleEndian:
        z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return z.compress(raw) + z.flush()
    return raw


def mr(**changes: object) -> Dataset:
    ds = mr_dataset(generate_uid(), generate_uid(), 4)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    "ts",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ],
)
def test_header_and_pixels_are_read_in_every_native_syntax(ts: str) -> None:
    ds = mr()
    parsed = read_dataset(encode(ds, ts), ts)
    h = parsed.header
    assert (h.sop_instance_uid, h.series_instance_uid) == (ds.SOPInstanceUID, ds.SeriesInstanceUID)
    assert (h.instance_number, h.series_number, h.modality) == (5, 3, "MR")
    assert h.patient_name == PATIENT_NAME
    assert parsed.pixel is not None and parsed.pixel.length == 64 * 64 * 2
    assert parsed.oddities == ()


def test_text_is_decoded_with_the_specific_character_set() -> None:
    ds = mr(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen")
    assert read_dataset(encode(ds), ExplicitVRLittleEndian).header.patient_name == "Müller^Jürgen"


def test_every_truncation_is_refused_as_cannot_understand() -> None:
    raw = encode(mr())
    offsets = [*sorted(random.Random(13).sample(range(len(raw)), 60)), 540, 541, len(raw) - 1]
    for cut in offsets:
        with pytest.raises(CannotUnderstand) as info:
            read_dataset(raw[:cut], ExplicitVRLittleEndian)
        assert info.value.status == 0xC000, cut
        assert "truncated" in info.value.reason or "no Pixel Data" in info.value.reason


def test_header_only_image_is_refused() -> None:
    ds = mr()
    del ds.PixelData
    with pytest.raises(CannotUnderstand, match="no Pixel Data"):
        read_dataset(encode(ds), ExplicitVRLittleEndian)


def test_pixel_data_shorter_than_its_geometry_is_a_mismatch() -> None:
    ds = mr()
    ds.PixelData = ds.PixelData[: 64 * 32 * 2]
    with pytest.raises(DataSetMismatch, match="needs 8192") as info:
        read_dataset(encode(ds), ExplicitVRLittleEndian)
    assert info.value.status == 0xA900
    ds = mr(NumberOfFrames=3)  # one frame of pixels for a header that says three
    with pytest.raises(DataSetMismatch, match="needs 24576"):
        read_dataset(encode(ds), ExplicitVRLittleEndian)


def test_encapsulated_pixels_need_a_fragment_per_frame() -> None:
    from pydicom.encaps import encapsulate

    ds = mr(NumberOfFrames=2)
    ds.PixelData = encapsulate([b"\xff\xd8 frame one \xff\xd9"])
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = False, True
    write_dataset(buf, ds)
    with pytest.raises(DataSetMismatch, match="1 fragments for 2 frames"):
        read_dataset(buf.getvalue(), JPEGLosslessSV1)
    ds.NumberOfFrames = 1
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = False, True
    write_dataset(buf, ds)
    parsed = read_dataset(buf.getvalue(), JPEGLosslessSV1)
    assert parsed.pixel is not None and (parsed.pixel.encapsulated, parsed.pixel.fragments) == (
        True,
        1,
    )
    with pytest.raises(DataSetMismatch, match="encapsulated"):
        read_dataset(buf.getvalue(), ExplicitVRLittleEndian)


def with_integer_string(raw: bytes, element: int, text: bytes) -> bytes:
    """``raw`` (explicit VR LE) with the IS element ``(0020,element)`` holding ``text``."""
    head = struct.pack("<HH", 0x0020, element) + b"IS"
    at = raw.index(head)
    (length,) = struct.unpack_from("<H", raw, at + 6)
    text += b" " * (len(text) % 2)
    return raw[:at] + head + struct.pack("<H", len(text)) + text + raw[at + 8 + length :]


@pytest.mark.parametrize(("keyword", "element"), [("InstanceNumber", 0x13), ("SeriesNumber", 0x11)])
def test_integer_strings_beyond_32_bits_are_refused_not_overflowing(
    keyword: str, element: int
) -> None:
    # IS allows 12 characters; hostile senders do not care
    raw = with_integer_string(encode(mr()), element, str(2**63).encode())
    with pytest.raises(DataSetMismatch, match=f"{keyword} 9223372036854775808 is outside"):
        read_dataset(raw, ExplicitVRLittleEndian)


def test_unreadable_instance_number_is_tolerated_and_noted() -> None:
    raw = with_integer_string(encode(mr()), 0x13, b"abc")
    parsed = read_dataset(raw, ExplicitVRLittleEndian)
    assert parsed.header.instance_number is None
    assert parsed.oddities == ("InstanceNumber is not a number",)


def nested(depth: int, *, undefined: bool) -> bytes:
    """A Referenced Image Sequence nested ``depth`` times, hand-encoded (explicit VR LE)."""
    body = struct.pack("<HH2sH", 0x0008, 0x0060, b"CS", 2) + b"CT"
    for _ in range(depth):
        if undefined:
            item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + body
            item += struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
            body = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF) + item
            body += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        else:
            item = struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body
            body = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, len(item)) + item
    return body


@pytest.mark.parametrize("undefined", [True, False])
def test_deep_nesting_is_refused_without_recursion(undefined: bool) -> None:
    head = encode(mr())
    with pytest.raises(CannotUnderstand, match="deeper than 32 levels"):
        read_dataset(nested(5000, undefined=undefined) + head, ExplicitVRLittleEndian)
    parsed = read_dataset(nested(20, undefined=undefined) + head, ExplicitVRLittleEndian)
    assert parsed.header.modality == "MR"  # the nested Modality is not the top-level one


def test_length_overrunning_its_item_is_corrupt() -> None:
    body = nested(2, undefined=False)
    bad = bytearray(body)
    struct.pack_into("<L", bad, 8, len(body))  # the outer sequence claims more than there is
    with pytest.raises(CannotUnderstand):
        read_dataset(bytes(bad) + encode(mr()), ExplicitVRLittleEndian)


def test_corrupt_deflate_stream_cannot_be_understood() -> None:
    deflated = bytearray(encode(mr(), DeflatedExplicitVRLittleEndian))
    deflated[10:40] = b"\xff" * 30
    with pytest.raises(CannotUnderstand, match=r"inflated|truncated|corrupt"):
        read_dataset(bytes(deflated), DeflatedExplicitVRLittleEndian)
    good = encode(mr(), DeflatedExplicitVRLittleEndian)
    with pytest.raises(CannotUnderstand, match="does not end"):
        read_dataset(good[: len(good) // 2], DeflatedExplicitVRLittleEndian)


def deflate_bomb(inflated: int) -> bytes:
    """An MR header followed by ``inflated`` bytes of zero Pixel Data, deflated."""
    ds = mr()
    del ds.PixelData
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [z.compress(encode(ds) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, inflated))]
    zeros = bytes(MiB)
    parts += [z.compress(zeros) for _ in range(inflated // MiB)]
    return b"".join(parts) + z.flush()


def test_deflate_bomb_is_refused_early_in_little_memory() -> None:
    bomb = deflate_bomb(256 * MiB)
    assert len(bomb) < 300 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(DatasetTooLarge, match="over the 100:1 cap") as info:
            read_dataset(bomb, DeflatedExplicitVRLittleEndian)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.status == 0xA700
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB"
    with pytest.raises(DatasetTooLarge, match="inflates past the 64 MiB cap"):
        read_dataset(
            bomb,
            DeflatedExplicitVRLittleEndian,
            ReadLimits(max_dataset_bytes=64 * MiB, max_inflate_ratio=5000),
        )


def test_data_set_over_the_size_cap_is_refused_before_reading() -> None:
    with pytest.raises(DatasetTooLarge, match="over the 1 MiB cap"):
        read_dataset(bytes(2 * MiB), ExplicitVRLittleEndian, ReadLimits(max_dataset_bytes=MiB))


def test_implicit_vr_under_an_explicit_syntax_is_read_and_noted() -> None:
    parsed = read_dataset(encode(mr(), ImplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert parsed.header.modality == "MR"
    assert parsed.oddities == ("Implicit VR encoding under Explicit VR Little Endian",)


def test_missing_uids_are_named() -> None:
    ds = mr()
    del ds.SeriesInstanceUID
    with pytest.raises(CannotUnderstand, match="no SeriesInstanceUID"):
        read_dataset(encode(ds), ExplicitVRLittleEndian)
