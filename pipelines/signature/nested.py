"""Nested cross-validation of a radiomics signature on a small real cohort.

With ~38 patients the danger is optimism: a feature filter, a LASSO penalty
or a cut-off chosen on all patients and then "validated" on the same ones.
Here every data-driven step is refitted inside each outer training fold
(:func:`fit_fold`), and the outer test fold only ever sees the frozen model:

1. finite, non-constant features;
2. robust features: ICC(2,1) > ``icc_threshold`` across mask perturbations
   (eroded, dilated, shifted), computed on the training patients only;
3. z-score with training means and SDs; exact duplicates (identical or
   sign-flipped after z-scoring, e.g. Energy and TotalEnergy) dropped;
4. univariate filter: Mann-Whitney (binary) or Wald test of a one-feature
   Cox model (survival), unadjusted p < ``univariate_p`` (the two best
   features when fewer pass);
5. mRMR down to ``mrmr_k`` features: relevance = |2*AUC - 1| or |2*C - 1|
   (Somers' D), redundancy = mean |Spearman rho| with those already chosen;
6. LASSO (logistic: C by inner stratified 5-fold AUC; Cox: penalty by inner
   5-fold C-index), rad-score = the linear predictor.

The outer loop is repeated stratified k-fold (:func:`nested_cv`); each
repeat pools its out-of-fold scores into one AUC or Harrell's C; the
headline is the mean over repeats, with a 95 % CI from a bootstrap over
patients of that same mean. :func:`permutation_test` reruns the whole
nested CV with the outcome shuffled, so chance performance is on the page,
and :func:`baselines` scores tumour volume alone and clinical factors
alone on the very same splits.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedKFold

from pipelines.signature.dedupe import distinct_columns
from pipelines.signature.survival import harrell_c, lasso_cox

VOLUME = "T1:tumour:original_shape_MeshVolume"


@dataclass(frozen=True)
class Recipe:
    """The signature's settings: what the nested CV refits in every fold."""

    icc_threshold: float = 0.75
    univariate_p: float = 0.10
    mrmr_k: int = 10
    lasso_folds: int = 5


@dataclass(frozen=True)
class Outcome:
    """A binary label (``event`` only) or a survival outcome (``time`` and ``event``)."""

    kind: str  # "binary" | "survival"
    event: np.ndarray
    time: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> Outcome:
        """The outcome of ``rows`` (positions)."""
        return Outcome(self.kind, self.event[rows], None if self.time is None else self.time[rows])

    def permuted(self, rng: np.random.Generator) -> Outcome:
        """Outcomes shuffled across patients ((time, event) pairs stay together)."""
        order = rng.permutation(self.event.size)
        return self.take(order)

    @property
    def strata(self) -> np.ndarray:
        """What the outer folds are stratified on: the label or the event indicator."""
        return self.event.astype(int)


@dataclass
class Fitted:
    """A frozen signature: z-scoring, coefficients and what each step kept."""

    names: list[str]
    means: np.ndarray
    sds: np.ndarray
    coefficients: np.ndarray
    intercept: float
    steps: dict[str, int] = field(default_factory=dict)
    penalty: float | None = None
    fill: np.ndarray | None = None  # training means that stand in for missing values

    def score(self, x: pd.DataFrame) -> np.ndarray:
        """Rad-score (log-odds or Cox linear predictor) of each row of ``x``."""
        if not self.names:
            return np.full(len(x), self.intercept)
        values = x[self.names].to_numpy(float)
        if self.fill is not None:
            values = np.where(np.isnan(values), self.fill, values)
        z = (values - self.means) / self.sds
        out: np.ndarray = self.intercept + z @ self.coefficients
        return out


# --- the steps ------------------------------------------------------------------------------


def icc21(raters: list[np.ndarray]) -> np.ndarray:
    """ICC(2,1) per column of (n subjects x f features) arrays, one per rater, vectorised."""
    x = np.stack(raters, axis=1)  # n, k, f
    n, k, _ = x.shape
    grand = x.mean(axis=(0, 1))
    ss_rows = k * ((x.mean(axis=1) - grand) ** 2).sum(axis=0)
    ss_cols = n * ((x.mean(axis=0) - grand) ** 2).sum(axis=0)
    ss_total = ((x - grand) ** 2).sum(axis=(0, 1))
    ss_error = ss_total - ss_rows - ss_cols
    bms, jms = ss_rows / (n - 1), ss_cols / (k - 1)
    ems = ss_error / ((n - 1) * (k - 1))
    den = bms + (k - 1) * ems + k * (jms - ems) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        out: np.ndarray = np.where(den > 0, (bms - ems) / den, np.nan)
    return out


