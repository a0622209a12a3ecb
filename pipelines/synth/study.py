"""Render a synthetic sarcoma study: paired T1 and FS-T2 DICOM series plus NIfTI truth.

Contrasts follow the sequences: on T1 fat and marrow are bright, muscle and
tumour intermediate, subacute haemorrhage bright; on fat-suppressed T2 fat and
marrow are dark, tumour bright, necrosis (fluid) brighter, edema bright. Each
series has its own matrix, pixel spacing and 4-6 mm slices (partial volume
from three sub-planes), a smooth bias field, Rician noise, vendor tags, and a
small patient motion between the two series (registration has work to do).
Everything, UIDs included, is deterministic per seed. Every object says
"SYNTHETIC" and "not for clinical use".

A follow-up (``follow_up_days`` > 0) is a later study of the same synthetic
patient: same PatientID, anatomy and scanner, new Study, Series, Frame of
Reference and SOP Instance UIDs, a StudyDate that many days later, and the
tumour's nominal volume scaled by ``1 + volume_change_pct / 100`` (every
radius by its cube root, so the lobulated shape keeps its form). The truth
masks are written beside it as for a baseline, and ``truth.json`` records the
volume measured on them, the ground truth a comparison is checked against.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from pipelines.synth import anatomy as anat

#: Signal per label (index = label) for each sequence, arbitrary units.
CONTRAST = {
    #         air skin fat  musc cort marrow vessel viable necro haem edema
    "T1": [0, 520, 1000, 430, 40, 940, 180, 410, 300, 880, 390],
    "T2FS": [0, 260, 110, 230, 30, 140, 120, 780, 1080, 560, 690],
}
VENDORS = [
    ("SIEMENS", "Avanto", 1.5, {"T1": "t1_tse_tra", "T2FS": "t2_tse_fs_tra"}),
    ("GE MEDICAL SYSTEMS", "Signa HDxt", 1.5, {"T1": "AX T1 FSE", "T2FS": "AX T2 FSE FS"}),
    ("Philips", "Ingenia", 3.0, {"T1": "T1W_TSE_TRA", "T2FS": "T2W_SPAIR_TRA"}),
]
NOT_CLINICAL = "SYNTHETIC - not for clinical use"
#: The baseline study's date; a follow-up is ``follow_up_days`` after it.
BASELINE_DATE = date(2026, 1, 1)


@dataclass(frozen=True)
class Visit:
    """Which study of the synthetic patient is written: 0 days is the baseline."""

    days: int = 0

    def __post_init__(self) -> None:
        if self.days < 0:
            raise ValueError(f"follow-up days must be >= 0, got {self.days}")

    def uid(self, seed: int, *parts: object) -> UID:
        """A deterministic UID of this visit (the baseline keeps its historical UIDs)."""
        return _uid(seed, *parts) if self.days == 0 else _uid(seed, "follow-up", self.days, *parts)

    @property
    def study_date(self) -> str:
        """StudyDate (DA) of this visit."""
        return (BASELINE_DATE + timedelta(days=self.days)).strftime("%Y%m%d")


@dataclass(frozen=True)
class SeriesSpec:
    """How one series is acquired."""

    role: str
    matrix: int
    pixel_mm: float
    slice_mm: float
    n_slices: int
    z0_mm: float
    tr_ms: float
    te_ms: float
    shift_mm: tuple[float, float, float]  # patient motion applied to the anatomy


def _specs(rng: np.random.Generator, limb: anat.Limb) -> list[SeriesSpec]:
    extent = 2 * max(limb.outer) + 20
    span = limb.traits.radius_mm * limb.axes[2] * 2 + 2 * limb.traits.edema_mm + 50
    out = []
    for role in ("T1", "T2FS"):
        matrix = int(rng.choice([256, 320, 384]))
        slice_mm = float(rng.choice([4.0, 5.0, 6.0]))
        n = int(np.clip(np.ceil(span / slice_mm), 16, 40))
        shift = (0.0, 0.0, 0.0) if role == "T1" else tuple(float(v) for v in rng.normal(0, 1.5, 3))
        out.append(
            SeriesSpec(
                role=role,
                matrix=matrix,
                pixel_mm=round(extent / matrix, 4),
                slice_mm=slice_mm,
                n_slices=n,
                z0_mm=float(limb.centre[2] - (n - 1) * slice_mm / 2 + rng.uniform(-3, 3)),
                tr_ms=float(rng.uniform(450, 700) if role == "T1" else rng.uniform(3000, 5000)),
                te_ms=float(rng.uniform(8, 15) if role == "T1" else rng.uniform(60, 100)),
                shift_mm=shift,  # type: ignore[arg-type]
            )
        )
    return out


def _grid(spec: SeriesSpec) -> sitk.Image:
    """An empty image with the series' geometry (axial, LPS, identity direction)."""
    image = sitk.Image(spec.matrix, spec.matrix, spec.n_slices, sitk.sitkFloat32)
    half = (spec.matrix - 1) * spec.pixel_mm / 2
    image.SetOrigin((-half, -half, spec.z0_mm))
    image.SetSpacing((spec.pixel_mm, spec.pixel_mm, spec.slice_mm))
    return image


