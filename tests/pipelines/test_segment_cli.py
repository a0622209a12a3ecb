"""``sarcnode segment`` / ``eval-seg`` / ``train-seg`` on CPU, with the shipped demo model."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipelines.io.dicom import load_series, scan
from pipelines.io.roles import load_role_rules
from pipelines.io.rtstruct import rtstruct_mask
from pipelines.segment.metrics import dice
from pipelines.synth.study import write_study
from tests.conftest import REPO, SARCNODE, shared_data

pytestmark = pytest.mark.slow  # the network on CPU in every test: ~45 s to ~4 min each


def sarcnode(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the CLI (no --config: these commands do not use the node's settings)."""
    return subprocess.run(
        [SARCNODE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_segment_a_synthetic_study_on_cpu_and_carry_the_mask_to_t1(tmp_path: Path) -> None:
    """FS-T2 segmented, carried to T1 by registration: both overlap their own truth."""
    write_study(tmp_path / "study", 21)  # a seed outside the training cohort
    proc = sarcnode(
        "segment",
        str(tmp_path / "study" / "dicom"),
        "--out",
        str(tmp_path / "mask.nii.gz"),
        "--device",
        "cpu",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["segmented"] == "T2FS" and report["device"] == "cpu"
    assert report["note"] == "not for clinical use"
    assert report["registration"]["accepted"], report["registration"]
    masks = tmp_path / "study" / "masks"
    t2 = sitk.ReadImage(report["masks"]["T2FS"])
    t1 = sitk.ReadImage(report["masks"]["T1"])
    assert report["masks"]["T1"].endswith("mask_T1.nii.gz")
    # FS-T2 goes through the card's FS-T2 path (the 1.0.0 model: 0.82 on this
    # seed, the 2.0 ensemble 0.74). Below 0.7 is a failure by the card's own
    # definition, and the bar stays there: synthetic FS-T2 was not what chose it.
    assert report["members"] == ["fine_t2fs"]
    assert dice(t2, sitk.ReadImage(str(masks / "T2FS_tumour.nii.gz"))) >= 0.7
    assert dice(t1, sitk.ReadImage(str(masks / "T1_tumour.nii.gz"))) >= 0.7


def test_segment_reads_nifti_and_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    image = shared_data("sts-t1-cropped", "STS_002", "MR_T1_image.nii.gz")
    ok = sarcnode("segment", str(image), "--out", str(tmp_path / "m.nii.gz"), "--device", "cpu")
    assert ok.returncode == 0, ok.stderr
    out = sitk.ReadImage(str(tmp_path / "m.nii.gz"))
    assert out.GetSize() == sitk.ReadImage(str(image)).GetSize()

    not_dicom = tmp_path / "empty"
    not_dicom.mkdir()
    bad = sarcnode("segment", str(not_dicom), "--out", str(tmp_path / "x.nii.gz"))
    assert bad.returncode == 2 and "no MR image series found" in bad.stderr

    model = tmp_path / "model"
    shutil.copytree(REPO / "models" / "sarcnode-seg-demo", model)
    with (model / "coarse.pt").open("ab") as fh:
        fh.write(b"tampered")
    refused = sarcnode(
        "segment", str(image), "--out", str(tmp_path / "y.nii.gz"), "--model", str(model)
    )
    assert refused.returncode == 2 and "refusing to load them" in refused.stderr
    assert not (tmp_path / "y.nii.gz").exists()


def test_segment_refuses_noise_and_reports_the_quality_of_a_real_mask(tmp_path: Path) -> None:
    """A real crop gets a mask with a quality estimate; the same grid of random noise is refused."""
    image_path = shared_data("sts-t1-cropped", "STS_002", "MR_T1_image.nii.gz")
    ok = sarcnode(
        "segment", str(image_path), "--out", str(tmp_path / "m.nii.gz"), "--device", "cpu", "--json"
    )
    assert ok.returncode == 0, ok.stderr
    quality = json.loads(ok.stdout)["quality"]
    assert 0 <= quality["score"] <= 1 and isinstance(quality["review"], bool)
    assert quality["review"] == (quality["score"] < quality["threshold"])

    image = sitk.ReadImage(str(image_path))
    arr = sitk.GetArrayFromImage(image)
    rng = np.random.default_rng(1)
    noise = sitk.GetImageFromArray(rng.uniform(0, arr.max(), arr.shape).astype(np.float32))
    noise.CopyInformation(image)
    sitk.WriteImage(noise, str(tmp_path / "noise.nii.gz"))
    refused = sarcnode(
        "segment", str(tmp_path / "noise.nii.gz"), "--out", str(tmp_path / "n.nii.gz")
    )
    assert refused.returncode == 2 and "looks like noise" in refused.stderr
    assert not (tmp_path / "n.nii.gz").exists()


def test_eval_seg_on_sts001_scores_against_the_expert_rtstruct(tmp_path: Path) -> None:
    """eval-seg's Dice agrees with segment's mask scored independently against GTV_Mass."""
    study = shared_data("sts-raw", "STS_001")
    proc = sarcnode(
        "eval-seg",
        str(REPO / "models" / "sarcnode-seg-demo"),
        str(study),
        "--device",
        "cpu",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["case"]: r for r in json.loads(proc.stdout)["cases"]}
    assert set(rows) == {"STS_001/T2FS", "STS_001/T1", "STS_001/T1 (carried from T2FS)"}

    seg = sarcnode(
        "segment",
        str(study / "MR_T2FS" / "image"),
        "--out",
        str(tmp_path / "t2.nii.gz"),
        "--device",
        "cpu",
    )
    assert seg.returncode == 0, seg.stderr
    image = load_series(scan(study / "MR_T2FS" / "image").series[0])
    truth = rtstruct_mask(study / "MR_T2FS" / "mask" / "1-1.dcm", image, "GTV_Mass")
    mine = dice(sitk.ReadImage(str(tmp_path / "t2.nii.gz")), truth)
    assert abs(mine - rows["STS_001/T2FS"]["dice"]) < 1e-3
    # The expert's tumour is found: a miss would score ~0 and an HD95 of the field's size.
    assert mine > 0.5 and rows["STS_001/T2FS"]["hd95_mm"] < 30
    # Issue 11's floor on the end-to-end case, FS-T2 and the mask carried to T1
    # (a gate for the FS-T2 path, as its card says, not an independent estimate).
    assert rows["STS_001/T2FS"]["dice"] >= 0.90
    assert rows["STS_001/T1 (carried from T2FS)"]["dice"] >= 0.90
    rules = load_role_rules(REPO / "config" / "sequence_roles.yaml")
    assert rules.classify(scan(study / "MR_T1" / "image").series[0].attributes) == "T1"
    assert np.isfinite(rows["STS_001/T1 (carried from T2FS)"]["hd95_mm"])


def test_train_seg_writes_weights_a_checked_card_and_honours_exclusions(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    for case in ("STS_001", "STS_002", "STS_008", "STS_025"):
        (real / case).symlink_to(shared_data("sts-t1-cropped", case))
    write_study(tmp_path / "syn" / "a", 41)
    write_study(tmp_path / "syn" / "b", 42)
    proc = sarcnode(
        "train-seg",
        str(real),
        str(tmp_path / "syn"),
        "--out",
        str(tmp_path / "m"),
        "--exclude",
        "STS_001",
        "--coarse-steps",
        "3",
        "--fine-steps",
        "3",
        "--val-every",
        "2",
        "--val-fraction",
        "0.5",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    from pipelines.segment.card import load_card

    card = load_card(tmp_path / "m")  # raises if a checksum does not match
    training = card["training"]
    assert "STS_001" not in training["train_ids"] + training["validation_ids"]
    assert set(training["train_ids"]) | set(training["validation_ids"]) == {
        "STS_002",
        "STS_008",
        "STS_025",
        "SYN000041",
        "SYN000042",
    }
    assert card["clinical_use"] == "not for clinical use"
    assert {r["case"] for r in card["validation"]["cases"]} >= {
        "STS_002",
        "STS_008",
        "STS_025",
    } & set(training["validation_ids"])
    assert "validation real" in proc.stdout
