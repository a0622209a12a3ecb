"""Overlap and surface-distance metrics for segmentation, with bootstrap intervals."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from pipelines.preprocess import dice

__all__ = ["bootstrap_ci", "dice", "hd95"]


def _surface_distances(a: sitk.Image, b: sitk.Image) -> np.ndarray:
    """Distances (mm) from each surface voxel of ``a`` to the surface of ``b``."""
    surface_a = sitk.GetArrayFromImage(sitk.LabelContour(a > 0, fullyConnected=True)) > 0
    distance_b = sitk.Abs(
        sitk.SignedMaurerDistanceMap(
            sitk.LabelContour(b > 0, fullyConnected=True),
            insideIsPositive=False,
            squaredDistance=False,
            useImageSpacing=True,
        )
    )
    return np.asarray(sitk.GetArrayViewFromImage(distance_b)[surface_a], dtype=np.float64)


def hd95(a: sitk.Image, b: sitk.Image) -> float:
    """95th percentile of the symmetric surface distances (mm), in physical space.

    ``inf`` when exactly one mask is empty (no surface to measure to), 0 when both are.
    """
    empty_a = not np.any(sitk.GetArrayViewFromImage(a))
    empty_b = not np.any(sitk.GetArrayViewFromImage(b))
    if empty_a and empty_b:
        return 0.0
    if empty_a or empty_b:
        return float("inf")
    both = np.concatenate([_surface_distances(a, b), _surface_distances(b, a)])
    return float(np.percentile(both, 95))


def bootstrap_ci(
    values: Sequence[float], *, level: float = 0.95, n: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean over cases and its percentile bootstrap interval.

    Cases are resampled with replacement (fixed seed, so a report is
    reproducible). Infinite values (a missed tumour's HD95) are kept: they make
    the mean infinite, which is the honest summary of a miss.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to summarise")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n, x.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return (
        float(x.mean()),
        float(np.percentile(means, tail)),
        float(np.percentile(means, 100 - tail)),
    )