def render(
    limb: anat.Limb, spec: SeriesSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(signal as float32 (z, y, x), labels as uint8 (z, y, x)) on the series grid."""
    half = (spec.matrix - 1) * spec.pixel_mm / 2
    axis = np.linspace(-half, half, spec.matrix, dtype=np.float32)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    sx, sy, sz = spec.shift_mm
    table = np.asarray(CONTRAST[spec.role], np.float32)
    signal = np.zeros((spec.n_slices, spec.matrix, spec.matrix), np.float32)
    labels = np.zeros_like(signal, dtype=np.uint8)
    for k in range(spec.n_slices):
        z = spec.z0_mm + k * spec.slice_mm
        acc = np.zeros_like(xx)
        for frac in (-1 / 3, 0.0, 1 / 3):  # partial volume across the slice
            zz = np.full_like(xx, z + frac * spec.slice_mm)
            lab = limb.labels(xx - sx, yy - sy, zz - sz)
            value = table[lab]
            tumour = np.isin(lab, anat.TUMOUR_LABELS)
            value[tumour] *= limb.texture_at(xx[tumour] - sx, yy[tumour] - sy, zz[tumour] - sz)
            acc += value / 3
            if frac == 0.0:
                labels[k] = lab
        signal[k] = acc
    # Smooth receive-coil bias field and Rician noise.
    gx, gy = rng.normal(0, 0.15, 2)
    zz3 = np.linspace(-1, 1, spec.n_slices, dtype=np.float32)[:, None, None]
    bias = 1 + gx * xx / half + gy * yy / half + 0.1 * rng.normal() * (xx**2 + yy**2) / half**2
    signal *= bias[None] * (1 + 0.05 * zz3)
    sigma = 0.025 * 1000
    noisy = np.sqrt(
        (signal + rng.normal(0, sigma, signal.shape)) ** 2 + rng.normal(0, sigma, signal.shape) ** 2
    )
    return noisy.astype(np.float32), labels


def _uid(seed: int, *parts: object) -> UID:
    """A UID derived from the seed and ``parts`` (2.25 root): re-runs give the same UIDs."""
    return UID(generate_uid(entropy_srcs=["sarcnode-synth", str(seed), *map(str, parts)]))


def _write_dicom(
    folder: Path,
    signal: np.ndarray,
    spec: SeriesSpec,
    seed: int,
    case_id: str,
    vendor: tuple[str, str, float, dict[str, str]],
    visit: Visit,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    manufacturer, model, field, names = vendor
    pixels = np.clip(signal * 3.0, 0, 4095).astype(np.uint16)
    half = (spec.matrix - 1) * spec.pixel_mm / 2
    for k in range(spec.n_slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = visit.uid(seed, spec.role, k)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = visit.uid(seed, "study")
        ds.SeriesInstanceUID = visit.uid(seed, spec.role)
        ds.FrameOfReferenceUID = visit.uid(seed, "frame")
        ds.PatientName = f"SYNTHETIC^{case_id}"
        ds.PatientID = case_id
        ds.PatientSex = "O"
        ds.StudyDate, ds.StudyTime = visit.study_date, "120000"
        ds.AccessionNumber = f"SYN{(seed + 7919 * visit.days) % 10**8:08d}"
        ds.StudyDescription = f"MR extremity {NOT_CLINICAL}"
        ds.ImageComments = NOT_CLINICAL
        ds.Modality = "MR"
        ds.Manufacturer, ds.ManufacturerModelName = manufacturer, model
        ds.MagneticFieldStrength = field
        ds.SeriesNumber = 2 if spec.role == "T1" else 3
        ds.SeriesDescription = names[spec.role]
        ds.ScanningSequence, ds.SequenceVariant = "SE", ["SK", "SP"]
        ds.ScanOptions = "FS" if spec.role == "T2FS" else ""
        ds.RepetitionTime, ds.EchoTime = round(spec.tr_ms, 1), round(spec.te_ms, 1)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-half, -half, round(spec.z0_mm + k * spec.slice_mm, 4)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spec.pixel_mm, spec.pixel_mm]
        ds.SliceThickness = spec.slice_mm
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.Rows = ds.Columns = spec.matrix
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels[k].tobytes()
        ds.save_as(folder / f"{k + 1:03d}.dcm", enforce_file_format=True)


def _write_mask(path: Path, array: np.ndarray, spec: SeriesSpec) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(_grid(spec))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def _mask_volume_ml(array: np.ndarray, spec: SeriesSpec) -> float:
    """Volume of a boolean mask on ``spec``'s grid, in ml."""
    return float(array.sum()) * spec.pixel_mm**2 * spec.slice_mm / 1000.0


def grown(traits: anat.Traits, volume_change_pct: float) -> anat.Traits:
    """``traits`` with the tumour's nominal volume scaled by ``1 + volume_change_pct / 100``.

    Raises
    ------
    ValueError
        When the change leaves no tumour (``volume_change_pct <= -100``).
    """
    if volume_change_pct <= -100:
        raise ValueError(f"volume change must be > -100 %, got {volume_change_pct}")
    factor = float(np.cbrt(1 + volume_change_pct / 100))
    return replace(traits, radius_mm=traits.radius_mm * factor)


def write_study(
    out: Path,
    seed: int,
    traits: anat.Traits | None = None,
    *,
    follow_up_days: int = 0,
    volume_change_pct: float = 0.0,
) -> dict[str, object]:
    """Write one synthetic study under ``out``; return its truth (also ``truth.json``).

    Layout: ``dicom/T1/*.dcm``, ``dicom/T2FS/*.dcm``, and per role
    ``masks/<role>_tumour.nii.gz``, ``_edema.nii.gz``, ``_habitats.nii.gz``
    (1 viable, 2 necrosis, 3 haemorrhage) on that series' own grid. With
    ``follow_up_days`` > 0 the study is that patient's later study with the
    tumour volume changed by ``volume_change_pct`` (see the module docstring).
    """
    visit = Visit(follow_up_days)
    rng = np.random.default_rng(seed)
    drawn = anat.draw_traits(rng)  # always drawn, so later draws do not depend on ``traits``
    traits = traits or drawn
    if volume_change_pct:
        traits = grown(traits, volume_change_pct)
    # The anatomy's draws do not depend on the tumour's size: the same limb at each visit.
    limb = anat.Limb(traits, np.random.default_rng([seed, 1]))
    vendor = VENDORS[int(rng.integers(len(VENDORS)))]
    case_id = f"SYN{seed:06d}"
    specs = _specs(rng, limb)
    measured: dict[str, float] = {}
    for spec in specs:
        noise = [seed, 2, len(spec.role)] + ([visit.days] if visit.days else [])
        signal, labels = render(limb, spec, np.random.default_rng(noise))
        _write_dicom(out / "dicom" / spec.role, signal, spec, seed, case_id, vendor, visit)
        tumour = np.isin(labels, anat.TUMOUR_LABELS)
        measured[spec.role] = round(_mask_volume_ml(tumour, spec), 3)
        habitats = np.select(
            [labels == anat.VIABLE, labels == anat.NECROSIS, labels == anat.HAEMORRHAGE],
            [1, 2, 3],
            0,
        )
        _write_mask(out / "masks" / f"{spec.role}_tumour.nii.gz", tumour, spec)
        _write_mask(out / "masks" / f"{spec.role}_edema.nii.gz", labels == anat.EDEMA, spec)
        _write_mask(out / "masks" / f"{spec.role}_habitats.nii.gz", habitats, spec)
    truth: dict[str, object] = {
        "case_id": case_id,
        "seed": seed,
        "study_instance_uid": str(visit.uid(seed, "study")),
        "study_date": visit.study_date,
        "follow_up_days": visit.days,
        "volume_change_pct": volume_change_pct,
        "tumour_volume_ml": measured,
        "traits": asdict(traits),
        "manufacturer": vendor[0],
        "series": [asdict(s) for s in specs],
        "note": NOT_CLINICAL,
    }
    (out / "truth.json").write_text(json.dumps(truth, indent=2))
    return truth
