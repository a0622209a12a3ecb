"""Statistics for the logistic endpoints (grade, seed 001; lung metastasis, seed 002).

- :func:`mann_whitney_filter`: features that differ between classes (U test).
- :func:`mrmr`: minimum-redundancy maximum-relevance ranking (relevance: mutual
  information with the label; redundancy: mean absolute Spearman correlation
  with the features already chosen; the MID difference of the two).
- :func:`lasso_logistic`: L1 logistic regression, C chosen by stratified K-fold AUC.
- :func:`delong`: AUC with its DeLong variance (fast algorithm of Sun & Xu
  2014), the 95 % CI, and the paired DeLong test of two scores.
- :func:`hosmer_lemeshow`: calibration chi-square over risk deciles.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.feature_selection import mutual_info_classif
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score


def mann_whitney_filter(x: pd.DataFrame, y: np.ndarray, alpha: float = 0.05) -> list[str]:
    """Columns whose two-sided Mann-Whitney U p-value is below ``alpha``, by p."""
    y = np.asarray(y).astype(bool)
    p = {
        c: stats.mannwhitneyu(x.loc[y, c], x.loc[~y, c], alternative="two-sided").pvalue
        for c in x.columns
        if x[c].nunique() > 1
    }
    return [c for c, v in sorted(p.items(), key=lambda kv: kv[1]) if v < alpha]


def mrmr(x: pd.DataFrame, y: np.ndarray, k: int = 30, seed: int = 0) -> list[str]:
    """The ``k`` columns chosen greedily by relevance minus mean redundancy (MID)."""
    relevance = pd.Series(
        mutual_info_classif(x.to_numpy(float), y, random_state=seed), index=x.columns
    )
    ranks = x.rank().to_numpy(float)
    ranks = (ranks - ranks.mean(axis=0)) / np.where(ranks.std(axis=0) > 0, ranks.std(axis=0), 1)
    chosen: list[int] = []
    redundancy = np.zeros(x.shape[1])
    for _ in range(min(k, x.shape[1])):
        score = relevance.to_numpy() - (redundancy / max(len(chosen), 1))
        score[chosen] = -np.inf
        best = int(np.argmax(score))
        chosen.append(best)
        redundancy += np.abs(ranks.T @ ranks[:, best]) / len(ranks)
    return [str(x.columns[i]) for i in chosen]


def lasso_logistic(
    x: pd.DataFrame, y: np.ndarray, *, folds: int = 5, seed: int = 0
) -> tuple[pd.Series, float, float]:
    """L1 logistic coefficients at the C of best mean CV AUC; (coefficients, intercept, C)."""
    grid = np.logspace(-2.5, 1.5, 25)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = []
    for c in grid:
        model = LogisticRegression(l1_ratio=1.0, C=c, solver="liblinear")
        scores.append(cross_val_score(model, x, y, cv=splitter, scoring="roc_auc").mean())
    best = float(grid[int(np.argmax(scores))])
    final = LogisticRegression(l1_ratio=1.0, C=best, solver="liblinear").fit(x, y)
    return pd.Series(final.coef_[0], index=x.columns), float(final.intercept_[0]), best


def _midrank(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = stats.rankdata(x, method="average")
    return out


def _delong_components(
    y: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and the V10/V01 structural components for each row of ``scores``."""
    y = np.asarray(y).astype(bool)
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    tx = np.array([_midrank(r) for r in pos])
    ty = np.array([_midrank(r) for r in neg])
    tz = np.array([_midrank(r) for r in scores])
    auc = (tz[:, y].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, y] - tx) / n
    v01 = 1 - (tz[:, ~y] - ty) / m
    return auc, v10, v01


def delong(y: np.ndarray, score: np.ndarray, other: np.ndarray | None = None) -> dict[str, float]:
    """AUC, DeLong SE and 95 % CI; with ``other``, the paired test of the two AUCs."""
    rows = np.vstack([score] if other is None else [score, other]).astype(float)
    auc, v10, v01 = _delong_components(np.asarray(y), rows)
    m, n = v10.shape[1], v01.shape[1]
    cov = np.atleast_2d(np.cov(v10) / m + np.cov(v01) / n)
    se = float(np.sqrt(cov[0, 0]))
    out = {
        "auc": float(auc[0]),
        "se": se,
        "ci_low": float(max(0.0, auc[0] - 1.959964 * se)),
        "ci_high": float(min(1.0, auc[0] + 1.959964 * se)),
    }
    if other is not None:
        diff_var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
        z = float((auc[0] - auc[1]) / np.sqrt(diff_var)) if diff_var > 0 else 0.0
        out |= {"auc_other": float(auc[1]), "z": z, "p": float(2 * stats.norm.sf(abs(z)))}
    return out


def hosmer_lemeshow(y: np.ndarray, p: np.ndarray, groups: int = 10) -> tuple[float, float]:
    """(chi-square, p) over ``groups`` quantile groups of predicted risk, df = groups - 2."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    order = np.argsort(p)
    chi2 = 0.0
    for chunk in np.array_split(order, groups):
        observed, expected, count = y[chunk].sum(), p[chunk].sum(), len(chunk)
        if 0 < expected < count:
            chi2 += (observed - expected) ** 2 / (expected * (1 - expected / count))
    return float(chi2), float(stats.chi2.sf(chi2, groups - 2))
