"""The regions features are taken from: tumour, peritumoral ring, and habitats.

- :func:`ring`: the shell within ``width_mm`` (physical distance, so it is
  right on anisotropic voxels) outside the tumour, clipped to the body and
  without the voxels the image shows as air, cortical bone or signal void.
- :func:`habitats`: K-means (k = 3) on the normalised intensities of the
  sequences inside the tumour (seed 003: T1 and FS-T2 after N4 and histogram
  standardisation), ordered by their mean first-channel intensity so that
  label 1 is always the darkest habitat.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import distance_transform_edt
from sklearn.cluster import KMeans

from pipelines.preprocess import body_mask


def ring(
    tumour: sitk.Image,
    image: sitk.Image | None = None,
    *,
    width_mm: float = 10.0,
    dark_fraction: float = 0.15,
    body: sitk.Image | None = None,
) -> sitk.Image:
    """Voxels outside ``tumour`` within ``width_mm`` of it (uint8 0/1 on the tumour's grid).

    With ``image``, the ring is clipped to the body and loses voxels darker
    than ``dark_fraction`` of the body's median intensity (air, cortical
    bone, flow voids: no tissue to describe). ``body`` overrides the body
    found on ``image`` (fat-suppressed T2 shows muscle barely above air; the
    T1 body of the same study, carried over, is the better outline).
    """
    inside = sitk.GetArrayViewFromImage(tumour) > 0
    # scipy's exact Euclidean distance in mm (double precision, one thread). ITK's
    # Maurer map put voxels at exactly width_mm on either side of the limit from
    # one call to the next under load; a small tolerance keeps them inside.
    distance = distance_transform_edt(~inside, sampling=tumour.GetSpacing()[::-1])
    shell = sitk.GetImageFromArray(
        ((distance > 0) & (distance <= width_mm + 1e-6)).astype(np.uint8)
    )
    shell.CopyInformation(tumour)
    if image is not None:
        body = body_mask(image) if body is None else sitk.Cast(body > 0, sitk.sitkUInt8)
        values = sitk.GetArrayViewFromImage(image)
        median = float(np.median(values[sitk.GetArrayViewFromImage(body) > 0]))
        tissue = sitk.Cast(image > dark_fraction * median, sitk.sitkUInt8)
        tissue.CopyInformation(tumour)
        body.CopyInformation(tumour)
        shell = sitk.And(sitk.And(shell, body), tissue)
    out: sitk.Image = sitk.Cast(shell, sitk.sitkUInt8)
    return out


def habitats(
    images: Sequence[sitk.Image], tumour: sitk.Image, *, k: int = 3, seed: int = 0
) -> sitk.Image:
    """Labels 1..k inside ``tumour`` from K-means on the images' z-scored intensities.

    ``images`` must share the tumour's grid (carry the other sequence onto it
    first). Each channel is z-scored inside the tumour so no sequence
    dominates by its scale. Clusters are numbered by increasing mean of the
    first channel: the result does not depend on K-means' arbitrary order.
    """
    inside = sitk.GetArrayViewFromImage(tumour) > 0
    n = int(inside.sum())
    if n < k:
        raise ValueError(f"tumour has {n} voxels: too few for {k} habitats")
    columns = []
    for image in images:
        if image.GetSize() != tumour.GetSize():
            raise ValueError("habitat images must be on the tumour's grid")
        v = sitk.GetArrayViewFromImage(image)[inside].astype(np.float64)
        columns.append((v - v.mean()) / (v.std() or 1.0))
    features = np.column_stack(columns)
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features)
    order = np.argsort([features[labels == c, 0].mean() for c in range(k)])
    rank = np.empty(k, dtype=np.uint8)
    rank[order] = np.arange(1, k + 1, dtype=np.uint8)
    out_arr = np.zeros(inside.shape, np.uint8)
    out_arr[inside] = rank[labels]
    out = sitk.GetImageFromArray(out_arr)
    out.CopyInformation(tumour)
    return out


def habitat_counts(labels: sitk.Image, k: int = 3) -> dict[str, float]:
    """Voxel count, volume (ml) and fraction of the tumour for each habitat."""
    arr = sitk.GetArrayViewFromImage(labels)
    total = int((arr > 0).sum())
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000
    out: dict[str, float] = {}
    for h in range(1, k + 1):
        count = int((arr == h).sum())
        out[f"habitat{h}_voxels"] = count
        out[f"habitat{h}_ml"] = round(count * voxel_ml, 4)
        out[f"habitat{h}_fraction"] = count / total if total else 0.0
    return out
