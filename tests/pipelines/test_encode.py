"""DICOM results: SEG, TID 1500 SR and Encapsulated PDF, checked by dciodvfy and read back."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml

from pipelines.encode.results import write_results
from pipelines.encode.seg import Algorithm, EncodeError, encode_seg, source_datasets
from pipelines.encode.sr import longest_axial_diameter_mm
from pipelines.encode.uids import check_root, derived_uid
from pipelines.io.dicom import load_series, scan
from pipelines.segment.card import SegModelCard
from pipelines.segment.quality import Quality
from pipelines.synth.study import write_study
from tests.peers import require

REPO = Path(__file__).resolve().parents[2]
SCORE = {  # the shape of pipelines.scoring.score's result (features added per test)
    "signature": "sarcnode-pfs-demo",
    "version": "1.0.0",
    "endpoint": "pfs",
    "clinical_use": "not for clinical use",
    "training_cohort": {"n": 140, "source": "synthetic"},
    "demo": True,
    "nested_cv": None,
    "radscore": 0.4321,
    "risk_group": "high",
    "model": "radscore",
    "survival_probability": {"300": 0.81, "600": 0.62, "900": 0.5},
    "pfs_probability": {"300": 0.81, "600": 0.62, "900": 0.5},
    "applicability": {
        "status": "inside",
        "text": "within the model's range: 7 feature(s) and the rad-score inside the "
        "training range (140 cases)",
        "outside": [],
    },
}


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dicom3tools' dciodvfy prints for ``path`` (warnings ignored)."""
    tool = require("/usr/bin/dciodvfy", "dciodvfy (Debian dicom3tools)")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("study")
    write_study(folder, 5)
    ref = scan(folder / "dicom" / "T2FS").series[0]
    image = load_series(ref)
    mask = sitk.ReadImage(str(folder / "masks" / "T2FS_tumour.nii.gz"))
    mask.CopyInformation(image)
    return {"ref": ref, "image": image, "mask": mask, "folder": folder}


def pdf_text(document: bytes) -> str:
    """The words of a PDF as poppler's ``pdftotext`` reads them, whitespace made single spaces.

    What a person copying from the report, or an indexer, gets; lines joined
    so that a phrase the layout wrapped is still found whole.
    """
    tool = require("/usr/bin/pdftotext", "pdftotext (Debian poppler-utils)")
    proc = subprocess.run(
        [tool, "-", "-"], input=document, capture_output=True, timeout=60, check=True
    )
    return " ".join(proc.stdout.decode("utf-8").split())


def pdf_pages(document: bytes) -> int:
    """Number of pages (``pdfinfo``)."""
    tool = require("/usr/bin/pdfinfo", "pdfinfo (Debian poppler-utils)")
    proc = subprocess.run([tool, "-"], input=document, capture_output=True, timeout=60, check=True)
    found = re.search(r"^Pages:\s+(\d+)", proc.stdout.decode(), re.M)
    assert found is not None, proc.stdout
    return int(found.group(1))


def sr_items(items: Iterable[pydicom.Dataset]) -> Iterator[pydicom.Dataset]:
    """Every content item under ``items``, depth first (read back with plain pydicom)."""
    for item in items:
        yield item
        yield from sr_items(item.get("ContentSequence", []))


def _results(
    study: dict[str, object],
    out: Path,
    job_key: str = "job-1",
    *,
    score: dict[str, object] | None = SCORE,
    quality: dict[str, object] | None = None,
) -> dict[str, Path]:
    seg_card = SegModelCard.from_folder(REPO / "models" / "sarcnode-seg-demo")
    pfs_card = yaml.safe_load((REPO / "models" / "sarcnode-pfs-demo" / "card.yaml").read_text())
    features = {f["name"]: 1.0 + i for i, f in enumerate(pfs_card["features"])}
    return write_results(
        out,
        series={"T2FS": study["ref"]},  # type: ignore[dict-item]
        images={"T2FS": study["image"]},  # type: ignore[dict-item]
        masks={"T2FS": study["mask"]},  # type: ignore[dict-item]
        primary="T2FS",
        segmentation_card=seg_card,
        job_key=job_key,
        scores=[score | {"features": features}] if score else [],
        cards={"sarcnode-pfs-demo": pfs_card},
        quality=quality,
    )


