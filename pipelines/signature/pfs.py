"""Fitting the progression-free-survival signature and nomogram (seed 000), as a card.

Steps, each recorded in the card's ``training`` block with how many features
survived it:

1. split: the clinical table's ``split`` column (train/validation) when
   present, else a random ``val_fraction`` stratified by event;
2. robust features only (ICC > ``icc_threshold``) when ICCs are given;
3. optional ComBat on the ``batch`` column (fitted on training cases);
4. z-score with training means and SDs;
5. distinct: exact duplicates after z-scoring (on the training cases) dropped,
   the first by column order kept (:mod:`pipelines.signature.dedupe`);
6. univariate Cox, Benjamini-Hochberg adjusted p < ``p_threshold``;
7. LASSO-Cox, penalty by 5-fold cross-validated C; rad-score =
   sum of coefficient * z-feature over the non-zero coefficients;
8. high/low risk cut at the training median rad-score;
9. nomogram: multivariable Cox of rad-score with the clinical factors that
   are significant (p < 0.05) in univariate Cox on the training cases;
   a rad-score-only Cox model too, for studies without clinical factors.

Validation figures (C-index with bootstrap CI, time-dependent AUC at the
card's time points, log-rank p between risk groups, integrated Brier score)
are computed on the validation cases with everything frozen from training.
td-AUC and Brier scores weight cases by the inverse probability of censoring
estimated (Kaplan-Meier) on the cases being evaluated, as R's pec and
riskRegression do; each card names this (:data:`IPCW`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from lifelines.statistics import logrank_test
from sksurv.metrics import cumulative_dynamic_auc, integrated_brier_score
from sksurv.util import Surv

from pipelines.radiomics.combat import ComBat
from pipelines.scoring.clinical import male
from pipelines.signature.dedupe import standardise
from pipelines.signature.survival import (
    LASSO_TOL,
    CoxModel,
    bootstrap_c,
    cox,
    lasso_cox,
    univariate_cox,
)

TIME_POINTS_DAYS: list[float] = [300, 600, 900, 365, 1095, 1825]
NOT_CLINICAL = "not for clinical use"
#: How td-AUC and Brier scores weight censored data; written beside them in the card.
IPCW = "IPCW with censoring (Kaplan-Meier) estimated on the evaluation cases, as pec/riskRegression"


class FitError(ValueError):
    """The cohort cannot give a signature (no features survive, no events, bad columns)."""


@dataclass
class PfsFit:
    """A fitted signature: the card and the per-case scores it was judged on."""

    card: dict[str, Any]
    scores: pd.DataFrame  # index id: split, time, event, radscore, risk_group, nomogram_lp


def _split(clinical: pd.DataFrame, event: str, val_fraction: float, seed: int) -> pd.Series:
    if "split" in clinical.columns:
        split = clinical["split"].astype(str).str.lower()
        if not set(split) <= {"train", "validation"}:
            raise FitError("column 'split' must hold 'train' or 'validation'")
        return split
    rng = np.random.default_rng(seed)
    split = pd.Series("train", index=clinical.index)
    for value in (0, 1):
        ids = clinical.index[clinical[event] == value].to_numpy()
        held = rng.permutation(ids)[: round(len(ids) * val_fraction)]
        split.loc[held] = "validation"
    return split


def derive_clinical(clinical: pd.DataFrame) -> pd.DataFrame:
    """Add the 0/1 columns cards use: ``sex_male`` from ``sex``, ``grade3`` from ``grade``."""
    out = clinical.copy()
    if "sex" in out.columns and "sex_male" not in out.columns:
        out["sex_male"] = out["sex"].map(male)  # M/F or male/female, as everywhere
    if "grade" in out.columns and "grade3" not in out.columns:
        out["grade3"] = (out["grade"] == 3).astype(int)
    return out


def feature_block(selected: pd.Series, means: pd.Series, sds: pd.Series) -> list[dict[str, Any]]:
    """The card's ``features``: name, training mean and SD, coefficient."""
    return [
        {"name": n, "mean": float(means[n]), "sd": float(sds[n]), "coefficient": float(v)}
        for n, v in selected.items()
    ]


