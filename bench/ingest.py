"""Ingest benchmark: C-STORE throughput of sarcnode against dcmtk storescp and Orthanc.

What it measures: N instances (default 500) of 512x512 16-bit MR, Explicit VR
Little Endian (~0.5 MiB each, one study, one series), sent by dcmtk's
/usr/bin/storescu (with TCP_NODELAY=1: with Nagle on the sender, storescu ->
storescp took 1.7 to 5.2 s for 500 files instead of 0.75 s) on loopback to

(a) sarcnode serve: each instance fsynced, indexed in SQLite and audited
    before the Success response;
(b) dcmtk storescp with TCP_NODELAY=1: writes files, no fsync, no index
    (an upper bound, not a like-for-like peer);
(c) Orthanc from Debian, when /usr/sbin/Orthanc exists, with its defaults
    (SyncStorageArea: fsync; SQLite index) and TCP_NODELAY=1 for its dcmtk
    DICOM layer (without it Nagle + delayed ACKs cap any dcmtk SCP at ~20/s).

Each receiver is timed twice, each time freshly started on empty storage:
one association carrying all N files, then --parallel associations at once
(files split evenly, one storescu per share; storescp gets --fork then). The
figure is N / wall-clock seconds of the storescu process(es), including
storescu's own start-up and file scanning. Afterwards the receiver's count is
checked. Targets (issue 17): sarcnode >= 1.0x Orthanc on one association and
>= 1.5x on eight; >= 0.5x storescp (issue 1).

``--before DIR`` adds "sarcnode-before": the same serve run from another
source tree (a checkout of an earlier commit, e.g. ``git worktree add
/tmp/before HEAD~1``; its ``node`` package first on PYTHONPATH), so a change
is measured before and after in one run, under the same load.

Run: ``make bench`` or ``.venv/bin/python bench/ingest.py [--n 500] [--parallel 8]
[--before DIR] [--receivers N] [--keep] [--json]``; ``--receivers`` sets
``dicom.receivers`` for sarcnode only, so ``PYTHONPATH=TREE ... --receivers 2
--before TREE`` compares 2 receiver processes with 1 on the same code. It is a
benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

STORESCU, STORESCP, ECHOSCU = "/usr/bin/storescu", "/usr/bin/storescp", "/usr/bin/echoscu"
ORTHANC = Path("/usr/sbin/Orthanc")
SARCNODE = Path(sys.executable).parent / "sarcnode"
#: Aims per peer: (one association, --parallel associations). Issue 17 asks >= 1.0x
#: Orthanc on one association and >= 1.5x on eight; issue 1's 0.5x of storescp stays.
TARGETS = {"orthanc": (1.0, 1.5), "storescp": (0.5, 0.5)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_instances(folder: Path, n: int) -> None:
    """Write n MR instances of one series, 512x512 uint16, Explicit VR LE."""
    rng = np.random.default_rng(20240601)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[-256:256, -256:256]
    body = ((xx**2 + yy**2) < 200**2).astype(np.float64) * 1200.0
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientSex = "BENCH^INGEST", "BENCH0001", "O"
        ds.PatientBirthDate, ds.StudyDate, ds.StudyTime = "19700101", "20240601", "120000"
        ds.SeriesDate, ds.SeriesTime, ds.ContentDate = "20240601", "120000", "20240601"
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "BENCH1", "1", ""
        ds.Modality, ds.Manufacturer, ds.SeriesNumber = "MR", "sarcnode-bench", 1
        ds.StudyDescription, ds.SeriesDescription = "Ingest benchmark", "T1 AX bench"
        ds.InstanceNumber, ds.ImageType = i + 1, ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "SE", "NONE", "2D"
        ds.SliceThickness, ds.SpacingBetweenSlices, ds.MagneticFieldStrength = 1.0, 1.0, 1.5
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 500.0, 15.0, 1
        ds.ImagePositionPatient = [-175.0, -175.0, round(-250.0 + i * 1.0, 3)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceLocation = [0.68359375, 0.68359375], round(-250.0 + i, 3)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        noise = rng.normal(0.0, 60.0, (512, 512))
        ds.PixelData = np.clip(body + noise, 0, 4095).astype("<u2").tobytes()
        ds.save_as(folder / f"MR{i:05d}.dcm", enforce_file_format=True)


@dataclass
class Receiver:
    name: str
    ae: str
    start: Callable[[Path, int, bool], tuple[list[str], dict[str, str], int | None]]
    count: Callable[[Path, int | None], int]
    note: str


def _sarcnode(
    work: Path, port: int, parallel: bool, receivers: int | None = None
) -> tuple[list[str], dict[str, str], None]:
    cfg: dict[str, dict[str, object]] = {
        "dicom": {
            "ae_title": "SARCNODE",
            "bind": "127.0.0.1",
            "port": port,
            # dcmtk's default calling AEs; every share comes from one address and AE,
            # so the per-peer limits are raised with the total for --parallel up to 32.
            "allowed_calling_aes": ["STORESCU", "ECHOSCU"],
            "max_associations": 33,
            "max_connections_per_ip": 32,
            "max_associations_per_peer": 32,
        },
        "storage": {"root": str(work / "sarcnode"), "min_free_mb": 100},
        "scheduler": {"series_stable_seconds": 60},
        "logging": {"level": "WARNING"},
    }
    if receivers is not None:  # serve's receiver processes (not set for --before)
        cfg["dicom"]["receivers"] = receivers
    (work / "sarcnode.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return [str(SARCNODE), "serve", "--config", str(work / "sarcnode.yaml")], {}, None


def _sarcnode_count(work: Path, _http: int | None) -> int:
    cmd = [str(SARCNODE), "instances", "--config", str(work / "sarcnode.yaml"), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout
    return len(json.loads(out))


def _storescp(work: Path, port: int, parallel: bool) -> tuple[list[str], dict[str, str], None]:
    (work / "storescp").mkdir()
    cmd = [STORESCP, "-aet", "STORESCP", "--output-directory", str(work / "storescp")]
    return [*cmd, *(["--fork"] if parallel else []), str(port)], {"TCP_NODELAY": "1"}, None


def _storescp_count(work: Path, _http: int | None) -> int:
    return sum(1 for p in (work / "storescp").rglob("*") if p.is_file())


def _orthanc(work: Path, port: int, parallel: bool) -> tuple[list[str], dict[str, str], int]:
    http, conf = free_port(), work / "orthanc-config"
    conf.mkdir()
    cfg = {"Name": "bench", "HttpPort": http, "DicomPort": port, "DicomAet": "ORTHANC",
           "StorageDirectory": str(work / "orthanc" / "storage"),
           "IndexDirectory": str(work / "orthanc" / "index"),
           "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": []}  # fmt: skip
    (conf / "orthanc.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return [str(ORTHANC), f"{conf}/"], {"TCP_NODELAY": "1"}, http


def http_json(http: int, path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http}{path}", timeout=5) as resp:
        return dict(json.load(resp))


def _orthanc_count(_work: Path, http: int | None) -> int:
    return int(str(http_json(int(http or 0), "/statistics")["CountInstances"]))


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(proc: subprocess.Popen[bytes], ae: str, port: int, http: int | None) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before it was ready")
        try:
            if http is not None:
                http_json(http, "/system")
            echo = [ECHOSCU, "-aec", ae, "127.0.0.1", str(port)]
            if subprocess.run(echo, capture_output=True, timeout=10).returncode == 0:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("not ready after 120 s")


def send(ae: str, port: int, dirs: list[Path]) -> tuple[float, int]:
    """One storescu per folder, all at once: wall seconds until all exit, failures."""
    argv = [STORESCU, "-aec", ae, "127.0.0.1", str(port), "+sd"]
    t0 = time.perf_counter()
    env = {**os.environ, "TCP_NODELAY": "1"}  # sender-side Nagle adds 40 ms stalls at random
    procs = [subprocess.Popen([*argv, str(d)], env=env, stderr=subprocess.PIPE) for d in dirs]
    outs = [p.communicate(timeout=900)[1] for p in procs]
    elapsed = time.perf_counter() - t0
    for p, err in zip(procs, outs, strict=True):
        if p.returncode != 0:
            print(f"  WARNING: storescu exited {p.returncode}: {err.decode()[-400:]}")
    return elapsed, sum(p.returncode != 0 for p in procs)


def run_one(
    rx: Receiver, root: Path, dirs: list[Path], n: int, keep: bool
) -> dict[str, float | int | str]:
    work = Path(tempfile.mkdtemp(prefix=f"{rx.name}-", dir=root))
    port = free_port()
    argv, env, http = rx.start(work, port, len(dirs) > 1)
    log = (work / "receiver.log").open("wb")
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=log)
    try:
        ready = wait_ready(proc, rx.ae, port, http)
        elapsed, failures = send(rx.ae, port, dirs)
        got = rx.count(work, http)
    except (RuntimeError, subprocess.SubprocessError, OSError, ValueError) as exc:
        tail = (work / "receiver.log").read_text(errors="replace")[-1500:]
        print(f"  WARNING: {rx.name} failed: {exc}\n{tail}")
        return {"error": str(exc)}
    finally:
        stop(proc)
        log.close()
    if got != n:
        print(f"  WARNING: {rx.name} holds {got} instances after the run, expected {n}")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    rate = n / elapsed
    label = f"{len(dirs)} assoc"
    print(f"  {rx.name:15} {label:9} {elapsed:7.2f} s {rate:8.1f} inst/s (ready in {ready:.1f} s)")
    return {"seconds": elapsed, "inst_per_s": rate, "received": got, "ready_s": ready,
            "storescu_failures": failures}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="instances to send (default 500)")
    ap.add_argument("--parallel", type=int, default=8, help="parallel associations (default 8)")
    ap.add_argument("--before", type=Path, help="also run serve from this source tree")
    ap.add_argument("--receivers", type=int, help="dicom.receivers for sarcnode (not for --before)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--json", action="store_true", help="print a JSON summary too")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sarcnode-bench-"))
    cpus = len(os.sched_getaffinity(0))
    print(f"sarcnode ingest bench: {args.n} x 512x512 uint16 MR (Explicit VR LE), loopback,")
    print("sender /usr/bin/storescu with TCP_NODELAY=1, each receiver fresh on empty storage")
    print(
        f"machine: {platform.node()}, {cpus} CPUs (nproc), {platform.machine()}, "
        f"Python {platform.python_version()}, tmp {root}"
    )
    receivers = [
        Receiver(
            "sarcnode",
            "SARCNODE",
            lambda work, port, parallel: _sarcnode(work, port, parallel, args.receivers),
            _sarcnode_count,
            "fsync+SQLite+audit"
            + (f", {args.receivers} receivers" if args.receivers is not None else ""),
        ),
        Receiver("storescp", "STORESCP", _storescp, _storescp_count, "no fsync, no index"),
        Receiver("orthanc", "ORTHANC", _orthanc, _orthanc_count, "fsync+SQLite (defaults)"),
    ]
    if args.before is not None:
        before = args.before.resolve()
        if not (before / "node" / "__init__.py").is_file():
            ap.error(f"--before {before}: no node package there")

        def _before(
            work: Path, port: int, parallel: bool
        ) -> tuple[list[str], dict[str, str], None]:
            argv, _env, _http = _sarcnode(work, port, parallel)
            return argv, {"PYTHONPATH": str(before)}, None

        note = f"the same, code from {before}"
        receivers.insert(1, Receiver("sarcnode-before", "SARCNODE", _before, _sarcnode_count, note))
    if not ORTHANC.exists():
        print(f"note: {ORTHANC} not installed: Orthanc skipped")
        receivers.pop()
    try:
        t0 = time.perf_counter()
        all_dir = root / "instances" / "all"
        all_dir.mkdir(parents=True)
        make_instances(all_dir, args.n)
        files = sorted(all_dir.iterdir())
        shares = [root / "instances" / f"part{k}" for k in range(args.parallel)]
        for k, share in enumerate(shares):
            share.mkdir()
            for f in files[k :: args.parallel]:
                (share / f.name).hardlink_to(f)
        print(f"generated {args.n} files in {time.perf_counter() - t0:.1f} s")
        results: dict[str, dict[str, dict[str, float | int | str]]] = {}
        for rx in receivers:
            results[rx.name] = {
                "single": run_one(rx, root, [all_dir], args.n, args.keep),
                "parallel": run_one(rx, root, shares, args.n, args.keep),
            }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    def rate(name: str, mode: str) -> float | None:
        value = results.get(name, {}).get(mode, {}).get("inst_per_s")
        return float(value) if value is not None else None

    print(f"\n{'receiver':15} {'1-assoc inst/s':>15} {f'{args.parallel}-assoc inst/s':>15}  what")
    for rx in receivers:
        cells = [
            f"{r:15.1f}" if (r := rate(rx.name, m)) else f"{'failed':>15}"
            for m in ("single", "parallel")
        ]
        print(f"{rx.name:15} {cells[0]} {cells[1]}  {rx.note}")
    ratios: dict[str, dict[str, float | bool | None]] = {}
    print()
    for peer, (single_target, parallel_target) in TARGETS.items():
        for mode, label, target in (
            ("single", "1-assoc", single_target),
            ("parallel", f"{args.parallel}-assoc", parallel_target),
        ):
            mine, theirs = rate("sarcnode", mode), rate(peer, mode)
            if mine is None or theirs is None:
                print(f"sarcnode/{peer:8} {label:8}: n/a")
                continue
            ratio = mine / theirs
            ratios[f"sarcnode/{peer} {label}"] = {"ratio": ratio, "met": ratio >= target}
            verdict = "met" if ratio >= target else "NOT met"
            print(f"sarcnode/{peer:8} {label:8}: {ratio:5.2f}x  (target >= {target}x: {verdict})")
    if args.keep:
        print(f"kept {root}")
    if args.json:
        machine = {"cpus": cpus, "python": platform.python_version()}
        summary = {"n": args.n, "parallel": args.parallel, **machine, "results": results}
        print(json.dumps({**summary, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
