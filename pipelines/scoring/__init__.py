"""Scoring one study with a signature card: rad-score, risk group, predictions.

:func:`score` refuses, naming what is wrong, a study whose features are
missing, whose batch ComBat has not seen, that was extracted with other
parameters, or that gives some but not all of the nomogram's clinical
factors. Without any clinical factor the rad-score-only Cox model answers;
never a silent zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipelines.radiomics.combat import ComBat
from pipelines.signature.card import ScoreError

__all__ = ["ScoreError", "score"]


def score(
    card: Mapping[str, Any],
    features: Mapping[str, float],
    clinical: Mapping[str, Any] | None = None,
    *,
    params_sha256: str | None = None,
) -> dict[str, Any]:
    """Rad-score, risk group and predictions for one study.

    ``features`` maps ``<sequence>:<region>:<feature>`` to values; ``clinical``
    may hold the nomogram's covariates and, when the card was harmonised, the
    batch. Survival endpoints give PFS probabilities at the card's time
    points from the nomogram when every covariate is known, else from the
    rad-score-only Cox model; logistic endpoints give probabilities.
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
    values = np.array([float(features[n]) for n in names])
    combat = card.get("combat")
    if combat:
        batch = clinical.get(combat["batch_column"])
        if batch is None:
            raise ScoreError(f"signature {card['id']}: needs the batch ({combat['batch_column']})")
        if combat.get("feature_names") != names:
            raise ScoreError(f"signature {card['id']}: ComBat block does not match its features")
        try:
            values = ComBat.from_dict(combat).transform(values[None, :], [batch])[0]
        except ValueError as exc:
            raise ScoreError(f"signature {card['id']}: {exc}") from exc
    z = np.array([(v - f["mean"]) / f["sd"] for v, f in zip(values, card["features"], strict=True)])
    coefficients = np.array([f["coefficient"] for f in card["features"]])
    radscore = float(card.get("intercept", 0.0) + z @ coefficients)
    out: dict[str, Any] = {
        "signature": card["id"],
        "version": str(card.get("version", "")),
        "endpoint": card["endpoint"],
        "radscore": radscore,
        "clinical_use": card.get("clinical_use", "not for clinical use"),
    }
    if card["endpoint"] == "pfs":
        cutoff = float(card["radscore"]["cutoff"])
        out["risk_group"] = "high" if radscore > cutoff else "low"
        out["cutoff"] = cutoff
        nomogram = card["nomogram"]
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
            block["coefficients"][c] * (covariates[c] - block["means"][c])
            for c in block["covariates"]
        )
        out["model"] = "nomogram" if have_all and extra else "radscore"
        out["linear_predictor"] = float(lp)
        out["pfs_probability"] = {
            t: float(s0 ** math.exp(lp)) for t, s0 in block["baseline_survival"].items()
        }
        if not have_all:
            out["missing_clinical"] = [c for c in extra if c not in clinical or clinical[c] is None]
    else:
        out["probability"] = 1 / (1 + math.exp(-radscore))
        out["risk_group"] = (
            "positive" if radscore > float(card["radscore"].get("cutoff", 0.0)) else "negative"
        )
    return out