def test_seg_sr_pdf_pass_dciodvfy_and_read_back(study: dict[str, object], tmp_path: Path) -> None:
    files = _results(study, tmp_path / "out")
    assert set(files) == {"seg_T2FS", "sr", "pdf"}
    for path in files.values():
        assert dciodvfy_errors(path) == [], path.name

    mask = sitk.GetArrayFromImage(study["mask"]) > 0  # type: ignore[arg-type]
    sources = source_datasets(study["ref"].files)  # type: ignore[attr-defined]
    seg = hd.seg.segread(files["seg_T2FS"])
    assert seg.SegmentationType == "BINARY" and int(seg.NumberOfFrames) == len(sources)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Tumour" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert "RecommendedDisplayCIELabValue" in segment
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert (
        segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "sarcnode-seg-demo"
    )
    assert (
        segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion
        == (
            yaml.safe_load((REPO / "models" / "sarcnode-seg-demo" / "card.yaml").read_text())[
                "version"
            ]
        )
    )
    # Frame k of the SEG is the mask on source slice k (read back by SOP instance).
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[s.SOPInstanceUID for s in sources], segment_numbers=[1]
    )[..., 0]
    assert np.array_equal(pixels > 0, mask)

    sr = hd.sr.srread(files["sr"])
    # Planar groups only (OHIF): the tumour's on the key slice, one per card on another slice.
    group, card_group = sr.content.get_planar_roi_measurement_groups()
    assert not sr.content.get_volumetric_roi_measurement_groups()
    assert not sr.content.get_image_measurement_groups()
    names = {m.name.meaning: m for m in group.get_measurements()}
    spacing = np.prod(study["image"].GetSpacing())  # type: ignore[attr-defined]
    assert names["Volume"].value == pytest.approx(mask.sum() * spacing / 1000, rel=1e-6)
    # OHIF draws a group's first five NUMs: the volume, then each card's headline.
    order = [m.name.meaning for m in group.get_measurements()]
    headline = "pfs-demo 1.0.0 synthetic, high risk (NOT FOR CLINICAL USE)"
    assert order[:2] == ["Volume", headline]
    assert names[headline].value == pytest.approx(0.4321)
    assert names[headline].unit.value == "{rad-score}"
    made_by = [
        i.TextValue
        for i in sr_items(names[headline][0].ContentSequence)
        if i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Name"
    ]
    assert made_by == ["sarcnode-pfs-demo"]  # the card made it, not the segmentation
    # MR signal has no physical unit: UCUM's arbitrary unit, not "1".
    assert names["Mean"].unit.value == names["Standard Deviation"].unit.value == "[arb'U]"
    evaluations = {q.name.meaning: q.value.meaning for q in group.get_qualitative_evaluations()}
    assert "NOT FOR CLINICAL USE" in evaluations["Clinical use"]
    names = {m.name.meaning: m for m in card_group.get_measurements()}
    assert names["Radiomics score (rad-score)"].value == pytest.approx(0.4321)
    assert names["Predicted PFS probability at 600 days"].value == pytest.approx(62.0)
    assert names["Training cohort size"].value == 140
    evaluations = {
        q.name.meaning: q.value.meaning for q in card_group.get_qualitative_evaluations()
    }
    assert evaluations["Radiomics risk group"] == "High risk"
    assert evaluations["Applicability (training range of the model)"] == (
        "Within the model's range"
    )
    assert evaluations["Training cohort"] == "SYNTHETIC patients (plumbing demo)"
    assert "NOT FOR CLINICAL USE" in evaluations["Clinical use"]
    # The tumour's outline lies on the slice with the largest tumour area, the card's on the
    # next largest (OHIF draws the groups of one image at once: they would overlap).
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    by_area = np.argsort(-areas, kind="stable")
    for each, k in ((group, by_area[0]), (card_group, by_area[1])):
        region = each.roi
        assert region.GraphicType == "POLYLINE"
        assert region.GraphicData[:2] == region.GraphicData[-2:]
        ref = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        assert ref == sources[int(k)].SOPInstanceUID
    # Result series: distinct numbers, descriptions saying what they hold and the warning.
    headers = {kind: pydicom.dcmread(path, stop_before_pixels=True) for kind, path in files.items()}
    assert {kind: int(ds.SeriesNumber) for kind, ds in headers.items()} == {
        "seg_T2FS": 9101,
        "sr": 9190,
        "pdf": 9191,
    }
    assert headers["seg_T2FS"].SeriesDescription.startswith("Tumour SEG on T2FS")
    assert headers["sr"].SeriesDescription == (
        "Tumour and radiomics results (SR) NOT FOR CLINICAL USE"
    )
    assert headers["pdf"].SeriesDescription == (
        "Tumour and radiomics report (PDF) NOT FOR CLINICAL USE"
    )

    pdf = pydicom.dcmread(files["pdf"])
    document = bytes(pdf.EncapsulatedDocument)[: int(pdf.EncapsulatedDocumentLength)]
    assert document.startswith(b"%PDF")
    assert pdf_pages(document) == 2  # the report; the nomogram and the KM curves
    assert pdf.StudyInstanceUID == sources[0].StudyInstanceUID and pdf.Modality == "DOC"


