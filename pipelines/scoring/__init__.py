"""Scoring one study with a signature card: rad-score, risk group, predictions.

:func:`score` refuses, naming what is wrong, a study whose features are
missing, whose batch ComBat has not seen, that was extracted with other
parameters, or that gives some but not all of the nomogram's clinical
factors. Without any clinical factor the rad-score-only Cox model answers;
never a silent zero.

A card is a survival card when it has a rad-score Cox model
(``radscore_cox``: progression-free or event-free survival alike); else it
is logistic. Every result carries the card's facts
(:func:`pipelines.scoring.cards.card_facts`: training cohort, real or
synthetic, nested-CV headline) and its applicability verdict
(:mod:`pipelines.scoring.domain`); outside the model's range the risk group
is None and ``risk_group_withheld`` says why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipelines.radiomics.combat import ComBat
from pipelines.scoring.cards import card_facts
from pipelines.scoring.domain import OUTSIDE_WORDS, judge
from pipelines.signature.card import ScoreError

__all__ = ["ScoreError", "is_survival", "score"]


def is_survival(card: Mapping[str, Any]) -> bool:
    """A survival card (PFS, EFS, ...) has a rad-score Cox model; a logistic one has not."""
    return "radscore_cox" in card


def score(
    card: Mapping[str, Any],
    features: Mapping[str, float],
    clinical: Mapping[str, Any] | None = None,
    *,
    params_sha256: str | None = None,
) -> dict[str, Any]:
    """Rad-score, risk group, predictions and applicability for one study.

    ``features`` maps ``<sequence>:<region>:<feature>`` to values; ``clinical``
    may hold the nomogram's covariates and, when the card was harmonised, the
    batch. Survival cards give survival probabilities at the card's time
    points (``survival_probability``; for a PFS card also under its old
    name ``pfs_probability``) from the nomogram when every covariate is
    known, else from the rad-score-only Cox model; logistic cards give a
    probability. ``features`` in the result are the card's inputs, as given.
    """
    expected = card.get("extraction", {}).get("params_sha256")
    if expected and params_sha256 and expected != params_sha256:
        raise ScoreError(
            f"features were extracted with parameters {params_sha256[:12]}..., "
            f"the card {card['id']} needs {expected[:12]}..."
        )
    names = [f["name"] for f in card["features"]]
    missing = [n for n in names if n not in features or not math.isfinite(float(features[n]))]
    if missing:
        raise ScoreError(f"signature {card['id']}: missing feature(s) {', '.join(missing)}")
    clinical = dict(clinical or {})
    values = _harmonised(card, names, np.array([float(features[n]) for n in names]), clinical)
    z = np.array([(v - f["mean"]) / f["sd"] for v, f in zip(values, card["features"], strict=True)])
    coefficients = np.array([f["coefficient"] for f in card["features"]])
    radscore = float(card.get("intercept", 0.0) + z @ coefficients)
    raw = {n: float(features[n]) for n in names}
    verdict = judge(card, raw, radscore)
    out: dict[str, Any] = card_facts(card) | {"radscore": radscore}
    if is_survival(card):
        out |= _survival(card, radscore, clinical)
    else:
        out["probability"] = 1 / (1 + math.exp(-radscore))
        out["risk_group"] = (
            "positive" if radscore > float(card["radscore"].get("cutoff", 0.0)) else "negative"
        )
    out["applicability"] = verdict.as_dict()
    if not verdict.confident:
        out["risk_group"] = None
        out["risk_group_withheld"] = OUTSIDE_WORDS
    out["features"] = raw
    return out


def _harmonised(
    card: Mapping[str, Any], names: list[str], values: np.ndarray, clinical: Mapping[str, Any]
) -> np.ndarray:
    """``values`` through the card's ComBat for the study's batch (as they are without one)."""
    combat = card.get("combat")
    if not combat:
        return values
    batch = clinical.get(combat["batch_column"])
    if batch is None:
        raise ScoreError(f"signature {card['id']}: needs the batch ({combat['batch_column']})")
    if combat.get("feature_names") != names:
        raise ScoreError(f"signature {card['id']}: ComBat block does not match its features")
    try:
        harmonised: np.ndarray = ComBat.from_dict(combat).transform(values[None, :], [batch])[0]
    except ValueError as exc:
        raise ScoreError(f"signature {card['id']}: {exc}") from exc
    return harmonised


def _survival(
    card: Mapping[str, Any], radscore: float, clinical: Mapping[str, Any]
) -> dict[str, Any]:
    """A survival card's risk group and survival probabilities: the nomogram or rad-score model.

    The nomogram answers when every clinical factor it needs is given, the
    rad-score-only Cox model when none is; some but not all is an error.
    """
    cutoff = float(card["radscore"]["cutoff"])
    out: dict[str, Any] = {"risk_group": "high" if radscore > cutoff else "low", "cutoff": cutoff}
    nomogram = card.get("nomogram") or card["radscore_cox"]
    extra = [c for c in nomogram["covariates"] if c != "radscore"]
    given = [c for c in extra if clinical.get(c) is not None]
    have_all = len(given) == len(extra)
    if given and not have_all:
        missing = [c for c in extra if c not in given]
        raise ScoreError(
            f"signature {card['id']}: the nomogram also needs {', '.join(missing)} "
            "(give every clinical factor, or none for the radiomics-only model)"
        )
    block = nomogram if have_all else card["radscore_cox"]
    covariates = {"radscore": radscore, **{c: float(clinical[c]) for c in extra if have_all}}
    lp = sum(
        block["coefficients"][c] * (covariates[c] - block["means"][c]) for c in block["covariates"]
    )
    out["model"] = "nomogram" if have_all and extra else "radscore"
    out["linear_predictor"] = float(lp)
    out["survival_probability"] = {
        str(t): float(s0 ** math.exp(lp)) for t, s0 in block["baseline_survival"].items()
    }
    if card["endpoint"] == "pfs":  # the name every output used before EFS cards
        out["pfs_probability"] = dict(out["survival_probability"])
    if not have_all:
        out["missing_clinical"] = [c for c in extra if c not in clinical or clinical[c] is None]
    return out
