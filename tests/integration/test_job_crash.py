"""``kill -9`` of ``serve`` during each stage in turn: the job resumes and delivers once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from node.testing import Fault
from pipelines.synth.study import write_study
from tests.conftest import NodeProcess
from tests.integration.test_e2e import pipeline_folder, pipeline_node, send, wait_for
from tests.orthanc import Orthanc, orthanc  # noqa: F401 (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STAGES = ["segment", "radiomics", "score", "encode", "deliver"]


def test_kill_9_in_every_stage_then_the_job_finishes_with_one_copy_of_each_object(
    node_factory: Any,
    orthanc: Orthanc,  # noqa: F811
    tmp_path: Path,
) -> None:
    node: NodeProcess = node_factory(pipeline_node(tmp_path, orthanc, retry_base_s=0))
    study = tmp_path / "study"
    write_study(study, 23)
    study_uid = str(pydicom.dcmread(next((study / "dicom" / "T1").iterdir())).StudyInstanceUID)
    for i, stage in enumerate(STAGES):
        node.extra_env = Fault(stage, pause_s=120).env
        node.start()
        if i == 0:
            send(node, study / "dicom")
        wait_for(
            node,
            f"the job to reach {stage}",
            lambda s=stage: [
                j for j in node.json("jobs") if j["state"] == "running" and j["stage"] == s
            ],
            timeout=180,
        )
        node.kill9()
    node.extra_env = {}
    node.start()
    done = wait_for(
        node,
        "the job to finish",
        lambda: [j for j in node.json("jobs") if j["state"] in ("done", "failed", "dead")],
    )
    (job,) = done
    shown = json.loads(node.cli("jobs", "show", str(job["id"]), "--json").stdout)
    assert job["state"] == "done", shown
    # Each stage was interrupted once and finished once; none ran again after finishing.
    assert {s["stage"]: s["attempts"] for s in shown["stages"]} == dict.fromkeys(STAGES, 2)
    assert len(node.json("jobs")) == 1  # recovery resumed the job, it made no second one
    wait_for(
        node,
        "deliveries",
        lambda: (rows := node.json("deliveries")) and all(r["state"] == "done" for r in rows),
    )
    assert orthanc.instance_count() == 4  # SEG (FS-T2), SEG (T1), SR, PDF: one copy each
    series = orthanc.series_of_study(study_uid)
    assert sorted(s["modality"] for s in series) == ["DOC", "SEG", "SEG", "SR"]
    recovered = node.json("audit", "--action", "job.recovered")
    assert len(recovered) == len(STAGES)


def test_a_stage_past_its_timeout_is_killed_and_the_job_goes_dead(
    node_factory: Any, tmp_path: Path
) -> None:
    folder = pipeline_folder(tmp_path)
    path = folder / "sarcoma-mr.yaml"
    data = yaml.safe_load(path.read_text())
    data["timeouts_s"] = {"score": 3}
    path.write_text(yaml.safe_dump(data))
    node: NodeProcess = node_factory(
        {
            "scheduler": {"series_stable_seconds": 1, "tick_seconds": 0.5},
            "jobs": {"pipelines_dir": str(folder), "device": "cpu", "max_attempts": 1},
        }
    )
    node.extra_env = Fault("score", pause_s=120).env  # the score stage hangs
    node.start()
    study = tmp_path / "study"
    write_study(study, 29)
    send(node, study / "dicom")
    (job,) = wait_for(
        node,
        "the job to end",
        lambda: [j for j in node.json("jobs") if j["state"] in ("done", "failed", "dead")],
        timeout=240,
    )
    assert job["state"] == "dead" and job["error"] == "score timed out after 3 s", job
    shown = json.loads(node.cli("jobs", "show", str(job["id"]), "--json").stdout)
    states = {s["stage"]: s["state"] for s in shown["stages"]}
    assert states == {
        "segment": "done",
        "radiomics": "done",
        "score": "failed",
        "encode": "pending",
        "deliver": "pending",
    }
    assert node.json("audit", "--action", "job.stage.timeout")
