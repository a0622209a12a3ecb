"""The shipped real-cohort signature cards: what they claim, checked independently.

``make signatures-real`` fits three T1 cards on the TCIA Soft-tissue-Sarcoma
patients (``sarcnode signature-cv``). A reader of a card must be able to
trust that its figures are out-of-sample and that the patient the demo
scores (STS_001) never trained it. These tests check, from the shipped
files alone and the clinical table:

- STS_001 is in no card's training cohort, and the cohort is the clinical
  table's eligible patients (grade-less ones out of the grade card);
- the headline (AUC, Harrell's C) is what the shipped out-of-fold scores
  give when recomputed with scikit-learn / lifelines (not the project's own
  metric code), so the figure on the page is the one the folds made;
- the permutation test has >= 100 permutations, the baselines ran on the
  same folds, the applicability block covers every feature;
- STS_001's own T1 crop, extracted as the cards were, is scored by each
  card: a probability or survival curve, "not for clinical use", the real
  training cohort's size, and a range verdict.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from lifelines.utils import concordance_index
from sklearn.metrics import roc_auc_score

from pipelines.radiomics.extract import load_params, params_hash
from pipelines.scoring import score
from pipelines.signature.sts import extract_sts, load_sts
from tests.conftest import shared_data

REPO = Path(__file__).resolve().parents[2]
CARDS = {
    "sarcnode-lungmets-t1": "lung_metastasis",
    "sarcnode-grade-t1": "high_grade",
    "sarcnode-efs-t1": "efs",
}


def _card(card_id: str) -> dict[str, Any]:
    folder = REPO / "models" / card_id
    card: dict[str, Any] = yaml.safe_load((folder / "card.yaml").read_text())
    return card


@pytest.mark.parametrize(("card_id", "endpoint"), sorted(CARDS.items()))
def test_a_real_card_is_out_of_sample_and_its_headline_is_its_folds(
    card_id: str, endpoint: str
) -> None:
    card = _card(card_id)
    cohort = load_sts(shared_data("sts-clinical", "clinical.csv"), shared_data("sts-t1-cropped"))
    eligible = cohort.endpoint(endpoint)
    assert card["endpoint"] == endpoint and card["cohort"]["source"] == "real"
    assert "STS_001" not in card["cohort"]["patients"] and card["cohort"]["held_out"] == ["STS_001"]
    assert sorted(card["cohort"]["patients"]) == sorted(eligible.index)
    assert card["clinical_use"] == "not for clinical use"
    params = load_params(REPO / "models" / card_id / card["extraction"]["params_file"])
    assert card["extraction"]["params_sha256"] == params_hash(params)

    cv = card["validation"]["nested_cv"]
    oof = pd.read_csv(REPO / "models" / card_id / "oof.csv", index_col="id").loc[eligible.index]
    assert oof.shape[1] >= 10  # repeats of the outer 5-fold split
    if endpoint == "efs":
        per_repeat = [
            concordance_index(eligible["efs_days"], -oof[c], eligible["efs_event"]) for c in oof
        ]
    else:
        per_repeat = [roc_auc_score(eligible[endpoint].astype(int), oof[c]) for c in oof]
    headline = cv["signature"]
    assert headline["value"] == pytest.approx(np.mean(per_repeat), abs=1e-3)
    low, high = headline["ci95"]
    assert low < headline["value"] < high
    assert cv["permutation"]["permutations"] >= 100 and 0 < cv["permutation"]["p"] <= 1
    for baseline in ("volume", "clinical"):
        assert 0 <= cv["baselines"][baseline]["value"] <= 1
    assert f"{headline['value']:.2f}" in cv["headline"]
    names = [f["name"] for f in card["features"]]
    assert set(card["applicability"]["features"]) == set(names)
    assert card["applicability"]["n_train"] == len(eligible)


def test_sts001_is_scored_out_of_sample_by_every_real_card() -> None:
    images = shared_data("sts-t1-cropped")
    cards = {card_id: _card(card_id) for card_id in CARDS}
    params = load_params(REPO / "models" / "sarcnode-lungmets-t1" / "mr-demo.yaml")
    features, _ = extract_sts(images, params, ["STS_001"], perturb=False)
    values = features.loc["STS_001"].to_dict()
    for card_id, card in cards.items():
        result = score(card, values, params_sha256=params_hash(params))
        assert result["signature"] == card_id
        assert result["clinical_use"] == "not for clinical use"
        assert result["training_cohort"] == {"n": len(card["cohort"]["patients"]), "source": "real"}
        assert result["applicability"]["status"] in ("inside", "outside")
        assert (result["risk_group"] is None) == (result["applicability"]["status"] == "outside")
        if card["endpoint"] == "efs":
            by_day = result["survival_probability"]
            curve = [by_day[t] for t in sorted(by_day, key=int)]
            assert all(1 >= a >= b >= 0 for a, b in itertools.pairwise(curve))
        else:
            assert 0 < result["probability"] < 1
