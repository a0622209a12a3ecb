"""The real Soft-tissue-Sarcoma cohort: clinical endpoints joined with the T1 images.

``../shared/data/sts-clinical/clinical.csv`` holds the outcomes of the 51
patients of the TCIA Soft-tissue-Sarcoma collection;
``../shared/data/sts-t1-cropped`` holds N4-corrected, fat-normalised T1
crops with the expert ``GTV_Mass`` mask for 39 of them. This module joins
the two, derives the three endpoints the data README defines, and extracts
the features (tumour and 10 mm ring on T1) plus the mask-perturbation
"raters" the ICC filter needs, so the nested cross-validation
(:mod:`pipelines.signature.nested`) can refit that filter inside each fold.

Endpoints:

- ``lung_metastasis``: 0/1 as in the table (Vallières et al. 2015);
- ``high_grade``: 1 for High, 0 for Low/Intermediate, missing grade left out;
- event-free survival from the MR scan: event = any ``outcome``; time =
  days diagnosis→event minus days diagnosis→MR, else censored at
  days diagnosis→last follow-up minus days diagnosis→MR.

STS_001 is the end-to-end case of the repository: it is kept out of every
fit (:data:`HELD_OUT`), so the node scores it out-of-sample.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from pipelines.io.dicom import load_image
from pipelines.radiomics.robustness import perturbations
from pipelines.radiomics.study import prepare_study, study_features, wide
from pipelines.scoring.clinical import male

HELD_OUT: tuple[str, ...] = ("STS_001",)
REGIONS: tuple[str, ...] = ("tumour", "ring")
ENDPOINTS: dict[str, dict[str, str]] = {
    "lung_metastasis": {"kind": "binary", "label": "lung_metastasis"},
    "high_grade": {"kind": "binary", "label": "high_grade"},
    "efs": {"kind": "survival", "time": "efs_days", "event": "efs_event"},
}


@dataclass
class StsCohort:
    """Patients with clinical data and a T1 image, endpoints derived; who was left out and why."""

    clinical: pd.DataFrame  # index: patient id
    without_images: list[str] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)

    def endpoint(self, name: str) -> pd.DataFrame:
        """The patients eligible for ``name`` (its outcome known) with its outcome columns."""
        spec = ENDPOINTS[name]
        if spec["kind"] == "binary":
            return self.clinical[self.clinical[spec["label"]].notna()]
        return self.clinical[
            self.clinical[spec["time"]].notna() & (self.clinical[spec["time"]] > 0)
        ]


def derive_endpoints(table: pd.DataFrame) -> pd.DataFrame:
    """The clinical table (``patient_id`` column) with endpoint and baseline columns added."""
    out = table.copy()
    out["id"] = out["patient_id"].astype(str)
    out = out.set_index("id")
    out["sex_male"] = out["sex"].map(male)
    grade = out["grade"].astype("string")
    out["high_grade"] = np.where(grade.isna(), np.nan, (grade == "High").astype(float))
    out["lung_metastasis"] = out["lung_metastasis"].astype(float)
    event = out["outcome"].notna() & (out["outcome"].astype(str).str.strip() != "")
    end = np.where(
        event, out["days_diagnosis_to_outcome"], out["days_diagnosis_to_last_followup"]
    ).astype(float)
    out["efs_event"] = event.astype(int)
    out["efs_days"] = end - out["days_diagnosis_to_mri"].astype(float)
    return out


def load_sts(clinical_csv: Path, images: Path, held_out: tuple[str, ...] = HELD_OUT) -> StsCohort:
    """Join the clinical table with the image folders; list who has no images, hold out STS_001."""
    table = pd.read_csv(clinical_csv)
    if "patient_id" not in table.columns:
        raise ValueError(f"{clinical_csv}: needs a 'patient_id' column")
    clinical = derive_endpoints(table)
    with_images = {p.name for p in images.iterdir() if p.is_dir() and any(p.glob("*T1*image*"))}
    without = sorted(set(clinical.index) - with_images)
    held = sorted(set(held_out) & set(clinical.index))
    keep = sorted(with_images & set(clinical.index) - set(held_out))
    return StsCohort(clinical.loc[keep], without_images=without, held_out=held)


def _t1_case(folder: Path) -> tuple[sitk.Image, sitk.Image]:
    image_path = next(folder.glob("*T1*image*.nii*"))
    mask = sitk.ReadImage(str(folder / image_path.name.replace("image", "mask")))
    image = load_image(image_path)
    mask.CopyInformation(image)
    return image, mask


def _patient_raters(
    images: Path, patient: str, params: Mapping[str, Any], perturb: bool
) -> dict[str, pd.DataFrame]:
    image, mask = _t1_case(images / patient)
    prep = prepare_study({"T1": image}, habitats=False)
    variants = perturbations(mask) if perturb else iter([("original", mask)])
    return {
        name: wide(
            study_features(
                {"T1": image},
                {"T1": moved},
                params,
                study=patient,
                regions_wanted=REGIONS,
                prep=prep,
                workers=1,
            )
        )
        for name, moved in variants
    }


def extract_sts(
    images: Path,
    params: Mapping[str, Any],
    patients: list[str],
    *,
    perturb: bool = True,
    workers: int = 1,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """(wide features, perturbed wide features by perturbation name) of ``patients``' T1.

    The features are the unperturbed expert mask's; the perturbations
    (:func:`~pipelines.radiomics.robustness.perturbations`: eroded, dilated,
    shifted ±2 mm) are the raters of the ICC filter. The ring is made from
    each perturbed tumour, as production would from its own mask. Patients
    run in ``workers`` processes.
    """
    raters: dict[str, list[pd.DataFrame]] = {}
    with ProcessPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(_patient_raters, images, p, dict(params), perturb) for p in patients]
        for i, (patient, future) in enumerate(zip(patients, futures, strict=True)):
            for name, table in future.result().items():
                raters.setdefault(name, []).append(table)
            if progress:
                progress(i + 1, len(patients), patient)
    tables = {name: pd.concat(frames) for name, frames in raters.items()}
    return tables.pop("original"), tables


def write_cache(
    cache: Path, features: pd.DataFrame, perturbed: Mapping[str, pd.DataFrame] | None
) -> None:
    """Store :func:`extract_sts`'s output in ``cache`` (``features.csv``, ``raters.csv``)."""
    cache.mkdir(parents=True, exist_ok=True)
    features.to_csv(cache / "features.csv", index_label="id")
    if perturbed:
        pd.concat([t.assign(perturbation=name) for name, t in perturbed.items()]).to_csv(
            cache / "raters.csv", index_label="id"
        )


def read_cache(
    cache: Path, *, raters: bool = True
) -> tuple[pd.DataFrame, list[pd.DataFrame] | None]:
    """(features, perturbation raters or None) as :func:`write_cache` stored them.

    Read back with ``float_precision="round_trip"``: the values are the
    extracted ones to the last bit, so a run from the cache fits exactly what
    the run that extracted them fitted.
    """
    features = pd.read_csv(cache / "features.csv", index_col="id", float_precision="round_trip")
    if not raters:
        return features, None
    table = pd.read_csv(cache / "raters.csv", index_col="id", float_precision="round_trip")
    return features, [g.drop(columns="perturbation") for _, g in table.groupby("perturbation")]
