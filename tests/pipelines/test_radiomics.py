"""Radiomics: extraction equals plain PyRadiomics; regions; ICC; ComBat against neuroCombat."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from pipelines.radiomics.combat import ComBat, CombatError
from pipelines.radiomics.extract import DEFAULT_PARAMS, ExtractionError, extract, load_params
from pipelines.radiomics.regions import habitat_counts, habitats, ring
from pipelines.radiomics.robustness import feature_icc, icc, perturbations, robust_features
from tests.conftest import shared_data


def sts(case: str) -> tuple[sitk.Image, sitk.Image]:
    folder = shared_data("sts-t1-cropped", case)
    image = sitk.ReadImage(str(folder / "MR_T1_image.nii.gz"), sitk.sitkFloat32)
    mask = sitk.ReadImage(str(folder / "MR_T1_mask.nii.gz"))
    return image, mask


def test_parallel_extraction_equals_one_plain_pyradiomics_call_per_region() -> None:
    """A real patient (STS_008), tumour and ring, two worker processes vs PyRadiomics on files."""
    from radiomics import featureextractor

    folder = shared_data("sts-t1-cropped", "STS_008")
    image, mask = sts("STS_008")
    shell = ring(mask, image)
    table = extract(
        {"T1": image}, {"T1": {"tumour": mask, "ring": shell}}, study="STS_008", workers=2
    )
    assert list(table["region"]) == ["tumour", "ring"] and (table["study"] == "STS_008").all()

    plain = featureextractor.RadiomicsFeatureExtractor(str(DEFAULT_PARAMS))
    reference = plain.execute(str(folder / "MR_T1_image.nii.gz"), str(folder / "MR_T1_mask.nii.gz"))
    values = {k: float(v) for k, v in reference.items() if not k.startswith("diagnostics_")}
    row = table.set_index("region").loc["tumour"]
    assert len(values) > 1000  # shape, first order and 5 texture classes on 12 images
    assert set(values) == set(table.columns) - {"study", "sequence", "region", "note"}
    assert (table["note"] == "").all()
    assert all(row[k] == v for k, v in values.items())  # identical, not approximately equal


def test_extraction_names_an_empty_region() -> None:
    image, mask = sts("STS_008")
    empty = sitk.Image(mask.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(mask)
    with pytest.raises(ExtractionError, match="T1/ring: empty mask"):
        extract({"T1": image}, {"T1": {"tumour": mask, "ring": empty}}, load_params(), workers=1)


def test_ring_is_outside_the_tumour_and_10_mm_wide_in_physical_space() -> None:
    """On STS_008's 0.98 x 0.98 x 3.27 mm grid the ring must still be 10 mm, not 10 voxels."""
    image, mask = sts("STS_008")
    shell = ring(mask)
    tumour = sitk.GetArrayViewFromImage(mask) > 0
    band = sitk.GetArrayViewFromImage(shell) > 0
    assert not np.any(tumour & band)
    # Independent distances (ITK's Maurer map in mm), 1 um tolerance at 10 mm.
    distance = sitk.GetArrayFromImage(
        sitk.SignedMaurerDistanceMap(
            mask > 0, insideIsPositive=False, useImageSpacing=True, squaredDistance=False
        )
    )
    assert distance[band].max() <= 10.0 + 1e-3 and distance[band].min() > 0
    assert np.all(band[(distance > 0) & (distance < 10.0 - 1e-3)])
    clipped = sitk.GetArrayFromImage(ring(mask, image)) > 0
    assert clipped.sum() < band.sum() and not np.any(clipped & ~band)  # air/dark voxels left out


def test_habitats_partition_the_tumour_and_are_ordered_by_intensity() -> None:
    image, mask = sts("STS_008")
    labels = habitats([image], mask, seed=0)
    arr = sitk.GetArrayViewFromImage(labels)
    tumour = sitk.GetArrayViewFromImage(mask) > 0
    assert set(np.unique(arr[tumour])) == {1, 2, 3} and not np.any(arr[~tumour])
    values = sitk.GetArrayViewFromImage(image)
    means = [values[arr == h].mean() for h in (1, 2, 3)]
    assert means[0] < means[1] < means[2]
    counts = habitat_counts(labels)
    assert sum(counts[f"habitat{h}_voxels"] for h in (1, 2, 3)) == tumour.sum()
    assert sum(counts[f"habitat{h}_fraction"] for h in (1, 2, 3)) == pytest.approx(1.0)
    assert np.array_equal(arr, sitk.GetArrayFromImage(habitats([image], mask, seed=0)))


