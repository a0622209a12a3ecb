"""Image preparation shared by training and inference (one code path, so they agree)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from pipelines.preprocess import resample


def normalise(array: np.ndarray) -> np.ndarray:
    """Mean-variance normalisation over the tissue, robust to outliers.

    Tissue is what is brighter than a tenth of the 99th percentile (air and
    background drop out, whether the image is a full field of view or a crop);
    values are clipped to the tissue's 0.5-99.5 percentiles before scaling.
    """
    x = array.astype(np.float32, copy=False)
    top = float(np.percentile(x, 99))
    tissue = x[x > 0.1 * top] if top > 0 else x.ravel()
    if tissue.size < 10:
        tissue = x.ravel()
    lo, hi = np.percentile(tissue, [0.5, 99.5])
    clipped = np.clip(x, lo, hi)
    inside = np.clip(tissue, lo, hi)
    sd = float(inside.std()) or 1.0
    return ((clipped - float(inside.mean())) / sd).astype(np.float32)


def to_spacing(image: sitk.Image, spacing: Sequence[float], *, label: bool = False) -> sitk.Image:
    """``image`` resampled to ``spacing``; masks are resampled linearly and cut at 0.5.

    Linear-then-threshold keeps a thin mask's partial volume better than
    nearest neighbour when going from 5 mm slices to finer ones.
    """
    if not label:
        return resample(sitk.Cast(image, sitk.sitkFloat32), spacing)
    soft = resample(sitk.Cast(image > 0, sitk.sitkFloat32), spacing)
    out: sitk.Image = sitk.Cast(soft >= 0.5, sitk.sitkUInt8)
    return out


def box_around(
    mask: sitk.Image, onto: sitk.Image, margin_mm: float
) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """(start index, size) on ``onto``'s grid of the box ``margin_mm`` around ``mask``'s foreground.

    ``mask`` may live on another grid (the coarse 5 mm one): the box's eight
    corners go through physical space. None when the mask is empty.
    """
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    if not stats.HasLabel(1):
        return None
    x0, y0, z0, sx, sy, sz = stats.GetBoundingBox(1)
    corners = [
        mask.TransformContinuousIndexToPhysicalPoint([cx, cy, cz])
        for cx, cy, cz in itertools.product(
            (x0 - 0.5, x0 + sx - 0.5), (y0 - 0.5, y0 + sy - 0.5), (z0 - 0.5, z0 + sz - 0.5)
        )
    ]
    idx = np.array([onto.TransformPhysicalPointToContinuousIndex(c) for c in corners])
    pad = margin_mm / np.asarray(onto.GetSpacing())
    lo = np.maximum(np.floor(idx.min(axis=0) - pad), 0).astype(int)
    hi = np.minimum(np.ceil(idx.max(axis=0) + pad), np.asarray(onto.GetSize()) - 1).astype(int)
    if np.any(hi < lo):
        return None
    size = hi - lo + 1
    return (int(lo[0]), int(lo[1]), int(lo[2])), (int(size[0]), int(size[1]), int(size[2]))


def crop(image: sitk.Image, box: tuple[tuple[int, int, int], tuple[int, int, int]]) -> sitk.Image:
    """The region ``box`` = (start, size) of ``image``, keeping its physical position."""
    start, size = box
    out: sitk.Image = sitk.RegionOfInterest(image, list(size), list(start))
    return out
