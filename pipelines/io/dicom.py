"""DICOM folders to series, and series to SimpleITK volumes, refusing bad geometry.

:func:`scan` reads only headers (any nesting, any file name; non-DICOM files
and non-image objects such as RTSTRUCT, SR or SEG are set aside) and groups
image instances into studies and series. :func:`load_series` builds one
SimpleITK image per series, slices ordered by their position along the slice
normal, and refuses — with a :class:`GeometryError` naming the series — what
would give a wrong mask: mixed orientations or matrix sizes, duplicate,
missing or non-uniformly spaced slices, too few slices, no pixel data.
Enhanced (multi-frame) MR is split into its frames by the per-frame plane
positions. Compressed transfer syntaxes decode through pydicom's pixel
handlers (pylibjpeg plugins).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pipelines.errors import GeometryError as GeometryError  # bad input: see pipelines.errors

#: SOP classes loaded as image volumes; everything else is set aside.
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4": "MR",
    "1.2.840.10008.5.1.4.1.1.4.1": "EnhancedMR",
    "1.2.840.10008.5.1.4.1.1.4.4": "LegacyConvertedEnhancedMR",
}
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"

#: Header attributes kept per series (for sequence-role rules and reports).
ROLE_ATTRIBUTES = (
    "SeriesDescription",
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "EchoTime",
    "RepetitionTime",
    "InversionTime",
    "ImageType",
    "MagneticFieldStrength",
    "Manufacturer",
    "ProtocolName",
    "Modality",
)


@dataclass(frozen=True)
class SeriesRef:
    """One image series found in a folder: its UIDs, files and header attributes."""

    study_instance_uid: str
    series_instance_uid: str
    files: tuple[Path, ...]
    sop_class_uid: str
    attributes: dict[str, Any] = field(hash=False, compare=False)

    @property
    def description(self) -> str:
        """SeriesDescription, or an empty string."""
        return str(self.attributes.get("SeriesDescription") or "")

    def label(self) -> str:
        """How errors name this series: description and UID."""
        return f"series {self.series_instance_uid} ({self.description or 'no description'})"


@dataclass(frozen=True)
class ScanResult:
    """What :func:`scan` found: image series by study, RTSTRUCT files, skipped files."""

    series: tuple[SeriesRef, ...]
    rtstructs: tuple[Path, ...]
    skipped: tuple[tuple[Path, str], ...]

    def studies(self) -> dict[str, list[SeriesRef]]:
        """Image series grouped by Study Instance UID."""
        out: dict[str, list[SeriesRef]] = defaultdict(list)
        for ref in self.series:
            out[ref.study_instance_uid].append(ref)
        return dict(out)


def orientation_label(iop: Any) -> str | None:
    """AXIAL, CORONAL or SAGITTAL from ImageOrientationPatient; OBLIQUE when > ~25 deg off.

    The label is the patient axis the slice normal is closest to; a normal
    whose largest component is below 0.9 is OBLIQUE. Pipelines match it like
    any attribute (``{attribute: Orientation, equals: AXIAL}``).
    """
    try:
        values = [float(v) for v in iop]
    except (TypeError, ValueError):
        return None
    if len(values) != 6:
        return None
    normal = np.cross(values[:3], values[3:])
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        return None
    normal = np.abs(normal / length)
    axis = int(np.argmax(normal))
    if normal[axis] < 0.9:
        return "OBLIQUE"
    return ("SAGITTAL", "CORONAL", "AXIAL")[axis]


def series_attributes(ds: Dataset) -> dict[str, Any]:
    """The header attributes role and pipeline rules see, plus the derived ``Orientation``."""
    attrs = {k: _value(ds, k) for k in ROLE_ATTRIBUTES}
    iop = ds.get("ImageOrientationPatient")
    if iop is None:
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared and "PlaneOrientationSequence" in shared[0]:
            iop = shared[0].PlaneOrientationSequence[0].get("ImageOrientationPatient")
    attrs["Orientation"] = orientation_label(iop)
    return attrs


def _value(ds: Dataset, keyword: str) -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        return [str(v) for v in value]
    if isinstance(value, (pydicom.valuerep.DSfloat, pydicom.valuerep.IS, float, int)):
        return float(value)
    return str(value)


def scan(folder: Path) -> ScanResult:
    """Find every DICOM image series under ``folder`` (headers only)."""
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    rtstructs: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for root, _dirs, names in os.walk(folder):
        for name in sorted(names):
            path = Path(root) / name
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
                skipped.append((path, f"not DICOM: {exc}"))
                continue
            sop = str(ds.get("SOPClassUID", ""))
            if sop == RTSTRUCT_SOP_CLASS:
                rtstructs.append(path)
            elif sop not in IMAGE_SOP_CLASSES:
                skipped.append((path, f"not an MR image ({sop or 'no SOP class'})"))
            elif "SeriesInstanceUID" not in ds or "StudyInstanceUID" not in ds:
                skipped.append((path, "no Study/Series Instance UID"))
            else:
                groups[str(ds.SeriesInstanceUID)].append((path, ds))
    series = []
    for uid, items in sorted(groups.items()):
        first = items[0][1]
        series.append(
            SeriesRef(
                study_instance_uid=str(first.StudyInstanceUID),
                series_instance_uid=uid,
                files=tuple(p for p, _ in items),
                sop_class_uid=str(first.SOPClassUID),
                attributes=series_attributes(first),
            )
        )
    return ScanResult(tuple(series), tuple(rtstructs), tuple(skipped))


@dataclass(frozen=True)
class _Slice:
    position: np.ndarray  # ImagePositionPatient (mm)
    orientation: np.ndarray  # 6 direction cosines
    spacing: tuple[float, float]  # row spacing, column spacing (mm)
    pixels: np.ndarray  # 2-D, rescaled to float32


def _rescaled(source: Dataset, array: np.ndarray) -> np.ndarray:
    """Apply RescaleSlope/Intercept from ``source`` (the dataset or a transformation item)."""
    slope = float(source.get("RescaleSlope", 1) or 1)
    intercept = float(source.get("RescaleIntercept", 0) or 0)
    return array.astype(np.float32) * slope + intercept


def _group(ds: Dataset, frame: Dataset | None, sequence: str) -> Dataset | None:
    """A functional-group item from the frame's groups, else the shared groups."""
    if frame is not None and sequence in frame:
        return frame[sequence][0]  # type: ignore[no-any-return]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and sequence in shared[0]:
        return shared[0][sequence][0]  # type: ignore[no-any-return]
    return None


