"""End to end: dcmtk storescu -> sarcnode serve -> pipeline jobs -> a real Orthanc."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from pipelines.scoring.clinical import ClinicalFactors
from pipelines.synth.study import write_study
from tests.conftest import NodeProcess
from tests.integration.equivalence import assert_analyze_matches_job
from tests.orthanc import Orthanc, orthanc  # noqa: F401 (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def pipeline_folder(tmp_path: Path) -> Path:
    """The shipped sarcoma-mr pipeline with absolute paths and no wait for T1."""
    data = yaml.safe_load((REPO / "config" / "pipelines" / "sarcoma-mr.yaml").read_text())
    data["trigger"]["roles_file"] = str(REPO / "config" / "sequence_roles.yaml")
    data["trigger"]["wait_for_optional_s"] = 0
    data["segmentation_model"] = str(REPO / "models" / "sarcnode-seg-demo")
    data["signatures"] = [str(REPO / "models" / "sarcnode-pfs-demo")]
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "sarcoma-mr.yaml").write_text(yaml.safe_dump(data))
    return folder


def pacs_destination(pacs: Orthanc, **extra: Any) -> dict[str, Any]:
    """The node's destination entry for a test Orthanc (C-STORE)."""
    return {
        "name": "pacs",
        "kind": "dicom",
        "ae_title": pacs.aet,
        "host": "127.0.0.1",
        "port": pacs.dicom_port,
    } | extra


def pipeline_node(tmp_path: Path, pacs: Orthanc, **jobs: Any) -> dict[str, Any]:
    """Node settings: the shipped pipeline on CPU, quick stability and retries, ``pacs``."""
    return {
        "scheduler": {"series_stable_seconds": 1, "tick_seconds": 0.5},
        "jobs": {"pipelines_dir": str(pipeline_folder(tmp_path)), "device": "cpu"} | jobs,
        "destinations": [pacs_destination(pacs)],
        "delivery": {"backoff_base_s": 1, "backoff_max_s": 2},
    }


def wait_for(node: NodeProcess, what: str, check: Any, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}:\n{node.log()[-3000:]}")


def send(node: NodeProcess, folder: Path) -> None:
    proc = subprocess.run(
        [*node.storescu_cmd("+sd", "+r"), str(folder)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.timeout(600)  # two jobs, a re-score and analyze on the same study
def test_a_study_sent_by_storescu_comes_back_to_orthanc_as_seg_sr_and_pdf(
    node_factory: Any,
    orthanc: Orthanc,  # noqa: F811
    tmp_path: Path,
) -> None:
    node: NodeProcess = node_factory(pipeline_node(tmp_path, orthanc))
    node.start()
    study = tmp_path / "study"
    write_study(study, 21)
    study_uid = str(pydicom.dcmread(next((study / "dicom" / "T2FS").iterdir())).StudyInstanceUID)

    # FS-T2 alone: a job runs (SEG and measurements; the signature needs T1 too).
    send(node, study / "dicom" / "T2FS")
    first = wait_for(
        node,
        "the first job",
        lambda: [j for j in node.json("jobs") if j["state"] in ("done", "failed", "dead")],
    )
    assert first[0]["state"] == "done", node.cli("jobs", "show", str(first[0]["id"])).stdout

    # T1 arrives: the inputs change, a new job supersedes the first and scores the study.
    send(node, study / "dicom" / "T1")
    jobs = wait_for(
        node,
        "the second job",
        lambda: [
            j
            for j in node.json("jobs")
            if j["id"] != first[0]["id"] and j["state"] in ("done", "failed", "dead")
        ],
    )
    second = jobs[0]
    shown = json.loads(node.cli("jobs", "show", str(second["id"]), "--json").stdout)
    assert second["state"] == "done", shown
    assert [s["stage"] for s in shown["stages"]] == [
        "segment",
        "radiomics",
        "score",
        "encode",
        "deliver",
    ]
    assert all(s["state"] == "done" and s["seconds"] is not None for s in shown["stages"])
    assert shown["inputs"].keys() == {"T2FS", "T1"}
    score = next(s for s in shown["stages"] if s["stage"] == "score")["outputs"]
    (result,) = shown["scores"]
    assert result["signature"] == score["signature"] == "sarcnode-pfs-demo"
    assert result["applicability"]["status"] in ("inside", "outside")
    assert (score["risk_group"] in ("high", "low")) == (
        result["applicability"]["status"] != "outside"
    )
    assert (
        next(j for j in node.json("jobs") if j["id"] == first[0]["id"])["superseded_by"]
        == (second["id"])
    )

    # Everything delivered, and QIDO-RS on Orthanc finds the results in the source study.
    wait_for(
        node,
        "deliveries",
        lambda: (rows := node.json("deliveries")) and all(r["state"] == "done" for r in rows),
    )
    modalities = sorted(s["modality"] for s in orthanc.series_of_study(study_uid))
    assert modalities.count("SEG") >= 2 and "SR" in modalities and "DOC" in modalities
    assert modalities.count("MR") == 0  # the node sends results, not the images

    # The same study again: no new job.
    send(node, study / "dicom")
    time.sleep(4)  # stability window + ticks
    assert len(node.json("jobs")) == 2

    # Clinical factors arrive: the study is re-scored with the nomogram, and a new SR
    # (naming the radiomics-only one as its predecessor) reaches the PACS.
    before = {s["series_uid"] for s in orthanc.series_of_study(study_uid)}
    told = node.cli(
        "clinical",
        "set",
        study_uid,
        "--edema",
        "yes",
        "--metastasis",
        "no",
        "--grade",
        "3",
        "--age",
        "60",
        "--sex",
        "M",
    )
    assert told.returncode == 0 and f"job {second['id']} queued again" in told.stdout, told.stderr
    wait_for(
        node,
        "the re-score",
        lambda: [j for j in node.json("jobs") if j["id"] == second["id"] and j["state"] == "done"],
    )
    shown = json.loads(node.cli("jobs", "show", str(second["id"]), "--json").stdout)
    rescored = next(s for s in shown["stages"] if s["stage"] == "score")["outputs"]
    assert rescored["model"] == "nomogram" and rescored["radscore"] == score["radscore"]
    wait_for(
        node,
        "the new SR",
        lambda: [
            s
            for s in orthanc.series_of_study(study_uid)
            if s["modality"] == "SR" and s["series_uid"] not in before
        ],
    )
    sr_files = list((Path(shown["folder"]) / "encode").glob("sr.dcm"))
    new_sr = pydicom.dcmread(sr_files[0])
    assert "PredecessorDocumentsSequence" in new_sr

    # analyze on the same study with the same factors: the same scores, features and SR
    # content items as the job through serve (one chain, pipelines.chain, on both paths).
    assert_analyze_matches_job(
        study / "dicom",
        Path(shown["folder"]),
        tmp_path / "analyze",
        model=REPO / "models" / "sarcnode-seg-demo",
        signatures=[REPO / "models" / "sarcnode-pfs-demo"],
        clinical=ClinicalFactors.from_options(
            edema="yes", metastasis="no", grade=3, age=60, sex="M"
        ),
    )