def univariate_cox_p(z: np.ndarray, time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Wald p of a one-covariate Cox model (Breslow ties) for every column of ``z`` at once.

    Newton-Raphson on all columns together (25 steps at most, step-halving
    kept simple by capping the step at 5); a column that separates the
    events perfectly gets a huge coefficient and a large SE, hence p near 1.
    """
    order = np.argsort(-time, kind="stable")  # descending: risk sets are prefixes
    t, e, x = time[order], event[order].astype(bool), z[order]
    # tied times: the risk set of an event includes every case with time >= its time
    last = np.searchsorted(-t, -t, side="right") - 1  # index of the last case with the same time
    beta = np.zeros(x.shape[1])
    info = np.ones(x.shape[1])
    for _ in range(25):
        w = np.exp(np.clip(x * beta, -50, 50))
        s0 = np.cumsum(w, axis=0)[last]
        s1 = np.cumsum(w * x, axis=0)[last]
        s2 = np.cumsum(w * x * x, axis=0)[last]
        mean = s1[e] / s0[e]
        grad = (x[e] - mean).sum(axis=0)
        info = (s2[e] / s0[e] - mean**2).sum(axis=0)
        step = np.clip(grad / np.maximum(info, 1e-12), -5, 5)
        beta += step
        if np.max(np.abs(step)) < 1e-8:
            break
    se = 1 / np.sqrt(np.maximum(info, 1e-300))
    p: np.ndarray = 2 * stats.norm.sf(np.abs(beta / se))
    return p


def mann_whitney_p(z: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Two-sided Mann-Whitney U p for every column (1.0 for a constant column)."""
    pos, neg = z[label == 1], z[label == 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = stats.mannwhitneyu(pos, neg, axis=0, alternative="two-sided").pvalue
    out: np.ndarray = np.nan_to_num(p, nan=1.0)
    return out


def somers_d(z: np.ndarray, outcome: Outcome) -> np.ndarray:
    """|2*AUC - 1| (binary) or |2*C - 1| (survival) of every column: mRMR's relevance."""
    if outcome.kind == "binary":
        ranks = stats.rankdata(z, axis=0)
        pos = outcome.event == 1
        m, n = pos.sum(), (~pos).sum()
        auc = (ranks[pos].sum(axis=0) - m * (m + 1) / 2) / (m * n)
        out: np.ndarray = np.abs(2 * auc - 1)
        return out
    assert outcome.time is not None
    return np.array(
        [abs(2 * harrell_c(outcome.time, outcome.event, z[:, j]) - 1) for j in range(z.shape[1])]
    )


def mrmr_select(z: np.ndarray, relevance: np.ndarray, k: int) -> list[int]:
    """Greedy MID mRMR: relevance minus mean |Spearman rho| with the features already chosen."""
    ranks = stats.rankdata(z, axis=0)
    ranks = (ranks - ranks.mean(axis=0)) / np.where(ranks.std(axis=0) > 0, ranks.std(axis=0), 1)
    chosen: list[int] = []
    redundancy = np.zeros(z.shape[1])
    for _ in range(min(k, z.shape[1])):
        score = relevance - redundancy / max(len(chosen), 1)
        score[chosen] = -np.inf
        best = int(np.argmax(score))
        chosen.append(best)
        redundancy += np.abs(ranks.T @ ranks[:, best]) / len(ranks)
    return chosen


def lasso_logistic(
    z: pd.DataFrame, label: np.ndarray, *, folds: int = 5, seed: int = 0
) -> tuple[pd.Series, float, float]:
    """L1 logistic at the C of best mean inner-fold AUC: (coefficients, intercept, C).

    The grid and folds of :func:`pipelines.signature.classify.lasso_logistic`,
    scored with a direct loop (that one's ``cross_val_score`` overhead is 40x
    the fits on 30 patients, and the nested CV and its permutations make
    tens of thousands of them).
    """
    grid = np.logspace(-2.5, 1.5, 25)
    values = z.to_numpy(float)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = np.zeros(grid.size)
    for train, test in splitter.split(values, label):
        for j, c in enumerate(grid):
            model = LogisticRegression(l1_ratio=1.0, C=c, solver="liblinear", max_iter=1000)
            model.fit(values[train], label[train])
            scores[j] += auc(label[test], values[test] @ model.coef_[0])
    best = float(grid[int(np.argmax(scores))])
    final = LogisticRegression(l1_ratio=1.0, C=best, solver="liblinear", max_iter=1000)
    final.fit(values, label)
    return pd.Series(final.coef_[0], index=z.columns), float(final.intercept_[0]), best


def fit_fold(
    x: pd.DataFrame,
    outcome: Outcome,
    recipe: Recipe,
    raters: list[pd.DataFrame] | None = None,
    *,
    seed: int = 0,
) -> Fitted:
    """Fit the whole signature recipe on ``x`` (training patients only); see the module doc."""
    steps = {"features": x.shape[1]}
    values = x.to_numpy(float)
    ok = np.isfinite(values).all(axis=0) & (np.nanstd(values, axis=0) > 0)
    x = x.loc[:, ok]
    steps["non_constant"] = x.shape[1]
    if raters:
        icc = icc21([r.loc[x.index, x.columns].to_numpy(float) for r in raters])
        x = x.loc[:, icc > recipe.icc_threshold]
        steps["robust_icc"] = x.shape[1]
    means, sds = x.mean().to_numpy(float), x.std(ddof=0).to_numpy(float)
    z = (x - means) / sds
    z = z[distinct_columns(z)]
    steps["distinct"] = z.shape[1]
    zv = z.to_numpy(float)
    if outcome.kind == "binary":
        p = mann_whitney_p(zv, outcome.event)
    else:
        assert outcome.time is not None
        p = univariate_cox_p(zv, outcome.time, outcome.event)
    passing = np.flatnonzero(p < recipe.univariate_p)
    if passing.size < 2:
        passing = np.argsort(p)[:2]
    steps["univariate"] = int(passing.size)
    relevance = somers_d(zv[:, passing], outcome)
    picked = [int(passing[i]) for i in mrmr_select(zv[:, passing], relevance, recipe.mrmr_k)]
    candidates = [str(z.columns[i]) for i in picked]
    steps["mrmr"] = len(candidates)
    zc = z[candidates]
    if outcome.kind == "binary":
        coef, intercept, penalty = lasso_logistic(
            zc, outcome.event.astype(int), folds=recipe.lasso_folds, seed=seed
        )
    else:
        assert outcome.time is not None
        coef, penalty, _ = lasso_cox(
            zc, outcome.time, outcome.event, folds=recipe.lasso_folds, seed=seed
        )
        intercept = 0.0
    keep = coef[coef != 0]
    steps["lasso"] = int(keep.size)
    where = [list(x.columns).index(n) for n in keep.index]
    return Fitted(
        names=list(keep.index),
        means=means[where],
        sds=sds[where],
        coefficients=keep.to_numpy(float),
        intercept=float(intercept),
        steps=steps,
        penalty=float(penalty),
    )


# --- metrics --------------------------------------------------------------------------------


def auc(label: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half)."""
    ranks = stats.rankdata(score)
    pos = label == 1
    m, n = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - m * (m + 1) / 2) / (m * n))


def metric(outcome: Outcome, score: np.ndarray) -> float:
    """AUC (binary) or Harrell's C (survival) of ``score`` (higher = more risk)."""
    if outcome.kind == "binary":
        return auc(outcome.event, score)
    assert outcome.time is not None
    return harrell_c(outcome.time, outcome.event, score)


def mean_metric(outcome: Outcome, oof: np.ndarray) -> float:
    """Mean over repeats (rows of ``oof``) of the pooled out-of-fold metric."""
    return float(np.mean([metric(outcome, row) for row in oof]))


def bootstrap_ci(
    outcome: Outcome, oof: np.ndarray, *, n: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile CI of :func:`mean_metric` over patients resampled with replacement."""
    rng = np.random.default_rng(seed)
    values = []
    size = outcome.event.size
    for _ in range(n):
        rows = rng.integers(0, size, size)
        sub = outcome.take(rows)
        if sub.event.sum() == 0 or (outcome.kind == "binary" and sub.event.sum() == size):
            continue
        values.append(mean_metric(sub, oof[:, rows]))
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def calibration(outcome: Outcome, oof: np.ndarray) -> dict[str, float]:
    """Out-of-fold calibration, averaged over repeats.

    Binary: calibration-in-the-large (mean predicted - observed rate),
    calibration slope (logistic regression of the label on the OOF log-odds;
    1 is ideal, below 1 means over-fitted), Brier score. Survival: the slope
    of a Cox model on the OOF linear predictor.
    """
    import statsmodels.api as sm

    rows: list[dict[str, float]] = []
    for lp in oof:
        if outcome.kind == "binary":
            p = 1 / (1 + np.exp(-lp))
            try:
                fit = sm.Logit(outcome.event, sm.add_constant(lp)).fit(disp=0)
                slope = float(fit.params[1])
            except Exception:  # perfect separation: no finite slope
                slope = math.nan
            rows.append(
                {
                    "in_the_large": float(p.mean() - outcome.event.mean()),
                    "slope": slope,
                    "brier": float(np.mean((p - outcome.event) ** 2)),
                }
            )
        else:
            assert outcome.time is not None
            rows.append({"slope": float(_cox_slope(lp, outcome.time, outcome.event))})
    return {k: round(float(np.nanmean([r[k] for r in rows])), 4) for k in rows[0]}


def _cox_slope(lp: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Coefficient of a one-covariate Cox model on ``lp`` (Breslow), by Newton steps."""
    if np.ptp(lp) == 0:
        return math.nan
    scale = float(np.std(lp))
    order = np.argsort(-time, kind="stable")
    t, e, x = time[order], event[order].astype(bool), lp[order] / scale
    last = np.searchsorted(-t, -t, side="right") - 1
    beta = 0.0
    for _ in range(50):
        w = np.exp(np.clip(beta * x, -50, 50))
        s0, s1, s2 = (np.cumsum(w * x**k)[last] for k in (0, 1, 2))
        mean = s1[e] / s0[e]
        grad = float((x[e] - mean).sum())
        info = float((s2[e] / s0[e] - mean**2).sum())
        step = float(np.clip(grad / max(info, 1e-12), -5, 5))
        beta += step
        if abs(step) < 1e-10:
            break
    return beta / scale


def td_auc(
    outcome: Outcome, oof: np.ndarray, days: tuple[int, ...] = (365, 730, 1095)
) -> dict[str, float]:
    """Cumulative/dynamic AUC at ``days`` of the OOF linear predictor, averaged over repeats.

    Censoring weights are estimated on the evaluated patients themselves
    (R's timeROC / riskRegression convention for a single data set).
    """
    from sksurv.metrics import cumulative_dynamic_auc
    from sksurv.util import Surv

    assert outcome.time is not None
    t, e = outcome.time, outcome.event.astype(bool)
    usable = [d for d in days if t.min() < d < t[e].max()]
    if not usable:
        return {}
    y = Surv.from_arrays(e, t)
    values = np.array([cumulative_dynamic_auc(y, y, lp, usable)[0] for lp in oof])
    return {str(d): round(float(v), 4) for d, v in zip(usable, values.mean(axis=0), strict=True)}


# --- the outer loop -------------------------------------------------------------------------


@dataclass
class CvResult:
    """Out-of-fold scores of every repeat and what the folds selected."""

    oof: np.ndarray  # repeats x patients
    selected: list[list[str]]
    steps: list[dict[str, int]]
    splits: list[tuple[int, int, np.ndarray]]  # (repeat, fold, test positions)

    def selection_frequency(self) -> dict[str, float]:
        """Share of outer folds that kept each feature, most frequent first."""
        counts: dict[str, int] = {}
        for names in self.selected:
            for n in names:
                counts[n] = counts.get(n, 0) + 1
        total = len(self.selected)
        return {n: round(c / total, 3) for n, c in sorted(counts.items(), key=lambda kv: -kv[1])}


def outer_splits(
    outcome: Outcome, folds: int, repeats: int, seed: int
) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """(repeat, fold, train positions, test positions), stratified on label / event."""
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    out = []
    for i, (train, test) in enumerate(splitter.split(np.zeros(outcome.event.size), outcome.strata)):
        out.append((i // folds, i % folds, train, test))
    return out


def nested_cv(
    x: pd.DataFrame,
    outcome: Outcome,
    recipe: Recipe,
    raters: list[pd.DataFrame] | None = None,
    *,
    folds: int = 5,
    repeats: int = 10,
    seed: int = 0,
    fit: Callable[..., Fitted] | None = None,
) -> CvResult:
    """Out-of-fold rad-scores of every patient in every repeat (see the module doc)."""
    fit = fit or fit_fold
    oof = np.full((repeats, len(x)), np.nan)
    selected, steps, splits = [], [], []
    for repeat, k, train, test in outer_splits(outcome, folds, repeats, seed):
        model = fit(
            x.iloc[train], outcome.take(train), recipe, raters, seed=seed + 1000 * repeat + k
        )
        oof[repeat, test] = model.score(x.iloc[test])
        selected.append(model.names)
        steps.append(model.steps)
        splits.append((repeat, k, test))
    return CvResult(oof, selected, steps, splits)


def permutation_test(
    x: pd.DataFrame,
    outcome: Outcome,
    recipe: Recipe,
    raters: list[pd.DataFrame] | None,
    observed: float,
    *,
    permutations: int = 100,
    folds: int = 5,
    repeats: int = 10,
    seed: int = 0,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The whole nested CV rerun on shuffled outcomes; p = (1 + #null >= observed) / (1 + n).

    Each permutation uses the same number of repeats and folds as the
    observed figure, so the null distribution is of the very statistic
    reported.
    """
    from concurrent.futures import ProcessPoolExecutor

    rng = np.random.default_rng(seed + 7919)
    shuffled = [outcome.permuted(rng) for _ in range(permutations)]
    null: list[float] = []
    args = [(x, o, recipe, raters, folds, repeats, seed) for o in shuffled]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for i, value in enumerate(pool.map(_null_statistic, args)):
                null.append(value)
                if progress:
                    progress(i + 1, permutations)
    else:
        for i, a in enumerate(args):
            null.append(_null_statistic(a))
            if progress:
                progress(i + 1, permutations)
    values = np.array(null)
    return {
        "permutations": permutations,
        "repeats_per_permutation": repeats,
        "observed": round(observed, 4),
        "null_mean": round(float(values.mean()), 4),
        "null_95th": round(float(np.percentile(values, 95)), 4),
        "p": round(float((1 + (values >= observed).sum()) / (1 + permutations)), 4),
    }


def _null_statistic(args: tuple[Any, ...]) -> float:
    x, outcome, recipe, raters, folds, repeats, seed = args
    result = nested_cv(x, outcome, recipe, raters, folds=folds, repeats=repeats, seed=seed)
    return mean_metric(outcome, result.oof)


# --- baselines on the same splits ----------------------------------------------------------


def fit_plain(
    x: pd.DataFrame, outcome: Outcome, recipe: Recipe, raters: Any = None, *, seed: int = 0
) -> Fitted:
    """An unpenalised logistic or Cox model on every column of ``x`` (a baseline).

    Missing values are filled with the training mean; columns are z-scored
    with training statistics, so the model is the same on any scale.
    """
    import statsmodels.api as sm
    from lifelines import CoxPHFitter

    filled = x.fillna(x.mean())
    means, sds = filled.mean().to_numpy(float), filled.std(ddof=0).to_numpy(float)
    sds = np.where(sds > 0, sds, 1.0)
    z = (filled.to_numpy(float) - means) / sds
    if outcome.kind == "binary":
        fit = sm.Logit(outcome.event, sm.add_constant(z, has_constant="add")).fit(
            disp=0, method="bfgs", maxiter=200
        )
        params = np.asarray(fit.params, float)
        intercept, coef = float(params[0]), params[1:]
    else:
        frame = pd.DataFrame(z, columns=[f"c{i}" for i in range(z.shape[1])])
        frame["t"], frame["e"] = outcome.time, outcome.event
        fitter = CoxPHFitter(penalizer=1e-4).fit(frame, "t", "e")
        coef = fitter.params_.to_numpy(float)
        intercept = 0.0
    return Fitted(list(x.columns), means, sds, coef, intercept, {}, fill=x.mean().to_numpy(float))


def summarise(outcome: Outcome, result: CvResult, *, seed: int = 0) -> dict[str, Any]:
    """Headline metric with CI and per-repeat spread, calibration and td-AUC."""
    value = mean_metric(outcome, result.oof)
    low, high = bootstrap_ci(outcome, result.oof, seed=seed)
    per_repeat = [metric(outcome, row) for row in result.oof]
    out: dict[str, Any] = {
        "metric": "AUC" if outcome.kind == "binary" else "Harrell's C",
        "value": round(value, 4),
        "ci95": [round(low, 4), round(high, 4)],
        "per_repeat_range": [round(min(per_repeat), 4), round(max(per_repeat), 4)],
        "calibration": calibration(outcome, result.oof),
    }
    if outcome.kind == "survival":
        out["td_auc"] = td_auc(outcome, result.oof)
    return out


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (for a card)."""
    return asdict(recipe)
