"""``make demo``: the node on its embedded defaults, fed a study by a "scanner".

Starts ``sarcnode serve`` with the embedded defaults (SQLite and folders under
``var/demo``, the shipped pipeline ``config/pipelines/sarcoma-mr.yaml``; the
scanner's AE title on the calling-AE allow-list, which is empty by default), a
folder destination and a throw-away Orthanc as the PACS (installed from
Debian's packages when run as root; else the demo says how); plays a scanner
with dcmtk's ``storescu`` (pynetdicom's SCU when dcmtk is not installed)
sending a synthetic sarcoma study (T1 + FS-T2) and, when ``../shared/data`` is
present, the real STS_001 T1 + FS-T2 study (``--out`` and ``--real-study`` or
$SARCNODE_DEMO_DIR and $SARCNODE_DEMO_REAL_STUDY say otherwise), and stores the MR
in the PACS too;
waits for the jobs and the deliveries, and prints the job table, per-stage
times, the rad-score and risk group, where the SEG/SR/PDF are, a picture of
each key slice with the tumour outline (``var/demo/<patient>/key-slice.png``)
and the ``sarcnode viewer`` command and address that show the results in OHIF.
Exit 0 only if every job is done and every object delivered.
"""

from __future__ import annotations

import argparse
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

#: Where the demo writes (storage, SQLite, the PACS, pictures); ``--out`` or this variable.
DEMO_DIR_ENV = "SARCNODE_DEMO_DIR"
#: A real raw study (MR_T1/, MR_T2FS/) to send as well; ``--real-study`` or this variable.
REAL_STUDY_ENV = "SARCNODE_DEMO_REAL_STUDY"
STORESCU = "/usr/bin/storescu"
#: The calling AE title the demo's "scanner" sends with (on the node's allow-list).
DEMO_SCANNER = "DEMOSCANNER"


def _sarcnode() -> str:
    """The console script beside this interpreter (the venv's, or the install's)."""
    return str(Path(sys.executable).parent / "sarcnode")


