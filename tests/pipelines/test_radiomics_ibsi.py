"""IBSI mode on the IBSI 1 digital phantom: every reported IBSI feature within its reference.

The phantom (``../shared/data/ibsi-digital-phantom``) is computed as its
reference values were: no resampling, no normalisation, and grey levels kept
as they are (1-6: bin width 1 from a minimum of 1). Every other setting and
the feature classes are the project's (``config/radiomics/mr-default.yaml``),
including ``voxelArrayShift: 300``, which IBSI mode must undo.

A value matches when it is within the reference's tolerance; where that is 0
(most of the phantom's), within half a unit of the reference's third
significant digit, the precision IBSI reports.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from pipelines.radiomics import ibsi
from pipelines.radiomics.extract import (
    ExtractionError,
    card_mode,
    extract,
    extraction_mode,
    load_params,
    params_hash,
    plain_pyradiomics,
)
from tests.conftest import REPO, shared_data

# What PyRadiomics' own values miss on the phantom with the project's settings:
# exactly what IBSI mode corrects (energy and RMS by voxelArrayShift: 300).
PYRADIOMICS_MISSES = {
    "stat_kurt",
    "morph_pca_min_axis",
    "morph_pca_least_axis",
    "stat_energy",
    "stat_rms",
}


def phantom() -> tuple[sitk.Image, sitk.Image, pd.DataFrame]:
    folder = shared_data("ibsi-digital-phantom")
    image = sitk.ReadImage(str(folder / "phantom.nii.gz"))
    mask = sitk.ReadImage(str(folder / "mask.nii.gz"))
    reference = pd.read_csv(folder / "reference_values.csv", encoding="utf-8-sig")
    return image, mask, reference


def phantom_params(mode: str, **setting: Any) -> dict[str, Any]:
    """The project's classes and settings in the digital phantom's configuration."""
    project = load_params()
    settings = {
        k: v
        for k, v in project["setting"].items()
        if k not in ("normalize", "normalizeScale", "resampledPixelSpacing")
    }
    return {
        "imageType": {"Original": {}},
        "featureClass": project["featureClass"],
        "setting": {**settings, "binWidth": 1, **setting},
        "sarcnode": {"mode": mode},
    }


def phantom_features(mode: str, **setting: Any) -> dict[str, float]:
    image, mask, _ = phantom()
    table = extract({"x": image}, {"x": {"roi": mask}}, phantom_params(mode, **setting), workers=1)
    row = table.drop(columns=["study", "sequence", "region", "note"]).iloc[0]
    assert all(column.startswith("original_") for column in row.index)
    return {ibsi.split_name(k)[1]: float(v) for k, v in row.items()}


def within(value: float, reference: float, tolerance: float) -> bool:
    if tolerance == 0:  # exact value, reported to three significant digits
        tolerance = 0.5 * 10 ** (math.floor(math.log10(abs(reference))) - 2) if reference else 1e-12
    return abs(value - reference) <= tolerance


def compare(features: dict[str, float], reference: pd.DataFrame) -> pd.DataFrame:
    """One row per mapped IBSI tag: feature, value, reference, tolerance, ok."""
    rows = reference.set_index("tag")
    out = []
    for feature, tags in ibsi.IBSI_TAGS.items():
        for tag in tags:
            ref = float(rows.loc[tag, "reference value"])
            tol = float(rows.loc[tag, "tolerance"])
            value = features[feature]
            out.append((tag, feature, value, ref, tol, within(value, ref, tol)))
    return pd.DataFrame(out, columns=["tag", "feature", "value", "reference", "tolerance", "ok"])


def test_every_reported_ibsi_feature_matches_the_phantom_in_ibsi_mode() -> None:
    _, _, reference = phantom()
    features = phantom_features("ibsi")
    unaccounted = set(features) - set(ibsi.IBSI_TAGS) - set(ibsi.NO_IBSI_DEFINITION)
    assert not unaccounted, f"features neither mapped to IBSI nor listed without: {unaccounted}"
    assert set(ibsi.IBSI_TAGS) <= set(features), "mapped features the project no longer computes"
    result = compare(features, reference)
    print("\n" + result.to_string(index=False))
    print(f"\n{int(result['ok'].sum())}/{len(result)} IBSI features within tolerance")
    print("IBSI 1 features not computed:", ", ".join(ibsi.NOT_COMPUTED))
    print("IBSI 1 families not computed:", "; ".join(ibsi.NOT_COMPUTED_FAMILIES))
    assert len(result) == 105
    assert result["ok"].all(), result[~result["ok"]].to_string(index=False)


def test_pyradiomics_mode_misses_exactly_what_ibsi_mode_corrects() -> None:
    _, _, reference = phantom()
    result = compare(phantom_features("pyradiomics"), reference)
    assert set(result.loc[~result["ok"], "tag"]) == PYRADIOMICS_MISSES
    # Without the project's intensity shift only the definitions differ.
    result = compare(phantom_features("pyradiomics", voxelArrayShift=0), reference)
    assert set(result.loc[~result["ok"], "tag"]) == PYRADIOMICS_MISSES - {"stat_energy", "stat_rms"}


def test_tables_account_for_every_ibsi_feature_of_the_reference_set() -> None:
    _, _, reference = phantom()
    mapped = {tag for tags in ibsi.IBSI_TAGS.values() for tag in tags}
    listed = set(ibsi.NOT_COMPUTED)
    by_family = set(reference.loc[reference["family"].isin(ibsi.NOT_COMPUTED_FAMILIES), "tag"])
    tags = set(reference["tag"])
    assert not mapped & listed and not mapped & by_family and not listed & by_family
    assert mapped | listed | by_family == tags, tags - mapped - listed - by_family
    assert set(ibsi.NOT_COMPUTED_FAMILIES) <= set(reference["family"])
    assert len(reference) == len(tags) == 487


def test_axis_lengths_follow_the_mask_pyradiomics_resampled() -> None:
    """In-plane resampling to 1 mm (z kept at 2 mm): N is the resampled mask's voxels."""
    image, mask, _ = phantom()
    values = {}
    for mode in ("pyradiomics", "ibsi"):
        params = phantom_params(mode, resampledPixelSpacing=[1.0, 1.0, 0.0])
        params["featureClass"] = {"shape": None, "firstorder": None}
        values[mode] = extract({"x": image}, {"x": {"roi": mask}}, params, workers=1).iloc[0]
    voxels = values["ibsi"]["original_shape_VoxelVolume"] / 2.0
    assert voxels != 74 and voxels == int(voxels)  # not the original grid's count
    for axis in ibsi.AXES:
        ratio = (
            values["ibsi"][f"original_shape_{axis}"]
            / values["pyradiomics"][f"original_shape_{axis}"]
        )
        assert ratio == pytest.approx(math.sqrt(voxels / (voxels - 1)), rel=1e-12)
    for name in ("Mean", "Variance", "Skewness"):
        column = f"original_firstorder_{name}"
        assert values["ibsi"][column] == values["pyradiomics"][column]
    energy = values["ibsi"]["original_firstorder_Energy"]
    mean, variance = (values["ibsi"][f"original_firstorder_{n}"] for n in ("Mean", "Variance"))
    assert energy == pytest.approx(voxels * (variance + mean**2), rel=1e-9)


