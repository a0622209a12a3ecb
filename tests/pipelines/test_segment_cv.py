"""Cross-validation of segmentation recipes, the quality flag and the input checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipelines.segment import network
from pipelines.segment.cv import (
    Recipe,
    assign_folds,
    cross_validate,
    flag_figures,
    flag_threshold,
    inner_split,
    rescore_cv,
    wilson_ci,
)
from pipelines.segment.data import discover
from pipelines.segment.ensemble import assemble
from pipelines.segment.infer import Segmenter
from pipelines.segment.quality import InputRejected, Quality, agreement, check_input
from tests.conftest import REPO, shared_data

REAL = ("STS_001", "STS_008", "STS_015", "STS_024", "STS_025")


def small_cohort(tmp_path: Path) -> Path:
    """Five small real crops (STS_001 among them) linked into one folder."""
    root = tmp_path / "real"
    root.mkdir()
    for case in REAL:
        (root / case).symlink_to(shared_data("sts-t1-cropped", case))
    return root


def test_folds_partition_patients_and_inner_split_stays_inside() -> None:
    patients = [f"P{i:02d}" for i in range(38)]
    folds = assign_folds(patients, 5, seed=0)
    flat = [p for f in folds for p in f]
    assert sorted(flat) == patients  # every patient once: none in two folds
    assert {len(f) for f in folds} <= {7, 8}
    assert assign_folds(patients, 5, seed=0) == folds  # reproducible
    train, val = inner_split(folds[1] + folds[2], seed=3)
    assert not set(train) & set(val) and set(train) | set(val) == set(folds[1] + folds[2])
    with pytest.raises(ValueError, match="cannot fill"):
        assign_folds(patients[:3], 5, seed=0)


@pytest.mark.slow  # trains fold models: ~75 s
def test_cross_validation_is_out_of_fold_resumable_and_never_uses_sts001(tmp_path: Path) -> None:
    """Two folds of a tiny recipe on four real patients, each scored by a model blind to it."""
    data = small_cohort(tmp_path)
    recipe = Recipe(
        "3d-heavy",  # a registered name: the card of an ensemble looks the recipe up
        dict(network.FINE_ARCH),
        steps=2,
        batch=1,
        synthetic=False,
        tta=["none", "x"],
        val_every=1,
    )
    out = tmp_path / "cv"
    summary = cross_validate([data], out, recipe, k=2, seed=0, device="cpu", log=lambda _: None)
    folds = json.loads((out / "folds.json").read_text())
    assert "STS_001" in folds["excluded"]
    assert sorted(p for f in folds["folds"] for p in f) == sorted(set(REAL) - {"STS_001"})
    for i in range(2):
        fold = json.loads((out / f"fold{i}.json").read_text())
        test, train, val = set(fold["test"]), set(fold["train"]), set(fold["inner_validation"])
        assert not test & (train | val) and not train & val
        assert "STS_001" not in test | train | val
        assert {r["patient"] for r in fold["rows"]} == test
        assert fold["postprocess"]["keep_fraction"] in (0.0, 0.1, 1.0)
    assert summary["n"] == 4 and [r["patient"] for r in summary["rows"]] == sorted(
        set(REAL) - {"STS_001"}
    )
    lo, hi = summary["dice_ci95"]
    assert lo <= summary["dice_mean"] <= hi
    assert all(0 <= r["dice"] <= 1 and r["agreement"] is not None for r in summary["rows"])
    report = (out / "report.html").read_text()
    assert report.count("<tr><td>STS_") == 4 and "NOT FOR CLINICAL USE" in report
    assert len(list(out.glob("worst_*.png"))) == 4
    # resumable: a finished fold is not trained again
    stamp = (out / "fold0.pt").stat().st_mtime_ns
    again = cross_validate([data], out, recipe, k=2, seed=0, device="cpu", log=lambda _: None)
    assert (out / "fold0.pt").stat().st_mtime_ns == stamp and again["dice_mean"] == summary[
        "dice_mean"
    ]
    # a faster inference is adopted only with its own out-of-fold figures
    whole = rescore_cv(out, tmp_path / "whole", [data], inference="whole", log=lambda _: None)
    assert whole["recipe"] == "3d-heavy+whole" and whole["inference"] == "whole"
    assert [r["patient"] for r in whole["rows"]] == [r["patient"] for r in summary["rows"]]
    # the fold models shipped as one ensemble, figures and candidates on its card
    model = tmp_path / "model"
    card = assemble(
        out,
        REPO / "models" / "sarcnode-seg-demo",
        model,
        model_id="tiny",
        version="0.0.1",
        data=[data],
    )
    assert card["ensemble"]["members"] == ["fine_0", "fine_1"]
    assert card["validation"]["summary"]["real"]["dice_mean"] == summary["dice_mean"]
    assert {c["recipe"] for c in card["validation"]["candidates"]} == {"3d-heavy", "3d-heavy+whole"}
    assert card["quality"]["review_below"] == summary["quality_flag"]["threshold_all_folds"]
    assert (
        card["input_checks"]["training_range"][0]
        > card["input_checks"]["min_neighbour_correlation"]
    )
    image, _ = discover([data], {"STS_001"})[0].load()
    result = Segmenter(model, "cpu").segment(image)
    assert (
        result.quality is not None and result.quality.threshold == card["quality"]["review_below"]
    )
    # the folds of a run cannot silently change under it
    with pytest.raises(ValueError, match="other folds"):
        cross_validate(
            [data], out, dataclasses.replace(recipe, name="25d-heavy"), k=2, log=lambda _: None
        )


def test_flag_threshold_separates_failures_and_is_judged_out_of_fold() -> None:
    rows = [
        {"patient": "a", "fold": 0, "dice": 0.9, "agreement": 0.95},
        {"patient": "b", "fold": 0, "dice": 0.2, "agreement": 0.60},
        {"patient": "c", "fold": 1, "dice": 0.85, "agreement": 0.93},
        {"patient": "d", "fold": 1, "dice": 0.5, "agreement": 0.70},
        {"patient": "e", "fold": 1, "dice": 0.8, "agreement": 0.75},
    ]
    t = flag_threshold(rows)
    assert 0.70 < t <= 0.75  # flags b and d, not a, c or e
    figures = flag_figures(rows, {0: t, 1: t})
    assert figures["sensitivity"] == 1.0 and figures["false_flag_rate"] == 0.0
    assert figures["flagged_patients"] == ["b", "d"]
    # a fold judged by a threshold that is too low misses its failure
    assert flag_figures(rows, {0: t, 1: 0.5})["caught"] == 1
    # Wilson interval: 13 of 17 is 0.53-0.90 (textbook values)
    assert wilson_ci(13, 17) == pytest.approx([0.527, 0.904], abs=0.002)


def test_agreement_and_review_flag() -> None:
    a = np.zeros((4, 10, 10))
    a[1:3, 2:8, 2:8] = 1
    b = np.zeros_like(a)
    b[1:3, 2:8, 2:5] = 1
    assert agreement([a, a, a]) == 1.0
    assert agreement([a, b]) == pytest.approx(2 * 36 / (72 + 36))
    assert agreement([a, np.zeros_like(a)]) == 0.0
    calm = Quality.judge(0.95, {"review_below": 0.9})
    assert not calm.review and calm.reasons == []
    shaky = Quality.judge(0.8, {"review_below": 0.9})
    assert shaky.review and "disagree" in shaky.reasons[0]
    lost = Quality.judge(0.99, {"review_below": 0.9}, located=False)
    assert lost.review and "locator" in lost.reasons[0]


def test_noise_and_constant_images_are_refused_real_mr_is_not() -> None:
    real = sitk.ReadImage(str(shared_data("sts-t1-cropped", "STS_002", "MR_T1_image.nii.gz")))
    assert check_input(real, {})["neighbour_correlation"] > 0.8
    rng = np.random.default_rng(0)
    noise = sitk.GetImageFromArray(
        rng.uniform(0, 1000, sitk.GetArrayViewFromImage(real).shape).astype(np.float32)
    )
    noise.CopyInformation(real)
    with pytest.raises(InputRejected, match="noise"):
        check_input(noise, {"min_neighbour_correlation": 0.5})
    flat = sitk.Image(real.GetSize(), sitk.sitkFloat32) + 100.0
    with pytest.raises(InputRejected, match="constant"):
        check_input(flat, {})