def combat_block(
    combat: ComBat | None, batch: str | None, columns: pd.Index, selected: pd.Series
) -> dict[str, Any] | None:
    """The card's ``combat``: parameters of the selected features only (each is its own)."""
    if combat is None:
        return None
    index = [list(columns).index(n) for n in selected.index]
    return {
        "batch_column": batch,
        "feature_names": list(selected.index),
        **combat.subset(index).to_dict(),
    }


def optimal_cutoff(score: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """The cut-off with the largest log-rank statistic between the two groups it makes.

    Candidates are the 10th to 90th percentiles of ``score`` in steps of 5
    (maximally selected rank statistic, X-tile style; seed 003). Chosen on
    training cases only: on the same cases its p-value is optimistic.
    """
    best, best_stat = float(np.median(score)), -1.0
    for q in range(10, 91, 5):
        cut = float(np.percentile(score, q))
        high = score > cut
        if high.all() or not high.any():
            continue
        stat = float(
            logrank_test(time[high], time[~high], event[high], event[~high]).test_statistic
        )
        if stat > best_stat:
            best, best_stat = cut, stat
    return best


def integrated_brier(
    model: CoxModel, train: pd.DataFrame, evaluate: pd.DataFrame, time: str, event: str
) -> float | None:
    """Integrated Brier score of ``model`` on ``evaluate`` over its follow-up.

    Twenty times from the 10th to the 80th percentile of ``evaluate``'s times,
    within ``train``'s follow-up (where the baseline survival is known);
    censoring weights as :data:`IPCW` says (scikit-survival's estimator, the
    censoring distribution fitted on ``evaluate``).
    """
    t = evaluate[time].to_numpy(float)
    grid = np.linspace(np.percentile(t, 10), np.percentile(t, 80), 20)
    grid = grid[(grid > t.min()) & (grid < t.max()) & (grid < train[time].max())]
    if grid.size < 2:
        return None
    y_eval = Surv.from_arrays(evaluate[event].astype(bool), t)
    survival = model.survival_at(evaluate, list(grid))
    return float(integrated_brier_score(y_eval, y_eval, survival, grid))


def _cox_block(model: CoxModel, times: list[float]) -> dict[str, Any]:
    """The part of a card that turns covariates into survival probabilities."""
    idx = np.searchsorted(model.baseline_times, times, side="right") - 1
    s0 = np.where(idx >= 0, model.baseline_survival[np.clip(idx, 0, None)], 1.0)
    return {
        "covariates": list(model.coefficients.index),
        "coefficients": {k: float(v) for k, v in model.coefficients.items()},
        "hazard_ratios": {k: float(np.exp(v)) for k, v in model.coefficients.items()},
        "p_values": {k: float(v) for k, v in model.p_values.items()},
        "means": {k: float(model.means[k]) for k in model.coefficients.index},
        "baseline_survival": {str(int(t)): float(s) for t, s in zip(times, s0, strict=True)},
    }


def km_curves(
    scores: pd.DataFrame, time: str = "time", event: str = "event", max_points: int = 60
) -> dict[str, dict[str, Any]]:
    """Kaplan-Meier curve of each risk group (days, survival), for reports drawn from a card.

    At most ``max_points`` steps per group, so a card stays small; a patient
    report draws these behind its own prediction.
    """
    from lifelines import KaplanMeierFitter

    out = {}
    for group in ("low", "high"):
        part = scores[scores["risk_group"] == group]
        if part.empty:
            continue
        sf = KaplanMeierFitter().fit(part[time], part[event]).survival_function_
        if len(sf) > max_points:
            sf = sf.iloc[np.linspace(0, len(sf) - 1, max_points).astype(int)]
        out[group] = {
            "days": [round(float(t), 1) for t in sf.index],
            "survival": [round(float(v), 4) for v in sf.iloc[:, 0]],
            "n": len(part),
        }
    return out


def fit_pfs(
    features: pd.DataFrame,
    clinical: pd.DataFrame,
    *,
    signature_id: str,
    time: str = "time",
    event: str = "event",
    clinical_factors: tuple[str, ...] = ("edema", "metastasis", "age", "sex_male", "grade3"),
    batch: str | None = None,
    icc: pd.Series | None = None,
    icc_threshold: float = 0.75,
    cutoff_rule: str = "median",
    p_threshold: float = 0.05,
    val_fraction: float = 0.3,
    seed: int = 0,
    synthetic: bool = False,
    provenance: dict[str, Any] | None = None,
) -> PfsFit:
    """Fit the signature on ``features`` (index: case id) and ``clinical`` (same ids)."""
    x_all, clin, split = _cases(features, clinical, time, event, val_fraction, seed)
    train, val = split == "train", split == "validation"
    steps: dict[str, int] = {"features": features.shape[1]}
    x_all = _robust(x_all, train, icc, icc_threshold, steps)
    x_all, combat = _harmonise(x_all, clin, train, batch)
    z, means, sds, copies = standardise(x_all, train)
    steps["distinct"] = z.shape[1]
    t_train = clin.loc[train, time].to_numpy(float)
    e_train = clin.loc[train, event].to_numpy(int)
    selected, lasso = _select(z.loc[train], t_train, e_train, p_threshold, seed, steps)
    radscore = z[selected.index] @ selected
    cutoff = _cutoff(radscore.loc[train], cutoff_rule, t_train, e_train)
    scores = pd.DataFrame(
        {
            "split": split,
            "time": clin[time],
            "event": clin[event],
            "radscore": radscore,
            "risk_group": np.where(radscore > cutoff, "high", "low"),
        }
    )
    frame = clin.assign(radscore=radscore)
    significant = _significant(frame.loc[train], time, event, clinical_factors)
    radscore_model = cox(frame.loc[train], time, event, ["radscore"])
    nomogram = cox(frame.loc[train], time, event, ["radscore", *significant])
    scores["nomogram_lp"] = nomogram.linear_predictor(frame)
    models = {"radscore": radscore_model, "nomogram": nomogram}
    validation = _validation(scores, frame, split, models, time, event, seed)
    card: dict[str, Any] = _card_head(signature_id, synthetic, provenance) | {
        "features": feature_block(selected, means, sds),
        "combat": combat_block(combat, batch, x_all.columns, selected),
        "radscore": {
            "formula": "sum(coefficient * (value - mean) / sd)",
            "cutoff": cutoff,
            "cutoff_rule": CUTOFF_RULES[cutoff_rule] + "; above = high risk",
        },
        "radscore_cox": _cox_block(radscore_model, TIME_POINTS_DAYS),
        "nomogram": _cox_block(nomogram, TIME_POINTS_DAYS),
        "time_points_days": TIME_POINTS_DAYS,
        "training": {
            "n": int(train.sum()),
            "events": int(e_train.sum()),
            "steps": steps,
            "duplicate_features": copies,
            "lasso": lasso,
            "univariate_clinical_significant": significant,
            "metrics": _judge(scores[train], seed),
            "km_by_risk_group": km_curves(scores[train], time, event),
        },
        "validation": {
            "n": int(val.sum()),
            "events": int(clin.loc[val, event].sum()),
            **validation,
        },
    }
    card["nomogram"]["ranges"] = _ranges(frame.loc[train], card["nomogram"]["covariates"])
    return PfsFit(card=card, scores=scores)


def _cases(
    features: pd.DataFrame,
    clinical: pd.DataFrame,
    time: str,
    event: str,
    val_fraction: float,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """(features, clinical table with derived columns, train/validation split) of the cases.

    Only cases with both features and clinical data count; a cohort too
    small or with too few training events is refused.
    """
    missing = [c for c in (time, event) if c not in clinical.columns]
    if missing:
        raise FitError(f"clinical table lacks column(s): {', '.join(missing)}")
    ids = features.index.intersection(clinical.index)
    if len(ids) < 20:
        raise FitError(f"only {len(ids)} cases have both features and clinical data")
    clin = derive_clinical(clinical.loc[ids])
    split = _split(clin, event, val_fraction, seed)
    if clin.loc[split == "train", event].sum() < 5:
        raise FitError("fewer than 5 events among the training cases")
    return features.loc[ids].astype(float), clin, split


def _harmonise(
    x_all: pd.DataFrame, clin: pd.DataFrame, train: pd.Series, batch: str | None
) -> tuple[pd.DataFrame, ComBat | None]:
    """Features through ComBat fitted on the training cases by ``batch`` (as they are without)."""
    if batch is None:
        return x_all, None
    combat = ComBat().fit(x_all.loc[train].to_numpy(), clin.loc[train, batch])
    harmonised = pd.DataFrame(
        combat.transform(x_all.to_numpy(), clin[batch]), index=x_all.index, columns=x_all.columns
    )
    return harmonised, combat


def _significant(train: pd.DataFrame, time: str, event: str, factors: tuple[str, ...]) -> list[str]:
    """Clinical factors significant (p < 0.05) in univariate Cox on the training cases."""
    return [
        factor
        for factor in factors
        if factor in train.columns
        and train[factor].nunique() > 1
        and cox(train, time, event, [factor]).p_values[factor] < 0.05
    ]


def _ranges(train: pd.DataFrame, covariates: list[str]) -> dict[str, list[float]]:
    """Each covariate's training range: the nomogram's axes and its applicability check."""
    return {c: [float(train[c].min()), float(train[c].max())] for c in covariates}


#: How each cut-off rule is described on the card.
CUTOFF_RULES = {
    "median": "median of training rad-scores",
    "optimal": "maximal log-rank statistic on training cases (10th-90th percentile)",
}


def _robust(
    x_all: pd.DataFrame,
    train: pd.Series,
    icc: pd.Series | None,
    icc_threshold: float,
    steps: dict[str, int],
) -> pd.DataFrame:
    """Features without gaps that vary on the training cases and, given ICCs, are robust."""
    usable = x_all.columns[(x_all.notna().all()) & (x_all.loc[train].std() > 0)]
    x_all = x_all[usable]
    steps["non_constant"] = len(usable)
    if icc is not None:
        keep = [c for c in x_all.columns if icc.get(c, np.nan) > icc_threshold]
        x_all = x_all[keep]
        steps["robust_icc"] = len(keep)
        if not steps["robust_icc"]:
            raise FitError(f"no feature has ICC > {icc_threshold}")
    return x_all


def _select(
    z_train: pd.DataFrame,
    t_train: np.ndarray,
    e_train: np.ndarray,
    p_threshold: float,
    seed: int,
    steps: dict[str, int],
) -> tuple[pd.Series, dict[str, Any]]:
    """(features LASSO-Cox kept with their coefficients, the card's ``lasso`` block).

    Univariate Cox first (adjusted p below ``p_threshold``), then LASSO-Cox
    with 5-fold cross-validation.
    """
    uni = univariate_cox(z_train, t_train, e_train)
    candidates = list(uni.loc[uni["p_adj"] < p_threshold, "feature"])
    steps["univariate_cox"] = len(candidates)
    if len(candidates) < 2:
        raise FitError(
            f"{len(candidates)} feature(s) pass the univariate Cox filter"
            f" (adjusted p < {p_threshold})"
        )
    coef, alpha, curve = lasso_cox(z_train[candidates], t_train, e_train, seed=seed)
    selected = coef[coef != 0]
    steps["lasso_cox"] = len(selected)
    if selected.empty:
        raise FitError("LASSO-Cox kept no feature")
    lasso = {
        "alpha": alpha,
        "folds": 5,
        "seed": seed,
        "cv_best_c": float(curve["cv_c"].max()),
        "objective": "-loglik/n + alpha*sum|coef| (Breslow ties), as glmnet's lambda",
        "tolerance": LASSO_TOL,
    }
    return selected, lasso


def _cutoff(radscore: pd.Series, rule: str, t_train: np.ndarray, e_train: np.ndarray) -> float:
    """The risk-group cut-off on the training rad-scores by ``rule`` (median or optimal)."""
    if rule == "median":
        return float(radscore.median())
    if rule == "optimal":
        return optimal_cutoff(radscore.to_numpy(), t_train, e_train)
    raise FitError(f"unknown cut-off rule {rule!r} (median or optimal)")


def _validation(
    scores: pd.DataFrame,
    frame: pd.DataFrame,
    split: pd.Series,
    models: Mapping[str, Any],
    time: str,
    event: str,
    seed: int,
) -> dict[str, Any]:
    """Metrics on the held-out cases: C-index, td-AUC, log-rank, integrated Brier, oracle C."""
    train, val = split == "train", split == "validation"
    if not val.any():
        return {}
    validation = _judge(scores[val], seed)
    for name, model in models.items():
        ibs = integrated_brier(model, frame.loc[train], frame.loc[val], time, event)
        if ibs is not None:
            validation[f"integrated_brier_{name}"] = round(ibs, 4)
            validation["ipcw"] = IPCW
    if "oracle_lp" in frame.columns:  # synthetic cohorts carry the true risk
        c, low, high = bootstrap_c(
            frame.loc[val, time].to_numpy(float),
            frame.loc[val, event].to_numpy(int),
            frame.loc[val, "oracle_lp"].to_numpy(float),
            n=500,
            seed=seed,
        )
        validation["c_index_oracle"] = {
            "value": round(c, 4),
            "ci95": [round(low, 4), round(high, 4)],
        }
    return validation


def _card_head(
    signature_id: str, synthetic: bool, provenance: dict[str, Any] | None
) -> dict[str, Any]:
    """The card's id, version, kind, endpoint, date, intended and clinical use, provenance."""
    return {
        "id": signature_id,
        "version": "1.0.0",
        "kind": "radiomics signature",
        "endpoint": "pfs",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "intended_use": "Research on progression-free survival of soft-tissue sarcoma. "
        + ("Fitted on SYNTHETIC data: " if synthetic else "")
        + NOT_CLINICAL
        + ".",
        "clinical_use": NOT_CLINICAL,
        **(provenance or {}),
    }


def _judge(scores: pd.DataFrame, seed: int) -> dict[str, Any]:
    """C-index (bootstrap CI) of rad-score and nomogram, td-AUC, log-rank between groups.

    td-AUC (cumulative/dynamic) weights by censoring estimated on ``scores``'
    own cases (:data:`IPCW`).
    """
    t, e = scores["time"].to_numpy(float), scores["event"].to_numpy(int)
    out: dict[str, Any] = {}
    for name in ("radscore", "nomogram_lp"):
        c, low, high = bootstrap_c(t, e, scores[name].to_numpy(), n=500, seed=seed)
        out[f"c_index_{name}"] = {"value": round(c, 4), "ci95": [round(low, 4), round(high, 4)]}
    y_eval = Surv.from_arrays(e.astype(bool), t)
    horizon = [d for d in (300, 600, 900) if t.min() < d < t[e == 1].max()]
    if horizon:
        auc, _ = cumulative_dynamic_auc(y_eval, y_eval, scores["radscore"].to_numpy(), horizon)
        out["td_auc_radscore"] = {
            str(d): round(float(a), 4) for d, a in zip(horizon, auc, strict=True)
        }
        out["ipcw"] = IPCW
    high = scores["risk_group"] == "high"
    if high.any() and (~high).any():
        test = logrank_test(t[high], t[~high], e[high], e[~high])
        out["logrank_p"] = float(test.p_value)
    return out
