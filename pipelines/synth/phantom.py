"""A small synthetic extremity MR series, written as real DICOM files.

This is the demo's stand-in study until the full synthetic sarcoma generator
(sequence contrasts, habitats, edema, cohort with outcomes) lands: an
elliptical limb cross-section with fat, muscle, bone and a bright lobulated
"tumour", deterministic per seed. Every file says it is synthetic.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

#: UID prefix for objects made by sarcnode's synthetic generators (2.25 = UUID-derived root).
SYNTH_PREFIX = "2.25."


def _volume(rng: np.random.Generator, size: int, slices: int) -> np.ndarray:
    """Intensities (T1-like) of a limb phantom: fat bright, muscle mid, tumour mid-high."""
    z, y, x = np.mgrid[0:slices, 0:size, 0:size].astype(np.float32)
    cy, cx = size / 2, size / 2
    r = np.hypot((y - cy) / (size * 0.42), (x - cx) / (size * 0.36))
    vol = np.zeros((slices, size, size), np.float32)
    vol[r < 1.0] = 900.0  # subcutaneous fat
    vol[r < 0.85] = 450.0  # muscle
    bone = np.hypot(y - cy * 1.05, x - cx * 0.95) < size * 0.07
    vol[bone] = 80.0  # cortical bone
    vol[np.hypot(y - cy * 1.05, x - cx * 0.95) < size * 0.045] = 700.0  # marrow
    tz, ty, tx = slices / 2, cy * 0.8, cx * 1.15
    lobes = 1 + 0.25 * np.sin(3 * np.arctan2(y - ty, x - tx)) * np.cos(z / 3)
    tumour = (
        np.sqrt(
            ((z - tz) * 5 / (size * 0.2)) ** 2
            + ((y - ty) / (size * 0.16)) ** 2
            + ((x - tx) / (size * 0.13)) ** 2
        )
        < lobes
    )
    vol[tumour & (r < 0.85)] = 620.0
    vol += rng.normal(0, 25, vol.shape).astype(np.float32)
    return np.clip(vol, 0, 4095)


def write_phantom_series(out: Path, *, seed: int = 0, size: int = 192, slices: int = 24) -> Path:
    """Write one axial T1-like series of the phantom into ``out``; return the folder."""
    rng = np.random.default_rng(seed)
    vol = _volume(rng, size, slices).astype(np.uint16)
    out.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(SYNTH_PREFIX), generate_uid(SYNTH_PREFIX)
    frame_uid = generate_uid(SYNTH_PREFIX)
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(SYNTH_PREFIX)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = f"SYNTHETIC^PHANTOM{seed:03d}"
        ds.PatientID = f"SYN{seed:05d}"
        ds.StudyDate = date.today().strftime("%Y%m%d")
        ds.StudyDescription = "SYNTHETIC sarcoma phantom - not a patient"
        ds.Modality = "MR"
        ds.Manufacturer = "sarcnode synthetic"
        ds.SeriesNumber = 1
        ds.SeriesDescription = "AX T1 SE (synthetic)"
        ds.ScanningSequence, ds.SequenceVariant = "SE", "NONE"
        ds.RepetitionTime, ds.EchoTime = 550.0, 12.0
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-size * 0.4, -size * 0.4, k * 5.0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = 5.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = vol[k].tobytes()
        ds.save_as(out / f"{k + 1:03d}.dcm", enforce_file_format=True)
    return out
