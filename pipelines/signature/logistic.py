"""Fitting a logistic signature and nomogram: tumour grade (seed 001), lung metastasis (seed 002).

ComBat across the ``batch`` column (fitted on training cases) → z-score →
exact duplicates after z-scoring dropped (first by column order kept; step
``distinct``) → Mann-Whitney filter (p < 0.05) or mRMR (top ``k``) → LASSO logistic with C by
5-fold CV AUC → rad-score = the model's logit. Nomogram: logistic regression
of rad-score with the clinical factors significant (p < 0.05) in univariate
logistic regression on training cases. Validation: AUC with DeLong 95 % CI,
the DeLong test of nomogram against rad-score, Hosmer-Lemeshow.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import statsmodels.api as sm

from pipelines.radiomics.combat import ComBat
from pipelines.signature.classify import (
    delong,
    hosmer_lemeshow,
    lasso_logistic,
    mann_whitney_filter,
    mrmr,
)
from pipelines.signature.dedupe import standardise
from pipelines.signature.pfs import (
    NOT_CLINICAL,
    FitError,
    _split,
    combat_block,
    derive_clinical,
    feature_block,
)


def _logit_fit(frame: pd.DataFrame, label: str, covariates: list[str]) -> Any:
    design = sm.add_constant(frame[covariates].astype(float), has_constant="add")
    return sm.Logit(frame[label].astype(float), design).fit(disp=0)


def fit_logistic(
    features: pd.DataFrame,
    clinical: pd.DataFrame,
    *,
    signature_id: str,
    endpoint: str,
    label: str,
    clinical_factors: tuple[str, ...] = ("margin", "t_stage", "age", "edema"),
    batch: str | None = "batch",
    selection: str = "mrmr",
    k: int = 30,
    val_fraction: float = 0.3,
    seed: int = 0,
    synthetic: bool = False,
    provenance: dict[str, Any] | None = None,
    icc: pd.Series | None = None,
    icc_threshold: float = 0.75,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Fit on ``features`` / ``clinical`` (index: case id); return (card, per-case scores)."""
    x, clin, split = _cases(features, clinical, label, val_fraction, seed)
    y = clin[label].astype(int)
    train, val = split == "train", split == "validation"
    x = x[x.columns[x.notna().all() & (x.loc[train].std() > 0)]]
    steps = {"features": features.shape[1], "non_constant": x.shape[1]}
    if icc is not None:
        x = x[[c for c in x.columns if icc.get(c, np.nan) > icc_threshold]]
        steps["robust_icc"] = x.shape[1]
        if not steps["robust_icc"]:
            raise FitError(f"no feature has ICC > {icc_threshold}")
    x, combat = _harmonise(x, clin, train, batch)
    z, means, sds, copies = standardise(x, train)
    steps["distinct"] = z.shape[1]
    selected, intercept, c_value = _select(z.loc[train], y[train], selection, k, seed, steps)
    radscore = intercept + z[selected.index] @ selected
    frame = clin.assign(radscore=radscore)
    significant = _significant(frame.loc[train], label, clinical_factors)
    nomogram = _logit_fit(frame.loc[train], label, ["radscore", *significant])
    design = sm.add_constant(frame[["radscore", *significant]].astype(float), has_constant="add")
    scores = pd.DataFrame(
        {
            "split": split,
            "label": y,
            "radscore": radscore,
            "probability": 1 / (1 + np.exp(-radscore)),
            "nomogram_probability": np.asarray(nomogram.predict(design), float),
        }
    )
    card: dict[str, Any] = _head(signature_id, endpoint, label, synthetic, provenance) | {
        "features": feature_block(selected, means, sds),
        "intercept": intercept,
        "combat": combat_block(combat, batch, x.columns, selected),
        "radscore": {
            "formula": "intercept + sum(coefficient * (value - mean) / sd) (log-odds)",
            "cutoff": 0.0,
        },
        "nomogram": {
            "covariates": ["radscore", *significant],
            "coefficients": {k: float(v) for k, v in nomogram.params.items()},
            "p_values": {k: float(v) for k, v in nomogram.pvalues.items()},
        },
        "training": {
            "n": int(train.sum()),
            "positives": int(y[train].sum()),
            "steps": steps,
            "duplicate_features": copies,
            "lasso": {"C": c_value, "folds": 5, "seed": seed},
            "univariate_clinical_significant": significant,
            "metrics": _judge(scores[train]),
        },
        "validation": {"n": int(val.sum()), "positives": int(y[val].sum()), **_judge(scores[val])},
    }
    return card, scores


