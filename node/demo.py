"""``make demo``: the node on its embedded defaults, fed a study by a "scanner".

Starts ``sarcnode serve`` with the embedded defaults (SQLite and folders under
``var/demo``, the shipped pipeline ``config/pipelines/sarcoma-mr.yaml``; the
scanner's AE title on the calling-AE allow-list, which is empty by default), a
folder destination and, when the Debian package is installed, a throw-away
Orthanc as the PACS; plays a scanner with dcmtk's ``storescu`` (pynetdicom's
SCU when dcmtk is not installed) sending a synthetic sarcoma study (T1 +
FS-T2) and, when ``../shared/data`` is present, the real STS_001 T1 + FS-T2
study; waits for the jobs and the deliveries, and prints the job table,
per-stage times, the rad-score and risk group, where the SEG/SR/PDF are and
how to look at them. Exit 0 only if every job is done and every object
delivered.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "var" / "demo"
STS_001 = REPO.parent / "shared" / "data" / "sts-raw" / "STS_001"
SARCNODE = str(Path(sys.executable).parent / "sarcnode")
STORESCU = "/usr/bin/storescu"
#: The calling AE title the demo's "scanner" sends with (on the node's allow-list).
DEMO_SCANNER = "DEMOSCANNER"


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def node_env(storage: Path, port: int, destinations: list[dict[str, Any]]) -> dict[str, str]:
    """What the demo changes from the embedded defaults, as ``SARCNODE_*`` variables.

    The defaults refuse calling AEs not on the allow-list, so the demo names its
    scanner, as an admin names each real one in ``dicom.allowed_calling_aes``.
    """
    return {
        "SARCNODE_STORAGE__ROOT": str(storage),
        "SARCNODE_DICOM__PORT": str(port),
        "SARCNODE_MONITORING__PORT": str(_free_port(9180)),
        "SARCNODE_DICOM__ALLOWED_CALLING_AES": json.dumps([DEMO_SCANNER]),
        "SARCNODE_STORAGE__MIN_FREE_MB": "200",
        "SARCNODE_SCHEDULER__SERIES_STABLE_SECONDS": "3",
        "SARCNODE_SCHEDULER__TICK_SECONDS": "1",
        "SARCNODE_DESTINATIONS": json.dumps(destinations),
        "SARCNODE_DELIVERY__BACKOFF_BASE_S": "2",
    }


def _send(folder: Path, port: int) -> int:
    """Send every DICOM file under ``folder``; return how many were sent."""
    files = sorted(p for p in folder.rglob("*.dcm"))
    if Path(STORESCU).exists():
        subprocess.run(
            [
                STORESCU,
                "-aet",
                DEMO_SCANNER,
                "-aec",
                "SARCNODE",
                "127.0.0.1",
                str(port),
                *map(str, files),
            ],
            check=True,
            timeout=300,
        )
    else:
        from pynetdicom import AE
        from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

        ae = AE(ae_title=DEMO_SCANNER)
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="SARCNODE")
        if not assoc.is_established:
            raise SystemExit("demo: the node refused the association")
        for f in files:
            status = assoc.send_c_store(f)
            if getattr(status, "Status", None) != 0:
                raise SystemExit(f"demo: storing {f.name} failed: {status}")
        assoc.release()
    return len(files)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SARCNODE, *args],
        env=env | {"COLUMNS": "160"},
        text=True,
        capture_output=True,
        timeout=120,
        check=False,
    )


def _orthanc(folder: Path) -> tuple[subprocess.Popen[bytes], int, int] | None:
    """Start a throw-away Orthanc (Debian package) as the demo's PACS, or None if absent."""
    binary = Path("/usr/sbin/Orthanc")
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if not binary.exists():
        return None
    http, dicom = _free_port(8042), _free_port(4242)
    (folder / "config").mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "sarcnode-demo-pacs",
        "HttpPort": http,
        "DicomPort": dicom,
        "DicomAet": "DEMOPACS",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowStore": True,
        "Plugins": [str(plugin)] if plugin.exists() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (folder / "config" / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = (folder / "orthanc.log").open("wb")
    proc = subprocess.Popen([str(binary), f"{folder / 'config'}/"], stdout=log, stderr=log)
    import urllib.request

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=1):
                return proc, http, dicom
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    return None


def _json(env: dict[str, str], *args: str) -> Any:
    return json.loads(_cli(env, *args, "--json").stdout or "[]")


