"""Statistics for logistic endpoints: DeLong, Hosmer-Lemeshow, feature filters, LASSO logistic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from pipelines.signature.classify import (
    delong,
    hosmer_lemeshow,
    lasso_logistic,
    mann_whitney_filter,
    mrmr,
)


def labelled(n: int = 240, p: int = 40, seed: int = 2) -> tuple[pd.DataFrame, np.ndarray]:
    """Logit = 1.2 f00 - 1.0 f01 + 0.8 f02; f03 duplicates f00 (a redundant copy)."""
    rng = np.random.default_rng(seed)
    x = pd.DataFrame(rng.normal(size=(n, p)), columns=[f"f{i:02d}" for i in range(p)])
    x["f03"] = x["f00"] + rng.normal(0, 0.05, n)
    logit = 1.2 * x["f00"] - 1.0 * x["f01"] + 0.8 * x["f02"]
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return x, y


def test_delong_auc_equals_sklearn_and_its_se_agrees_with_the_bootstrap() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    strong, weak = y + rng.normal(0, 1.0, 300), y + rng.normal(0, 2.5, 300)
    result = delong(y, strong, weak)
    assert result["auc"] == pytest.approx(roc_auc_score(y, strong), abs=1e-12)
    boot = [
        roc_auc_score(y[i], strong[i]) for i in (rng.integers(0, 300, 300) for _ in range(1500))
    ]
    assert result["se"] == pytest.approx(np.std(boot), rel=0.15)
    assert result["ci_low"] < result["auc"] < result["ci_high"]
    assert result["p"] < 0.01  # AUC ~0.76 vs ~0.6 on 300 cases: a real difference
    same = delong(y, strong, strong * 2 + 1)  # a monotone transform: identical AUC
    assert same["z"] == 0.0 and same["p"] == 1.0


def test_hosmer_lemeshow_accepts_calibrated_and_rejects_miscalibrated_risk() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(0.05, 0.95, 2000)
    y = (rng.random(2000) < p).astype(int)
    assert hosmer_lemeshow(y, p)[1] > 0.01
    assert hosmer_lemeshow(y, np.clip(p * 0.5 + 0.4, 0, 1))[1] < 1e-6


def test_filters_find_the_signal_and_mrmr_skips_the_redundant_copy() -> None:
    x, y = labelled()
    kept = mann_whitney_filter(x, y)
    assert {"f00", "f01", "f02"} <= set(kept) and len(kept) <= 8
    top = mrmr(x, y, k=3)
    assert top[0] in {"f00", "f03"} and not {"f00", "f03"} <= set(top)


def test_lasso_logistic_keeps_the_true_features_with_their_signs() -> None:
    x, y = labelled()
    coef, intercept, c = lasso_logistic(x.drop(columns="f03"), y, seed=0)
    chosen = set(coef[coef != 0].index)
    assert {"f00", "f01", "f02"} <= chosen
    assert coef["f00"] > 0 and coef["f01"] < 0 and coef["f02"] > 0
    assert np.isfinite(intercept) and c > 0