def _slices_of(ds: Dataset, label: str) -> list[_Slice]:
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise GeometryError(f"{label}: an instance has no pixel data")
    try:
        array = ds.pixel_array
    except Exception as exc:  # any decoder failure is a refusal, with its reason
        raise GeometryError(f"{label}: pixel data cannot be decoded: {exc}") from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        try:
            return [
                _Slice(
                    np.asarray(ds.ImagePositionPatient, float),
                    np.asarray(ds.ImageOrientationPatient, float),
                    (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
                    _rescaled(ds, array if array.ndim == 2 else array[0]),
                )
            ]
        except AttributeError as exc:
            raise GeometryError(f"{label}: missing geometry attribute ({exc})") from exc
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) != frames:
        raise GeometryError(
            f"{label}: multi-frame image without per-frame plane positions "
            "(PerFrameFunctionalGroupsSequence)"
        )
    out = []
    for index, frame in enumerate(per_frame):
        position = _group(ds, frame, "PlanePositionSequence")
        orientation = _group(ds, frame, "PlaneOrientationSequence")
        measures = _group(ds, frame, "PixelMeasuresSequence")
        if position is None or orientation is None or measures is None:
            raise GeometryError(f"{label}: frame {index + 1} has no plane position/orientation")
        out.append(
            _Slice(
                np.asarray(position.ImagePositionPatient, float),
                np.asarray(orientation.ImageOrientationPatient, float),
                (float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1])),
                _rescaled(
                    _group(ds, frame, "PixelValueTransformationSequence") or ds, array[index]
                ),
            )
        )
    return out


