"""Scoring one study with a written card reproduces the fit, and refuses what it cannot score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lifelines import CoxPHFitter

from pipelines.scoring import ScoreError, score
from pipelines.signature.card import load_signature_card, write_signature_card
from pipelines.signature.logistic import fit_logistic
from pipelines.signature.pfs import fit_pfs
from tests.pipelines.test_logistic_fit import grade_table
from tests.pipelines.test_pfs_fit import cohort


def test_pfs_card_scores_a_case_as_the_fit_did_and_as_lifelines_predicts(tmp_path: Path) -> None:
    features, clinical = cohort(200)
    fit = fit_pfs(features, clinical, signature_id="pfs-test", seed=1)
    card = load_signature_card(write_signature_card(tmp_path / "sig", fit.card).parent)
    case = fit.scores.index[fit.scores["split"] == "validation"][0]
    row = features.loc[case].to_dict()
    clin = clinical.loc[case].to_dict() | {
        "sex_male": int(clinical.loc[case, "sex"] == "M"),
        "grade3": int(clinical.loc[case, "grade"] == 3),
    }
    result = score(card, row, clin)
    assert result["radscore"] == pytest.approx(fit.scores.loc[case, "radscore"], abs=1e-9)
    assert result == score(card, row, clin)  # same inputs, same numbers
    assert result["model"] == "nomogram"

    # lifelines, refitted on the training rows, predicts the same survival at 600 days
    # (its step function at the last event time <= 600, as R's survfit; lifelines'
    # times= argument would interpolate between event times instead).
    train = fit.scores["split"] == "train"
    frame = clinical.assign(
        radscore=fit.scores["radscore"],
        sex_male=(clinical["sex"] == "M").astype(int),
        grade3=(clinical["grade"] == 3).astype(int),
    )
    covariates = card["nomogram"]["covariates"]
    cph = CoxPHFitter().fit(frame.loc[train, [*covariates, "time", "event"]], "time", "event")
    curve = cph.predict_survival_function(frame.loc[[case], covariates]).iloc[:, 0]
    expected = curve[curve.index <= 600].iloc[-1]
    assert result["pfs_probability"]["600"] == pytest.approx(expected, abs=1e-6)

    radiomics_only = score(card, row, {})
    assert radiomics_only["model"] == "radscore" and radiomics_only["missing_clinical"]
    with pytest.raises(ScoreError, match="missing feature"):
        score(card, {k: v for k, v in row.items() if k != card["features"][0]["name"]}, clin)


def test_logistic_card_applies_combat_and_refuses_an_unknown_scanner(tmp_path: Path) -> None:
    features, clinical = grade_table()
    fitted, scores = fit_logistic(
        features, clinical, signature_id="g", endpoint="grade", label="grade3", k=10
    )
    card = load_signature_card(write_signature_card(tmp_path / "g", fitted).parent)
    case = scores.index[5]
    result = score(card, features.loc[case].to_dict(), {"batch": clinical.loc[case, "batch"]})
    assert result["radscore"] == pytest.approx(scores.loc[case, "radscore"], abs=1e-9)
    assert result["probability"] == pytest.approx(1 / (1 + np.exp(-result["radscore"])))
    with pytest.raises(ScoreError, match="not seen when ComBat was fitted: Toshiba"):
        score(card, features.loc[case].to_dict(), {"batch": "Toshiba"})
    with pytest.raises(ScoreError, match="needs the batch"):
        score(card, features.loc[case].to_dict(), {})


def test_a_partial_set_of_clinical_factors_is_refused_by_name(tmp_path: Path) -> None:
    features, clinical = cohort(300)
    card = fit_pfs(features, clinical, signature_id="pfs-test", seed=0).card
    extra = [c for c in card["nomogram"]["covariates"] if c != "radscore"]
    assert len(extra) >= 2, "the cohort model makes metastasis and grade 3 significant"
    row = features.iloc[0].to_dict()
    partial = {c: 0 for c in extra[1:]}
    with pytest.raises(ScoreError, match=f"also needs {extra[0]}"):
        score(card, row, partial)
    assert score(card, row, {})["model"] == "radscore"
    assert score(card, row, {c: 0 for c in extra})["version"] == "1.0.0"
