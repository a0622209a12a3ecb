"""The Ray executor: a real job through a local Ray instance (ray.init(num_cpus=2))."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipelines.synth.study import write_study
from tests.conftest import NodeProcess
from tests.integration.test_e2e import pipeline_folder, send, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_job_runs_through_ray(node_factory: Any, tmp_path: Path) -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        from tests.peers import require

        require("python package ray", "Ray (pip extra sarcnode[ray])")
    node: NodeProcess = node_factory(
        {
            "scheduler": {"series_stable_seconds": 1, "tick_seconds": 0.5},
            "jobs": {
                "pipelines_dir": str(pipeline_folder(tmp_path)),
                "device": "cpu",
                "executor": {"kind": "ray", "num_cpus": 2},
            },
            "destinations": [{"name": "archive", "kind": "folder", "path": str(tmp_path / "out")}],
        }
    )
    node.start(timeout=90)
    study = tmp_path / "study"
    write_study(study, 27)
    send(node, study / "dicom")
    (job,) = wait_for(
        node,
        "the job",
        lambda: [j for j in node.json("jobs") if j["state"] in ("done", "failed", "dead")],
    )
    shown = json.loads(node.cli("jobs", "show", str(job["id"]), "--json").stdout)
    assert job["state"] == "done", shown
    workers = {e["detail"]["worker"] for e in shown["audit"] if e["action"] == "job.stage.done"}
    assert workers and all(w.startswith("ray@") for w in workers), workers
    wait_for(
        node,
        "deliveries",
        lambda: (rows := node.json("deliveries")) and all(r["state"] == "done" for r in rows),
    )
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 4  # SEG x2, SR, PDF
