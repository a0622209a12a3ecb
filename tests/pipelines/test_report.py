"""The PDF report a clinician reads, on the real STS_001 study with the shipped cards.

Fast: the tumour mask is drawn (no network) on STS_001's own FS-T2 series,
and the four shipped cards score feature values inside their training range
(one card pushed outside it), so every kind of result is printed. The pages
are rendered with ``pdftoppm`` into ``var/test-output/report`` for a person to
look at.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml

from pipelines.encode.nomogram import at_risk, model_block, nomogram_axes, patient_values
from pipelines.encode.pdf import _date, _person, key_slice_text
from pipelines.encode.results import write_results
from pipelines.encode.seg import source_datasets
from pipelines.io.dicom import load_series, scan
from pipelines.io.roles import load_role_rules
from pipelines.scoring import score
from pipelines.segment.card import SegModelCard
from pipelines.segment.study import choose_series
from tests.conftest import shared_data
from tests.peers import require
from tests.pipelines.test_encode import dciodvfy_errors, pdf_pages, pdf_text

REPO = Path(__file__).resolve().parents[2]
CARDS = ("sarcnode-lungmets-t1", "sarcnode-grade-t1", "sarcnode-efs-t1", "sarcnode-pfs-demo")
PAGES = REPO / "var" / "test-output" / "report"


def card(card_id: str) -> dict[str, Any]:
    """A shipped card as the pipeline loads it."""
    loaded: dict[str, Any] = yaml.safe_load((REPO / "models" / card_id / "card.yaml").read_text())
    return loaded


def inside_features(c: dict[str, Any]) -> dict[str, float]:
    """The middle of every feature's training range: a study the card was made for."""
    ranges = c["applicability"]["features"]
    return {name: (low + high) / 2 for name, (low, high) in ranges.items()}


@pytest.fixture(scope="module")
def sts001(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """STS_001's FS-T2 series, a drawn tumour on it, and the four cards' results."""
    study = shared_data("sts-raw", "STS_001")
    rules = load_role_rules(REPO / "config" / "sequence_roles.yaml")
    ref = choose_series(scan(study), rules)["T2FS"]
    image = load_series(ref)
    # A tumour 9 slices deep, largest on the middle one (the key slice).
    array = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    frames, rows, cols = array.shape
    yy, xx = np.mgrid[:rows, :cols]
    middle = frames // 2
    for dz in range(-4, 5):
        radius = rows / 8 - 3 * abs(dz)
        array[middle + dz] = (yy - rows / 2) ** 2 + (xx - cols / 2.5) ** 2 <= radius**2
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(image)
    cards = {c: card(c) for c in CARDS}
    results = []
    for card_id, c in cards.items():
        features = inside_features(c)
        if card_id == "sarcnode-grade-t1":  # one card outside its range
            name, (low, high) = next(iter(c["applicability"]["features"].items()))
            features[name] = low - (high - low)
        results.append(score(c, features))
    out = tmp_path_factory.mktemp("sts001")
    seg_card = SegModelCard.from_folder(REPO / "models" / "sarcnode-seg-demo")
    files = write_results(
        out,
        series={"T2FS": ref},
        images={"T2FS": image},
        masks={"T2FS": mask},
        primary="T2FS",
        segmentation_card=seg_card,
        job_key="report-test",
        scores=results,
        cards=cards,
        quality={"score": 0.94, "review": False, "threshold": 0.87, "reasons": []},
    )
    sources = source_datasets(ref.files)
    return {
        "files": files,
        "results": results,
        "key": sources[middle],
        "sources": sources,
        "out": out,
    }


def test_the_report_for_sts001_names_patient_study_key_slice_and_every_result(
    sts001: dict[str, Any],
) -> None:
    files = sts001["files"]
    for kind in ("seg_T2FS", "sr", "pdf"):
        assert dciodvfy_errors(files[kind]) == [], kind
    pdf = pydicom.dcmread(files["pdf"])
    document = bytes(pdf.EncapsulatedDocument)[: int(pdf.EncapsulatedDocumentLength)]
    text = pdf_text(document)
    key = sts001["key"]
    # The header, as the source study names the patient and the study.
    assert "STS_001" in text  # patient ID
    assert str(key.PatientID) == "STS_001"
    study_date = str(key.StudyDate)
    assert f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:]}" in text
    assert "Accession no." in text and "Birth date" in text and "Sex" in text
    # The key slice by the number a viewer shows, not by its position in the stack.
    assert f"image {key.InstanceNumber}" in text
    assert key_slice_text(key, "T2FS") in text
    # Measurements with units.
    assert " ml " in text and " mm " in text and "mm²" in text and "arbitrary units" in text
    # Every card: id and version, its result in words, meaning, validation, cut-off.
    by_card = {r["signature"]: r for r in sts001["results"]}
    for card_id, result in by_card.items():
        assert f"{card_id} {result['version']}" in text
        if result["applicability"]["status"] == "outside":
            assert f"{card_id}: OUTSIDE THE MODEL'S RANGE - no risk group, no prediction" in text
            assert f"rad-score {result['radscore']:.3f}" in text
        else:
            assert f"Rad-score {result['radscore']:.3f}" in text
    lungmets = by_card["sarcnode-lungmets-t1"]
    assert f"Rad-score {lungmets['radscore']:.3f}, at or below the cut-off: negative" in text
    assert f"Predicted probability of lung metastasis: {lungmets['probability']:.0%}" in text
    efs = by_card["sarcnode-efs-t1"]
    one_year = efs["survival_probability"]["365"]
    assert "at or below the cut-off: low-risk group" in text
    assert f"Predicted event-free survival (rad-score-only model): 1 year {one_year:.0%}" in text
    assert "Risk cut-off: high risk above rad-score 0.099" in text
    assert "Risk cut-off: positive above rad-score 0.000 (predicted probability 50%)" in text
    assert "nested cross-validation (0.5 = chance): AUC 0.55 (95% CI 0.40-0.71)" in text
    assert "Harrell's C 0.55" in text
    assert "140 SYNTHETIC patients" in text
    assert text.count("NOT FOR CLINICAL USE") >= 5  # the band, and every card
    assert "Models (id version): sarcnode-seg-demo" in text
    # Page 1 holds the report; then the nomograms (three cards in range) and KM curves.
    assert pdf_pages(document) >= 2
    assert "Nomograms and risk groups" in text and "Number at risk" in text
    assert "rad-score-only Cox model" in text and "logistic model" in text
    assert "differ from the printed ones" not in text  # the nomograms are the models used
    # The pages as a person sees them.
    tool = require("/usr/bin/pdftoppm", "pdftoppm (Debian poppler-utils)")
    PAGES.mkdir(parents=True, exist_ok=True)
    for old in PAGES.glob("sts001-*.png"):
        old.unlink()
    subprocess.run(
        [tool, "-r", "80", "-png", str(sts001["out"] / "report.pdf"), str(PAGES / "sts001")],
        check=True,
        timeout=120,
    )
    assert (PAGES / "sts001-1.png").is_file()


