"""A study in, masks for its sequences out: segment one role, carry the mask to the other.

The node segments the fat-suppressed T2 (where sarcoma and its edema are
brightest; ROI-Net's choice) and carries the mask to the T1 series through
:func:`~pipelines.preprocess.register_rigid`, so both series get a mask on
their own grid. ``sequence="T1"`` reverses the roles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
import SimpleITK as sitk

from pipelines.io.dicom import ScanResult, SeriesRef, load_image, load_series, scan
from pipelines.io.roles import RoleRules
from pipelines.preprocess import Registration, carry_mask, register_rigid
from pipelines.segment.infer import Result, Segmenter

ROLES = ("T2FS", "T1")
NIFTI_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


class InputError(ValueError):
    """The input cannot be segmented as asked; the message says what was found."""


@dataclass
class StudySegmentation:
    """Masks per role on each series' own grid, and how they were obtained."""

    sequence: str
    images: dict[str, sitk.Image]
    series: dict[str, SeriesRef]
    masks: dict[str, sitk.Image]
    result: Result
    registration: Registration | None = None


def is_volume_file(path: Path) -> bool:
    """A NIfTI/NRRD/MetaImage file (research input) rather than a DICOM folder."""
    return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)


def choose_series(found: ScanResult, rules: RoleRules) -> dict[str, SeriesRef]:
    """Role -> series of the (single) study in ``found``; the series with most slices per role."""
    studies = found.studies()
    if not studies:
        raise InputError("no MR image series found")
    if len(studies) > 1:
        raise InputError(f"{len(studies)} studies found; point at one study's folder")
    (series,) = studies.values()
    chosen: dict[str, SeriesRef] = {}
    for ref in sorted(series, key=lambda r: -len(r.files)):
        role = rules.classify(ref.attributes)
        chosen.setdefault(role, ref)
    if len(series) == 1 and not any(r in chosen for r in ROLES):
        chosen["unknown"] = series[0]  # a lone series pointed at explicitly: segment it
    return chosen


def study_roles(path: Path, rules: RoleRules, sequence: str) -> tuple[str, dict[str, SeriesRef]]:
    """(the role to segment, role -> series) of the one study in the folder ``path``.

    ``sequence`` when the study has it; else a lone series of no known role
    (``unknown``), else the study's only series.

    Raises
    ------
    InputError
        When ``path`` is no folder, holds several studies or no MR series, or
        has several series of which none is ``sequence``.
    """
    if not path.is_dir():
        raise InputError(f"{path}: neither a DICOM folder nor a NIfTI/NRRD file")
    chosen = choose_series(scan(path), rules)
    if sequence in chosen:
        role = sequence
    elif "unknown" in chosen:
        role = "unknown"
    elif len(chosen) == 1:
        role = next(iter(chosen))
    else:
        found = ", ".join(
            f"{r}: {ref.description or ref.series_instance_uid}" for r, ref in chosen.items()
        )
        raise InputError(f"no {sequence} series in the study (found {found}); try --sequence")
    return role, chosen


def segment_input(
    path: Path, segmenter: Segmenter, rules: RoleRules, sequence: str = "T2FS"
) -> StudySegmentation:
    """Segment a NIfTI/NRRD file, a series folder or a study folder (carried to the other role)."""
    if is_volume_file(path):
        image = load_image(path)
        result = segmenter.segment(image, sequence)
        return StudySegmentation(sequence, {sequence: image}, {}, {sequence: result.mask}, result)
    role, chosen = study_roles(path, rules, sequence)
    image = load_series(chosen[role])
    result = segmenter.segment(image, role)
    seg = StudySegmentation(role, {role: image}, {role: chosen[role]}, {role: result.mask}, result)
    for other in ROLES:
        if other == role or other not in chosen:
            continue
        target = load_series(chosen[other])
        registration = register_rigid(target, image)
        seg.images[other], seg.series[other] = target, chosen[other]
        seg.masks[other] = carry_mask(result.mask, target, registration.transform)
        seg.registration = registration
    return seg


def rtstruct_references(path: Path) -> set[str]:
    """Series Instance UIDs an RTSTRUCT's contours refer to."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {
        str(series.SeriesInstanceUID)
        for frame in ds.get("ReferencedFrameOfReferenceSequence", [])
        for study in frame.get("RTReferencedStudySequence", [])
        for series in study.get("RTReferencedSeriesSequence", [])
    }