def _cases(
    features: pd.DataFrame, clinical: pd.DataFrame, label: str, val_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """(features, clinical table with derived columns, train/validation split) of the cases.

    Only cases with both features and clinical data count; a cohort too
    small, or a label that is not 0/1 with both classes, is refused.
    """
    if label not in clinical.columns:
        raise FitError(f"clinical table lacks the label column {label!r}")
    ids = features.index.intersection(clinical.index)
    if len(ids) < 20:
        raise FitError(f"only {len(ids)} cases have both features and clinical data")
    clin = derive_clinical(clinical.loc[ids])
    if set(clin[label].astype(int)) != {0, 1}:
        raise FitError(f"label {label!r} must be 0/1 with both classes present")
    return features.loc[ids].astype(float), clin, _split(clin, label, val_fraction, seed)


def _harmonise(
    x: pd.DataFrame, clin: pd.DataFrame, train: pd.Series, batch: str | None
) -> tuple[pd.DataFrame, ComBat | None]:
    """ComBat by ``batch`` fitted on the training cases, when they span several batches."""
    if batch is None or batch not in clin.columns or clin.loc[train, batch].nunique() <= 1:
        return x, None
    combat = ComBat().fit(x.loc[train].to_numpy(), clin.loc[train, batch])
    harmonised = pd.DataFrame(
        combat.transform(x.to_numpy(), clin[batch]), index=x.index, columns=x.columns
    )
    return harmonised, combat


def _select(
    z_train: pd.DataFrame,
    y_train: pd.Series,
    selection: str,
    k: int,
    seed: int,
    steps: dict[str, int],
) -> tuple[pd.Series, float, float]:
    """(kept features' coefficients, intercept, C): a filter, then LASSO logistic by CV AUC."""
    if selection == "mannwhitney":
        candidates = mann_whitney_filter(z_train, y_train.to_numpy())
    elif selection == "mrmr":
        candidates = mrmr(z_train, y_train.to_numpy(), k=k, seed=seed)
    else:
        raise FitError(f"unknown feature selection {selection!r} (mrmr or mannwhitney)")
    steps[selection] = len(candidates)
    if len(candidates) < 2:
        raise FitError(f"{len(candidates)} feature(s) pass the {selection} filter")
    coef, intercept, c_value = lasso_logistic(z_train[candidates], y_train.to_numpy(), seed=seed)
    selected = coef[coef != 0]
    steps["lasso_logistic"] = len(selected)
    if selected.empty:
        raise FitError("LASSO logistic kept no feature")
    return selected, intercept, c_value


def _significant(train: pd.DataFrame, label: str, factors: tuple[str, ...]) -> list[str]:
    """Clinical factors significant (p < 0.05) in univariate logistic regression on training."""
    return [
        factor
        for factor in factors
        if factor in train.columns
        and train[factor].nunique() > 1
        and _logit_fit(train, label, [factor]).pvalues[factor] < 0.05
    ]


def _judge(s: pd.DataFrame) -> dict[str, Any]:
    """AUCs of rad-score and nomogram (DeLong CI), their DeLong test, Hosmer-Lemeshow."""
    if s["label"].nunique() < 2:
        return {}
    auc = delong(
        s["label"].to_numpy(), s["nomogram_probability"].to_numpy(), s["radscore"].to_numpy()
    )
    hl = hosmer_lemeshow(s["label"].to_numpy(), s["nomogram_probability"].to_numpy())
    rad = delong(s["label"].to_numpy(), s["radscore"].to_numpy())
    return {
        "auc_radscore": {
            "value": round(rad["auc"], 4),
            "ci95": [round(rad["ci_low"], 4), round(rad["ci_high"], 4)],
        },
        "auc_nomogram": {
            "value": round(auc["auc"], 4),
            "ci95": [round(auc["ci_low"], 4), round(auc["ci_high"], 4)],
        },
        "delong_nomogram_vs_radscore_p": round(auc["p"], 4),
        "hosmer_lemeshow": {"chi2": round(hl[0], 3), "p": round(hl[1], 4)},
    }


def _head(
    signature_id: str,
    endpoint: str,
    label: str,
    synthetic: bool,
    provenance: dict[str, Any] | None,
) -> dict[str, Any]:
    """The card's id, version, kind, endpoint, label, date, intended and clinical use."""
    return {
        "id": signature_id,
        "version": "1.0.0",
        "kind": "radiomics signature",
        "endpoint": endpoint,
        "label": label,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "intended_use": f"Research on {endpoint} of soft-tissue sarcoma. "
        + ("Fitted on SYNTHETIC data: " if synthetic else "")
        + NOT_CLINICAL
        + ".",
        "clinical_use": NOT_CLINICAL,
        **(provenance or {}),
    }
