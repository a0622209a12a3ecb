"""``sarcnode analyze`` on the real STS_001 study with the shipped demo models."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import SimpleITK as sitk

from pipelines.analyze import summary
from pipelines.segment.quality import Quality
from tests.conftest import shared_data
from tests.pipelines.test_encode import dciodvfy_errors
from tests.pipelines.test_segment_cli import sarcnode


@pytest.mark.slow  # analyze twice on STS_001: ~5 min on 2 busy cores
def test_analyze_sts001_segments_extracts_and_scores_reproducibly(tmp_path: Path) -> None:
    study = shared_data("sts-raw", "STS_001")
    first = sarcnode(
        "analyze", str(study), "--out", str(tmp_path / "a"), "--device", "cpu", "--json"
    )
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    for role in ("T2FS", "T1"):
        mask = sitk.ReadImage(report["segmentation"]["masks"][role])
        assert sitk.GetArrayViewFromImage(mask).sum() > 1000  # a real tumour, on each series' grid
    # The shipped pipeline's cards: three T1 cards fitted on real patients (one extraction,
    # T1 tumour + ring) and the synthetic demo card (T1 and FS-T2).
    extractions = {tuple(e["cards"]): e for e in report["extractions"]}
    real = ("sarcnode-lungmets-t1", "sarcnode-grade-t1", "sarcnode-efs-t1")
    assert set(extractions) == {real, ("sarcnode-pfs-demo",)}
    for cards, pairs in (
        (real, {("T1", "tumour"), ("T1", "ring")}),
        (("sarcnode-pfs-demo",), {("T2FS", "tumour"), ("T2FS", "ring")}),
    ):
        table = pd.read_csv(extractions[cards]["features"])
        assert {(s, r) for s, r in zip(table["sequence"], table["region"], strict=True)} >= pairs
    scores = {s["signature"]: s for s in report["scores"]}
    assert list(scores) == [*real, "sarcnode-pfs-demo"]
    assert report["score"] == report["scores"][0]
    for card_id in real:  # STS_001 never trained them: out-of-sample predictions
        result = scores[card_id]
        assert result["training_cohort"]["source"] == "real"
        assert result["training_cohort"]["n"] in (37, 38)
        assert "nested CV" in result["nested_cv"]
        assert result["applicability"]["status"] in ("inside", "outside")
        assert (result["risk_group"] is None) == (result["applicability"]["status"] == "outside")
    assert 0 < scores["sarcnode-lungmets-t1"]["probability"] < 1
    assert 0 < scores["sarcnode-grade-t1"]["probability"] < 1
    assert set(scores["sarcnode-efs-t1"]["survival_probability"]) >= {"365", "1095"}
    score = scores["sarcnode-pfs-demo"]
    assert score["model"] == "radscore"
    assert score["missing_clinical"]  # no clinical factors given
    # A real study against a card fitted on synthetic ones: in range or not, it is said.
    verdict = score["applicability"]
    assert verdict["status"] in ("inside", "outside")
    assert (score["risk_group"] in ("high", "low")) == (verdict["status"] == "inside")
    probabilities = [score["pfs_probability"][t] for t in ("300", "600", "900")]
    assert 1 > probabilities[0] >= probabilities[1] >= probabilities[2] > 0
    summary_text = (tmp_path / "a" / "summary.txt").read_text()
    assert "NOT FOR CLINICAL USE" in summary_text
    assert "fitted on 140 SYNTHETIC patients: the plumbing demo" in summary_text
    assert verdict["text"] in summary_text
    for card_id in real:
        assert f"{card_id} 1.0.0" in summary_text
    assert "fitted on 38 real patients; nested CV: lung metastasis: nested CV AUC" in summary_text
    quality = report["segmentation"]["quality"]  # the demo model: one view, so no score
    assert set(quality) >= {"score", "review", "threshold", "reasons"}
    # The objects a PACS receives: a SEG per series, the SR and the PDF, all valid DICOM.
    assert set(report["dicom"]) == {"seg_T2FS", "seg_T1", "sr", "pdf"}
    for path in report["dicom"].values():
        assert dciodvfy_errors(Path(path)) == [], path

    again = sarcnode(
        "analyze",
        str(study),
        "--out",
        str(tmp_path / "b"),
        "--device",
        "cpu",
        "--json",
        "--edema",
        "yes",
        "--metastasis",
        "no",
        "--grade",
        "3",
        "--age",
        "60",
        "--sex",
        "M",
    )
    assert again.returncode == 0, again.stderr
    second = {s["signature"]: s for s in json.loads(again.stdout)["scores"]}
    for card_id, first_result in scores.items():  # same study, same numbers
        assert second[card_id]["radscore"] == first_result["radscore"]
    second = second["sarcnode-pfs-demo"]
    assert second["model"] == "nomogram" or not second.get("missing_clinical")
    bad = sarcnode("analyze", str(study), "--out", str(tmp_path / "c"), "--edema", "maybe")
    assert bad.returncode == 2 and "expected yes or no" in bad.stderr


def _report(quality: dict[str, object] | None) -> dict[str, object]:
    return {
        "study": "S1",
        "segmentation": {"model": "m 1", "sequence": "T2FS", "volume_ml": 12.5, "quality": quality},
        "score": {"signature": "sig", "endpoint": "pfs", "radscore": 0.5, "risk_group": "low"},
    }


def test_summary_gives_every_card_and_why_one_was_skipped() -> None:
    report = _report(None) | {
        "scores": [
            {
                "signature": "sarcnode-lungmets-t1",
                "version": "1.0.0",
                "endpoint": "lung_metastasis",
                "training_cohort": {"n": 37, "source": "real"},
                "nested_cv": "nested-CV AUC 0.74 (95% CI 0.58-0.88), permutation p 0.02",
                "clinical_use": "not for clinical use",
                "radscore": 3.9,
                "risk_group": None,
                "risk_group_withheld": "outside the model's range",
                "probability": 0.98,
                "applicability": {
                    "status": "outside",
                    "text": "outside the model's range: rad-score 3.9 above the training range "
                    "-2.1 to 2.4 by 1.5 (33% of its width)",
                },
            },
            {
                "signature": "sarcnode-grade-t1",
                "version": "1.0.0",
                "endpoint": "high_grade",
                "training_cohort": {"n": 35, "source": "real"},
                "skipped": "needs T1: not in the study (it has T2FS)",
            },
        ]
    }
    text = summary(report)
    assert "sarcnode-lungmets-t1 1.0.0 (lung_metastasis)" in text
    assert "rad-score 3.900, no risk group: outside the model's range" in text
    assert "predictions withheld: outside the model's range" in text and "98%" not in text
    assert "rad-score 3.9 above the training range -2.1 to 2.4 by 1.5" in text
    assert "fitted on 37 real patients; nested CV: nested-CV AUC 0.74" in text
    assert "not scored: needs T1: not in the study (it has T2FS)" in text


def test_summary_says_when_the_mask_needs_review() -> None:
    flagged = Quality.judge(0.41, {"review_below": 0.8}, located=False).as_dict()
    text = summary(_report(flagged))
    assert (
        "Segmentation flagged for review: views of the ensemble disagree: agreement 0.41 < 0.80; "
        "the locator found no tumour; the whole image was searched." in text
    )
    fine = summary(_report(Quality.judge(0.934, {"review_below": 0.8}).as_dict()))
    assert "Segmentation quality 0.93 (agreement of ensemble views, review below 0.80)" in fine
    assert "review" not in summary(_report(None)).lower()
