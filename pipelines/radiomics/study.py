"""One study's radiomics: regions on each sequence, features, and the wide row a card reads.

For each sequence with a tumour mask: the tumour, the 10 mm ring, and three
habitats. The body outline comes from T1 (air and tissue well apart) and is
carried to the other sequence (same frame of reference). Habitats need both
sequences' intensities on one grid: the other
sequence is registered (:func:`~pipelines.preprocess.register_rigid`) and
resampled onto this one, both are N4-corrected and histogram-standardised
inside the body, and K-means runs on the pairs inside the tumour (seed 003).
Images are N4-corrected before extraction; PyRadiomics then normalises them
(``normalize: true`` in the parameter file).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from pipelines.preprocess import body_mask, histogram_standardise, n4, register_rigid
from pipelines.radiomics.extract import KEYS, extract
from pipelines.radiomics.regions import habitat_counts, habitats, ring

REGIONS = ("tumour", "ring", "habitat1", "habitat2", "habitat3")


def prepare(images: Mapping[str, sitk.Image]) -> dict[str, sitk.Image]:
    """N4-corrected copies (bias fields differ between series and scanners)."""
    return {
        role: n4(sitk.Cast(image, sitk.sitkFloat32), body_mask(image))
        for role, image in images.items()
    }


def study_regions(
    images: Mapping[str, sitk.Image], tumours: Mapping[str, sitk.Image], *, seed: int = 0
) -> tuple[dict[str, dict[str, sitk.Image]], dict[str, dict[str, float]]]:
    """(role -> region -> mask, role -> habitat counts) for each role that has a tumour mask."""
    regions: dict[str, dict[str, sitk.Image]] = {}
    counts: dict[str, dict[str, float]] = {}
    outline = "T1" if "T1" in images else next(iter(images))
    outline_body = body_mask(images[outline])
    for role, tumour in tumours.items():
        image = images[role]
        body = sitk.Resample(outline_body, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        tumour = sitk.Cast(tumour > 0, sitk.sitkUInt8)
        tumour.CopyInformation(image)
        channels = [histogram_standardise(image, body)]
        for other, other_image in images.items():
            if other == role:
                continue
            moved = sitk.Resample(
                other_image,
                image,
                register_rigid(image, other_image).transform,
                sitk.sitkLinear,
                0.0,
            )
            channels.append(histogram_standardise(moved, body))
        labels = habitats(channels, tumour, seed=seed)
        named = {"tumour": tumour, "ring": ring(tumour, image, body=body)}
        for h in (1, 2, 3):
            named[f"habitat{h}"] = sitk.Cast(labels == h, sitk.sitkUInt8)
        regions[role] = named
        counts[role] = habitat_counts(labels)
    return regions, counts


def study_features(
    images: Mapping[str, sitk.Image],
    tumours: Mapping[str, sitk.Image],
    params: Mapping[str, Any] | None = None,
    *,
    study: str = "",
    workers: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """The tidy table (one row per sequence and region) for one study, habitat counts included."""
    corrected = prepare(images)
    regions, counts = study_regions(corrected, tumours, seed=seed)
    habitats_optional = frozenset(r for r in REGIONS if r.startswith("habitat"))
    table = extract(
        corrected, regions, params, study=study, workers=workers, optional=habitats_optional
    )
    for role, values in counts.items():
        for key, value in values.items():
            table.loc[
                (table["sequence"] == role) & (table["region"] == "tumour"), f"habitat_{key}"
            ] = value
    return table


def wide(table: pd.DataFrame) -> pd.DataFrame:
    """One row per study, columns ``<sequence>:<region>:<feature>`` (what cards name)."""
    rows: dict[str, dict[str, float]] = {}
    for _, row in table.iterrows():
        prefix = f"{row['sequence']}:{row['region']}:"
        out = rows.setdefault(str(row["study"]), {})
        for column, value in row.items():
            if column not in KEYS and column != "note" and pd.notna(value):
                out[prefix + str(column)] = float(value)
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "id"
    return frame.reindex(sorted(frame.columns), axis=1).astype(np.float64)
