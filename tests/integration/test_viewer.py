"""Our SEG and SR in a real OHIF (3.12.10, headless Chromium) over a real Orthanc."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.orthanc import Orthanc, orthanc  # noqa: F401 (fixture)
from tests.pipelines.test_encode import _results, study  # noqa: F401 (fixture)
from tests.viewer import run_viewer
from tests.viewer.ohif import ViewerServer, ohif_viewer  # noqa: F401 (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "var" / "test-output" / "viewer"


def test_ohif_draws_the_seg_overlay_and_lists_the_sr_measurements(
    orthanc: Orthanc,  # noqa: F811
    ohif_viewer: ViewerServer,  # noqa: F811
    study: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    files = _results(study, tmp_path / "results", job_key="viewer")
    for path in [*study["ref"].files, files["seg_T2FS"], files["sr"], files["pdf"]]:
        orthanc.post_instance(Path(path).read_bytes())
    seg = pydicom.dcmread(files["seg_T2FS"], stop_before_pixels=True)
    sr = pydicom.dcmread(files["sr"])
    seen = run_viewer(
        ohif_viewer.url,
        str(seg.StudyInstanceUID),
        str(seg.SeriesInstanceUID),
        str(sr.SeriesInstanceUID),
        SCREENSHOTS,
    )
    assert (SCREENSHOTS / "seg.png").is_file() and (SCREENSHOTS / "sr.png").is_file()
    # The SEG: listed by OHIF's segmentation service, and its overlay drawn on the MR.
    assert seen["seg_error"] is None, seen
    segments = [s for g in seen["segmentations"] for s in g["segments"]]
    assert any(s["label"] == "Tumour" for s in segments), seen["segmentations"]
    assert seen["overlay_pixels"] > 500, seen["seg_viewport"]
    # The SR: its planar group drawn on the key slice with our numbers, no black viewport.
    assert seen["sr_error"] is None and seen["sr_viewport_nonblack"], seen
    # The tumour's group on the key slice; one per signature card, each on another slice (OHIF
    # draws the groups of one image at once: on one outline their text boxes would overlap).
    group, card_group = seen["sr_measurements"]
    assert group["tracking_identifier"] == "Tumour" and group["graphic_types"] == ["POLYLINE"]
    assert group["referenced_sop"] == seen["sr_image"]["sop_uid"]  # the key slice is shown
    assert card_group["tracking_identifier"] == "Tumour: sarcnode-pfs-demo 1.0.0"
    assert card_group["loaded"] and card_group["referenced_sop"] != group["referenced_sop"]
    labels = {item["label"]: item["value"] for item in group["labels"]}
    volume_ml = sr_volume(sr)
    assert labels["Volume"] == f"{volume_ml:.2f} mL"
    assert labels["Mean"].endswith(" [arb'U]")  # MR signal: an arbitrary unit, not "1"
    # What OHIF prints on the key slice: the volume, then each card's headline with its
    # rad-score, validation, risk group and the warning.
    shown = seen["sr_viewport_text"]
    assert shown[0] == f"Volume: {volume_ml:.2f} mL"
    assert shown[1] == (
        "pfs-demo 1.0.0 synthetic, high risk (NOT FOR CLINICAL USE): 0.43 {rad-score}"
    )
    card_labels = [item["label"] for item in card_group["labels"]]
    assert card_labels[:2] == [
        "Radiomics score (rad-score)",
        "Predicted PFS probability at 300 days",
    ]
    assert "Training cohort size" in card_labels


def sr_volume(sr: pydicom.Dataset) -> float:
    """The Volume measurement's value as stored in the SR (what OHIF must print)."""
    import highdicom as hd

    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    group = report.content.get_planar_roi_measurement_groups()[0]
    (volume,) = [m for m in group.get_measurements() if m.name.meaning == "Volume"]
    return float(volume.value)
