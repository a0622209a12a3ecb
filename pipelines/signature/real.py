"""A signature on the real sarcoma cohort: nested CV, baselines, permutations, the shipped card.

:func:`run_endpoint` does, for one endpoint of :mod:`pipelines.signature.sts`:

1. the nested cross-validation of the recipe (:mod:`pipelines.signature.nested`),
   with calibration, td-AUC (survival) and which features the folds kept;
2. on the very same outer splits, tumour volume alone and clinical factors
   alone (unpenalised logistic / Cox refitted in each training fold);
3. the permutation test: the whole nested CV on shuffled outcomes;
4. the final model: the same recipe fitted once on every eligible patient
   (STS_001 never among them), written as a card the node scores, with its
   training ranges (the applicability domain) and every figure above.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from pipelines.scoring.domain import applicability_block
from pipelines.signature.nested import (
    VOLUME,
    CvResult,
    Fitted,
    Outcome,
    Recipe,
    fit_fold,
    fit_plain,
    mean_metric,
    nested_cv,
    permutation_test,
    recipe_dict,
    summarise,
)
from pipelines.signature.pfs import NOT_CLINICAL, km_curves
from pipelines.signature.sts import ENDPOINTS, StsCohort

CLINICAL: dict[str, list[str]] = {
    "lung_metastasis": ["age", "sex_male", "high_grade"],
    "high_grade": ["age", "sex_male"],
    "efs": ["age", "sex_male", "high_grade"],
}
TITLES = {
    "lung_metastasis": "lung metastasis",
    "high_grade": "high grade (High vs Low/Intermediate)",
    "efs": "event-free survival from the MR scan",
}
# Vallières et al. 2015 (Phys Med Biol 60:5471) on the same 51 patients: what a reader compares.
VALLIERES_2015 = (
    "Vallières et al. 2015 modelled lung metastasis on all 51 patients with texture features "
    "from FDG-PET and MRI (T1, T2FS) and PET/MRI fusions, choosing feature set and model order "
    "by imbalance-adjusted .632+ bootstrap; their code (mvallieres/radiomics, masterScript_STS.m) "
    "models PET, SEPARATE (PET+T1+T2FS) and FUSED sets only, so no MRI-only figure is published "
    "to set beside ours. Their headline (fused PET/MRI textures, 4 features) is an AUC near 0.98 "
    "by bootstrap on the patients that also chose the model; ours is T1 only, nested "
    "cross-validated on 38 patients, no PET. A later single-split study on the same data "
    "(Zhao et al. 2022, Cancer Imaging 22:7) reports a T1 validation AUC of 0.83 on one split."
)


def outcome_of(cohort: StsCohort, endpoint: str) -> tuple[pd.DataFrame, Outcome]:
    """(clinical rows eligible for ``endpoint``, their outcome)."""
    spec = ENDPOINTS[endpoint]
    clinical = cohort.endpoint(endpoint)
    if spec["kind"] == "binary":
        return clinical, Outcome("binary", clinical[spec["label"]].to_numpy(int))
    return clinical, Outcome(
        "survival",
        clinical[spec["event"]].to_numpy(int),
        clinical[spec["time"]].to_numpy(float),
    )


def baselines(
    features: pd.DataFrame,
    clinical: pd.DataFrame,
    outcome: Outcome,
    endpoint: str,
    *,
    folds: int,
    repeats: int,
    seed: int,
) -> dict[str, Any]:
    """Volume alone and clinical factors alone, on the recipe's own outer splits."""
    out: dict[str, Any] = {}
    tables = {
        "volume": np.log(features[[VOLUME]]).rename(columns={VOLUME: "log_volume"}),
        "clinical": clinical[CLINICAL[endpoint]].astype(float),
    }
    for name, table in tables.items():
        result = nested_cv(
            table, outcome, Recipe(), folds=folds, repeats=repeats, seed=seed, fit=fit_plain
        )
        out[name] = {"covariates": list(table.columns), **summarise(outcome, result, seed=seed)}
    return out


