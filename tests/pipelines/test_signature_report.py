"""The evaluation report: figures, metrics and a page that says what the model is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.signature.evaluate import evaluate
from pipelines.signature.logistic import fit_logistic
from pipelines.signature.pfs import fit_pfs
from tests.pipelines.test_logistic_fit import grade_table
from tests.pipelines.test_pfs_fit import cohort


def test_pfs_report_has_the_papers_figures_and_consistent_numbers(tmp_path: Path) -> None:
    features, clinical = cohort(200)
    fit = fit_pfs(features, clinical, signature_id="pfs-r", seed=0, synthetic=True)
    val = fit.scores.index[fit.scores["split"] == "validation"]
    result = evaluate(fit.card, features.loc[val], clinical.loc[val], tmp_path / "r")
    for name in ("td_auc", "km", "calibration", "decision_curve", "forest", "nomogram"):
        assert (tmp_path / "r" / result["figures"][name]).stat().st_size > 5000
    page = (tmp_path / "r" / "report.html").read_text()
    assert "NOT FOR CLINICAL USE" in page and "km.png" in page
    # The report's rad-score C-index is the fit's validation C-index (same cases and scores).
    assert result["metrics"]["c_index_radscore"]["value"] == pytest.approx(
        fit.card["validation"]["c_index_radscore"]["value"], abs=1e-4
    )
    assert result["metrics"]["risk_cutoff"]["value"] == fit.card["radscore"]["cutoff"]
    assert (tmp_path / "r" / result["figures"]["brier"]).stat().st_size > 5000
    # The card's survival predictions beat "no model": everyone given the cohort's
    # Kaplan-Meier curve, scored at the same days with the same IPCW weights.
    from lifelines import KaplanMeierFitter
    from sksurv.metrics import integrated_brier_score
    from sksurv.util import Surv

    clin = clinical.loc[val]
    days = [float(d) for d in result["metrics"]["brier"]]
    km = KaplanMeierFitter().fit(clin["time"], clin["event"]).survival_function_at_times(days)
    y = Surv.from_arrays(clin["event"].astype(bool), clin["time"].astype(float))
    null = integrated_brier_score(y, y, np.tile(km.to_numpy(), (len(clin), 1)), days)
    assert result["metrics"]["integrated_brier"] < null


def test_logistic_report(tmp_path: Path) -> None:
    features, clinical = grade_table()
    card, _ = fit_logistic(
        features, clinical, signature_id="g", endpoint="grade", label="grade3", k=10
    )
    result = evaluate(card, features, clinical, tmp_path / "g")
    assert {"roc", "calibration", "decision_curve"} <= set(result["figures"])
    auc = result["metrics"]["auc"]
    assert auc["ci95"][0] < auc["value"] < auc["ci95"][1]
    assert 0 <= result["metrics"]["hosmer_lemeshow"]["p"] <= 1
