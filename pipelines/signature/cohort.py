"""Cohorts for fitting and evaluation: a feature table, or studies to extract, plus clinical data.

A COHORT argument is one of

- a CSV of features: wide (``id`` + ``<sequence>:<region>:<feature>`` columns)
  or tidy (``study, sequence, region, <feature>...`` rows, as ``sarcnode
  radiomics`` writes them);
- a folder holding ``features.csv`` and ``clinical.csv``;
- a folder holding ``clinical.csv`` and studies to extract: synthetic studies
  (``truth.json``, ``dicom/<role>/``, ``masks/<role>_tumour.nii.gz``, as
  ``sarcnode synth cohort`` writes under ``cases/``) or NIfTI folders
  (``<id>/*<SEQ>_image.nii.gz`` with ``*<SEQ>_mask.nii.gz``).

Extracted features are cached in ``features.csv`` beside the output so a
second run does not extract again.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from pipelines.io.dicom import load_image, load_series, scan
from pipelines.radiomics.extract import worker_pool
from pipelines.radiomics.robustness import feature_icc, perturbations
from pipelines.radiomics.study import REGIONS, prepare_study, study_features, wide
from pipelines.segment.data import sequence_of


def read_features(path: Path) -> pd.DataFrame:
    """A feature CSV, wide or tidy, as the wide table (index: case id)."""
    table = pd.read_csv(path)
    if {"study", "sequence", "region"} <= set(table.columns):
        return wide(table)
    if "id" not in table.columns:
        raise ValueError(f"{path}: needs an 'id' column (wide) or study/sequence/region (tidy)")
    table["id"] = table["id"].astype(str)
    return table.set_index("id").astype(float)


def read_clinical(path: Path) -> pd.DataFrame:
    """The clinical CSV (``id`` first), indexed by case id."""
    if not path.is_file():
        raise ValueError(f"clinical table {path} not found")
    table = pd.read_csv(path)
    if "id" not in table.columns:
        raise ValueError(f"{path}: needs an 'id' column")
    table["id"] = table["id"].astype(str)
    return table.set_index("id")


def _study_inputs(folder: Path) -> tuple[dict[str, sitk.Image], dict[str, sitk.Image]] | None:
    """(images, tumour masks) by role for a synthetic study or a NIfTI case folder."""
    if (folder / "truth.json").is_file():
        images, masks = {}, {}
        for role in ("T2FS", "T1"):
            if (folder / "dicom" / role).is_dir():
                images[role] = load_series(scan(folder / "dicom" / role).series[0])
                mask = sitk.ReadImage(str(folder / "masks" / f"{role}_tumour.nii.gz"))
                mask.CopyInformation(images[role])
                masks[role] = mask
        return images, masks
    pairs = sorted(folder.glob("*image*.nii*"))
    if not pairs:
        return None
    images, masks = {}, {}
    for image_path in pairs:
        mask_path = folder / image_path.name.replace("image", "mask")
        if mask_path.is_file():
            role = sequence_of(image_path.name)
            images[role] = load_image(image_path)
            mask = sitk.ReadImage(str(mask_path))
            mask.CopyInformation(images[role])
            masks[role] = mask
    return images, masks


@contextlib.contextmanager
def _pool(workers: int | None) -> Iterator[ProcessPoolExecutor | None]:
    """One extraction pool for a whole cohort (none when one process is asked for)."""
    if (workers or len(os.sched_getaffinity(0))) <= 1:
        yield None
        return
    pool = worker_pool(workers)
    try:
        yield pool
    finally:
        pool.shutdown()


def extract_cohort(
    root: Path,
    params: Mapping[str, Any] | None,
    *,
    workers: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    regions: tuple[str, ...] = REGIONS,
) -> pd.DataFrame:
    """The tidy feature table of every study under ``root`` (``cases/`` first when present)."""
    base = root / "cases" if (root / "cases").is_dir() else root
    folders = _case_folders(root)
    tables = []
    with _pool(workers) as pool:
        for i, folder in enumerate(folders):
            inputs = _study_inputs(folder)
            if inputs is None or not inputs[1]:
                continue
            case_id = folder.name
            truth = folder / "truth.json"
            if truth.is_file():
                case_id = str(json.loads(truth.read_text()).get("case_id", case_id))
            tables.append(
                study_features(
                    *inputs,
                    params,
                    study=case_id,
                    workers=workers,
                    regions_wanted=regions,
                    pool=pool,
                )
            )
            if progress:
                progress(i + 1, len(folders), case_id)
    if not tables:
        raise ValueError(f"no studies with tumour masks under {base}")
    return pd.concat(tables, ignore_index=True)


def _case_folders(root: Path) -> list[Path]:
    base = root / "cases" if (root / "cases").is_dir() else root
    return sorted(p for p in base.iterdir() if p.is_dir())


def _has_masks(folder: Path) -> bool:
    """Whether a study folder holds tumour masks (without reading any image)."""
    if (folder / "truth.json").is_file():
        return any((folder / "masks").glob("*_tumour.nii.gz"))
    return any(folder.glob("*mask*.nii*"))


def perturbation_icc(
    root: Path,
    params: Mapping[str, Any] | None,
    *,
    cases: int = 20,
    seed: int = 0,
    workers: int | None = None,
    regions: tuple[str, ...] = REGIONS,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[pd.Series, dict[str, Any]]:
    """ICC(2,1) of every wide feature column across mask perturbations of ``cases`` studies.

    The stand-in for a second reader when a cohort has one segmentation
    (Zwanenburg et al. 2019): each study's tumour masks are eroded, dilated
    and shifted (:func:`pipelines.radiomics.robustness.perturbations`, the
    same perturbation on every sequence), ring and habitats are derived from
    the perturbed tumour as in production, and each perturbation is one
    "rater". Cases are a seeded random subset. Returns (ICC per column, a
    summary for the card).
    """
    rng = np.random.default_rng(seed)
    folders = [f for f in _case_folders(root) if _has_masks(f)]
    if len(folders) < 2:
        raise ValueError(f"ICC needs at least 2 studies with masks under {root}")
    chosen = sorted(rng.choice(len(folders), size=min(cases, len(folders)), replace=False))
    raters: dict[str, list[pd.DataFrame]] = {}
    with _pool(workers) as pool:
        for n, index in enumerate(chosen):
            folder = folders[index]
            inputs = _study_inputs(folder)
            assert inputs is not None
            images, masks = inputs
            prep = prepare_study(images, habitats=any(r.startswith("habitat") for r in regions))
            variants: dict[str, dict[str, sitk.Image]] = {}
            for role, mask in masks.items():
                for name, moved in perturbations(mask):
                    variants.setdefault(name, {})[role] = moved
            for name, moved_masks in variants.items():
                table = study_features(
                    images,
                    moved_masks,
                    params,
                    study=folder.name,
                    workers=workers,
                    regions_wanted=regions,
                    pool=pool,
                    prep=prep,
                )
                raters.setdefault(name, []).append(wide(table))
            if progress:
                progress(n + 1, len(chosen), folder.name)
    tables = [pd.concat(frames) for frames in raters.values()]
    common = sorted(set.intersection(*(set(t.columns) for t in tables)))
    values = feature_icc([t[common].reset_index() for t in tables], id_column="id")
    summary = {
        "method": "mask perturbations: " + ", ".join(raters),
        "kind": "ICC(2,1)",
        "cases": [folders[i].name for i in chosen],
    }
    return values, summary


def second_reader_icc(first: pd.DataFrame, second: pd.DataFrame) -> pd.Series:
    """ICC(2,1) per column between two wide tables of the same cases (two segmentations)."""
    ids = first.index.intersection(second.index)
    if len(ids) < 2:
        raise ValueError("the two feature tables share fewer than 2 cases")
    common = sorted(set(first.columns) & set(second.columns))
    tables = [t.loc[ids, common].reset_index() for t in (first, second)]
    return feature_icc(tables, id_column="id")


def load_cohort(
    cohort: Path,
    *,
    clinical: Path | None = None,
    params: Mapping[str, Any] | None = None,
    cache: Path | None = None,
    workers: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    regions: tuple[str, ...] = REGIONS,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(wide features, clinical) for ``cohort`` (see the module docstring)."""
    if cohort.is_file():
        if clinical is None:
            raise ValueError("a feature CSV needs --clinical CSV")
        return read_features(cohort), read_clinical(clinical)
    clinical_table = read_clinical(clinical or cohort / "clinical.csv")
    for candidate in (cohort / "features.csv", cache):
        if candidate is not None and candidate.is_file():
            return read_features(candidate), clinical_table
    tidy = extract_cohort(cohort, params, workers=workers, progress=progress, regions=regions)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tidy.to_csv(cache, index=False)
    return wide(tidy), clinical_table
