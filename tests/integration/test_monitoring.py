"""Monitoring and shutdown of a real ``sarcnode serve`` on 127.0.0.1.

- ``/metrics`` counters move while a study is received and its job runs, and
  serve logs the job's end with its duration;
- ``/health`` is 200 when all is well and 503 naming the check when the
  database (a private PostgreSQL, stopped under the node) is unreachable or
  the SCP is down;
- SIGTERM with an open, idle association: a C-STORE on it is refused (0xA700),
  the node exits within the grace period, and every instance acknowledged
  before is on disk and indexed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from node.config import Settings
from node.service import Node
from tests.conftest import NodeProcess, free_port
from tests.dicomgen import write_series
from tests.integration.test_e2e import pipeline_folder
from tests.peers import postgres_bindir

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def get(url: str) -> tuple[int, str]:
    """(status, body) of a GET; 4xx/5xx are answers, not errors."""
    try:
        with urllib.request.urlopen(url, timeout=15) as resp:  # noqa: S310 (http on loopback)
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    found = re.search(r"(?m)^" + pattern + "$", text)
    return float(found.group(1)) if found else 0.0


def monitoring(port: int, **extra: Any) -> dict[str, Any]:
    return {"monitoring": {"port": port, "echo_interval_s": 0} | extra}


@pytest.mark.slow
def test_metrics_move_during_a_job_and_serve_logs_its_end(
    node_factory: Any, tmp_path: Path
) -> None:
    from pipelines.synth.study import write_study

    port = free_port()
    node: NodeProcess = node_factory(
        {
            "scheduler": {"series_stable_seconds": 1, "tick_seconds": 0.5},
            "jobs": {"pipelines_dir": str(pipeline_folder(tmp_path)), "device": "cpu"},
        }
        | monitoring(port)
    )
    node.start()
    url = f"http://127.0.0.1:{port}"
    status, before = get(f"{url}/metrics")
    assert status == 200
    assert sample(before, "sarcnode_instances_received_total", outcome="stored") == 0
    study = tmp_path / "study"
    write_study(study, 21)
    files = [p for p in (study / "dicom").rglob("*") if p.is_file()]
    proc = subprocess.run(
        [*node.storescu_cmd("+sd", "+r"), str(study / "dicom")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 400
    text = ""
    while time.monotonic() < deadline:
        text = get(f"{url}/metrics")[1]
        if sample(text, "sarcnode_jobs_finished_total", state="done") >= 1:
            break
        assert sample(text, "sarcnode_jobs_finished_total", state="failed") == 0, node.log()
        time.sleep(2)
    else:
        raise AssertionError(f"no job finished:\n{node.log()[-3000:]}")
    assert sample(text, "sarcnode_instances_received_total", outcome="stored") == len(files)
    assert sample(text, "sarcnode_associations_total", outcome="accepted") >= 1
    assert sample(text, "sarcnode_associations_total", outcome="released") >= 1
    assert sample(text, "sarcnode_jobs", state="done") == 1
    assert sample(text, "sarcnode_job_queue_depth") == 0
    for stage in ("segment", "radiomics", "score", "encode"):
        assert sample(text, "sarcnode_stage_duration_seconds_count", stage=stage) == 1, stage
    assert sample(text, "sarcnode_job_duration_seconds_count", state="done") == 1
    assert sample(text, "sarcnode_audit_events_total", action="job.done", outcome="ok") == 1
    assert sample(text, "sarcnode_storage_free_bytes") > 0
    assert 0 <= sample(text, "sarcnode_scheduler_tick_age_seconds") < 10
    # serve logs the job's end from its own loop, just after the job's row says done.
    line_deadline = time.monotonic() + 15
    while not re.search(r"job 1 done in \d+\.\d s \(sarcoma-mr\)", node.log()):
        assert time.monotonic() < line_deadline, node.log()[-2000:]
        time.sleep(0.5)
    status, body = get(f"{url}/health")
    assert status == 200 and json.loads(body)["status"] == "ok", body
    # Every metric the Grafana dashboard charts is one the node exports.
    dashboard = (REPO / "deploy" / "grafana" / "sarcnode.json").read_text()
    for name in set(re.findall(r"sarcnode_[a-z_]+", dashboard)) - {"sarcnode_node"}:
        base = re.sub(r"_(total|bucket)$", "", name)
        assert f"# HELP {base}" in text, name


# -- health -------------------------------------------------------------------


@pytest.fixture
def private_postgres() -> Iterator[tuple[str, list[str], list[str]]]:
    """A PostgreSQL cluster of this test alone: (database URL, start and stop commands)."""
    bindir = postgres_bindir()
    base = Path(tempfile.mkdtemp(prefix="sarcnode-pg-health-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", free_port()
    initdb = [*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust"]
    subprocess.run(
        [*initdb, "-U", "sarcnode", "--no-sync"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl = [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log")]
    start, stop = [*pg_ctl, "-o", opts, "-w", "start"], [*pg_ctl, "-m", "immediate", "stop"]
    subprocess.run(start, check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://sarcnode@127.0.0.1:{port}/postgres", start, stop
    finally:
        subprocess.run(stop, capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_health_is_unhealthy_when_the_database_is_unreachable(
    node_factory: Any, private_postgres: tuple[str, list[str], list[str]]
) -> None:
    url, start, stop = private_postgres
    port = free_port()
    node: NodeProcess = node_factory({"database": {"url": url}} | monitoring(port))
    node.start()
    status, body = get(f"http://127.0.0.1:{port}/health")
    assert status == 200, body
    checks = json.loads(body)["checks"]
    assert all(c["ok"] for c in checks.values()), checks
    subprocess.run(stop, check=True, capture_output=True)
    status, body = get(f"http://127.0.0.1:{port}/health")
    report = json.loads(body)
    assert status == 503 and report["status"] == "unhealthy", body
    assert report["checks"]["database"]["ok"] is False
    assert "unreachable" in report["checks"]["database"]["detail"]
    assert report["checks"]["scp"]["ok"] is True  # only the database is named
    status, _ = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200  # metrics still answer (the DB gauges are left out)
    subprocess.run(start, check=True, capture_output=True)
    deadline = time.monotonic() + 20
    while get(f"http://127.0.0.1:{port}/health")[0] != 200:
        assert time.monotonic() < deadline, "health did not recover with the database"
        time.sleep(0.5)


def test_health_is_unhealthy_when_the_scp_is_down(tmp_path: Path) -> None:
    port, dicom_port = free_port(), free_port()
    settings = Settings(
        dicom={"port": dicom_port, "allowed_calling_aes": ["SARCNODE-CLI"]},
        storage={"root": tmp_path / "storage", "min_free_mb": 50},
        scheduler={"tick_seconds": 0.5},
        jobs={"pipelines_dir": tmp_path / "none"},
        monitoring={"port": port, "echo_interval_s": 0},
    )
    node = Node(settings)
    node.start()
    try:
        status, body = get(f"http://127.0.0.1:{port}/health")
        assert status == 200, body
        assert json.loads(body)["checks"]["scp"]["detail"] == "C-ECHO success"
        node.scp.stop()  # the listener is gone; the rest of the node runs on
        status, body = get(f"http://127.0.0.1:{port}/health")
        report = json.loads(body)
        assert status == 503, body
        assert report["checks"]["scp"]["ok"] is False
        assert f"no C-ECHO answer on port {dicom_port}" in report["checks"]["scp"]["detail"]
        assert report["checks"]["database"]["ok"] is True
        assert get(f"http://127.0.0.1:{port}/nothing")[0] == 404
    finally:
        node.stop()


# -- shutdown -----------------------------------------------------------------


def test_sigterm_with_an_idle_association_exits_within_the_grace_period(
    node_factory: Any, tmp_path: Path
) -> None:
    grace = 3.0
    node: NodeProcess = node_factory(
        {"dicom": {"shutdown_grace_s": grace}} | monitoring(free_port())
    )
    node.start()
    sent = write_series(tmp_path / "series", 5)
    proc = subprocess.run(
        [*node.storescu_cmd("+sd"), str(tmp_path / "series")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    late = write_series(tmp_path / "late", 2)
    acked = assoc.send_c_store(late[0])
    assert acked.Status == 0x0000  # acknowledged before SIGTERM: must survive
    assert node.proc is not None
    t0 = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    refused = assoc.send_c_store(late[1])  # on the open association, after SIGTERM
    assert refused.Status == 0xA700, refused
    # ... then the association stays idle: the node aborts it at the grace deadline.
    node.proc.wait(grace + 10)
    took = time.monotonic() - t0
    assert took < grace + 3, f"exit took {took:.1f} s (grace {grace} s)\n{node.log()[-2000:]}"
    assert node.proc.returncode == 0, node.log()[-2000:]
    assert assoc.is_aborted or not assoc.is_established
    log = node.log()
    assert "1 association(s) open at SIGTERM, 1 aborted" in log, log[-2000:]
    # Nothing acknowledged is lost: the six acknowledged instances are indexed and on disk.
    listed = node.json("instances", "--series", str(sent[0].SeriesInstanceUID))
    listed += node.json("instances", "--series", str(late[0].SeriesInstanceUID))
    uids = {row["sop_instance_uid"] for row in listed}
    assert uids == {str(d.SOPInstanceUID) for d in [*sent, late[0]]}, listed
    stored = [dcmread(p, stop_before_pixels=True) for p in node.root.rglob("*.dcm")]
    assert {str(d.SOPInstanceUID) for d in stored} >= uids
    events = node.json("audit", "--action", "node.stopped")
    assert events and json.loads(json.dumps(events[-1]))["detail"]["associations_aborted"] == 1
    refusals = node.json("audit", "--action", "instance.refused")
    assert any("shutting-down" in json.dumps(e) for e in refusals), refusals