def main() -> int:
    """Run the demo; return the process exit code."""
    from pipelines.scoring.text import score_lines
    from pipelines.synth.study import write_study

    started = time.monotonic()
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir(parents=True)
    port = _free_port(11112)
    destinations: list[dict[str, Any]] = [
        {"name": "results", "kind": "folder", "path": str(DEMO / "results")}
    ]
    pacs = _orthanc(DEMO / "orthanc")
    if pacs is not None:
        destinations.append(
            {
                "name": "orthanc",
                "kind": "dicom",
                "ae_title": "DEMOPACS",
                "host": "127.0.0.1",
                "port": pacs[2],
            }
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARCNODE_")}
    env |= node_env(DEMO / "storage", port, destinations)
    print(f"== sarcnode demo: embedded defaults, storage and SQLite under {DEMO}")
    print("== synthetic and public data, demo models: NOT FOR CLINICAL USE")
    if pacs is not None:
        print(f"== PACS: Orthanc (AE DEMOPACS) on 127.0.0.1:{pacs[2]}, web 127.0.0.1:{pacs[1]}")
    else:
        print("== Orthanc is not installed: results go to the folder destination only")
    log = (DEMO / "serve.log").open("wb")
    serve = subprocess.Popen([SARCNODE, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    heartbeat = DEMO / "storage" / "run" / "serve.json"
    deadline = time.monotonic() + 60
    while not heartbeat.exists():
        if serve.poll() is not None or time.monotonic() > deadline:
            print((DEMO / "serve.log").read_text(), file=sys.stderr)
            print("demo: the node did not start", file=sys.stderr)
            return 1
        time.sleep(0.2)
    try:
        print(f"== node SARCNODE listening on 127.0.0.1:{port}; pipeline config/pipelines")
        truth = write_study(DEMO / "scanner" / "synthetic", seed=1)
        sent = _send(DEMO / "scanner" / "synthetic" / "dicom", port)
        studies = 1
        print(
            f"== scanner sent {sent} instances of synthetic study {truth['case_id']} (T1 + FS-T2)"
        )
        if STS_001.exists():
            n = _send(STS_001 / "MR_T1" / "image", port) + _send(
                STS_001 / "MR_T2FS" / "image", port
            )
            print(
                f"== scanner sent {n} instances of the real STS_001 T1 + FS-T2 study "
                "(TCIA Soft-tissue-Sarcoma, CC BY 3.0)"
            )
            sent, studies = sent + n, 2
        last_sent = time.monotonic()
        deadline = time.monotonic() + 600
        while True:
            jobs = _json(env, "jobs")
            finished = [j for j in jobs if j["state"] in ("done", "failed", "dead")]
            if len(finished) >= studies:
                break
            if time.monotonic() > deadline or serve.poll() is not None:
                print(_cli(env, "jobs").stdout, file=sys.stderr)
                print("demo: the jobs did not finish", file=sys.stderr)
                return 1
            time.sleep(1)
        while any(d["state"] in ("pending", "committing") for d in _json(env, "deliveries")):
            if time.monotonic() > deadline:
                break
            time.sleep(1)
        results_at = time.monotonic()
        print(_cli(env, "jobs").stdout, end="")
        for job in jobs:
            shown = json.loads(_cli(env, "jobs", "show", str(job["id"]), "--json").stdout)
            stages = {s["stage"]: s for s in shown["stages"]}
            times = ", ".join(
                f"{k} {v['seconds']:.1f} s" for k, v in stages.items() if v["seconds"] is not None
            )
            print(f"== job {job['id']} ({job['state']}): {times}")
            for result in shown.get("scores") or []:
                for line in score_lines(result):
                    print(f"   {line}")
            files = ((stages.get("encode") or {}).get("outputs") or {}).get("files", {})
            for kind, path in sorted(files.items()):
                print(f"   {kind:9} {path}")
        deliveries = _json(env, "deliveries")
        done = [d for d in deliveries if d["state"] == "done"]
        print(
            f"== {len(done)} of {len(deliveries)} deliveries done "
            f"({', '.join(sorted({d['destination'] for d in deliveries}))}); "
            f"copies under {DEMO / 'results'}"
        )
        print(_cli(env, "audit", "verify").stdout, end="")
        print(
            f"== {results_at - last_sent:.0f} s from the last instance sent to all results "
            f"delivered; demo total {time.monotonic() - started:.0f} s"
        )
        if pacs is not None:
            print(
                "== to look at the results, start the demo PACS again and OHIF in front of it:\n"
                f"     /usr/sbin/Orthanc {DEMO / 'orthanc' / 'config'}/ &\n"
                f"     .venv/bin/python -m tests.viewer.ohif http://127.0.0.1:{pacs[1]}\n"
                "   then open the printed OHIF address: each study shows the MR, the SEG "
                "overlay, the SR (outline and numbers on the key slice) and the PDF report;\n"
                f"   or Orthanc Explorer at http://127.0.0.1:{pacs[1]}/app/explorer.html"
            )
        ok = (
            len([j for j in jobs if j["state"] == "done"]) == studies
            and deliveries
            and len(done) == len(deliveries)
        )
        return 0 if ok else 1
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
        if pacs is not None:
            pacs[0].terminate()
            pacs[0].wait(30)


if __name__ == "__main__":
    raise SystemExit(main())
