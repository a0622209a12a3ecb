"""Exact duplicate features after z-scoring, dropped before univariate filtering and selection.

Some radiomics features are exact linear copies of one another once each is
z-scored: PyRadiomics' ``Energy`` and ``TotalEnergy`` differ by the voxel
volume, a constant when every study is resampled to the same spacing (2 mm
in the demo). Left in, such a pair doubles a test in the Benjamini-Hochberg
filter and makes the LASSO problem non-unique (any split of the coefficient
between the twins is optimal, so two solvers, or two runs, disagree). A
column that is an exact negation of an earlier one (``x_j = a - b x_i``,
``b > 0``) carries the same information and is dropped as well.

"Exact" means equal up to floating-point round-off: every z-value within
``tol`` (default 1e-9 SD) of the earlier column's or its negation's.
Near-duplicates (correlation 0.99999, e.g. VoxelVolume and MeshVolume) are
left to the univariate filter and the LASSO.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Largest difference, in SDs, between two z-scored columns that count as copies.
DUPLICATE_TOL = 1e-9


def duplicates(z: pd.DataFrame, tol: float = DUPLICATE_TOL) -> dict[str, str]:
    """Columns of ``z`` that copy an earlier one, each mapped to the first column it copies.

    Parameters
    ----------
    z
        Features already z-scored (rows: the cases the decision is made on,
        normally the training cases; columns: features in their order).
    tol
        Largest absolute difference between z-values that still counts as equal.

    Returns
    -------
    dict
        ``{dropped: kept}`` in column order; ``kept`` is prefixed with ``-``
        when the dropped column is its negation.
    """
    values = z.to_numpy(float)
    if values.shape[1] < 2:
        return {}
    # Candidates first (|correlation| ~ 1, one matrix product), then the exact check.
    centred = values - values.mean(axis=0)
    norms = np.linalg.norm(centred, axis=0)
    unit = centred / np.where(norms > 0, norms, 1.0)
    close = np.abs(unit.T @ unit) > 1 - 1e-6
    names = [str(c) for c in z.columns]
    copies: dict[str, str] = {}
    for j in range(1, values.shape[1]):
        for i in np.flatnonzero(close[:j, j]):
            if names[i] in copies:  # a copy of a copy: matched through the first column
                continue
            if np.max(np.abs(values[:, j] - values[:, i])) <= tol:
                copies[names[j]] = names[i]
                break
            if np.max(np.abs(values[:, j] + values[:, i])) <= tol:
                copies[names[j]] = f"-{names[i]}"
                break
    return copies


def distinct_columns(z: pd.DataFrame, tol: float = DUPLICATE_TOL) -> list[str]:
    """Columns of z-scored ``z`` that are not an exact copy (or negation) of an earlier one."""
    dropped = duplicates(z, tol)
    return [str(c) for c in z.columns if str(c) not in dropped]


def standardise(
    x: pd.DataFrame, train: pd.Series
) -> tuple[pd.DataFrame, pd.Series, pd.Series, dict[str, str]]:
    """(z, means, SDs, copies): ``x`` z-scored with its ``train`` rows' means and SDs (ddof 0).

    Columns that copy an earlier one on the training rows (:func:`duplicates`)
    are dropped from ``z``; ``copies`` names them. Means and SDs are of every
    column, as a card stores them for the selected ones.
    """
    means, sds = x.loc[train].mean(), x.loc[train].std(ddof=0)
    z = (x - means) / sds
    copies = duplicates(z.loc[train])
    return z.drop(columns=list(copies)), means, sds, copies
