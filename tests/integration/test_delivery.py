"""The delivery outbox against a real Orthanc: C-STORE, STOW-RS, outages, dead rows, retry."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from tests.integration.test_e2e import pacs_destination
from tests.orthanc import Orthanc, orthanc  # noqa: F401 (fixture)
from tests.pipelines.test_encode import _results, study  # noqa: F401 (fixture)
from tests.pipelines.test_segment_cli import sarcnode

pytestmark = pytest.mark.integration


def node_config(tmp_path: Path, pacs: Orthanc) -> Path:
    """Node settings with three destinations and a fast retry policy (3 tries, < 1 s apart)."""
    config = {
        "storage": {"root": str(tmp_path / "node"), "min_free_mb": 0},
        "destinations": [
            pacs_destination(pacs, timeout_s=5),
            {"name": "web", "kind": "stow", "url": f"{pacs.http_url}/dicom-web", "timeout_s": 5},
            {"name": "archive", "kind": "folder", "path": str(tmp_path / "archive")},
        ],
        "delivery": {"max_attempts": 3, "backoff_base_s": 0.2, "backoff_max_s": 0.5},
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def unstarted_orthanc(tmp_path: Path) -> Orthanc:
    """An Orthanc not started yet (its modalities must name the node first)."""
    from tests.orthanc import DICOMWEB_PLUGIN, ORTHANC_BIN
    from tests.peers import require

    require(ORTHANC_BIN, "Orthanc (Debian orthanc)")
    require(DICOMWEB_PLUGIN, "Orthanc DICOMweb plugin")
    return Orthanc(tmp_path / "orthanc")


def rows(config: Path, *extra: str) -> list[dict[str, object]]:
    proc = sarcnode("deliveries", "--json", "-c", str(config), *extra)
    assert proc.returncode == 0, proc.stderr
    listed: list[dict[str, object]] = json.loads(proc.stdout)
    return listed


def test_results_reach_orthanc_by_c_store_and_stow_rs_once(
    orthanc: Orthanc,  # noqa: F811
    study: dict[str, object],  # noqa: F811
    tmp_path: Path,
) -> None:
    config = node_config(tmp_path, orthanc)
    by_dimse = _results(study, tmp_path / "a", job_key="job-dimse")
    by_web = _results(study, tmp_path / "b", job_key="job-web")
    queued = sarcnode(
        "deliver",
        *map(str, by_dimse.values()),
        "--to",
        "pacs",
        "--to",
        "archive",
        "-c",
        str(config),
    )
    assert queued.returncode == 0, queued.stderr
    queued = sarcnode("deliver", *map(str, by_web.values()), "--to", "web", "-c", str(config))
    assert queued.returncode == 0, queued.stderr
    sent = sarcnode("deliveries", "run", "-c", str(config), "--wait", "30")
    assert sent.returncode == 0, sent.stderr + sent.stdout
    assert {r["state"] for r in rows(config)} == {"done"} and len(rows(config)) == 9

    study_uid = pydicom.dcmread(by_dimse["sr"]).StudyInstanceUID
    series = orthanc.series_of_study(study_uid)
    assert sorted(s["modality"] for s in series) == ["DOC", "DOC", "SEG", "SEG", "SR", "SR"]
    assert orthanc.instance_count() == 6
    assert len(list((tmp_path / "archive").rglob("*.dcm"))) == 3

    # Queued again (a re-run of the same job): nothing new is sent.
    again = sarcnode("deliver", *map(str, by_dimse.values()), "--to", "pacs", "-c", str(config))
    assert again.returncode == 0 and "queued 0" in again.stdout
    assert orthanc.instance_count() == 6


def test_outbox_survives_a_pacs_outage_and_retry_revives_dead_rows(
    orthanc: Orthanc,  # noqa: F811
    study: dict[str, object],  # noqa: F811
    tmp_path: Path,
) -> None:
    config = node_config(tmp_path, orthanc)
    files = _results(study, tmp_path / "a", job_key="job-outage")
    orthanc.stop()
    assert (
        sarcnode("deliver", *map(str, files.values()), "--to", "pacs", "-c", str(config)).returncode
        == 0
    )
    first = sarcnode("deliveries", "run", "-c", str(config))
    assert first.returncode == 0 and "pending" in first.stderr
    waiting = rows(config)
    assert {r["state"] for r in waiting} == {"pending"} and {r["attempts"] for r in waiting} == {1}
    assert all(r["next_attempt_at"] and r["last_error"] for r in waiting)

    orthanc.start()  # the PACS is back: the next due attempt delivers
    time.sleep(0.8)
    back = sarcnode("deliveries", "run", "-c", str(config), "--wait", "20")
    assert back.returncode == 0, back.stderr
    assert {r["state"] for r in rows(config)} == {"done"} and orthanc.instance_count() == 3

    # A longer outage: three failed attempts make the rows dead.
    more = _results(study, tmp_path / "b", job_key="job-dead")
    orthanc.stop()
    sarcnode("deliver", *map(str, more.values()), "--to", "pacs", "-c", str(config))
    gave_up = sarcnode("deliveries", "run", "-c", str(config), "--wait", "20")
    assert gave_up.returncode == 1  # dead rows are an error for the admin
    dead = rows(config, "--state", "dead")
    assert len(dead) == 3 and {r["attempts"] for r in dead} == {3}
    audit = sarcnode("audit", "--json", "--action", "delivery.failed", "-c", str(config))
    assert len(json.loads(audit.stdout)) == 3 + 3 * 3  # one per attempt: 3 rows x 1, then x 3

    orthanc.start()
    revived = sarcnode("deliveries", "retry", "--all-dead", "-c", str(config))
    assert revived.returncode == 0 and "3 delivery(ies) due again" in revived.stdout
    done = sarcnode("deliveries", "run", "-c", str(config), "--wait", "20")
    assert done.returncode == 0, done.stderr
    assert {r["state"] for r in rows(config)} == {"done"}
    assert orthanc.instance_count() == 6  # each object exactly once
    unknown = sarcnode("deliveries", "retry", "999", "-c", str(config))
    assert unknown.returncode == 2 and "no delivery with id 999" in unknown.stderr


def test_storage_commitment_marks_rows_done_only_when_orthanc_confirms(
    node_factory: Any,
    study: dict[str, object],  # noqa: F811
    tmp_path: Path,
) -> None:
    """C-STORE, then N-ACTION; Orthanc's N-EVENT-REPORT reaches `serve`'s SCP."""
    pacs = unstarted_orthanc(tmp_path)
    node = node_factory(
        {
            "destinations": [pacs_destination(pacs, storage_commitment=True, timeout_s=5)],
            "delivery": {"backoff_base_s": 0.5, "backoff_max_s": 1, "commitment_timeout_s": 30},
        }
    )
    pacs.modalities = {"SARCNODE": ("SARCNODE", "127.0.0.1", node.port)}
    pacs.start()
    try:
        node.start()
        files = _results(study, tmp_path / "a", job_key="job-commit")
        queued = node.cli("deliver", *map(str, files.values()), "--to", "pacs")
        assert queued.returncode == 0, queued.stderr
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = {r["state"] for r in node.json("deliveries")}
            if states == {"done"}:
                break
            time.sleep(0.5)
        assert states == {"done"}, node.log()[-3000:]
        committed = node.json("audit", "--action", "delivery.committed")
        assert len(committed) == 3 and all(e["actor"] == f"ae:{pacs.aet}" for e in committed)
        assert pacs.instance_count() == 3
    finally:
        pacs.stop(kill=True)


def test_a_missing_commitment_report_sends_again_after_the_timeout(
    study: dict[str, object],  # noqa: F811
    tmp_path: Path,
) -> None:
    """Orthanc accepts the N-ACTION but cannot reach the node to report: no `done`."""
    from tests.conftest import free_port

    pacs = unstarted_orthanc(tmp_path)
    pacs.modalities = {"SARCNODE": ("SARCNODE", "127.0.0.1", free_port())}  # nobody listens
    pacs.start()
    try:
        config = node_config(tmp_path, pacs)
        data = yaml.safe_load(config.read_text())
        data["destinations"][0] |= {"storage_commitment": True}
        data["delivery"]["commitment_timeout_s"] = 1
        config.write_text(yaml.safe_dump(data))
        files = _results(study, tmp_path / "a", job_key="job-no-report")
        queued = sarcnode("deliver", str(files["sr"]), "--to", "pacs", "-c", str(config))
        assert queued.returncode == 0
        assert sarcnode("deliveries", "run", "-c", str(config)).returncode == 0
        (row,) = rows(config)
        assert row["state"] == "committing" and pacs.instance_count() == 1, row["last_error"]
        time.sleep(1.5)
        assert sarcnode("deliveries", "run", "-c", str(config)).returncode == 0
        (row,) = rows(config)
        assert row["state"] == "pending"  # timed out: it will be sent again
        timeouts = sarcnode("audit", "--json", "--action", "delivery.failed", "-c", str(config))
        (event,) = json.loads(timeouts.stdout)
        assert "no storage commitment report within 1 s" in event["detail"]["error"]
        time.sleep(1.0)  # the back-off
        assert sarcnode("deliveries", "run", "-c", str(config)).returncode == 0
        (row,) = rows(config)
        assert row["attempts"] == 2 and row["state"] == "committing"
        assert pacs.instance_count() == 1  # stored again under the same UID: one copy
    finally:
        pacs.stop(kill=True)