def demo_paths(argv: list[str]) -> tuple[Path, Path | None]:
    """The demo's output folder and the real study to send, from the arguments or environment.

    Defaults: ``var/demo`` under the working directory, and the public STS_001
    study where a checkout keeps it (``../shared/data/sts-raw/STS_001``); no real
    study when that folder is absent.
    """
    parser = argparse.ArgumentParser(prog="python -m node.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=os.environ.get(DEMO_DIR_ENV))
    parser.add_argument("--real-study", type=Path, default=os.environ.get(REAL_STUDY_ENV))
    args = parser.parse_args(argv)
    out = (args.out or Path.cwd() / "var" / "demo").resolve()
    real = args.real_study
    if real is None:
        shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "sts-raw" / "STS_001"
        real = shared if shared.is_dir() else None
    return out, real


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


def _send(folder: Path, port: int, called: str = "SARCNODE") -> int:
    """Send every DICOM file under ``folder`` to AE ``called``; return how many were sent."""
    files = sorted(p for p in folder.rglob("*.dcm"))
    if Path(STORESCU).exists():
        subprocess.run(
            [
                STORESCU,
                "-aet",
                DEMO_SCANNER,
                "-aec",
                called,
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
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            raise SystemExit(f"demo: {called} refused the association")
        for f in files:
            status = assoc.send_c_store(f)
            if getattr(status, "Status", None) != 0:
                raise SystemExit(f"demo: storing {f.name} failed: {status}")
        assoc.release()
    return len(files)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_sarcnode(), *args],
        env=env | {"COLUMNS": "160"},
        text=True,
        capture_output=True,
        timeout=120,
        check=False,
    )


def _orthanc(folder: Path) -> tuple[subprocess.Popen[bytes], int, int] | None:
    """Start a throw-away Orthanc (Debian package) as the demo's PACS, or None if absent."""
    binary, plugin = ORTHANC_BIN, ORTHANC_DICOMWEB
    if not binary.exists():
        return None
    http, dicom = _free_port(8042), _free_port(4242)
    (folder / "config").mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "sarcnode-demo-pacs",
        "HttpPort": http,
        "DicomPort": dicom,
        "DicomAet": DEMO_PACS_AET,
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


# -- the PACS and the viewer (issue 14) -------------------------------------------

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
#: Debian's packages for the demo PACS: Orthanc and its DICOMweb plugin (what OHIF reads).
ORTHANC_PACKAGES = ("orthanc", "orthanc-dicomweb")
DEMO_PACS_AET = "DEMOPACS"


def ensure_orthanc() -> str | None:
    """None when Orthanc with DICOMweb is there; else how to install it, in one line.

    Installs it when it can (root on Debian: apt-get).
    """
    if ORTHANC_BIN.exists() and ORTHANC_DICOMWEB.exists():
        return None
    packages = " ".join(ORTHANC_PACKAGES)
    apt = shutil.which("apt-get")
    if apt is None:
        return (
            "Orthanc with its DICOMweb plugin is not installed and this is not a Debian "
            f"system: install them (Debian/Ubuntu: apt-get install {packages}; else "
            "https://orthanc.uclouvain.be/book/users/cookbook.html) and run `make demo` again"
        )
    if os.geteuid() != 0:
        return (
            f"Orthanc is not installed (not root, so the demo cannot): "
            f"sudo apt-get install -y {packages}, then `make demo` again"
        )
    print(f"== installing the demo PACS: apt-get install -y {packages}", flush=True)
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        [apt, "update", "-qq"],
        [apt, "install", "-y", "-qq", "--no-install-recommends", *ORTHANC_PACKAGES],
    ):
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            return (
                f"installing Orthanc failed ({' '.join(command[:2])} exited {proc.returncode}: "
                f"{proc.stderr.strip()[-300:]}); install it by hand: apt-get install -y "
                f"{packages}, then `make demo` again"
            )
    if ORTHANC_BIN.exists() and ORTHANC_DICOMWEB.exists():
        return None
    return f"apt-get installed {packages} but {ORTHANC_BIN} or {ORTHANC_DICOMWEB} is missing"


def store_in_pacs(folders: list[Path], dicom_port: int) -> int:
    """The scanner stores the study's MR in the PACS too; return how many instances.

    The node sends only its results, and a SEG or SR without its images opens
    on a black viewport.
    """
    return sum(_send(folder, dicom_port, called=DEMO_PACS_AET) for folder in folders)


def viewer_lines(pacs_http: int, studies: list[str], demo: Path) -> list[str]:
    """How to look at the results: restart the demo PACS, run ``sarcnode viewer``, open."""
    from node.viewer import MissingDistError, find_dist

    def shown(path: Path) -> str:
        return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)

    pacs_url = f"http://127.0.0.1:{pacs_http}"
    command = f"{shown(Path(_sarcnode()))} viewer --pacs {pacs_url}" + "".join(
        f" --study {uid}" for uid in studies
    )
    lines = [
        "== to look at the results in OHIF, start the demo PACS again and the viewer in front "
        "of it:",
        f"     {ORTHANC_BIN} {shown(demo / 'orthanc' / 'config')}/ "
        f">> {shown(demo / 'orthanc' / 'orthanc.log')} 2>&1 &",
        f"     {command}",
        "   then open (the MR with the SEG overlay, the SR's numbers on the key slice, the PDF "
        "report as its own series):",
        *(f"     http://127.0.0.1:3000/viewer?StudyInstanceUIDs={uid}" for uid in studies),
        f"   (Orthanc Explorer: {pacs_url}/app/explorer.html)",
    ]
    try:
        find_dist()
    except MissingDistError as exc:
        lines.insert(1, f"   first fetch OHIF: {exc}")
    return lines