def headline(endpoint: str, cv: dict[str, Any], perm: dict[str, Any] | None) -> str:
    """One line: the nested-CV figure with CI, permutation p and the baselines."""
    s = cv["signature"]
    base = cv["baselines"]
    text = (
        f"nested CV {s['metric']} {s['value']:.2f} (95% CI {s['ci95'][0]:.2f}-{s['ci95'][1]:.2f})"
    )
    if perm:
        text += f", permutation p={perm['p']:.2f}"
    text += "; volume alone " + f"{base['volume']['value']:.2f}"
    text += ", clinical alone " + f"{base['clinical']['value']:.2f}"
    return f"{TITLES[endpoint]}: {text} ({cv['n']} real patients)"


def run_endpoint(
    cohort: StsCohort,
    features: pd.DataFrame,
    raters: list[pd.DataFrame] | None,
    endpoint: str,
    *,
    recipe: Recipe | None = None,
    folds: int = 5,
    repeats: int = 10,
    permutations: int = 100,
    permutation_repeats: int = 2,
    seed: int = 0,
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], CvResult, Fitted]:
    """Nested CV, baselines, permutation test and final fit for ``endpoint``.

    Returns (the CV block for the card, the CV result, the final model).
    The permutation test reruns the nested CV with ``permutation_repeats``
    repeats per permutation; its observed statistic is the same-sized
    statistic on the true outcome (the first ``permutation_repeats``
    repeats), so the p-value is of exactly the statistic it tests.
    """
    recipe = recipe or Recipe()
    say = progress or (lambda _m: None)
    clinical, outcome = outcome_of(cohort, endpoint)
    x = features.loc[clinical.index]
    rx = [r.loc[clinical.index] for r in raters] if raters else None
    say(f"{endpoint}: nested CV, {len(x)} patients, {folds} folds x {repeats} repeats")
    result = nested_cv(x, outcome, recipe, rx, folds=folds, repeats=repeats, seed=seed)
    cv: dict[str, Any] = {
        "n": len(x),
        "folds": folds,
        "repeats": repeats,
        "positives_or_events": int(outcome.event.sum()),
        "method": (
            f"outer repeated stratified {folds}-fold x {repeats}; every step (ICC filter on "
            "mask perturbations, z-scoring, duplicate removal, univariate filter, mRMR, LASSO "
            "penalty) refitted in each outer training fold; out-of-fold scores of each repeat "
            "pooled into one figure, the mean over repeats reported; 95% CI by bootstrap over "
            "patients"
        ),
        "recipe": recipe_dict(recipe),
        "signature": summarise(outcome, result, seed=seed),
        "features_per_fold": {
            "median": float(np.median([len(s) for s in result.selected])),
            "range": [min(len(s) for s in result.selected), max(len(s) for s in result.selected)],
        },
        "selection_frequency": dict(list(result.selection_frequency().items())[:15]),
    }
    say(f"{endpoint}: baselines")
    cv["baselines"] = baselines(
        x, clinical, outcome, endpoint, folds=folds, repeats=repeats, seed=seed
    )
    perm = None
    if permutations:
        observed = mean_metric(outcome, result.oof[:permutation_repeats])
        say(f"{endpoint}: {permutations} permutations")
        perm = permutation_test(
            x,
            outcome,
            recipe,
            rx,
            observed,
            permutations=permutations,
            folds=folds,
            repeats=permutation_repeats,
            seed=seed,
            workers=workers,
        )
        cv["permutation"] = perm
    cv["headline"] = headline(endpoint, cv, perm)
    cv["comparison"] = VALLIERES_2015 if endpoint == "lung_metastasis" else None
    say(f"{endpoint}: final fit")
    final = fit_fold(x, outcome, recipe, rx, seed=seed)
    return cv, result, final


