"""Logistic signature (grade) on a table with a known signal and scanner batch effects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.signature.logistic import fit_logistic
from pipelines.signature.pfs import FitError
from pipelines.synth.cohort import draw_case


def grade_table(n: int = 300) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Grade 3 from a logistic model over the cohort's heterogeneity and necrosis traits.

    Features are noisy copies of the two traits plus noise columns, all
    shifted by scanner batch (what ComBat must remove).
    """
    cases = [draw_case(600_000 + i) for i in range(n)]
    rng = np.random.default_rng(1)
    het = np.array([c.traits.heterogeneity for c in cases])
    nec = np.array([c.traits.necrosis for c in cases])
    logit = 2 * (het - het.mean()) / het.std() + 2 * (nec - nec.mean()) / nec.std()
    clinical = pd.DataFrame(
        {
            "grade3": (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int),
            "batch": [c.batch for c in cases],
            "age": [c.age for c in cases],
        },
        index=pd.Index([c.case_id for c in cases], name="id"),
    )
    shift = (
        clinical["batch"]
        .map({b: i for i, b in enumerate(sorted(set(clinical["batch"])))})
        .to_numpy()
    )
    features = pd.DataFrame(index=clinical.index)
    for j in range(3):
        features[f"T2FS:tumour:het{j}"] = (
            het + rng.normal(0, 0.3 * het.std(), n) + het.std() * shift
        )
        features[f"T2FS:tumour:nec{j}"] = (
            nec + rng.normal(0, 0.3 * nec.std(), n) + nec.std() * shift
        )
    for j in range(40):
        features[f"T2FS:tumour:noise{j}"] = rng.normal(size=n) + shift
    return features, clinical


@pytest.mark.parametrize("selection", ["mrmr", "mannwhitney"])
def test_grade_signature_finds_the_signal_through_batch_effects(selection: str) -> None:
    features, clinical = grade_table()
    card, scores = fit_logistic(
        features,
        clinical,
        signature_id="g",
        endpoint="grade",
        label="grade3",
        selection=selection,
        k=10,
        seed=0,
        synthetic=True,
    )
    weight = {f["name"]: abs(f["coefficient"]) for f in card["features"]}
    signal = sum(v for k, v in weight.items() if "noise" not in k)
    noise = sum(v for k, v in weight.items() if "noise" in k)
    assert signal > 3 * noise  # CV-AUC's penalty keeps a few weak noise terms, not many
    assert card["combat"]["batches"] == sorted(set(clinical["batch"]))
    auc = card["validation"]["auc_nomogram"]
    assert auc["ci95"][0] < auc["value"] < auc["ci95"][1] and auc["value"] > 0.7
    assert 0 <= card["validation"]["hosmer_lemeshow"]["p"] <= 1
    assert scores["nomogram_probability"].between(0, 1).all()


def test_logistic_fit_names_a_bad_label() -> None:
    features, clinical = grade_table(60)
    with pytest.raises(FitError, match="lacks the label column 'lung_mets'"):
        fit_logistic(features, clinical, signature_id="g", endpoint="metastasis", label="lung_mets")
    with pytest.raises(FitError, match="must be 0/1"):
        fit_logistic(
            features, clinical.assign(grade3=1), signature_id="g", endpoint="grade", label="grade3"
        )