def test_a_mask_flagged_for_review_says_so_in_the_sr_and_the_pdf(
    study: dict[str, object], tmp_path: Path
) -> None:
    quality = Quality.judge(0.4213, {"review_below": 0.8}, located=False)
    assert quality.review and len(quality.reasons) == 2
    files = _results(study, tmp_path / "out", quality=quality.as_dict())
    assert dciodvfy_errors(files["sr"]) == []

    sr = pydicom.dcmread(files["sr"])
    measurements = next(
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements"
    )
    group, card_group = [g for g in measurements.ContentSequence if g.ValueType == "CONTAINER"]
    nums = [i for i in group.ContentSequence if i.ValueType == "NUM"]
    agreement = next(i for i in nums if i.ConceptNameCodeSequence[0].CodeValue == "segagreementlow")
    value = agreement.MeasuredValueSequence[0]
    assert float(value.NumericValue) == pytest.approx(0.4213)
    assert value.MeasurementUnitsCodeSequence[0].CodeValue == "{Dice}"
    # Flagged, it comes second (OHIF draws it) under a concept that says so.
    assert nums.index(agreement) == 1
    meaning = agreement.ConceptNameCodeSequence[0].CodeMeaning
    assert meaning == "Segmentation REVIEW RECOMMENDED (agreement of views)"
    # OHIF reads every NUM's ContentSequence unguarded: this one has one, like the others.
    card_nums = [i for i in card_group.ContentSequence if i.ValueType == "NUM"]
    assert all("ContentSequence" in i for i in nums + card_nums)
    algorithm = [
        i.TextValue
        for i in sr_items(agreement.ContentSequence)
        if i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Name"
    ]
    assert algorithm == ["sarcnode-seg-demo"]
    evaluations = {
        i.ConceptNameCodeSequence[0].CodeValue: i.ConceptCodeSequence[0]
        for i in group.ContentSequence
        if i.ValueType == "CODE" and i.RelationshipType == "CONTAINS"
    }
    review = evaluations["segreview"]
    assert (review.CodeValue, review.CodingSchemeDesignator) == ("reviewneeded", "99SARCNODE")
    assert review.CodeMeaning == "Review recommended before trusting the numbers"
    scored = {
        i.ConceptNameCodeSequence[0].CodeValue: i.ConceptCodeSequence[0]
        for i in card_group.ContentSequence
        if i.ValueType == "CODE"
    }
    assert scored["riskgroup"].CodeValue == "high"  # the scores are still there
    # One review evaluation in the whole tree: in the tumour's group, where OHIF looks.
    reviews = [
        i
        for i in sr_items(sr.ContentSequence)
        if "ConceptNameCodeSequence" in i
        and i.ConceptNameCodeSequence[0].get("CodeValue") == "segreview"
    ]
    assert len(reviews) == 1

    pdf = pydicom.dcmread(files["pdf"])
    text = pdf_text(bytes(pdf.EncapsulatedDocument)[: int(pdf.EncapsulatedDocumentLength)])
    assert "SEGMENTATION FLAGGED FOR REVIEW: views of the ensemble disagree" in text
    assert "the locator found no tumour" in text
    assert "Segmentation quality: 0.42 (agreement of ensemble views), REVIEW RECOMMENDED" in text