def test_the_outside_only_report_fits_on_one_page(tmp_path: Path) -> None:
    """STS_001 as the shipped cards judge it today: all four outside their range."""
    study = shared_data("sts-raw", "STS_001")
    rules = load_role_rules(REPO / "config" / "sequence_roles.yaml")
    ref = choose_series(scan(study), rules)["T2FS"]
    image = load_series(ref)
    array = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    array[10:14, 200:260, 150:230] = 1
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(image)
    cards = {c: card(c) for c in CARDS}
    results = []
    for c in cards.values():
        features = inside_features(c)
        name, (low, high) = next(iter(c["applicability"]["features"].items()))
        features[name] = low - (high - low)
        results.append(score(c, features))
    files = write_results(
        tmp_path,
        series={"T2FS": ref},
        images={"T2FS": image},
        masks={"T2FS": mask},
        primary="T2FS",
        segmentation_card=SegModelCard.from_folder(REPO / "models" / "sarcnode-seg-demo"),
        job_key="report-test-outside",
        scores=results,
        cards=cards,
    )
    pdf = pydicom.dcmread(files["pdf"])
    document = bytes(pdf.EncapsulatedDocument)[: int(pdf.EncapsulatedDocumentLength)]
    assert pdf_pages(document) == 1
    text = pdf_text(document)
    for card_id in CARDS:
        assert f"{card_id}: OUTSIDE THE MODEL'S RANGE - no risk group, no prediction" in text
    assert "Nomograms" not in text  # no nomogram invites reading off an extrapolation


@pytest.mark.parametrize("clinical", [None, {"metastasis": 1, "grade3": 0}])
def test_the_nomogram_reads_off_the_printed_numbers(clinical: dict[str, int] | None) -> None:
    """Drawn from the model that gave the numbers: rad-score-only, or with clinical factors."""
    demo = card("sarcnode-pfs-demo")
    result = score(demo, inside_features(demo), clinical)
    assert result["model"] == ("nomogram" if clinical else "radscore")
    model = model_block(result, demo)
    assert model is not None
    assert model.covariates == (("radscore", "metastasis", "grade3") if clinical else ("radscore",))
    fig, ax = plt.subplots()
    marks = nomogram_axes(ax, model, patient_values(result, clinical))
    plt.close(fig)
    assert [label for label, _ in model.outcomes] == [
        "1 year progression-free survival",
        "3 years progression-free survival",
        "5 years progression-free survival",
    ]
    for (label, _), days in zip(model.outcomes, ("365", "1095", "1825"), strict=True):
        assert marks[label] == pytest.approx(result["survival_probability"][days], rel=1e-9)
    assert 0 <= marks["total_points"] <= 100 * len(model.covariates)


def test_the_logistic_nomogram_reads_off_the_printed_probability() -> None:
    lungmets = card("sarcnode-lungmets-t1")
    result = score(lungmets, inside_features(lungmets))
    model = model_block(result, lungmets)
    assert model is not None and model.covariates == ("radscore",)
    fig, ax = plt.subplots()
    marks = nomogram_axes(ax, model, patient_values(result, None))
    plt.close(fig)
    assert marks["probability of lung metastasis"] == pytest.approx(result["probability"])


def test_numbers_at_risk_come_from_a_complete_curve_only() -> None:
    complete = {"days": [0.0, 10.0, 20.0, 30.0], "survival": [1.0, 0.67, 0.67, 0.0], "n": 3}
    assert [at_risk(complete, t) for t in (0, 10, 15, 30, 31)] == [3, 3, 2, 1, 0]
    thinned = {"days": [0.0, 10.0, 30.0], "survival": [1.0, 0.5, 0.0], "n": 60}
    assert at_risk(thinned, 5) is None
    efs = card("sarcnode-efs-t1")["training"]["km_by_risk_group"]
    assert at_risk(efs["low"], 0) == efs["low"]["n"]


def test_dicom_dates_and_names_read_as_people_write_them() -> None:
    assert _date("20000903") == "2000-09-03" and _date("") == "not given"
    assert _person("Doe^John^^Dr") == "DOE, John Dr" and _person("STS_001") == "STS_001"
    assert _person(None) == "not given"
