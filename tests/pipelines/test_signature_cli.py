"""``sarcnode radiomics``, ``fit-signature`` and ``evaluate`` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from tests.conftest import shared_data
from tests.pipelines.test_pfs_fit import cohort
from tests.pipelines.test_segment_cli import sarcnode


def test_radiomics_command_writes_one_row_per_region(tmp_path: Path) -> None:
    folder = shared_data("sts-t1-cropped", "STS_008")
    proc = sarcnode(
        "radiomics",
        str(folder / "MR_T1_image.nii.gz"),
        str(folder / "MR_T1_mask.nii.gz"),
        "--out",
        str(tmp_path / "f.csv"),
        "--sequence",
        "T1",
        "--study",
        "STS_008",
        "--workers",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(tmp_path / "f.csv")
    assert list(table["region"]) == ["tumour", "ring"] and (table["sequence"] == "T1").all()
    assert (
        table.loc[0, "original_shape_VoxelVolume"] > table.loc[0, "original_shape_MeshVolume"] * 0.9
    )
    bad = sarcnode(
        "radiomics",
        str(folder / "MR_T1_image.nii.gz"),
        str(tmp_path / "nope.nii.gz"),
        "--out",
        str(tmp_path / "g.csv"),
    )
    assert bad.returncode == 2 and "nope.nii.gz" in bad.stderr


def test_fit_signature_then_evaluate_from_a_feature_table(tmp_path: Path) -> None:
    features, clinical = cohort(200)
    features.to_csv(tmp_path / "features.csv", index_label="id")
    clinical.to_csv(tmp_path / "clinical.csv", index_label="id")
    proc = sarcnode(
        "fit-signature",
        str(tmp_path),
        "--endpoint",
        "pfs",
        "--out",
        str(tmp_path / "models" / "pfs-demo"),
        "--synthetic",
        "--seed",
        "0",
    )
    assert proc.returncode == 0, proc.stderr
    card = yaml.safe_load((tmp_path / "models" / "pfs-demo" / "card.yaml").read_text())
    assert card["id"] == "pfs-demo" and card["endpoint"] == "pfs"
    assert card["extraction"]["params_sha256"] and "SYNTHETIC" in card["intended_use"]
    assert "validation (n=60)" in proc.stdout
    report = sarcnode(
        "evaluate",
        str(tmp_path / "models" / "pfs-demo"),
        str(tmp_path),
        "--out",
        str(tmp_path / "report"),
    )
    assert report.returncode == 0, report.stderr
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["n"] == 200 and 0.5 < metrics["c_index_radscore"]["value"] < 1
    wrong = sarcnode(
        "fit-signature", str(tmp_path), "--endpoint", "survival", "--out", str(tmp_path / "x")
    )
    assert wrong.returncode == 2 and "--endpoint must be" in wrong.stderr


def test_features_that_readers_disagree_on_never_enter_the_signature(tmp_path: Path) -> None:
    """A second reader's table (--icc FILE): ICC(2,1) <= 0.75 keeps a feature out."""
    from pipelines.signature.pfs import fit_pfs

    features, clinical = cohort(200)
    plain = fit_pfs(features, clinical, signature_id="plain", seed=0, synthetic=True).card
    chosen = {f["name"] for f in plain["features"]}
    assert chosen
    second = features.copy()
    rng = np.random.default_rng(5)
    for name in chosen:  # the second reader's values of these bear no relation to the first's
        second[name] = rng.permutation(second[name].to_numpy())
    features.to_csv(tmp_path / "features.csv", index_label="id")
    clinical.to_csv(tmp_path / "clinical.csv", index_label="id")
    second.to_csv(tmp_path / "reader2.csv", index_label="id")
    out = tmp_path / "models" / "robust"
    proc = sarcnode(
        "fit-signature", str(tmp_path), "--endpoint", "pfs", "--out", str(out),
        "--synthetic", "--icc", str(tmp_path / "reader2.csv"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    card = yaml.safe_load((out / "card.yaml").read_text())
    robust = card["robustness"]
    assert robust["method"].startswith("second segmentation") and robust["threshold"] == 0.75
    assert robust["of"] == features.shape[1] and robust["robust"] == features.shape[1] - len(chosen)
    assert not chosen & {f["name"] for f in card["features"]}
    perturb = sarcnode(
        "fit-signature", str(tmp_path), "--endpoint", "pfs", "--out", str(tmp_path / "x"),
        "--icc", "perturb",
    )  # fmt: skip
    assert perturb.returncode == 2 and "needs a folder of studies" in perturb.stderr


def test_perturbation_icc_on_synthetic_studies(tmp_path: Path) -> None:
    """Three studies, seven "raters" (mask, eroded, dilated, four shifts)."""
    from pipelines.radiomics.extract import load_params
    from pipelines.signature.cohort import perturbation_icc
    from pipelines.synth.cohort import write_cohort

    write_cohort(tmp_path, 3, 41)
    params = load_params(Path(__file__).parents[2] / "config" / "radiomics" / "mr-demo.yaml")
    values, summary = perturbation_icc(tmp_path, params, cases=3, regions=("tumour",), workers=2)
    assert len(summary["cases"]) == 3
    assert summary["method"].count(",") == 6  # original + 6 perturbations
    # Tumour volumes differ between patients far more than a one-voxel rim:
    assert values["T2FS:tumour:original_shape_VoxelVolume"] > 0.9
    assert values["T1:tumour:original_shape_VoxelVolume"] > 0.9
    assert values.index.str.startswith(("T1:tumour:", "T2FS:tumour:")).all()
