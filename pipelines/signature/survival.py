"""Survival statistics for the PFS signature (seed 000), on lifelines and scikit-survival.

- :func:`cox`: multivariable Cox (Efron ties, as R's ``coxph``) with the
  Breslow baseline survival a nomogram needs for probabilities at fixed times.
- :func:`univariate_cox`: one Cox model per feature, Benjamini-Hochberg
  adjusted p-values (the filter before LASSO).
- :func:`lasso_cox`: L1-penalised Cox with the penalty chosen by K-fold
  cross-validated Harrell's C (scikit-survival's Coxnet path); the final fit
  is converged to the optimum R's glmnet reaches (see :data:`LASSO_TOL`).
- :func:`harrell_c` / :func:`bootstrap_c`: concordance and its percentile CI.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from lifelines.exceptions import ConvergenceError
from lifelines.utils import concordance_index
from sklearn.model_selection import KFold
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.util import Surv

#: Coordinate-descent tolerance of the final LASSO-Cox fit (largest coefficient update).
#: scikit-survival's default, 1e-7, stops about 1.7e-3 short of the optimum on the demo
#: cohort (140 cases, 220 correlated features); 1e-12 meets the optimality (KKT)
#: conditions to about 1e-6, as R glmnet 4.1 does with ``thresh=1e-14``.
LASSO_TOL = 1e-12


@dataclass
class CoxModel:
    """A fitted Cox model: coefficients with SE and p, and the baseline survival curve."""

    coefficients: pd.Series
    standard_errors: pd.Series
    p_values: pd.Series
    concordance: float
    baseline_times: np.ndarray
    baseline_survival: np.ndarray
    means: pd.Series

    def linear_predictor(self, x: pd.DataFrame) -> np.ndarray:
        """Sum of coefficient * (value - training mean): lifelines' and R's centring."""
        cols = list(self.coefficients.index)
        centred = x[cols].to_numpy(float) - self.means[cols].to_numpy(float)
        out: np.ndarray = centred @ self.coefficients.to_numpy(float)
        return out

    def survival_at(self, x: pd.DataFrame, times: list[float]) -> np.ndarray:
        """S(t | x) = S0(t) ^ exp(lp) at each time (rows: cases, columns: times)."""
        idx = np.searchsorted(self.baseline_times, times, side="right") - 1
        s0 = np.where(idx >= 0, self.baseline_survival[np.clip(idx, 0, None)], 1.0)
        out: np.ndarray = np.power(s0[None, :], np.exp(self.linear_predictor(x))[:, None])
        return out


def cox(data: pd.DataFrame, duration: str, event: str, covariates: list[str]) -> CoxModel:
    """Multivariable Cox proportional hazards (no penalty)."""
    fitter = CoxPHFitter()
    fitter.fit(data[[*covariates, duration, event]], duration_col=duration, event_col=event)
    baseline = fitter.baseline_survival_
    return CoxModel(
        coefficients=fitter.params_.copy(),
        standard_errors=fitter.standard_errors_.copy(),
        p_values=fitter.summary["p"].copy(),
        concordance=float(fitter.concordance_index_),
        baseline_times=baseline.index.to_numpy(float),
        baseline_survival=baseline.iloc[:, 0].to_numpy(float),
        means=fitter._norm_mean.copy(),
    )


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values (monotone, capped at 1), as R's ``p.adjust(method="BH")``."""
    p = np.asarray(p, float)
    n = p.size
    order = np.argsort(p)
    ranked = p[order] * n / np.arange(1, n + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def univariate_cox(x: pd.DataFrame, time: np.ndarray, event: np.ndarray) -> pd.DataFrame:
    """Per-feature Cox: coefficient, Wald p and BH-adjusted p, sorted by p."""
    rows = []
    for column in x.columns:
        frame = pd.DataFrame({"x": x[column].to_numpy(float), "t": time, "e": event})
        try:
            model = cox(frame, "t", "e", ["x"])
            rows.append((column, float(model.coefficients["x"]), float(model.p_values["x"])))
        except (ConvergenceError, ValueError, np.linalg.LinAlgError):
            # A constant or perfectly separating feature: not a candidate.
            rows.append((column, float("nan"), 1.0))
    table = pd.DataFrame(rows, columns=["feature", "coef", "p"])
    table["p_adj"] = benjamini_hochberg(table["p"].to_numpy())
    return table.sort_values("p").reset_index(drop=True)


def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C: the share of comparable pairs where the higher risk fails first."""
    return float(concordance_index(time, -np.asarray(risk, float), event))


def bootstrap_c(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, *, n: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """(C, low, high): Harrell's C and its 95 % percentile bootstrap interval over cases."""
    rng = np.random.default_rng(seed)
    time, event, risk = (np.asarray(a) for a in (time, event, risk))
    values = []
    for _ in range(n):
        i = rng.integers(0, time.size, time.size)
        if event[i].sum() == 0:
            continue
        values.append(harrell_c(time[i], event[i], risk[i]))
    return (
        harrell_c(time, event, risk),
        float(np.percentile(values, 2.5)),
        float(np.percentile(values, 97.5)),
    )


def lasso_cox(
    x: pd.DataFrame, time: np.ndarray, event: np.ndarray, *, folds: int = 5, seed: int = 0
) -> tuple[pd.Series, float, pd.DataFrame]:
    """L1 Cox with the penalty of best mean held-out C over ``folds`` folds.

    Returns the coefficients at that penalty (fitted on all of ``x``), the
    penalty, and the cross-validation curve (alpha, mean C, SD, non-zero).
    ``x`` should be standardised (the signature z-scores features first) and
    free of exact duplicate columns (:mod:`pipelines.signature.dedupe`): with
    twins the optimum is not unique.

    The problem solved at penalty ``alpha`` is glmnet's: minimise
    ``-loglik(beta) / n + alpha * sum(|beta|)``, with Breslow's partial
    likelihood (a case censored at an event time is still at risk then, as
    in R's ``coxph``). The same ``alpha`` as glmnet's ``lambda``
    (``family="cox"``, ``standardize=FALSE``) gives the same coefficients;
    glmnet 4.1 keeps a censoring tied with an event in the risk set or not
    depending on the order of the rows, so compare on data without such ties.
    The final fit follows the path down to the chosen penalty (warm starts,
    as glmnet) with tolerance :data:`LASSO_TOL`. The cross-validation fits
    only rank penalties by held-out C and keep scikit-survival's default
    tolerance: a tight one costs about five times as long, and nested
    cross-validation with permutations repeats these fits thousands of times.
    """
    y = Surv.from_arrays(event=np.asarray(event, bool), time=np.asarray(time, float))
    values = x.to_numpy(float)
    path = CoxnetSurvivalAnalysis(l1_ratio=1.0, alpha_min_ratio=0.01, n_alphas=50)
    path.fit(values, y)
    alphas = path.alphas_
    scores = np.full((folds, alphas.size), np.nan)
    splitter = KFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (train, test) in enumerate(splitter.split(values)):
        model = CoxnetSurvivalAnalysis(l1_ratio=1.0, alphas=alphas, fit_baseline_model=False)
        try:
            model.fit(values[train], y[train])
        except ArithmeticError:
            continue
        for j, alpha in enumerate(alphas):
            risk = model.predict(values[test], alpha=alpha)
            if event[test].sum() > 0 and np.ptp(risk) > 0:
                # events, but maybe no comparable pair in this fold
                with contextlib.suppress(ZeroDivisionError):
                    scores[k, j] = harrell_c(time[test], event[test], risk)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a penalty no fold could score
        mean = np.nanmean(scores, axis=0)
    # No fold could rank any penalty (tiny folds, or shuffled outcomes in a
    # permutation test): the largest penalty, i.e. the empty model.
    best = int(np.nanargmax(mean)) if np.isfinite(mean).any() else 0
    final = CoxnetSurvivalAnalysis(
        l1_ratio=1.0, alphas=alphas[: best + 1], tol=LASSO_TOL, fit_baseline_model=False
    )
    final.fit(values, y)
    coef = pd.Series(final.coef_[:, -1], index=x.columns)
    curve = pd.DataFrame(
        {
            "alpha": alphas,
            "cv_c": mean,
            "cv_c_sd": np.nanstd(scores, axis=0),
            "nonzero": (np.abs(path.coef_) > 0).sum(axis=0),
        }
    )
    return coef, float(alphas[best]), curve
