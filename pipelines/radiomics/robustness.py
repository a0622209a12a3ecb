"""Feature robustness: intraclass correlation across segmentations or mask perturbations.

The PFS signature (seed 000) keeps features with ICC > 0.75. With two
readers' segmentations the "raters" are the readers; without them, the
raters are perturbed copies of one mask (erosion, dilation, small
translations), the usual stand-in (Zwanenburg et al., Sci Rep 2019).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import SimpleITK as sitk


def icc(ratings: np.ndarray, kind: str = "2,1") -> float:
    """Shrout-Fleiss intraclass correlation of an (n subjects x k raters) array.

    ``2,1``: two-way random effects, absolute agreement, single rater (the
    default in radiomics robustness studies); ``3,1``: two-way mixed,
    consistency; ``1,1``: one-way random. NaN when subjects do not vary.
    """
    x = np.asarray(ratings, dtype=np.float64)
    n, k = x.shape
    if n < 2 or k < 2:
        raise ValueError("ICC needs at least 2 subjects and 2 raters")
    grand = x.mean()
    ss_rows = k * ((x.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((x.mean(axis=0) - grand) ** 2).sum()
    ss_total = ((x - grand) ** 2).sum()
    ss_error = ss_total - ss_rows - ss_cols
    bms = ss_rows / (n - 1)
    jms = ss_cols / (k - 1)
    ems = ss_error / ((n - 1) * (k - 1))
    wms = (ss_cols + ss_error) / (n * (k - 1))
    if kind == "1,1":
        den = bms + (k - 1) * wms
        num = bms - wms
    elif kind == "2,1":
        den = bms + (k - 1) * ems + k * (jms - ems) / n
        num = bms - ems
    elif kind == "3,1":
        den = bms + (k - 1) * ems
        num = bms - ems
    else:
        raise ValueError(f"unknown ICC kind {kind!r} (1,1 / 2,1 / 3,1)")
    return float(num / den) if den > 0 else float("nan")


def feature_icc(
    tables: list[pd.DataFrame], id_column: str = "study", kind: str = "2,1"
) -> pd.Series:
    """ICC per feature column across ``tables`` (one per rater/perturbation, same ids)."""
    indexed = [t.set_index(id_column).sort_index() for t in tables]
    ids = indexed[0].index
    for t in indexed[1:]:
        if not t.index.equals(ids):
            raise ValueError("every rater's table must hold the same cases")
    columns = [c for c in indexed[0].columns if pd.api.types.is_numeric_dtype(indexed[0][c])]
    values = {c: icc(np.column_stack([t[c].to_numpy() for t in indexed]), kind) for c in columns}
    return pd.Series(values, name=f"icc({kind})")


def perturbations(mask: sitk.Image, *, shift_mm: float = 2.0) -> Iterator[tuple[str, sitk.Image]]:
    """The mask itself, eroded and dilated by one voxel, and shifted ±``shift_mm`` in-plane."""
    binary = sitk.Cast(mask > 0, sitk.sitkUInt8)
    yield "original", binary
    yield "eroded", sitk.BinaryErode(binary, [1, 1, 0])
    yield "dilated", sitk.BinaryDilate(binary, [1, 1, 0])
    spacing = binary.GetSpacing()
    for axis, name in ((0, "x"), (1, "y")):
        for sign in (-1, 1):
            offset = [0.0, 0.0, 0.0]
            offset[axis] = sign * round(shift_mm / spacing[axis]) * spacing[axis]
            moved = sitk.Resample(
                binary, binary, sitk.TranslationTransform(3, offset), sitk.sitkNearestNeighbor, 0
            )
            yield f"shift{'+' if sign > 0 else '-'}{name}", moved


def robust_features(icc_values: pd.Series, threshold: float = 0.75) -> list[str]:
    """Features whose ICC exceeds ``threshold`` (NaN counts as not robust)."""
    return sorted(icc_values[icc_values > threshold].index)
