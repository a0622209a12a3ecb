"""End-to-end latency: the last instance received -> all results stored in the PACS.

Starts a throw-away Orthanc (Debian package) as the PACS and ``sarcnode
serve`` with the shipped pipeline, sends the real STS_001 study (T1 + FS-T2,
``../shared/data/sts-raw/STS_001``) with dcmtk's storescu, and prints, from
the node's own records: the stability window, the wait in the queue, each
stage's seconds, the delivery, and the total from the last instance received
to the last result delivered to Orthanc. ``--device cuda`` for the GPU figure.

``--prior`` also stores a prior of the patient in Orthanc only (STS_001's
images under new UIDs, dated 90 days earlier), runs the pipeline with the
``compare`` stage and Orthanc as the prior source (the node registered as
its C-MOVE destination), and prints the extra seconds the prior costs: the
compare stage (C-FIND, C-MOVE, the prior's segmentation and scoring).

Run: ``.venv/bin/python bench/e2e.py [--device cpu|cuda|auto] [--stable-s 2] [--prior]
[--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

from node.demo import DEMO_SCANNER, _free_port, _orthanc, _send  # noqa: E402

STS_001 = REPO.parent / "shared" / "data" / "sts-raw" / "STS_001"

SARCNODE = str(Path(sys.executable).parent / "sarcnode")


def _study_uid() -> str:
    """STS_001's Study Instance UID (the study the bench times)."""
    import pydicom

    first = next((STS_001 / "MR_T2FS").rglob("*.dcm"))
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def _t(value: str | None) -> datetime:
    assert value is not None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _store_prior(http: int, days: int = 90) -> str:
    """STS_001 under new UIDs, ``days`` earlier, stored in Orthanc by REST; its study UID."""
    import urllib.request
    from datetime import timedelta

    import pydicom
    from pydicom.uid import generate_uid

    def uid(old: str) -> str:
        return str(generate_uid(entropy_srcs=["bench-prior", old]))

    study = ""
    images = [STS_001 / "MR_T1" / "image", STS_001 / "MR_T2FS" / "image"]  # no RTSTRUCT
    for path in [p for folder in images for p in sorted(folder.rglob("*.dcm"))]:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study = uid(ds.StudyInstanceUID)
        ds.SeriesInstanceUID = uid(ds.SeriesInstanceUID)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid(ds.SOPInstanceUID)
        when = datetime.strptime(str(ds.StudyDate), "%Y%m%d") - timedelta(days=days)
        ds.StudyDate = when.strftime("%Y%m%d")
        buffer = pydicom.filebase.DicomBytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        request = urllib.request.Request(
            f"http://127.0.0.1:{http}/instances", data=buffer.getvalue(), method="POST"
        )
        urllib.request.urlopen(request, timeout=30).read()  # noqa: S310
    return study


def _with_compare(root: Path) -> Path:
    """The shipped pipeline with absolute paths and the compare stage, in ``root/pipelines``."""
    import yaml

    shipped = REPO / "config" / "pipelines"
    data = yaml.safe_load((shipped / "sarcoma-mr.yaml").read_text())
    data["trigger"]["roles_file"] = str((shipped / data["trigger"]["roles_file"]).resolve())
    data["segmentation_model"] = str((shipped / data["segmentation_model"]).resolve())
    data["signatures"] = [str((shipped / s).resolve()) for s in data["signatures"]]
    data["stages"] = ["segment", "radiomics", "score", "compare", "encode", "deliver"]
    (root / "pipelines").mkdir()
    (root / "pipelines" / "sarcoma-mr.yaml").write_text(yaml.safe_dump(data))
    return root / "pipelines"


def _register_node(http: int, port: int) -> None:
    """Orthanc's C-MOVE destination for the node (in memory, for this run)."""
    import urllib.request

    body = json.dumps({"AET": "SARCNODE", "Host": "127.0.0.1", "Port": port}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{http}/modalities/sarcnode", data=body, method="PUT"
    )
    urllib.request.urlopen(request, timeout=30).read()  # noqa: S310