def key_slice_png(sr_path: Path, storage_root: Path, scores: list[Any], out: Path) -> Path:
    """The key slice the SR names, with the tumour outline it draws and the results in words.

    What OHIF shows, for a user with no viewer at hand.
    """
    import textwrap

    import matplotlib
    import numpy as np
    import pydicom

    from pipelines.scoring.text import headline, prediction_text

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sr = pydicom.dcmread(sr_path)
    # The first measurement group is the tumour's, on the key slice (TID 1410).
    group = next(
        (i for i in _sr_items(sr) if _meaning(i) == "Measurement Group"),
        pydicom.Dataset(),
    )
    items = list(_sr_items(group.get("ContentSequence", [])))
    region = next((i for i in items if i.get("ValueType") == "SCOORD"), None)
    if region is None:
        raise ValueError(f"{sr_path}: no outline in the tumour's measurement group")
    image = next(i for i in region.ContentSequence if i.get("ValueType") == "IMAGE")
    sop = str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    found = sorted((storage_root / "dicom" / str(sr.StudyInstanceUID)).glob(f"*/{sop}.dcm"))
    if not found:
        raise FileNotFoundError(f"key slice {sop} is not in {storage_root}")
    mr = pydicom.dcmread(found[0])
    pixels = mr.pixel_array.astype(float)
    low, high = np.percentile(pixels, [1, 99.5])
    measured = {
        _meaning(i): i.MeasuredValueSequence[0] for i in items if i.get("ValueType") == "NUM"
    }
    lines = [
        f"{name} {float(measured[name].NumericValue):.1f} "
        f"{measured[name].MeasurementUnitsCodeSequence[0].CodeValue}"
        for name in ("Volume", "Long axis", "Area")
        if name in measured
    ]
    for result in scores:
        if "skipped" in result:
            continue
        lines.append(f"{headline(result)}: rad-score {float(result['radscore']):.2f}")
        predicted = prediction_text(result)
        if predicted:
            lines.append(f"   {predicted}")
    lines.append("Demo models: NOT FOR CLINICAL USE")
    # About 100 characters of 8.5 pt text fit the picture's width.
    lines = [
        part for line in lines for part in textwrap.wrap(line, 100, subsequent_indent="      ")
    ]
    rows, cols = pixels.shape
    spacing = [float(v) for v in getattr(mr, "PixelSpacing", [1.0, 1.0])]
    # Inches: a title band, the image at its pixel aspect, the lines below it.
    width, title_h, line_h = 7.0, 0.35, 0.17
    image_h = width * rows * spacing[0] / (cols * spacing[1])
    text_h = line_h * len(lines) + 0.2
    height = title_h + image_h + text_h
    fig = plt.figure(figsize=(width, height), dpi=110)
    ax = fig.add_axes((0.0, text_h / height, 1.0, image_h / height))
    ax.imshow(pixels, cmap="gray", vmin=low, vmax=high, aspect=spacing[0] / spacing[1])
    # SCOORD (column, row) pixel coordinates: 0 is the first pixel's edge, not its centre.
    outline = np.asarray(region.GraphicData, dtype=float).reshape(-1, 2)
    closed = np.vstack([outline, outline[:1]])
    ax.plot(closed[:, 0] - 0.5, closed[:, 1] - 0.5, color="#ff3030", linewidth=1.4)
    ax.set_axis_off()
    title = (
        f"{mr.get('PatientID', '')}: image {mr.get('InstanceNumber', '?')} of series "
        f"{mr.get('SeriesNumber', '?')} {mr.get('SeriesDescription', '')}, tumour outlined"
    )
    fig.text(0.02, 1 - 0.22 / height, title, va="center", ha="left", fontsize=9)
    fig.text(0.02, (text_h - 0.1) / height, "\n".join(lines), va="top", ha="left", fontsize=8.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _sr_items(items: Any) -> Any:
    """Every SR content item under ``items`` (a data set or a sequence), depth first."""
    for item in items.get("ContentSequence", []) if hasattr(items, "get") else items:
        yield item
        yield from _sr_items(item)


def _meaning(item: Any) -> str:
    names = item.get("ConceptNameCodeSequence") or [{}]
    return str(names[0].get("CodeMeaning", ""))


def key_slice_pngs(
    env: dict[str, str], jobs: list[Any], storage_root: Path, demo: Path
) -> list[str]:
    """``var/demo/<patient>/key-slice.png`` for each done job; the lines saying where."""
    import pydicom

    lines = []
    for job in jobs:
        if job["state"] != "done":
            continue
        shown = json.loads(_cli(env, "jobs", "show", str(job["id"]), "--json").stdout)
        stages = {s["stage"]: s for s in shown["stages"]}
        files = ((stages.get("encode") or {}).get("outputs") or {}).get("files", {})
        if "sr" not in files:
            continue
        sr = Path(files["sr"])
        # The demo's patients are synthetic or public (TCIA): their IDs name the folders.
        patient = str(pydicom.dcmread(sr, stop_before_pixels=True).get("PatientID", ""))
        folder = "".join(c if c.isalnum() or c in "-_." else "_" for c in patient)
        try:
            png = key_slice_png(
                sr,
                storage_root,
                shown.get("scores") or [],
                demo / (folder or "study") / "key-slice.png",
            )
        except (OSError, ValueError) as exc:
            lines.append(f"   job {job['id']}: no key-slice picture ({exc})")
            continue
        lines.append(f"   {png}")
    if lines:
        lines.insert(0, "== no viewer at hand? the key slice with the tumour outline and results:")
    return lines


def _json(env: dict[str, str], *args: str) -> Any:
    return json.loads(_cli(env, *args, "--json").stdout or "[]")


def _start_node(env: dict[str, str], demo: Path) -> subprocess.Popen[bytes] | None:
    """Start ``sarcnode serve`` and wait for its heartbeat; None (log printed) if it fails."""
    log = (demo / "serve.log").open("wb")
    serve = subprocess.Popen([_sarcnode(), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    heartbeat = demo / "storage" / "run" / "serve.json"
    deadline = time.monotonic() + 60
    while not heartbeat.exists():
        if serve.poll() is not None or time.monotonic() > deadline:
            print((demo / "serve.log").read_text(), file=sys.stderr)
            print("demo: the node did not start", file=sys.stderr)
            serve.kill()
            serve.wait(30)
            return None
        time.sleep(0.2)
    return serve


def _send_studies(port: int, demo: Path, real: Path | None) -> int:
    """Play the scanner: the synthetic study, and the real study if any; return the study count."""
    from pipelines.synth.study import write_study

    truth = write_study(demo / "scanner" / "synthetic", seed=1)
    sent = _send(demo / "scanner" / "synthetic" / "dicom", port)
    print(f"== scanner sent {sent} instances of synthetic study {truth['case_id']} (T1 + FS-T2)")
    if real is None:
        return 1
    n = sum(_send(folder, port) for folder in sorted(real.glob("MR_*/image")))
    print(
        f"== scanner sent {n} instances of the real study {real.name} "
        "(TCIA Soft-tissue-Sarcoma, CC BY 3.0)"
    )
    return 2


def _wait_for_results(
    env: dict[str, str], serve: subprocess.Popen[bytes], studies: int
) -> list[dict[str, Any]] | None:
    """Wait until every study's job has finished and no delivery is pending; None on time-out."""
    deadline = time.monotonic() + 600
    while True:
        jobs: list[dict[str, Any]] = _json(env, "jobs")
        if len([j for j in jobs if j["state"] in ("done", "failed", "dead")]) >= studies:
            break
        if time.monotonic() > deadline or serve.poll() is not None:
            print(_cli(env, "jobs").stdout, file=sys.stderr)
            print("demo: the jobs did not finish", file=sys.stderr)
            return None
        time.sleep(1)
    while any(d["state"] in ("pending", "committing") for d in _json(env, "deliveries")):
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    return jobs


def _print_jobs(env: dict[str, str], jobs: list[dict[str, Any]]) -> None:
    """Each job's stage times, card results and output files."""
    from pipelines.scoring.text import score_lines

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


def _report(
    env: dict[str, str],
    jobs: list[dict[str, Any]],
    pacs: tuple[subprocess.Popen[bytes], int, int] | None,
    studies: int,
    demo: Path,
) -> bool:
    """Print jobs, deliveries, the audit check, key-slice pictures and the viewer address.

    Returns whether every job is done and every delivery reached its destination.
    """
    _print_jobs(env, jobs)
    deliveries = _json(env, "deliveries")
    done = [d for d in deliveries if d["state"] == "done"]
    print(
        f"== {len(done)} of {len(deliveries)} deliveries done "
        f"({', '.join(sorted({d['destination'] for d in deliveries}))}); "
        f"copies under {demo / 'results'}"
    )
    print(_cli(env, "audit", "verify").stdout, end="")
    for line in key_slice_pngs(env, jobs, Path(env["SARCNODE_STORAGE__ROOT"]), demo):
        print(line)
    if pacs is not None:
        uids = list(dict.fromkeys(j["study_instance_uid"] for j in jobs))
        print("\n".join(viewer_lines(pacs[1], uids, demo)))
    all_done = len([j for j in jobs if j["state"] == "done"]) == studies
    return bool(all_done and deliveries and len(done) == len(deliveries))


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the process exit code."""
    demo, real = demo_paths(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    shutil.rmtree(demo, ignore_errors=True)
    demo.mkdir(parents=True)
    port = _free_port(11112)
    destinations: list[dict[str, Any]] = [
        {"name": "results", "kind": "folder", "path": str(demo / "results")}
    ]
    no_pacs = ensure_orthanc()
    pacs = _orthanc(demo / "orthanc") if no_pacs is None else None
    if pacs is not None:
        destinations.append(
            {
                "name": "orthanc",
                "kind": "dicom",
                "ae_title": DEMO_PACS_AET,
                "host": "127.0.0.1",
                "port": pacs[2],
            }
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARCNODE_")}
    env |= node_env(demo / "storage", port, destinations)
    print(f"== sarcnode demo: embedded defaults, storage and SQLite under {demo}")
    print("== synthetic and public data, demo models: NOT FOR CLINICAL USE")
    if pacs is not None:
        print(f"== PACS: Orthanc (AE demoPACS) on 127.0.0.1:{pacs[2]}, web 127.0.0.1:{pacs[1]}")
    else:
        print(f"== no PACS: {no_pacs or 'Orthanc did not start'}")
        print("   results go to the folder destination only")
    serve = _start_node(env, demo)
    if serve is None:
        if pacs is not None:
            pacs[0].terminate()
        return 1
    try:
        print(f"== node SARCNODE listening on 127.0.0.1:{port}; pipeline config/pipelines")
        studies = _send_studies(port, demo, real)
        last_sent = time.monotonic()
        if pacs is not None:
            stored = store_in_pacs([Path(env["SARCNODE_STORAGE__ROOT"]) / "dicom"], pacs[2])
            print(f"== the MR ({stored} instances) stored in the PACS too, as the scanner would")
        jobs = _wait_for_results(env, serve, studies)
        if jobs is None:
            return 1
        print(
            f"== {time.monotonic() - last_sent:.0f} s from the last instance sent to all "
            f"results delivered; demo total {time.monotonic() - started:.0f} s"
        )
        return 0 if _report(env, jobs, pacs, studies, demo) else 1
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
        if pacs is not None:
            pacs[0].terminate()
            pacs[0].wait(30)


if __name__ == "__main__":
    raise SystemExit(main())
