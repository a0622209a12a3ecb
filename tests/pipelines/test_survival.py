"""Survival statistics against published results and simulations with known truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines.datasets import load_rossi

from pipelines.signature.survival import (
    benjamini_hochberg,
    bootstrap_c,
    cox,
    harrell_c,
    lasso_cox,
    univariate_cox,
)

#: R ``coxph(Surv(week, arrest) ~ fin + age + race + wexp + mar + paro + prio, data=Rossi)``
#: (Fox & Weisberg, "Cox Proportional-Hazards Regression for Survival Data in R", 2011, p. 4),
#: which lifelines reproduces in its documentation.
ROSSI_R = {
    "fin": -0.37942,
    "age": -0.05744,
    "race": 0.31390,
    "wexp": -0.14980,
    "mar": -0.43370,
    "paro": -0.08487,
    "prio": 0.09150,
}


def test_cox_on_rossi_equals_r_coxph() -> None:
    rossi = load_rossi()
    model = cox(rossi, "week", "arrest", list(ROSSI_R))
    for name, value in ROSSI_R.items():
        assert model.coefficients[name] == pytest.approx(value, abs=5e-5)
    assert model.concordance == pytest.approx(0.640, abs=5e-4)  # R: Concordance= 0.64
    # R's table: se(coef) fin 0.19138, age 0.02200; Pr(>|z|) prio 0.00140, fin 0.04742.
    assert model.standard_errors["fin"] == pytest.approx(0.19138, abs=5e-5)
    assert model.standard_errors["age"] == pytest.approx(0.02200, abs=5e-5)
    assert model.p_values["prio"] == pytest.approx(0.00140, abs=5e-5)
    assert model.p_values["fin"] == pytest.approx(0.04742, abs=5e-5)
    surv = model.survival_at(rossi.iloc[:3], [0.0, 20.0, 52.0])
    assert np.all(surv[:, 0] == 1.0) and np.all(np.diff(surv, axis=1) <= 0)


def test_benjamini_hochberg_matches_r_p_adjust() -> None:
    """R: p.adjust(c(0.01, 0.04, 0.03, 0.005, 0.5), "BH") = 0.025 0.05 0.05 0.025 0.5."""
    got = benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.005, 0.5]))
    assert np.allclose(got, [0.025, 0.05, 0.05, 0.025, 0.5])


def simulated(
    n: int = 300, p: int = 30, seed: int = 4
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Exponential survival with hazard exp(0.9 x0 - 0.7 x1 + 0.6 x2); ~30 % censored."""
    rng = np.random.default_rng(seed)
    x = pd.DataFrame(rng.normal(size=(n, p)), columns=[f"f{i:02d}" for i in range(p)])
    lp = 0.9 * x["f00"] - 0.7 * x["f01"] + 0.6 * x["f02"]
    t = rng.exponential(1 / np.exp(lp.to_numpy()))
    c = rng.exponential(2.5, n)
    return x, np.minimum(t, c), (t <= c).astype(int)


def test_lasso_cox_selects_the_true_features_with_their_signs() -> None:
    x, time, event = simulated()
    coef, alpha, curve = lasso_cox(x, time, event, folds=5, seed=0)
    chosen = set(coef[coef != 0].index)
    assert {"f00", "f01", "f02"} <= chosen and len(chosen) <= 8
    assert coef["f00"] > 0 and coef["f01"] < 0 and coef["f02"] > 0
    assert alpha in set(curve["alpha"]) and curve["cv_c"].max() > 0.7
    again, _, _ = lasso_cox(x, time, event, folds=5, seed=0)
    assert again.equals(coef)  # fixed seed: same folds, same answer


def test_univariate_filter_and_concordance() -> None:
    x, time, event = simulated()
    table = univariate_cox(x, time, event)
    significant = set(table[table["p_adj"] < 0.05]["feature"])
    assert {"f00", "f01", "f02"} <= significant and len(significant) <= 5
    lp = 0.9 * x["f00"] - 0.7 * x["f01"] + 0.6 * x["f02"]
    c, low, high = bootstrap_c(time, event, lp.to_numpy(), n=300)
    assert 0.7 < low < c < high < 0.85
    assert harrell_c(time, event, -lp.to_numpy()) == pytest.approx(1 - c, abs=1e-9)
