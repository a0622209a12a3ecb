"""Training-time augmentation of (z, y, x) patches, nnU-Net's list sized for a 2-core CPU.

Two levels: ``light`` is what the first demo model was trained with
(left-right and front-back mirroring, a small intensity jitter); ``heavy``
adds what nnU-Net applies by default, each with its own probability:
in-plane rotation and scaling, a smooth elastic deformation, a multiplicative
bias field (the raw scanner images the node sees are not N4-corrected, the
real training crops are), gamma, brightness and contrast, Gaussian noise and
blur, simulated low resolution, and mirroring along every axis.

Geometric transforms act in-plane (slices are 3-5 mm apart: rotating across
them would invent anatomy), with one map for image and mask; the mask is
re-binarised at 0.5 after linear interpolation.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

LEVELS = ("light", "heavy")


def _inplane_warp(
    img: np.ndarray, msk: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rotation (+-30 deg), scaling (0.75-1.3) and a smooth elastic field, in every slice alike."""
    _, ny, nx = img.shape
    yy, xx = np.meshgrid(
        np.arange(ny, dtype=np.float32), np.arange(nx, dtype=np.float32), indexing="ij"
    )
    cy, cx = (ny - 1) / 2, (nx - 1) / 2
    angle = np.deg2rad(rng.uniform(-30, 30)) if rng.random() < 0.3 else 0.0
    scale = rng.uniform(0.75, 1.3) if rng.random() < 0.3 else 1.0
    c, s = np.cos(angle) / scale, np.sin(angle) / scale
    sy = cy + c * (yy - cy) - s * (xx - cx)
    sx = cx + s * (yy - cy) + c * (xx - cx)
    elastic = rng.random() < 0.2
    if not elastic and angle == 0.0 and scale == 1.0:
        return img, msk
    if elastic:  # smoothed random displacements, a few voxels
        sigma = rng.uniform(8, 13)
        alpha = rng.uniform(2, 6)
        for grid in (sy, sx):
            field = ndimage.gaussian_filter(rng.standard_normal((ny, nx)).astype(np.float32), sigma)
            field *= alpha / (float(np.abs(field).max()) or 1.0)
            grid += field
    coords = np.stack([sy, sx])
    fill = float(img.min())
    out_img = np.stack(
        [ndimage.map_coordinates(sl, coords, order=1, mode="constant", cval=fill) for sl in img]
    )
    out_msk = np.stack(
        [
            ndimage.map_coordinates(sl.astype(np.float32), coords, order=1, mode="constant") >= 0.5
            for sl in msk
        ]
    ).astype(msk.dtype)
    return out_img.astype(np.float32), out_msk


def _bias_field(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative field within about +-25 %, as an uncorrected coil gives."""
    coarse = rng.uniform(-1, 1, size=(2, 3, 3)).astype(np.float32)
    zoom = [s / c for s, c in zip(shape, coarse.shape, strict=True)]
    field = ndimage.zoom(coarse, zoom, order=1)[: shape[0], : shape[1], : shape[2]]
    out: np.ndarray = np.exp(0.25 * field)
    return out


def _low_resolution(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Down-sample in-plane by 1-2x and back (nearest down, linear up), as a coarser scan looks."""
    factor = rng.uniform(1.0, 2.0)
    small = ndimage.zoom(img, (1, 1 / factor, 1 / factor), order=0)
    back = ndimage.zoom(
        small, [a / b for a, b in zip(img.shape, small.shape, strict=True)], order=1
    )
    out = np.full_like(img, float(img.min()))
    z, y, x = (min(a, b) for a, b in zip(img.shape, back.shape, strict=True))
    out[:z, :y, :x] = back[:z, :y, :x]
    return out


def augment(
    img: np.ndarray, msk: np.ndarray, rng: np.random.Generator, level: str = "heavy"
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented copy of a normalised (z, y, x) patch and its mask."""
    if level not in LEVELS:
        raise ValueError(f"unknown augmentation level {level!r} ({', '.join(LEVELS)})")
    if level == "light":
        for axis in (1, 2):
            if rng.random() < 0.5:
                img, msk = np.flip(img, axis), np.flip(msk, axis)
        return img * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1), msk
    img, msk = _inplane_warp(img, msk, rng)
    lo = float(img.min())
    if rng.random() < 0.3:
        img = lo + (img - lo) * _bias_field(img.shape, rng)
    if rng.random() < 0.15:
        img = img + rng.normal(0, rng.uniform(0, 0.1), img.shape).astype(np.float32)
    if rng.random() < 0.2:
        img = ndimage.gaussian_filter(img, (0, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)))
    if rng.random() < 0.15:
        img = img * rng.uniform(0.75, 1.25)  # brightness
    if rng.random() < 0.15:  # contrast around the mean, range kept
        mean, top, bottom = float(img.mean()), float(img.max()), float(img.min())
        img = np.clip((img - mean) * rng.uniform(0.75, 1.25) + mean, bottom, top)
    if rng.random() < 0.25:
        img = _low_resolution(img, rng)
    if rng.random() < 0.3:  # gamma on the patch's own range, sometimes on the inverted image
        invert = rng.random() < 0.15
        x = -img if invert else img
        bottom, span = float(x.min()), float(np.ptp(x)) or 1.0
        x = ((x - bottom) / span) ** rng.uniform(0.7, 1.5) * span + bottom
        img = -x if invert else x
    for axis in (0, 1, 2):
        if rng.random() < 0.5:
            img, msk = np.flip(img, axis), np.flip(msk, axis)
    return np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(msk)
