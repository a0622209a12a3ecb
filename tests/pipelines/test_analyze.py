"""``sarcnode analyze`` on the real STS_001 study with the shipped demo models."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import SimpleITK as sitk

from pipelines.analyze import summary
from pipelines.segment.quality import Quality
from tests.conftest import shared_data
from tests.pipelines.test_encode import dciodvfy_errors
from tests.pipelines.test_segment_cli import sarcnode


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
    table = pd.read_csv(tmp_path / "a" / "features.csv")
    assert {(s, r) for s, r in zip(table["sequence"], table["region"], strict=True)} >= {
        ("T2FS", "tumour"),
        ("T2FS", "ring"),
    }
    score = report["score"]
    assert score["signature"] == "sarcnode-pfs-demo" and score["risk_group"] in ("high", "low")
    assert score["model"] == "radscore" and score["missing_clinical"]  # no clinical factors given
    probabilities = [score["pfs_probability"][t] for t in ("300", "600", "900")]
    assert 1 > probabilities[0] >= probabilities[1] >= probabilities[2] > 0
    assert "NOT FOR CLINICAL USE" in (tmp_path / "a" / "summary.txt").read_text()
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
    second = json.loads(again.stdout)["score"]
    assert second["radscore"] == score["radscore"]  # same study, same number
    assert second["model"] == "nomogram" or not second.get("missing_clinical")
    bad = sarcnode("analyze", str(study), "--out", str(tmp_path / "c"), "--edema", "maybe")
    assert bad.returncode == 2 and "expected yes or no" in bad.stderr


def _report(quality: dict[str, object] | None) -> dict[str, object]:
    return {
        "study": "S1",
        "segmentation": {"model": "m 1", "sequence": "T2FS", "volume_ml": 12.5, "quality": quality},
        "score": {"signature": "sig", "endpoint": "pfs", "radscore": 0.5, "risk_group": "low"},
    }


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