def build_card(
    card_id: str,
    endpoint: str,
    cohort: StsCohort,
    features: pd.DataFrame,
    final: Fitted,
    cv: dict[str, Any],
    *,
    extraction: dict[str, Any],
) -> dict[str, Any]:
    """The shipped card: scoring blocks the node reads, the CV figures, the training ranges."""
    clinical, outcome = outcome_of(cohort, endpoint)
    x = features.loc[clinical.index]
    radscore = pd.Series(final.score(x), index=x.index)
    spec = ENDPOINTS[endpoint]
    card = _head(card_id, endpoint, cohort, x, outcome, extraction) | {
        "features": [
            {"name": n, "mean": float(m), "sd": float(s), "coefficient": float(c)}
            for n, m, s, c in zip(
                final.names, final.means, final.sds, final.coefficients, strict=True
            )
        ],
        "combat": None,
    }
    card["applicability"] = applicability_block(card, x).as_dict()
    training = {
        "n": len(x),
        "steps": final.steps,
        "penalty": final.penalty,
        "recipe": cv["recipe"],
    }
    if spec["kind"] == "binary":
        card |= {
            "label": spec["label"],
            "intercept": final.intercept,
            "radscore": {
                "formula": "intercept + sum(coefficient * (value - mean) / sd) (log-odds)",
                "cutoff": 0.0,
            },
        }
        training["positives"] = int(outcome.event.sum())
    else:
        blocks, curves = _survival_blocks(radscore, outcome, card["applicability"]["radscore"])
        card |= blocks
        training |= {"events": int(outcome.event.sum()), "km_by_risk_group": curves}
    if not final.names:
        card["warning"] = "the LASSO kept no feature on the full cohort: the score is constant"
    card["training"] = training
    card["validation"] = {"nested_cv": cv}
    return card


def _head(
    card_id: str,
    endpoint: str,
    cohort: StsCohort,
    x: pd.DataFrame,
    outcome: Outcome,
    extraction: dict[str, Any],
) -> dict[str, Any]:
    """Id, version, endpoint, intended use, extraction, sequences and regions, the cohort."""
    return {
        "id": card_id,
        "version": "1.0.0",
        "kind": "radiomics signature",
        "endpoint": endpoint,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "intended_use": f"Research on {TITLES[endpoint]} of soft-tissue sarcoma, from T1 MRI. "
        f"Fitted on {len(x)} real patients of the TCIA Soft-tissue-Sarcoma collection: "
        + NOT_CLINICAL
        + ".",
        "clinical_use": NOT_CLINICAL,
        "extraction": extraction,
        "sequences": ["T1"],
        "regions": ["ring", "tumour"],
        "cohort": {
            "source": "real",
            "collection": "TCIA Soft-tissue-Sarcoma (sts-clinical + sts-t1-cropped)",
            "n": len(x),
            "positives_or_events": int(outcome.event.sum()),
            "patients": list(x.index),
            "held_out": cohort.held_out,
            "without_images": cohort.without_images,
        },
    }


def _survival_blocks(
    radscore: pd.Series, outcome: Outcome, radscore_range: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(a survival card's rad-score, Cox and nomogram blocks; its training KM curves)."""
    from pipelines.signature.pfs import TIME_POINTS_DAYS, _cox_block
    from pipelines.signature.survival import cox

    frame = pd.DataFrame(
        {"radscore": radscore, "time": outcome.time, "event": outcome.event},
        index=radscore.index,
    )
    model = cox(frame, "time", "event", ["radscore"])
    cutoff = float(radscore.median())
    groups = frame.assign(risk_group=np.where(radscore > cutoff, "high", "low"))
    block = _cox_block(model, TIME_POINTS_DAYS)
    blocks = {
        "time_unit": "days from the MR scan",
        "radscore": {
            "formula": "sum(coefficient * (value - mean) / sd)",
            "cutoff": cutoff,
            "cutoff_rule": "median of training rad-scores; above = high risk",
        },
        "radscore_cox": block,
        "nomogram": {**block, "ranges": {"radscore": radscore_range}},
        "time_points_days": TIME_POINTS_DAYS,
    }
    return blocks, km_curves(groups, "time", "event")
