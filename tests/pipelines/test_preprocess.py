"""Preprocessing: bias correction, normalisation, resampling, carrying a mask across grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipelines.io.dicom import load_series, scan
from pipelines.io.roles import load_role_rules
from pipelines.preprocess import (
    body_mask,
    carry_mask,
    dice,
    histogram_standardise,
    n4,
    register_rigid,
    resample,
    zscore,
)
from pipelines.synth.study import write_study
from tests.conftest import REPO


def phantom_with_bias() -> tuple[sitk.Image, sitk.Image]:
    """A uniform ellipsoidal 'body' times a known smooth bias field, plus noise."""
    _, y, x = np.mgrid[0:24, 0:96, 0:96].astype(np.float32)
    body = ((x - 48) / 40) ** 2 + ((y - 48) / 34) ** 2 < 1
    bias = 1 + 0.5 * (x - 48) / 48 + 0.2 * (y - 48) / 48
    rng = np.random.default_rng(0)
    arr = np.where(body, 400 * bias, 0) + rng.normal(0, 4, x.shape)
    image = sitk.GetImageFromArray(np.abs(arr).astype(np.float32))
    image.SetSpacing((1.5, 1.5, 5.0))
    mask = sitk.GetImageFromArray(body.astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


def cv_inside(image: sitk.Image, mask: sitk.Image) -> float:
    arr = sitk.GetArrayFromImage(image)[sitk.GetArrayFromImage(mask) > 0]
    return float(arr.std() / arr.mean())


def test_n4_removes_most_of_a_known_bias_field() -> None:
    image, truth_body = phantom_with_bias()
    found = body_mask(image)
    assert dice(found, truth_body) > 0.95
    corrected = n4(image, found)
    assert cv_inside(corrected, truth_body) < 0.4 * cv_inside(image, truth_body)


def test_zscore_and_histogram_standardisation_inside_the_body() -> None:
    image, mask = phantom_with_bias()
    inside = sitk.GetArrayFromImage(mask) > 0
    z = sitk.GetArrayFromImage(zscore(image, mask))[inside]
    assert z.mean() == pytest.approx(0, abs=1e-4) and z.std() == pytest.approx(1, abs=1e-4)
    h = sitk.GetArrayFromImage(histogram_standardise(image, mask))[inside]
    assert np.percentile(h, 50) == pytest.approx(50, abs=1.0)
    assert np.percentile(h, 99) == pytest.approx(100, abs=1.0)
    with pytest.raises(ValueError, match="increasing landmarks"):
        histogram_standardise(image, mask, standard=[1, 2, 3])


def test_resample_keeps_extent_and_label_values() -> None:
    _, mask = phantom_with_bias()
    iso = resample(mask, (1.0, 1.0, 1.0), label=True)
    assert iso.GetSpacing() == (1.0, 1.0, 1.0)
    assert iso.GetSize() == (144, 144, 120)
    assert set(np.unique(sitk.GetArrayFromImage(iso))) == {0, 1}


def test_a_mask_carried_across_series_grids_overlaps_the_other_series_truth(
    tmp_path: Path,
) -> None:
    """FS-T2 truth resampled onto the T1 grid (own matrix, thickness, slight motion)."""
    write_study(tmp_path / "s", 21)
    rules = load_role_rules(REPO / "config" / "sequence_roles.yaml")
    images = {
        rules.classify(r.attributes): load_series(r) for r in scan(tmp_path / "s" / "dicom").series
    }
    t2_mask = sitk.ReadImage(str(tmp_path / "s" / "masks" / "T2FS_tumour.nii.gz"))
    t1_truth = sitk.ReadImage(str(tmp_path / "s" / "masks" / "T1_tumour.nii.gz"))
    carried = carry_mask(t2_mask, images["T1"], sitk.Transform())
    assert carried.GetSize() == images["T1"].GetSize()
    assert dice(carried, t1_truth) >= 0.8


def test_rigid_registration_finds_the_patient_motion_between_series(tmp_path: Path) -> None:
    """Seed 8 moves the patient 2.5 mm between T1 and FS-T2 (truth.json says by how much)."""
    truth = write_study(tmp_path / "s", 8)
    shift = next(s["shift_mm"] for s in truth["series"] if s["role"] == "T2FS")  # type: ignore[attr-defined]
    rules = load_role_rules(REPO / "config" / "sequence_roles.yaml")
    images = {
        rules.classify(r.attributes): load_series(r) for r in scan(tmp_path / "s" / "dicom").series
    }
    result = register_rigid(images["T1"], images["T2FS"])
    assert result.accepted, result.reason
    # In-plane motion within half a millimetre; through-plane (5 mm slices) within 2 mm.
    assert np.allclose(result.translation_mm[:2], shift[:2], atol=0.5)
    assert abs(result.translation_mm[2] - shift[2]) < 2.0
    t2_mask = sitk.ReadImage(str(tmp_path / "s" / "masks" / "T2FS_tumour.nii.gz"))
    t1_truth = sitk.ReadImage(str(tmp_path / "s" / "masks" / "T1_tumour.nii.gz"))
    before = dice(carry_mask(t2_mask, images["T1"], sitk.Transform()), t1_truth)
    after = dice(carry_mask(t2_mask, images["T1"], result.transform), t1_truth)
    assert after >= 0.95 and after > before + 0.05

    refused = register_rigid(images["T1"], images["T2FS"], max_translation_mm=0.5)
    assert not refused.accepted and "exceeds 0.5 mm" in refused.reason
    assert refused.transform.GetParameters() == ()  # the identity: scanner alignment kept
