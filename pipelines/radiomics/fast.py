"""Compiled replacements for PyRadiomics' two slowest GLCM steps, bit-identical.

Profiling one (sequence, region) with the full parameter file
(``config/radiomics/mr-default.yaml``) shows over half the time in two pure
numpy loops of ``radiomics.glcm.RadiomicsGLCM``:

- ``getMCCFeatureValue`` builds Q(i, j) = sum_k p(i,k) p(j,k) / (p_x(i) p_y(k))
  with one full Ng x Ng x angles temporary per gray level k (~56 % of the
  time);
- ``_calculateCoefficients`` sums p(i, j) over the diagonals i + j = k and
  |i - j| = k with a boolean mask per k (~11 %).

The functions here do the same floating-point operations in the same order
(each Q element is accumulated over k from 0 upwards, each diagonal sum runs
over (i, j) in C order, no fast-math, so no re-association or fused
multiply-add), compiled with numba. Every feature value therefore stays
bit-for-bit what PyRadiomics computes; ``tests/pipelines/test_radiomics.py``
and ``bench/radiomics.py`` compare all of them.

A third, smaller one: ``imageoperations.getBinEdges`` takes the ROI's
minimum and maximum with Python's built-in ``min``/``max`` (~7 %).

Use :func:`accelerated` around PyRadiomics calls; outside it PyRadiomics is
untouched (the reference in the tests is plain PyRadiomics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numba
import numpy as np


@numba.njit(cache=True)
def _q_matrix(p: np.ndarray, px: np.ndarray, py: np.ndarray, eps: float) -> np.ndarray:
    """Q with shape (Nv, angles, Ng, Ng), summed over k in PyRadiomics' order."""
    nv, ng, _, na = p.shape
    q = np.zeros((nv, na, ng, ng))
    columns = np.ascontiguousarray(p.transpose(0, 3, 2, 1))  # v, angle, k, j
    for v in range(nv):
        for a in range(na):
            for i in range(ng):
                row = q[v, a, i]
                for k in range(ng):
                    pik = p[v, i, k, a]
                    den = px[v, i, 0, a] * py[v, 0, k, a] + eps
                    col = columns[v, a, k]
                    if k == 0:
                        for j in range(ng):
                            row[j] = (pik * col[j]) / den
                    else:
                        for j in range(ng):
                            row[j] += (pik * col[j]) / den
    return q


@numba.njit(cache=True)
def _diagonal_sums(p: np.ndarray, levels: np.ndarray, ng: int) -> tuple[np.ndarray, np.ndarray]:
    """p_{x+y}(k) for k = 2 .. 2Ng and p_{x-y}(k) for k = 0 .. Ng-1, shapes (Nv, k, angles).

    ``levels`` are the gray levels present in the region (the GLCM's rows),
    so i + j and |i - j| are taken on those values, as PyRadiomics does.
    Each sum adds the (i, j) cells in C order, the order of PyRadiomics'
    boolean-mask gather.
    """
    nv, n, _, na = p.shape
    add = np.zeros((nv, 2 * ng - 1, na))
    sub = np.zeros((nv, ng, na))
    for v in range(nv):
        for i in range(n):
            for j in range(n):
                s = levels[i] + levels[j] - 2
                d = abs(levels[i] - levels[j])
                for a in range(na):
                    add[v, s, a] += p[v, i, j, a]
                    sub[v, d, a] += p[v, i, j, a]
    return add, sub


def _mcc(self: Any) -> Any:
    """RadiomicsGLCM.getMCCFeatureValue with the Q matrix compiled."""
    px = self.coefficients["px"]
    py = self.coefficients["py"]
    eps = self.coefficients["eps"]
    q = _q_matrix(np.ascontiguousarray(self.P_glcm, dtype=np.float64), px, py, eps)
    eigen = np.linalg.eigvals(q)
    eigen.sort()
    if eigen.shape[2] < 2:
        return 1  # flat region, as PyRadiomics
    mcc = np.sqrt(eigen[:, :, -2])
    return np.nanmean(mcc, 1).real


def _coefficients(self: Any) -> None:
    """RadiomicsGLCM._calculateCoefficients with the diagonal sums compiled."""
    ng = self.coefficients["Ng"]
    eps = np.spacing(1)
    levels = self.coefficients["grayLevels"].astype("float")
    i, j = np.meshgrid(levels, levels, indexing="ij", sparse=True)
    p = self.P_glcm
    px = p.sum(2, keepdims=True)
    py = p.sum(1, keepdims=True)
    ux = np.sum(i[None, :, :, None] * p, (1, 2), keepdims=True)
    uy = np.sum(j[None, :, :, None] * p, (1, 2), keepdims=True)
    add, sub = _diagonal_sums(
        np.ascontiguousarray(p, dtype=np.float64), levels.astype(np.int64), int(ng)
    )
    hxy = (-1) * np.sum((p * np.log2(p + eps)), (1, 2))
    self.coefficients.update(
        eps=eps,
        i=i,
        j=j,
        kValuesSum=np.arange(2, (ng * 2) + 1, dtype="float"),
        kValuesDiff=np.arange(0, ng, dtype="float"),
        px=px,
        py=py,
        ux=ux,
        uy=uy,
        pxAddy=add,
        pxSuby=sub,
        HXY=hxy,
    )


def _bin_edges(parameterValues: np.ndarray, **kwargs: Any) -> Any:  # noqa: N803 (PyRadiomics' name)
    """imageoperations.getBinEdges, fixed bin width, with numpy's min/max.

    PyRadiomics takes the minimum and maximum with Python's built-in
    ``min``/``max``, one element at a time (~7 % of a unit). numpy's give the
    same element; with a bin count, or NaN among the values (where the
    built-ins answer differently), the original runs.
    """
    values = np.asarray(parameterValues)
    if kwargs.get("binCount") is not None or values.size == 0 or np.isnan(values).any():
        return _ORIGINAL["getBinEdges"](parameterValues, **kwargs)
    width = kwargs.get("binWidth", 25)
    minimum, maximum = values.min(), values.max()
    edges = np.arange(minimum - (minimum % width), maximum + 2 * width, width)
    if len(edges) == 1:  # flat region: one bin, as PyRadiomics
        return [edges[0] - 0.5, edges[0] + 0.5]
    return edges


_ORIGINAL: dict[str, Any] = {}


@contextlib.contextmanager
def accelerated() -> Iterator[None]:
    """Within the block, PyRadiomics' GLCM uses the compiled steps (same values)."""
    from radiomics import imageoperations
    from radiomics.glcm import RadiomicsGLCM

    _ORIGINAL.setdefault("getBinEdges", imageoperations.getBinEdges)
    _ORIGINAL.setdefault("getMCCFeatureValue", RadiomicsGLCM.getMCCFeatureValue)
    _ORIGINAL.setdefault("_calculateCoefficients", RadiomicsGLCM._calculateCoefficients)
    RadiomicsGLCM.getMCCFeatureValue = _mcc
    RadiomicsGLCM._calculateCoefficients = _coefficients
    imageoperations.getBinEdges = _bin_edges
    try:
        yield
    finally:
        RadiomicsGLCM.getMCCFeatureValue = _ORIGINAL["getMCCFeatureValue"]
        RadiomicsGLCM._calculateCoefficients = _ORIGINAL["_calculateCoefficients"]
        imageoperations.getBinEdges = _ORIGINAL["getBinEdges"]
