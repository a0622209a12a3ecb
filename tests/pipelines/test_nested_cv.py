"""Nested cross-validation of signatures and the real sarcoma cohort it runs on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter

from pipelines.radiomics.robustness import icc
from pipelines.signature.nested import (
    Outcome,
    Recipe,
    icc21,
    mean_metric,
    nested_cv,
    outer_splits,
    permutation_test,
    univariate_cox_p,
)
from pipelines.signature.sts import load_sts
from tests.conftest import shared_data


def _table(n: int, f: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        rng.normal(size=(n, f)), columns=[f"T1:tumour:f{i}" for i in range(f)]
    ).set_index(pd.Index([f"P{i:03d}" for i in range(n)], name="id"))


def test_univariate_cox_p_agrees_with_lifelines() -> None:
    """The vectorised one-feature Cox Wald p is lifelines' (no tied times: Breslow = Efron)."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(40, 3))
    time = rng.exponential(300, 40) * np.exp(-0.8 * z[:, 0])
    event = (rng.random(40) < 0.7).astype(int)
    ours = univariate_cox_p(z, time, event)
    for j in range(3):
        frame = pd.DataFrame({"x": z[:, j], "t": time, "e": event})
        ref = CoxPHFitter().fit(frame, "t", "e").summary.loc["x", "p"]
        assert ours[j] == pytest.approx(ref, rel=1e-3, abs=1e-6)
    assert ours[0] < 0.05  # the feature that drives the hazard is found


def test_icc21_agrees_with_the_scalar_icc() -> None:
    """The vectorised ICC(2,1) is the Shrout-Fleiss ICC(2,1) of each column."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(20, 4))
    raters = [base + rng.normal(scale=s, size=base.shape) for s in (0.1, 0.3, 0.5)]
    ours = icc21(raters)
    for j in range(4):
        ref = icc(np.column_stack([r[:, j] for r in raters]), "2,1")
        assert ours[j] == pytest.approx(ref, rel=1e-9)


def test_every_patient_is_tested_once_per_repeat_never_on_its_own_model() -> None:
    """Outer splits: test folds of a repeat partition the patients; train and test disjoint."""
    outcome = Outcome("binary", np.array([0, 1] * 19))
    splits = outer_splits(outcome, folds=5, repeats=3, seed=0)
    for repeat in range(3):
        tests = [test for r, _, _, test in splits if r == repeat]
        assert sorted(np.concatenate(tests)) == list(range(38))
    for _, _, train, test in splits:
        assert not set(train) & set(test)


def test_signal_is_found_and_noise_is_not() -> None:
    """A label carried by one of 60 features scores high out of fold; pure noise near chance."""
    x = _table(40, 60, 5)
    label = (x["T1:tumour:f7"] + 0.3 * np.random.default_rng(2).normal(size=40) > 0).astype(int)
    signal = Outcome("binary", label.to_numpy())
    result = nested_cv(x, signal, Recipe(mrmr_k=5), folds=5, repeats=2, seed=0)
    observed = mean_metric(signal, result.oof)
    assert observed > 0.85
    assert all(np.isfinite(result.oof).all(axis=1))
    perm = permutation_test(
        x, signal, Recipe(mrmr_k=5), None, observed, permutations=19, repeats=1, seed=0
    )
    assert perm["p"] == pytest.approx(0.05)  # nothing in 19 shuffles reaches it
    assert perm["null_mean"] < 0.7

    noise = Outcome("binary", np.random.default_rng(9).permutation(np.repeat([0, 1], 20)))
    result = nested_cv(x, noise, Recipe(mrmr_k=5), folds=5, repeats=2, seed=0)
    assert 0.25 < mean_metric(noise, result.oof) < 0.75


def test_survival_signal_is_found() -> None:
    """The same nested CV on a Cox outcome driven by one feature: C well above 0.5."""
    x = _table(40, 30, 6)
    rng = np.random.default_rng(4)
    time = rng.exponential(500, 40) * np.exp(-1.5 * x["T1:tumour:f3"].to_numpy())
    event = (rng.random(40) < 0.8).astype(int)
    outcome = Outcome("survival", event, time)
    result = nested_cv(x, outcome, Recipe(mrmr_k=5), folds=5, repeats=1, seed=0)
    assert mean_metric(outcome, result.oof) > 0.7


def test_sts_cohort_holds_out_sts001_and_lists_missing_images() -> None:
    """The join: STS_001 never eligible, patients without images listed, endpoints derived."""
    cohort = load_sts(shared_data("sts-clinical", "clinical.csv"), shared_data("sts-t1-cropped"))
    assert "STS_001" not in cohort.clinical.index
    assert cohort.held_out == ["STS_001"]
    raw = pd.read_csv(shared_data("sts-clinical", "clinical.csv"))
    images = {p.name for p in shared_data("sts-t1-cropped").iterdir() if p.is_dir()}
    assert set(cohort.without_images) == set(raw["patient_id"]) - images
    assert len(cohort.clinical) == len(images) - 1
    grade = cohort.endpoint("high_grade")
    assert grade["grade"].notna().all() and set(grade["high_grade"]) == {0.0, 1.0}
    efs = cohort.endpoint("efs")
    assert (efs["efs_days"] > 0).all()
    assert efs["efs_event"].sum() == efs["outcome"].notna().sum()
    # the event time of STS_002 (no event): follow-up 501 days after diagnosis, MR at day -10
    assert efs.loc["STS_002", "efs_days"] == 511
