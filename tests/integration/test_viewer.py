"""Our SEG and SR in a real OHIF (3.12.10, headless Chromium) over a real Orthanc,
served by the product's viewer (``sarcnode viewer``, node/viewer.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node.viewer import ViewerServer
from pipelines.scoring.text import headline
from pipelines.synth.study import write_study
from tests.conftest import NodeProcess
from tests.integration.test_e2e import pipeline_node, send, wait_for
from tests.orthanc import Orthanc, orthanc  # noqa: F401 (fixture)
from tests.peers import DCMTK_STORESCU, require
from tests.pipelines.test_encode import _results, study  # noqa: F401 (fixture)
from tests.viewer import ohif_viewer, run_viewer, viewer_command  # noqa: F401 (fixture)

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


def test_after_a_job_through_serve_ohif_shows_the_mr_with_the_seg_and_the_srs_results(
    node_factory: Any,
    orthanc: Orthanc,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A scanner sends a study to the node and to the PACS; the node's job delivers its
    SEG, SR and PDF to that PACS; ``sarcnode viewer`` in front of it shows them on the MR."""
    node: NodeProcess = node_factory(pipeline_node(tmp_path, orthanc))
    node.start()
    folder = tmp_path / "study"
    write_study(folder, 21)
    study_uid = str(pydicom.dcmread(next((folder / "dicom" / "T2FS").iterdir())).StudyInstanceUID)
    # T1 first: when FS-T2 (the trigger) is stable, the optional T1 is there too (one job).
    for sequence in ("T1", "T2FS"):
        send(node, folder / "dicom" / sequence)
    # The scanner stores the MR in the PACS as well (the node sends only its results).
    store = subprocess.run(
        [
            require(DCMTK_STORESCU, "dcmtk storescu"),
            *("+sd", "+r", "-aet", "SCANNER1", "-aec", orthanc.aet),
            *("127.0.0.1", str(orthanc.dicom_port), str(folder / "dicom")),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert store.returncode == 0, store.stderr
    (job,) = wait_for(
        node,
        "the job",
        lambda: [j for j in node.json("jobs") if j["state"] in ("done", "failed", "dead")],
    )
    shown = json.loads(node.cli("jobs", "show", str(job["id"]), "--json").stdout)
    assert job["state"] == "done" and shown["inputs"].keys() == {"T2FS", "T1"}, shown
    wait_for(
        node,
        "deliveries",
        lambda: (rows := node.json("deliveries")) and all(r["state"] == "done" for r in rows),
    )
    files = next(s for s in shown["stages"] if s["stage"] == "encode")["outputs"]["files"]
    seg = pydicom.dcmread(files["seg_T2FS"], stop_before_pixels=True)
    sr = pydicom.dcmread(files["sr"])
    (result,) = shown["scores"]
    in_pacs = {s["series_uid"]: s["modality"] for s in orthanc.series_of_study(study_uid)}
    assert sorted(in_pacs.values()) == ["DOC", "MR", "MR", "SEG", "SEG", "SR"], in_pacs

    out = SCREENSHOTS / "after-serve"
    with viewer_command(orthanc.http_url, [study_uid]) as viewer:
        assert viewer.study_urls == [f"{viewer.url}/viewer?StudyInstanceUIDs={study_uid}"]
        seen = run_viewer(
            viewer.url, study_uid, str(seg.SeriesInstanceUID), str(sr.SeriesInstanceUID), out
        )
    assert (out / "seg.png").is_file() and (out / "sr.png").is_file()
    # The MR with the SEG overlay: the segment listed, its colour drawn over the MR.
    assert seen["seg_error"] is None, seen
    segments = [s for g in seen["segmentations"] for s in g["segments"]]
    assert any(s["label"] == "Tumour" for s in segments), seen["segmentations"]
    assert seen["overlay_pixels"] > 500, seen["seg_viewport"]
    # The SR on its MR slice (not a black viewport), and the text OHIF prints there: the
    # volume, then the card's headline with its rad-score, risk group and the warning.
    assert seen["sr_error"] is None and seen["sr_viewport_nonblack"], seen
    text = seen["sr_viewport_text"]
    assert text[0].startswith("Volume: ") and text[0].endswith(" mL"), text
    assert result["applicability"]["status"] == "inside", result  # else no risk group to show
    assert text[1] == f"{headline(result)}: {result['radscore']:.2f} {{rad-score}}", text
    assert f"{result['risk_group']} risk" in text[1] and "NOT FOR CLINICAL USE" in text[1]
    # The card's own group (OHIF's labels for it): rad-score and predicted probabilities.
    card = next(
        m
        for m in seen["sr_measurements"]
        if m["tracking_identifier"].endswith(f"{result['signature']} {result['version']}")
    )
    labels = [item["label"] for item in card["labels"]]
    assert labels[0] == "Radiomics score (rad-score)", labels
    assert any(label.startswith("Predicted PFS probability") for label in labels), labels