def main() -> int:
    """Run the study through the node once; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--stable-s", type=float, default=2.0)
    parser.add_argument("--prior", action="store_true", help="Also fetch and compare a prior.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not STS_001.exists():
        print(f"bench/e2e.py needs {STS_001}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pacs = _orthanc(root / "orthanc")
        if pacs is None:
            print("bench/e2e.py needs Orthanc (Debian orthanc)", file=sys.stderr)
            return 2
        port = _free_port(11112)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SARCNODE_")} | {
            "SARCNODE_STORAGE__ROOT": str(root / "node"),
            "SARCNODE_STORAGE__MIN_FREE_MB": "100",
            "SARCNODE_DICOM__PORT": str(port),
            "SARCNODE_DICOM__ALLOWED_CALLING_AES": json.dumps([DEMO_SCANNER]),
            "SARCNODE_SCHEDULER__SERIES_STABLE_SECONDS": str(args.stable_s),
            "SARCNODE_SCHEDULER__TICK_SECONDS": "0.5",
            "SARCNODE_JOBS__DEVICE": args.device,
            "SARCNODE_DESTINATIONS": json.dumps(
                [
                    {
                        "name": "pacs",
                        "kind": "dicom",
                        "ae_title": "DEMOPACS",
                        "host": "127.0.0.1",
                        "port": pacs[2],
                    }
                ]
            ),
            "SARCNODE_DELIVERY__BACKOFF_BASE_S": "1",
        }
        if args.prior:
            _register_node(pacs[1], port)
            _store_prior(pacs[1])
            sources = [{"name": "pacs", "ae_title": "DEMOPACS", "host": "127.0.0.1"}]
            env |= {
                "SARCNODE_JOBS__PIPELINES_DIR": str(_with_compare(root)),
                "SARCNODE_PRIORS__SOURCES": json.dumps([sources[0] | {"port": pacs[2]}]),
                "SARCNODE_DICOM__ALLOWED_CALLING_AES": json.dumps([DEMO_SCANNER, "DEMOPACS"]),
            }

        def cli(*a: str) -> Any:
            proc = subprocess.run(
                [SARCNODE, *a, "--json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            return json.loads(proc.stdout)

        log = (root / "serve.log").open("wb")
        serve = subprocess.Popen([SARCNODE, "serve"], env=env, stdout=log, stderr=log)
        try:
            while not (root / "node" / "run" / "serve.json").exists():
                if serve.poll() is not None:
                    print((root / "serve.log").read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.2)
            _send(STS_001 / "MR_T1" / "image", port)
            _send(STS_001 / "MR_T2FS" / "image", port)
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline:
                jobs = [j for j in cli("jobs") if j["study_instance_uid"] == _study_uid()]
                if jobs and jobs[0]["state"] in ("done", "failed", "dead"):
                    deliveries = [d for d in cli("deliveries") if d["job_id"] == jobs[0]["id"]]
                    if jobs[0]["state"] != "done" or (
                        deliveries and all(d["state"] == "done" for d in deliveries)
                    ):
                        break
                time.sleep(0.5)
            (job,) = jobs
            shown = json.loads(
                subprocess.run(
                    [SARCNODE, "jobs", "show", str(job["id"]), "--json"],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            received = max(
                _t(i["received_at"])
                for i in cli("instances")
                if i["series_instance_uid"] in shown["inputs"].values()
            )
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(30)
            pacs[0].terminate()
            pacs[0].wait(30)
    if job["state"] != "done":
        print(f"job {job['state']}: {job['error']}", file=sys.stderr)
        return 1
    stages = {s["stage"]: s for s in shown["stages"]}
    first_start = min(_t(s["started_at"]) for s in stages.values())
    last_stage_end = max(_t(s["ended_at"]) for s in stages.values())
    delivered = max(_t(d["delivered_at"]) for d in deliveries)
    figures = {
        "device": args.device,
        "stable_window_s": args.stable_s,
        "to_job_start_s": round((first_start - received).total_seconds(), 2),
        "stages_s": {k: v["seconds"] for k, v in stages.items()},
        "delivery_after_stages_s": round((delivered - last_stage_end).total_seconds(), 2),
        "total_s": round((delivered - received).total_seconds(), 2),
        "objects": len(deliveries),
        "prior_s": stages["compare"]["seconds"] if "compare" in stages else None,
        "prior": (stages.get("compare") or {}).get("outputs"),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"STS_001 (T1 + FS-T2) on {args.device}; stability window {args.stable_s:g} s")
        print(f"  last instance received -> job start: {figures['to_job_start_s']:7.2f} s")
        for name, seconds in figures["stages_s"].items():
            print(f"  {name:<36} {seconds:7.2f} s")
        print(f"  deliveries after the last stage:     {figures['delivery_after_stages_s']:7.2f} s")
        print(
            f"  total, last instance -> in the PACS: {figures['total_s']:7.2f} s "
            f"({figures['objects']} objects)"
        )
        if figures["prior_s"] is not None:
            said = (figures["prior"] or {}).get("headline") or (figures["prior"] or {}).get(
                "reason"
            )
            print(f"  extra seconds the prior costs:       {figures['prior_s']:7.2f} s ({said})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