def test_icc_matches_shrout_and_fleiss_1979() -> None:
    """Their Table 2 (6 targets, 4 judges): ICC(1,1)=.17, ICC(2,1)=.29, ICC(3,1)=.71."""
    x = np.array(
        [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    )
    assert [round(icc(x, k), 2) for k in ("1,1", "2,1", "3,1")] == [0.17, 0.29, 0.71]


def test_perturbation_icc_keeps_volume_like_features_and_drops_noise() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(100, 30, 12)
    tables = [
        pd.DataFrame(
            {
                "study": range(12),
                "stable": base + rng.normal(0, 1, 12),
                "noise": rng.normal(0, 1, 12),
            }
        )
        for _ in range(4)
    ]
    values = feature_icc(tables)
    assert robust_features(values) == ["stable"]
    _, mask = sts("STS_008")
    names = [name for name, _ in perturbations(mask)]
    assert names == ["original", "eroded", "dilated", "shift-x", "shift+x", "shift-y", "shift+y"]


def test_combat_equals_neurocombat_and_applies_to_new_cases() -> None:
    """Same harmonised values as the reference neuroCombat (Fortin), with a covariate kept."""
    from neuroCombat import neuroCombat

    rng = np.random.default_rng(0)
    batch = np.repeat(["A", "B", "C"], 20)
    age = rng.normal(50, 10, 60)
    x = rng.normal(0, 1, (60, 8)) + 0.05 * age[:, None]
    x[batch == "B"] = x[batch == "B"] * 1.8 + 2
    x[batch == "C"] = x[batch == "C"] * 0.6 - 1
    covars = pd.DataFrame({"batch": batch, "age": age})
    reference = neuroCombat(dat=x.T, covars=covars, batch_col="batch", continuous_cols=["age"])[
        "data"
    ].T
    model = ComBat().fit(x, batch, age[:, None])
    assert np.allclose(model.transform(x, batch, age[:, None]), reference, atol=1e-4)
    # Batch means line up after harmonisation (what is left: age differences, EB shrinkage).
    harmonised = model.transform(x, batch, age[:, None])
    before = np.ptp([x[batch == b].mean() for b in "ABC"])
    after = np.ptp([harmonised[batch == b].mean() for b in "ABC"])
    assert after < 0.1 * before
    again = ComBat.from_dict(model.to_dict())
    assert np.allclose(again.transform(x[:5], batch[:5], age[:5, None]), harmonised[:5])
    with pytest.raises(CombatError, match="not seen when ComBat was fitted: Z"):
        model.transform(x[:1], ["Z"], age[:1, None])


def test_study_regions_on_a_synthetic_pair(tmp_path: Path) -> None:
    """Both sequences: crop keeps the whole tumour, ring and habitats are where they belong."""
    from pipelines.io.dicom import load_series, scan
    from pipelines.radiomics.study import study_regions
    from pipelines.synth.study import write_study

    write_study(tmp_path / "s", 21)
    images = {r: load_series(scan(tmp_path / "s" / "dicom" / r).series[0]) for r in ("T1", "T2FS")}
    masks = {
        r: sitk.ReadImage(str(tmp_path / "s" / "masks" / f"{r}_tumour.nii.gz")) for r in images
    }
    prepared, regions, counts = study_regions(images, masks)
    for role in ("T1", "T2FS"):
        named = {k: sitk.GetArrayViewFromImage(v) > 0 for k, v in regions[role].items()}
        full = sitk.GetArrayViewFromImage(masks[role]) > 0
        assert named["tumour"].sum() == full.sum()  # the 40 mm crop cut nothing off
        assert prepared[role].GetSize() == regions[role]["tumour"].GetSize()
        assert not np.any(named["ring"] & named["tumour"]) and named["ring"].sum() > 0
        union = named["habitat1"] | named["habitat2"] | named["habitat3"]
        assert np.array_equal(union, named["tumour"])
        assert sum(counts[role][f"habitat{h}_fraction"] for h in (1, 2, 3)) == pytest.approx(1.0)


class _Glcm:
    """The attributes RadiomicsGLCM's coefficient and MCC steps read."""

    def __init__(self, p: np.ndarray, levels: np.ndarray) -> None:
        import logging

        self.P_glcm = p
        self.coefficients = {"Ng": int(levels.max()), "grayLevels": levels}
        self.logger = logging.getLogger("test")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compiled_glcm_steps_are_bit_identical_to_pyradiomics(seed: int) -> None:
    """Random normalised GLCMs with gaps in the gray levels, empty cells, 13 angles."""
    from radiomics.glcm import RadiomicsGLCM

    from pipelines.radiomics import fast

    rng = np.random.default_rng(seed)
    levels = np.sort(rng.choice(np.arange(1, 90), size=40 + 10 * seed, replace=False)).astype(float)
    n = len(levels)
    p = rng.random((1, n, n, 13)) * (rng.random((1, n, n, 13)) < 0.3)
    p = p + p.transpose(0, 2, 1, 3)
    p /= p.sum((1, 2), keepdims=True)
    plain, ours = _Glcm(p, levels), _Glcm(p.copy(), levels)
    RadiomicsGLCM._calculateCoefficients(plain)
    fast._coefficients(ours)
    assert plain.coefficients.keys() == ours.coefficients.keys()
    for key, value in plain.coefficients.items():
        np.testing.assert_array_equal(np.asarray(ours.coefficients[key]), np.asarray(value), key)
    mcc_plain = RadiomicsGLCM.getMCCFeatureValue(plain)
    assert np.array_equal(fast._mcc(ours), mcc_plain, equal_nan=True)


def test_bin_edges_equal_pyradiomics() -> None:
    from radiomics import imageoperations

    from pipelines.radiomics import fast

    with fast.accelerated():
        pass  # records the original
    original = fast._ORIGINAL["getBinEdges"]
    rng = np.random.default_rng(3)
    for values, width in (
        (rng.normal(0, 100, 5000), 5),
        (rng.normal(3, 0.2, 100), 0.5),
        (np.full(10, 25.0), 5),  # flat region, on an edge
    ):
        assert np.array_equal(
            fast._bin_edges(values, binWidth=width), original(values, binWidth=width)
        )
    assert imageoperations.getBinEdges is original  # restored after the block
