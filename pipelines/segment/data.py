"""Training cases: synthetic studies and NIfTI image/mask pairs, found under folders.

A synthetic study (a folder with ``truth.json``, as ``sarcnode synth`` writes)
gives two cases, its T1 and FS-T2 series with their tumour masks; both
belong to one patient (``group``), so a split never puts one in training and
the other in validation. A folder holding ``*image*.nii[.gz]`` and
``*mask*.nii[.gz]`` (the layout of ``sts-t1-cropped``) gives one real case.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipelines.io.dicom import load_image, load_series, scan


@dataclass(frozen=True)
class CaseRef:
    """Where one training case lives; loading is deferred (:meth:`load`)."""

    case_id: str
    group: str
    source: str  # "real" | "synthetic"
    sequence: str  # "T1" | "T2FS" | "unknown"
    image_path: Path
    mask_path: Path

    def load(self) -> tuple[sitk.Image, sitk.Image]:
        """(image as float32, mask as uint8 0/1) on the image's own grid."""
        if self.image_path.is_dir():
            found = scan(self.image_path)
            if len(found.series) != 1:
                raise ValueError(
                    f"{self.image_path}: expected one series, found {len(found.series)}"
                )
            image = load_series(found.series[0])
        else:
            image = load_image(self.image_path)
        mask = sitk.ReadImage(str(self.mask_path))
        if mask.GetSize() != image.GetSize():
            raise ValueError(f"case {self.case_id}: mask and image grids differ")
        mask.CopyInformation(image)  # NIfTI round-off in origin/direction
        out: sitk.Image = sitk.Cast(mask > 0, sitk.sitkUInt8)
        return image, out


def sequence_of(name: str) -> str:
    """T2FS, T1 or unknown, from a research file name such as ``MR_T1_image.nii.gz``."""
    upper = name.upper()
    if "T2FS" in upper or "T2_FS" in upper or "STIR" in upper:
        return "T2FS"
    return "T1" if "T1" in upper else "unknown"


def _files(root: Path) -> list[Path]:
    """Every file under ``root``, following symlinked folders (cohorts are often built of links)."""
    return sorted(
        Path(dirpath) / name
        for dirpath, _, names in os.walk(root, followlinks=True)
        for name in names
    )


def discover(roots: list[Path], exclude: set[str] = frozenset()) -> list[CaseRef]:  # type: ignore[assignment]
    """Every case under ``roots`` (sorted, so splits are reproducible), minus ``exclude`` ids."""
    cases: list[CaseRef] = []
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"training data folder {root} does not exist")
        files = _files(root)
        for truth in (f for f in files if f.name == "truth.json"):
            study = truth.parent
            case_id = str(json.loads(truth.read_text()).get("case_id", study.name))
            for role in ("T2FS", "T1"):
                if (study / "dicom" / role).is_dir():
                    cases.append(
                        CaseRef(
                            f"{case_id}/{role}",
                            case_id,
                            "synthetic",
                            role,
                            study / "dicom" / role,
                            study / "masks" / f"{role}_tumour.nii.gz",
                        )
                    )
        nifti = {f.parent for f in files if "image" in f.name and ".nii" in f.name}
        for folder in sorted(nifti):
            images = sorted(folder.glob("*image*.nii*"))
            for image in images:
                mask = folder / image.name.replace("image", "mask")
                if mask.is_file():
                    cases.append(
                        CaseRef(
                            folder.name, folder.name, "real", sequence_of(image.name), image, mask
                        )
                    )
    return [c for c in cases if c.group not in exclude]


def split(
    cases: list[CaseRef], val_fraction: float, seed: int
) -> tuple[list[CaseRef], list[CaseRef]]:
    """Patient-level split, stratified by source (real and synthetic each lose ``val_fraction``)."""
    rng = np.random.default_rng(seed)
    train: list[CaseRef] = []
    val: list[CaseRef] = []
    for source in ("real", "synthetic"):
        groups = sorted({c.group for c in cases if c.source == source})
        n_val = round(len(groups) * val_fraction)
        held = set(rng.permutation(groups)[:n_val].tolist()) if groups else set()
        for c in cases:
            if c.source == source:
                (val if c.group in held else train).append(c)
    return train, val
