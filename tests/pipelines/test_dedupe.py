"""Exact duplicate features after z-scoring: found, the first kept, and dropped by both fits."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipelines.signature.dedupe import distinct_columns, duplicates
from pipelines.signature.logistic import fit_logistic
from pipelines.signature.pfs import fit_pfs
from tests.pipelines.test_logistic_fit import grade_table
from tests.pipelines.test_pfs_fit import cohort


def zscore(frame: pd.DataFrame) -> pd.DataFrame:
    return (frame - frame.mean()) / frame.std(ddof=0)


def test_copies_and_negations_are_dropped_and_the_first_is_kept() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    raw = pd.DataFrame(
        {
            "Energy": 8.0 * np.exp(a),  # at 2 mm spacing: TotalEnergy = 8 mm^3 * Energy
            "b": b,
            "TotalEnergy": np.exp(a),
            "minus_b": 3.0 - 2.0 * b,
            "again": 64.0 * np.exp(a),  # a copy of a copy
            "near": b + 1e-4 * rng.normal(size=50),  # correlated 0.99999999: kept
        }
    )
    z = zscore(raw)
    assert duplicates(z) == {"TotalEnergy": "Energy", "minus_b": "-b", "again": "Energy"}
    assert distinct_columns(z) == ["Energy", "b", "near"]
    assert distinct_columns(z[["TotalEnergy", "Energy"]]) == ["TotalEnergy"]  # column order
    assert duplicates(z[["b"]]) == {} and duplicates(zscore(pd.DataFrame({"x": a, "y": b}))) == {}


def test_fit_pfs_and_fit_logistic_drop_duplicates_before_selection() -> None:
    features, clinical = cohort()
    features["T2FS:tumour:logvol0_copy"] = 8.0 * features["T2FS:tumour:logvol0"]
    features["T2FS:tumour:logvol1_negated"] = 5.0 - features["T2FS:tumour:logvol1"]
    card = fit_pfs(features, clinical, signature_id="dedupe-pfs", seed=0).card
    steps = card["training"]["steps"]
    assert list(steps)[:3] == ["features", "non_constant", "distinct"]
    assert steps["distinct"] == steps["non_constant"] - 2
    assert card["training"]["duplicate_features"] == {
        "T2FS:tumour:logvol0_copy": "T2FS:tumour:logvol0",
        "T2FS:tumour:logvol1_negated": "-T2FS:tumour:logvol1",
    }
    assert not {f["name"] for f in card["features"]} & set(card["training"]["duplicate_features"])

    features, clinical = grade_table()
    features["T2FS:tumour:het0_copy"] = 2.0 * features["T2FS:tumour:het0"] + 1.0
    card, _ = fit_logistic(
        features, clinical, signature_id="dedupe-grade", endpoint="grade", label="grade3", seed=0
    )
    assert card["training"]["steps"]["distinct"] == card["training"]["steps"]["non_constant"] - 1
    assert card["training"]["duplicate_features"] == {"T2FS:tumour:het0_copy": "T2FS:tumour:het0"}
