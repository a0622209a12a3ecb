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

``--before DIR`` runs the same study through ``serve`` from another source
tree too (``git worktree add /tmp/before <commit>``; its ``node`` and
``pipelines`` first on PYTHONPATH), and ``--rounds N`` repeats both,
alternating, so a change is measured before and after under the same load.
The time to the job's start is split: the series turning stable, the job
created, its first stage started. The study is sent once the node's job
worker says it is warm (models loaded, extraction pool started: a node that
has been up a while); ``--cold`` sends it as soon as ``serve`` is up. The
``--before`` tree is never waited for (its workers start with the first job).

Run: ``.venv/bin/python bench/e2e.py [--device cpu|cuda|auto] [--stable-s 2] [--tick-s 0.5]
[--prior] [--before DIR] [--rounds N] [--cold] [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _env(args: argparse.Namespace, root: Path, pacs: Any, port: int) -> dict[str, str]:
    """The node's environment: temporary storage, the Orthanc as destination, fast ticks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARCNODE_")} | {
        "SARCNODE_STORAGE__ROOT": str(root / "node"),
        "SARCNODE_STORAGE__MIN_FREE_MB": "100",
        "SARCNODE_DICOM__PORT": str(port),
        "SARCNODE_DICOM__ALLOWED_CALLING_AES": json.dumps([DEMO_SCANNER]),
        "SARCNODE_SCHEDULER__SERIES_STABLE_SECONDS": str(args.stable_s),
        "SARCNODE_SCHEDULER__TICK_SECONDS": str(args.tick_s),
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
    return env


def _run(args: argparse.Namespace, tree: Path | None) -> dict[str, Any]:
    """One study through a fresh node (its code from ``tree``, else this one); the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pacs = _orthanc(root / "orthanc")
        if pacs is None:
            raise SystemExit("bench/e2e.py needs Orthanc (Debian orthanc)")
        port = _free_port(11112)
        env = _env(args, root, pacs, port)
        if tree is not None:  # its node and pipelines first on the path, the serve's too
            env["PYTHONPATH"] = str(tree)

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
                    raise SystemExit((root / "serve.log").read_text())
                time.sleep(0.2)
            warm_s = None if args.cold or tree is not None else _wait_warm(root / "serve.log")
            _send(STS_001 / "MR_T1" / "image", port)
            _send(STS_001 / "MR_T2FS" / "image", port)
            _wait_done(root / "node" / "sarcnode.db")
            (job,) = [j for j in cli("jobs") if j["study_instance_uid"] == _study_uid()]
            deliveries = [d for d in cli("deliveries") if d["job_id"] == job["id"]]
            shown = cli("jobs", "show", str(job["id"]))
            inputs = set(shown["inputs"].values())
            received = max(
                _t(i["received_at"]) for i in cli("instances") if i["series_instance_uid"] in inputs
            )
            stable = max(
                _t(x["stable_at"]) for x in cli("series") if x["series_instance_uid"] in inputs
            )
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(30)
            pacs[0].terminate()
            pacs[0].wait(30)
    if job["state"] != "done":
        raise SystemExit(f"job {job['state']}: {job['error']}")
    return _figures(args, tree, shown, deliveries, received, stable) | {"warm_wait_s": warm_s}


def _wait_warm(log: Path, timeout: float = 300) -> float:
    """Seconds until the node's job worker says its extraction pool is warm (a node up a while)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if "extraction pool of" in log.read_text(errors="replace"):
            return round(time.monotonic() - began, 1)
        time.sleep(0.2)
    raise SystemExit(f"no warm job worker after {timeout:g} s:\n{log.read_text()[-3000:]}")


def _wait_done(database: Path) -> None:
    """Until STS_001's job ended and its deliveries ended (or it failed).

    Polls the node's SQLite file read-only from this process: a ``sarcnode``
    CLI call per poll would start a Python process each time and take the
    CPU the node is being timed on (the figures come from the node's own
    timestamps, so how soon this notices does not change them).
    """
    import sqlite3

    study = _study_uid()
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if not database.exists():
            continue
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            try:
                job = db.execute(
                    "SELECT id, state FROM jobs WHERE study_instance_uid = ? ORDER BY id", (study,)
                ).fetchone()
                if job is None or job[1] not in ("done", "failed", "dead"):
                    continue
                if job[1] != "done":
                    return
                states = [
                    row[0]
                    for row in db.execute(
                        "SELECT state FROM deliveries WHERE job_id = ?", (job[0],)
                    )
                ]
            except sqlite3.OperationalError:  # busy, or tables not made yet
                continue
        if states and all(state == "done" for state in states):
            return
    raise SystemExit("STS_001's job did not end within 30 minutes")


def _figures(
    args: argparse.Namespace,
    tree: Path | None,
    shown: dict[str, Any],
    deliveries: list[dict[str, Any]],
    received: datetime,
    stable: datetime,
) -> dict[str, Any]:
    stages = {s["stage"]: s for s in shown["stages"]}
    first_start = min(_t(s["started_at"]) for s in stages.values())
    last_stage_end = max(_t(s["ended_at"]) for s in stages.values())
    delivered = max(_t(d["delivered_at"]) for d in deliveries)
    created = _t(shown["created_at"])
    return {
        "code": str(tree) if tree else "this tree",
        "device": args.device,
        "stable_window_s": args.stable_s,
        "tick_s": args.tick_s,
        "to_job_start_s": round((first_start - received).total_seconds(), 2),
        "to_stable_s": round((stable - received).total_seconds(), 2),
        "stable_to_job_created_s": round((created - stable).total_seconds(), 2),
        "created_to_first_stage_s": round((first_start - created).total_seconds(), 2),
        "stages_s": {k: v["seconds"] for k, v in stages.items()},
        "delivery_after_stages_s": round((delivered - last_stage_end).total_seconds(), 2),
        "total_s": round((delivered - received).total_seconds(), 2),
        "objects": len(deliveries),
        "prior_s": stages["compare"]["seconds"] if "compare" in stages else None,
        "prior": (stages.get("compare") or {}).get("outputs"),
        "load_1min": round(os.getloadavg()[0], 2),
    }


def _print(figures: dict[str, Any]) -> None:
    print(
        f"STS_001 (T1 + FS-T2) on {figures['device']}, code: {figures['code']}; "
        f"stability window {figures['stable_window_s']:g} s, tick {figures['tick_s']:g} s, "
        f"load {figures['load_1min']}"
        + (
            f"; sent after the node was warm ({figures['warm_wait_s']} s)"
            if figures["warm_wait_s"]
            else ""
        )
    )
    print(f"  last instance received -> job start: {figures['to_job_start_s']:7.2f} s")
    print(f"    -> series stable                   {figures['to_stable_s']:7.2f} s")
    print(f"    -> job created                     {figures['stable_to_job_created_s']:7.2f} s")
    print(f"    -> first stage started             {figures['created_to_first_stage_s']:7.2f} s")
    for name, seconds in figures["stages_s"].items():
        print(f"  {name:<36} {seconds:7.2f} s")
    print(f"  deliveries after the last stage:     {figures['delivery_after_stages_s']:7.2f} s")
    print(
        f"  total, last instance -> in the PACS: {figures['total_s']:7.2f} s "
        f"({figures['objects']} objects)"
    )
    if figures["prior_s"] is not None:
        said = (figures["prior"] or {}).get("headline") or (figures["prior"] or {}).get("reason")
        print(f"  extra seconds the prior costs:       {figures['prior_s']:7.2f} s ({said})")


def main() -> int:
    """Run the study through the node (and the --before tree's), --rounds times; print figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--stable-s", type=float, default=2.0)
    parser.add_argument("--tick-s", type=float, default=0.5, help="scheduler.tick_seconds")
    parser.add_argument("--prior", action="store_true", help="Also fetch and compare a prior.")
    parser.add_argument("--before", type=Path, help="also run serve from this source tree")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each code, alternating")
    parser.add_argument(
        "--cold", action="store_true", help="send at once, not after the job worker is warm"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not STS_001.exists():
        print(f"bench/e2e.py needs {STS_001}", file=sys.stderr)
        return 2
    trees: list[Path | None] = [None]
    if args.before is not None:
        if not (args.before / "node" / "__init__.py").is_file():
            parser.error(f"--before {args.before}: no node package there")
        trees = [args.before.resolve(), None]
    runs = []
    for _ in range(args.rounds):
        for tree in trees:
            runs.append(_run(args, tree))
            if not args.json:
                _print(runs[-1])
    if args.json:
        print(json.dumps(runs if len(runs) > 1 else runs[0], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
