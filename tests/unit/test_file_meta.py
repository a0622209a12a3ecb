"""The File Meta Information written before each received data set, without pydicom.

pydicom's own encoder (``write_file_meta_info`` over pynetdicom's
``create_file_meta``, what the node used before) is the reference: the bytes
must be identical for odd and even UID lengths, the longest UIDs and every
kind of transfer syntax, and pydicom must read the file back.
"""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)
from pynetdicom.dsutils import create_file_meta

from node.store.spool import file_meta_bytes

MR = "1.2.840.10008.5.1.4.1.1.4"  # 25 characters: odd
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"  # 27: odd
SEG = "1.2.840.10008.5.1.4.1.1.66.4"  # 28: even
UID_64 = "1.2." + "3" * 60
UID_63 = "1.2." + "3" * 59


def pydicom_bytes(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    meta = create_file_meta(
        sop_class_uid=UID(sop_class),
        sop_instance_uid=UID(sop_instance),
        transfer_syntax=UID(syntax),
    )
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)  # type: ignore[arg-type]
    return out.getvalue()


@pytest.mark.parametrize("sop_class", [MR, ENHANCED_MR, SEG])
@pytest.mark.parametrize("sop_instance", ["1.2.3", "1.2.34", UID_63, UID_64])
@pytest.mark.parametrize(
    "syntax",
    [
        ImplicitVRLittleEndian,  # 17 characters
        ExplicitVRLittleEndian,  # 19
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
        JPEGBaseline8Bit,  # 22
        JPEG2000Lossless,
        RLELossless,
    ],
)
def test_file_meta_is_byte_for_byte_what_pydicom_writes(
    sop_class: str, sop_instance: str, syntax: str
) -> None:
    assert file_meta_bytes(sop_class, sop_instance, syntax) == pydicom_bytes(
        sop_class, sop_instance, syntax
    )


def test_an_odd_implementation_version_is_padded_as_pydicom_pads_it() -> None:
    meta = create_file_meta(
        sop_class_uid=UID(MR),
        sop_instance_uid=UID("1.2.3"),
        transfer_syntax=UID(ExplicitVRLittleEndian),
        implementation_version="ODD",
    )
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)  # type: ignore[arg-type]
    mine = file_meta_bytes(MR, "1.2.3", ExplicitVRLittleEndian, implementation_version="ODD")
    assert mine == out.getvalue()


def test_pydicom_reads_the_file_meta_back() -> None:
    raw = file_meta_bytes(SEG, UID_63, JPEGBaseline8Bit)
    meta = dcmread(io.BytesIO(raw), force=True).file_meta
    assert (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
        meta.TransferSyntaxUID,
    ) == (SEG, UID_63, JPEGBaseline8Bit)
    assert meta.FileMetaInformationGroupLength == len(raw) - 128 - 4 - 12