def test_undoing_the_shift_needs_the_features_it_is_computed_from() -> None:
    params = phantom_params("ibsi")
    params["featureClass"] = {"firstorder": ["Energy", "Mean"]}
    image, mask, _ = phantom()
    with pytest.raises(ExtractionError, match=r"IBSI mode: .*needs firstorder RootMeanSquared"):
        extract({"x": image}, {"x": {"roi": mask}}, params, workers=1)
    params["setting"]["voxelArrayShift"] = 0  # nothing to undo
    extract({"x": image}, {"x": {"roi": mask}}, params, workers=1)


def test_existing_parameter_files_keep_their_hash_and_mode() -> None:
    demo = load_params(REPO / "config" / "radiomics" / "mr-demo.yaml")
    card = yaml.safe_load((REPO / "models" / "sarcnode-pfs-demo" / "card.yaml").read_text())
    assert params_hash(demo) == card["extraction"]["params_sha256"]
    assert extraction_mode(demo) == "pyradiomics" and card_mode(card) == "pyradiomics"
    assert params_hash({**demo, "sarcnode": {"mode": "pyradiomics"}}) == params_hash(demo)
    assert params_hash({**demo, "sarcnode": {"mode": "ibsi"}}) != params_hash(demo)
    assert card_mode({"extraction": {"mode": "ibsi"}}) == "ibsi"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("{mode: IBSI}", "'sarcnode' mode 'IBSI' is not one of pyradiomics, ibsi"),
        ("{mode: ibsi, bins: 5}", r"'sarcnode' has unknown keys \['bins'\]"),
        ("ibsi", "'sarcnode' must be a mapping"),
    ],
)
def test_a_bad_mode_is_refused_with_its_field(tmp_path: Path, section: str, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(f"imageType: {{Original: {{}}}}\nsarcnode: {section}\n")
    with pytest.raises(ExtractionError, match=message):
        load_params(path)


def test_the_section_never_reaches_pyradiomics() -> None:
    """PyRadiomics' schema refuses unknown keys; plain values stay PyRadiomics' own."""
    image, mask, _ = phantom()
    params = phantom_params("ibsi")
    params["featureClass"] = {"firstorder": ["Kurtosis"]}
    assert plain_pyradiomics(image, mask, params)["original_firstorder_Kurtosis"] > 2


def test_docs_hold_the_generated_tables() -> None:
    doc = (REPO / "docs" / "ibsi.md").read_text()
    assert ibsi.markdown_tables() in doc, "regenerate the tables in docs/ibsi.md (see its header)"
