"""``make demo``: the node on its embedded defaults, fed a study by a "scanner".

Starts ``sarcnode serve`` with the embedded defaults (SQLite and folders under
``var/demo``), plays a scanner with dcmtk's ``storescu`` (pynetdicom's SCU when
dcmtk is not installed) sending a synthetic sarcoma study (T1 + FS-T2) and, when
``../shared/data`` is present, the real STS_001 T1 + FS-T2 study, waits for the
series to become stable, prints what the admin CLI shows, verifies the audit
chain and stops. Exit 0 only if every sent instance is stored and indexed.
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

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "var" / "demo"
STS_001 = REPO.parent / "shared" / "data" / "sts-raw" / "STS_001"
SARCNODE = str(Path(sys.executable).parent / "sarcnode")
STORESCU = "/usr/bin/storescu"


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def _send(folder: Path, port: int) -> int:
    """Send every DICOM file under ``folder``; return how many were sent."""
    files = sorted(p for p in folder.rglob("*.dcm"))
    if Path(STORESCU).exists():
        subprocess.run(
            [
                STORESCU,
                "-aet",
                "DEMOSCANNER",
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

        ae = AE(ae_title="DEMOSCANNER")
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


def main() -> int:
    """Run the demo; return the process exit code."""
    from pipelines.synth.study import write_study

    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir(parents=True)
    port = _free_port(11112)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARCNODE_")}
    env |= {
        "SARCNODE_STORAGE__ROOT": str(DEMO / "storage"),
        "SARCNODE_DICOM__PORT": str(port),
        "SARCNODE_STORAGE__MIN_FREE_MB": "200",
        "SARCNODE_SCHEDULER__SERIES_STABLE_SECONDS": "3",
        "SARCNODE_SCHEDULER__TICK_SECONDS": "1",
    }
    print(f"== sarcnode demo: embedded defaults, storage and SQLite under {DEMO}")
    print("== synthetic and public data only - NOT FOR CLINICAL USE")
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
        print(f"== node SARCNODE listening on 127.0.0.1:{port}")
        truth = write_study(DEMO / "scanner" / "synthetic", seed=1)
        sent = _send(DEMO / "scanner" / "synthetic" / "dicom", port)
        print(
            f"== scanner sent {sent} instances of synthetic study {truth['case_id']} "
            "(T1 + FS-T2, pipelines/synth)"
        )
        if STS_001.exists():
            n = _send(STS_001 / "MR_T1" / "image", port) + _send(
                STS_001 / "MR_T2FS" / "image", port
            )
            print(
                f"== scanner sent {n} instances of the real STS_001 T1 + FS-T2 study "
                "(TCIA Soft-tissue-Sarcoma, CC BY 3.0)"
            )
            sent += n
        deadline = time.monotonic() + 60
        while True:
            rows = json.loads(_cli(env, "series", "--json").stdout)
            if rows and all(r["state"] == "stable" for r in rows):
                break
            if time.monotonic() > deadline:
                print("demo: series did not become stable in 60 s", file=sys.stderr)
                return 1
            time.sleep(1)
        for args in (
            ("studies",),
            ("series",),
            ("associations",),
            ("audit", "verify"),
            ("status",),
        ):
            print(_cli(env, *args).stdout, end="")
        stored = sum(r["instances"] for r in rows)
        print(
            f"== {stored} of {sent} sent instances stored and indexed; files under "
            f"{DEMO / 'storage' / 'dicom'}"
        )
        print(
            f"== try: SARCNODE_STORAGE__ROOT={DEMO / 'storage'} .venv/bin/sarcnode audit "
            "--since 10m"
        )
        return 0 if stored == sent else 1
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)


if __name__ == "__main__":
    raise SystemExit(main())
