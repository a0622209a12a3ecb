"""Small synthetic MR instances for tests (real DICOM files, made with pydicom)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

PATIENT_NAME = "Testpatient^Hidden"
PATIENT_ID = "PHI-ID-7731"


def mr_dataset(
    study_uid: str,
    series_uid: str,
    index: int,
    *,
    sop_uid: str | None = None,
    size: int = 64,
) -> Dataset:
    """One MR slice with a complete enough header for the node and the pipelines."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19600101"
    ds.Modality = "MR"
    ds.SeriesNumber = 3
    ds.SeriesDescription = "AX T2 FS"
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(index) * 5.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.8, 0.8]
    ds.SliceThickness = 5.0
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(index)
    ds.PixelData = rng.integers(0, 4095, (size, size), dtype=np.uint16).tobytes()
    return ds


def write_series(folder: Path, n: int, *, size: int = 64) -> list[Dataset]:
    """Write ``n`` slices of one new study/series into ``folder``; return the datasets."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = mr_dataset(study, series, i, size=size)
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)
        out.append(ds)
    return out
