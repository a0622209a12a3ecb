"""The comparison of a study with its prior: days, volume, RECIST-like category, deltas."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pydicom
import pytest
import SimpleITK as sitk

from pipelines.compare import Comparison, TimePoint, compare, recist_like
from pipelines.encode.results import write_results
from pipelines.io.dicom import load_series, scan
from pipelines.segment.card import SegModelCard
from pipelines.synth.study import write_study
from tests.pipelines.test_encode import REPO, dciodvfy_errors, pdf_text, sr_items


def point(day: date, volume: float, diameter: float, *scores: dict[str, object]) -> TimePoint:
    return TimePoint(f"2.25.{day.toordinal()}", day, volume, diameter, tuple(scores))


@pytest.mark.parametrize(
    ("now", "before", "category"),
    [
        (70.0, 100.0, "PR"),  # -30 %: the PR threshold is inclusive
        (71.0, 100.0, "SD"),
        (120.0, 100.0, "PD"),  # +20 % and +20 mm
        (24.0, 20.0, "SD"),  # +20 % but only +4 mm: RECIST wants 5 mm as well
        (25.0, 20.0, "PD"),
        (119.0, 100.0, "SD"),
    ],
)
def test_recist_like_category_follows_the_single_lesion_thresholds(
    now: float, before: float, category: str
) -> None:
    assert recist_like(now, before) == category


def test_a_grown_tumour_is_reported_with_days_volume_and_pd() -> None:
    card = {"signature": "pfs", "radscore": 0.5, "survival_probability": {"730": 0.6}}
    prior = point(date(2026, 1, 1), 50.0, 40.0, card | {"features": {"a": 2.0, "b": 0.0}})
    now = point(
        date(2026, 5, 1),
        70.0,
        52.0,
        card | {"radscore": 0.8, "survival_probability": {"730": 0.45}, "features": {"a": 3.0}},
    )
    result = compare(now, prior)
    assert result.days == 120
    assert result.volume_pct == pytest.approx(40.0)
    assert result.diameter_mm == pytest.approx(12.0)
    assert result.category == "PD"
    assert (
        result.headline() == "vs prior 2026-01-01 (+120 d): volume +40 % (PD, RECIST-like approx.)"
    )
    (change,) = result.scores
    assert change.radscore_delta == pytest.approx(0.3)
    assert (change.prior_probability, change.probability) == (0.6, 0.45)
    assert change.features_pct == {"a": pytest.approx(50.0)}  # b only in the prior: left out
    assert Comparison.from_json(result.to_json()) == result


def test_a_shrunk_tumour_is_a_decrease_and_a_skipped_card_has_no_delta() -> None:
    prior = point(date(2026, 1, 1), 60.0, 50.0, {"signature": "x", "radscore": 1.0})
    now = point(date(2026, 3, 1), 36.0, 34.0, {"signature": "x", "skipped": "no T1"})
    result = compare(now, prior)
    assert result.volume_pct == pytest.approx(-40.0)
    assert result.category == "PR"
    assert result.scores == ()
    assert "-40 %" in result.headline()


def test_a_prior_that_is_not_earlier_is_refused_by_its_uid() -> None:
    day = date(2026, 1, 1)
    with pytest.raises(ValueError, match="not earlier"):
        compare(point(day, 1.0, 1.0), point(day, 1.0, 1.0))
    with pytest.raises(ValueError, match="needs a tumour"):
        point(day, 0.0, 10.0)


# -- the comparison in the SR and the PDF ----------------------------------------------------


def test_the_sr_and_the_pdf_report_the_change_and_reference_the_prior(tmp_path: Path) -> None:
    write_study(tmp_path / "study", 5)
    ref = scan(tmp_path / "study" / "dicom" / "T2FS").series[0]
    image = load_series(ref)
    mask = sitk.ReadImage(str(tmp_path / "study" / "masks" / "T2FS_tumour.nii.gz"))
    mask.CopyInformation(image)
    prior = TimePoint(
        "2.25.1234",
        date(2026, 1, 1),
        50.0,
        40.0,
        evidence=(("2.25.1235", "1.2.840.10008.5.1.4.1.1.4", "2.25.1236"),),
    )
    current = point(date(2026, 5, 1), 70.0, 52.0)
    first = point(date(2025, 9, 1), 80.0, 61.0)  # before the prior: in the table and trend only
    comparison = compare(current, prior, [first])
    assert Comparison.from_json(comparison.to_json()) == comparison
    assert [p.study_date for p in comparison.points] == [first.study_date, prior.study_date,
                                                          current.study_date]  # fmt: skip
    seg_card = SegModelCard.from_folder(REPO / "models" / "sarcnode-seg-demo")

    def results(out: Path, with_prior: Comparison | None) -> dict[str, Path]:
        return write_results(
            out,
            series={"T2FS": ref},
            images={"T2FS": image},
            masks={"T2FS": mask},
            primary="T2FS",
            segmentation_card=seg_card,
            job_key="job-1",
            comparison=with_prior,
        )

    files = results(tmp_path / "out", comparison)
    assert dciodvfy_errors(files["sr"]) == []
    sr = pydicom.dcmread(files["sr"])
    nums = [i for i in sr_items(sr.ContentSequence) if i.get("ValueType") == "NUM"]
    # Second in the tumour's group, so OHIF draws it under the volume.
    change = nums[1]
    assert change.ConceptNameCodeSequence[0].CodeMeaning == (
        "Volume vs prior 2026-01-01 (+120 d), PD (RECIST-like)"
    )
    assert float(change.MeasuredValueSequence[0].NumericValue) == pytest.approx(40.0)
    texts = [i.TextValue for i in sr_items(sr.ContentSequence) if i.get("ValueType") == "TEXT"]
    assert any(comparison.headline() in t for t in texts)
    (evidence,) = sr.PertinentOtherEvidenceSequence
    assert evidence.StudyInstanceUID == "2.25.1234"
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[
        0
    ].ReferencedSOPInstanceUID == ("2.25.1236")
    pdf = pydicom.dcmread(files["pdf"])
    text = pdf_text(bytes(pdf.EncapsulatedDocument)[: int(pdf.EncapsulatedDocumentLength)])
    assert "Change since the prior study" in text
    assert "vs prior 2026-01-01 (+120 d): volume +40 %" in text
    for cell in ("2026-01-01", "2026-05-01", "50.0", "70.0", "40.0", "52.0"):  # the table
        assert cell in text
    for cell in ("2025-09-01", "80.0", "61.0"):  # ... over all time points, the earliest too
        assert cell in text
    # Without the prior the objects are other objects (their UIDs say what they hold).
    plain = pydicom.dcmread(results(tmp_path / "plain", None)["sr"])
    assert plain.SOPInstanceUID != sr.SOPInstanceUID
    assert "PertinentOtherEvidenceSequence" not in plain