def test_a_mask_not_flagged_gets_its_score_and_no_review(
    study: dict[str, object], tmp_path: Path
) -> None:
    quality = Quality.judge(0.9312, {"review_below": 0.8})
    files = _results(study, tmp_path / "out", score=None, quality=quality.as_dict())
    assert dciodvfy_errors(files["sr"]) == []
    group = hd.sr.srread(files["sr"]).content.get_planar_roi_measurement_groups()[0]
    names = {m.name.meaning: m.value for m in group.get_measurements()}
    assert names["Segmentation quality (agreement of ensemble views)"] == pytest.approx(0.9312)
    evaluations = {q.name.meaning: q.value.meaning for q in group.get_qualitative_evaluations()}
    assert evaluations["Segmentation review"] == "No review needed"
    pdf = pydicom.dcmread(files["pdf"])
    text = pdf_text(bytes(pdf.EncapsulatedDocument)[: int(pdf.EncapsulatedDocumentLength)])
    assert "Segmentation quality: 0.93 (agreement of ensemble views), no review needed" in text
    assert "FLAGGED" not in text


def test_uids_are_derived_so_a_rerun_replaces(study: dict[str, object], tmp_path: Path) -> None:
    first = _results(study, tmp_path / "a")
    again = _results(study, tmp_path / "b")
    other = _results(study, tmp_path / "c", job_key="job-2")
    for kind in first:
        a, b, c = (pydicom.dcmread(d[kind], stop_before_pixels=True) for d in (first, again, other))
        assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
        assert a.SOPInstanceUID != c.SOPInstanceUID
        assert a.SOPInstanceUID.startswith("2.25.") and len(a.SOPInstanceUID) <= 64
    assert derived_uid("x", root="1.2.3.").startswith("1.2.3.")
    with pytest.raises(ValueError, match="UID root"):
        check_root("1.02.3")


def test_seg_refuses_a_mask_from_another_series(study: dict[str, object]) -> None:
    sources = source_datasets(study["ref"].files)  # type: ignore[attr-defined]
    wrong = sitk.Image(10, 10, 3, sitk.sitkUInt8)
    with pytest.raises(EncodeError, match="does not match the series"):
        encode_seg(sources, {"tumour": wrong}, algorithm=Algorithm("m", "1"), job_key="k")


def test_longest_axial_diameter_of_a_disc() -> None:
    """A disc of radius 20 px at 0.5 mm is 20 mm across (pixel corners: within one pixel)."""
    yy, xx = np.mgrid[:100, :100]
    disc = ((yy - 50) ** 2 + (xx - 50) ** 2 <= 20**2).astype(np.uint8)
    mask = np.stack([np.zeros_like(disc), disc])
    assert longest_axial_diameter_mm(mask, (0.5, 0.5)) == pytest.approx(20.5, abs=0.6)
