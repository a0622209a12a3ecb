"""PFS signature fitting on a table whose signal is known (the synthetic cohort's traits)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.signature.pfs import FitError, PfsFit, fit_pfs
from pipelines.signature.survival import harrell_c
from pipelines.synth.cohort import draw_case


def cohort(n: int = 300) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Clinical table from the cohort model; features: noisy copies of the latent traits + noise."""
    cases = [draw_case(500_000 + i) for i in range(n)]
    rng = np.random.default_rng(0)
    clinical = pd.DataFrame(
        [
            {
                "id": c.case_id,
                "time": c.time_days,
                "event": c.event,
                "age": c.age,
                "sex": c.sex,
                "edema": c.edema,
                "metastasis": c.metastasis,
                "grade": c.grade,
                "oracle_lp": c.oracle_lp,
            }
            for c in cases
        ]
    ).set_index("id")
    traits = pd.DataFrame(
        [
            {
                "logvol": np.log(c.traits.volume_ml),
                "het": c.traits.heterogeneity,
                "nec": c.traits.necrosis,
                "edema": c.traits.edema_mm,
                "irr": c.traits.irregularity,
            }
            for c in cases
        ],
        index=clinical.index,
    )
    features = pd.DataFrame(index=clinical.index)
    for name in traits:
        for j in range(3):
            noise = rng.normal(0, traits[name].std() * 0.3, n)
            features[f"T2FS:tumour:{name}{j}"] = traits[name] * (1 + 0.3 * j) + noise
    for j in range(60):
        features[f"T2FS:tumour:noise{j}"] = rng.normal(size=n)
    return features, clinical


def test_signature_recovers_the_signal_close_to_the_oracle() -> None:
    features, clinical = cohort()
    fit = fit_pfs(features, clinical, signature_id="test-pfs", seed=0, synthetic=True)
    card = fit.card
    chosen = [f["name"] for f in card["features"]]
    assert chosen and not any("noise" in name for name in chosen)
    val = fit.scores[fit.scores["split"] == "validation"]
    oracle = harrell_c(
        val["time"].to_numpy(),
        val["event"].to_numpy(),
        clinical.loc[val.index, "oracle_lp"].to_numpy(),
    )
    nomogram_c = card["validation"]["c_index_nomogram_lp"]["value"]
    assert abs(nomogram_c - oracle) < 0.05
    assert card["validation"]["c_index_oracle"]["value"] == pytest.approx(oracle, abs=1e-4)
    assert "metastasis" in card["nomogram"]["covariates"]  # true HR exp(0.8)
    assert card["validation"]["logrank_p"] < 0.01
    assert card["clinical_use"] == "not for clinical use" and "SYNTHETIC" in card["intended_use"]
    surv = [card["nomogram"]["baseline_survival"][k] for k in ("300", "600", "900")]
    assert 1 > surv[0] > surv[1] > surv[2] > 0
    assert (fit.scores["risk_group"] == "high").sum() == pytest.approx(len(fit.scores) / 2, rel=0.2)


def test_fitting_is_deterministic_and_names_missing_inputs() -> None:
    features, clinical = cohort(120)
    a = fit_pfs(features, clinical, signature_id="x", seed=3).card
    b = fit_pfs(features, clinical, signature_id="x", seed=3).card
    a.pop("created"), b.pop("created")
    assert a == b
    with pytest.raises(FitError, match=r"lacks column.*event"):
        fit_pfs(features, clinical.drop(columns="event"), signature_id="x")
    with pytest.raises(FitError, match="only 10 cases"):
        fit_pfs(features.iloc[:10], clinical, signature_id="x")


def test_integrated_brier_beats_kaplan_meier_and_the_optimal_cutoff_separates_more() -> None:
    """Seed 003: IBS beats Kaplan-Meier; the optimal cut-off splits as well or better."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test
    from sksurv.metrics import integrated_brier_score
    from sksurv.util import Surv

    features, clinical = cohort()
    median = fit_pfs(features, clinical, signature_id="m", seed=0)
    optimal = fit_pfs(features, clinical, signature_id="o", seed=0, cutoff_rule="optimal")
    val = median.scores["split"] == "validation"
    train = ~val
    ibs = median.card["validation"]["integrated_brier_nomogram"]
    t, e = clinical["time"].to_numpy(float), clinical["event"].to_numpy(int)
    km = KaplanMeierFitter().fit(t[train.to_numpy()], e[train.to_numpy()])
    grid = np.linspace(
        np.percentile(t[val.to_numpy()], 10), np.percentile(t[val.to_numpy()], 80), 20
    )
    grid = grid[(grid > t[val.to_numpy()].min()) & (grid < t[val.to_numpy()].max())]
    null = np.tile(km.survival_function_at_times(grid).to_numpy(), (int(val.sum()), 1))
    y_train = Surv.from_arrays(e[train.to_numpy()].astype(bool), t[train.to_numpy()])
    y_val = Surv.from_arrays(e[val.to_numpy()].astype(bool), t[val.to_numpy()])
    assert 0 < ibs < integrated_brier_score(y_train, y_val, null, grid)

    def statistic(fit: PfsFit, cut: float) -> float:
        s = fit.scores[train]
        high = (s["radscore"] > cut).to_numpy()
        tt, ee = s["time"].to_numpy(), s["event"].to_numpy()
        return float(logrank_test(tt[high], tt[~high], ee[high], ee[~high]).test_statistic)

    assert statistic(optimal, optimal.card["radscore"]["cutoff"]) >= statistic(
        median, median.card["radscore"]["cutoff"]
    )
    assert "maximal log-rank" in optimal.card["radscore"]["cutoff_rule"]
    with pytest.raises(FitError, match="unknown cut-off rule"):
        fit_pfs(features, clinical, signature_id="x", cutoff_rule="tertile")