def _check_and_order(
    slices: list[_Slice], label: str, *, min_slices: int, spacing_tolerance: float
) -> tuple[list[_Slice], np.ndarray, float]:
    """Validate geometry; return slices sorted along the normal, the normal, slice spacing."""
    if len(slices) < min_slices:
        raise GeometryError(f"{label}: {len(slices)} slice(s), at least {min_slices} needed")
    first = slices[0]
    for s in slices[1:]:
        if not np.allclose(s.orientation, first.orientation, atol=1e-3):
            raise GeometryError(f"{label}: mixed orientations (slices are not parallel)")
        if s.pixels.shape != first.pixels.shape:
            raise GeometryError(
                f"{label}: mixed matrix sizes {s.pixels.shape}/{first.pixels.shape}"
            )
        if not np.allclose(s.spacing, first.spacing, rtol=1e-3):
            raise GeometryError(f"{label}: mixed pixel spacing")
    row, col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, col)
    ordered = sorted(slices, key=lambda s: float(np.dot(s.position, normal)))
    if len(ordered) == 1:
        return ordered, normal, 1.0
    dists = np.array([np.dot(s.position, normal) for s in ordered])
    gaps = np.diff(dists)
    if np.any(gaps < 1e-3):
        raise GeometryError(f"{label}: two or more slices at the same position")
    step = float(np.median(gaps))
    worst = float(np.max(np.abs(gaps - step)))
    if worst > spacing_tolerance * step:
        multiples = np.round(gaps / step)
        on_grid = np.abs(gaps - multiples * step) <= spacing_tolerance * step
        missing = int(np.sum((multiples >= 2) & on_grid))
        uniform_otherwise = bool(np.all(on_grid))
        what = (
            f"{missing} missing slice gap(s)"
            if missing and uniform_otherwise
            else "non-uniform slice spacing"
        )
        raise GeometryError(
            f"{label}: {what} (spacing {step:.2f} mm, worst deviation {worst:.2f} mm)"
        )
    # In-plane offsets must follow the normal: a staggered stack is not a volume.
    for s in ordered[1:]:
        offset = s.position - ordered[0].position
        in_plane = offset - np.dot(offset, normal) * normal
        if np.linalg.norm(in_plane) > max(first.spacing) * 0.5:
            raise GeometryError(f"{label}: slice positions are not along the slice normal")
    return ordered, normal, step


def load_series(
    ref: SeriesRef, *, min_slices: int = 3, spacing_tolerance: float = 0.1
) -> sitk.Image:
    """Load one series as a float32 SimpleITK image in patient (LPS) space.

    Raises
    ------
    GeometryError
        The series would give a wrong mask; the message names the series and why.
    """
    label = ref.label()
    slices: list[_Slice] = []
    for path in ref.files:
        slices.extend(_slices_of(pydicom.dcmread(path), label))
    ordered, normal, step = _check_and_order(
        slices, label, min_slices=min_slices, spacing_tolerance=spacing_tolerance
    )
    volume = np.stack([s.pixels for s in ordered])  # (z, rows, cols)
    image = sitk.GetImageFromArray(volume)
    row_spacing, col_spacing = ordered[0].spacing
    image.SetSpacing((col_spacing, row_spacing, step))
    image.SetOrigin(tuple(float(v) for v in ordered[0].position))
    row, col = ordered[0].orientation[:3], ordered[0].orientation[3:]
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))
    return image


def load_image(path: Path) -> sitk.Image:
    """Load a NIfTI/NRRD/MHA file (research cohorts) as float32."""
    image: sitk.Image = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    return image
