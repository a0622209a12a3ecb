"""serve's memory under large and hostile data sets: peak RSS per scenario (issue 13).

    .venv/bin/python bench/rss.py
    .venv/bin/python bench/rss.py --scenarios bomb large --senders 4 --large-mb 400

A real ``sarcnode serve`` (default ``storage.max_dataset_mb`` 512, any calling
AE) on a free loopback port under a temporary folder; before each scenario its
peak RSS (VmHWM) is reset to the current RSS, after it the peak is read.

- ``pdu``: an A-ASSOCIATE, then a P-DATA-TF header announcing 512 MiB and up
  to 64 MiB of its body (the node must abort at the header);
- ``bomb``: a Deflated Explicit VR Little Endian MR data set of about 1 MB
  that inflates to 1 GiB of zero Pixel Data (must be refused, 0xA700);
- ``oversize``: ``--senders`` associations at once, each sending a data set
  of ``--over-mb`` (over the cap: each must be aborted while it arrives);
- ``large``: ``--senders`` associations at once, each storing one MR
  instance of ``--large-mb`` (legitimate: each must be stored, 0x0000).

Prints, per scenario: RSS before, peak, after (MiB), wall time and the
outcomes. ``--serve`` runs another build (``PYTHONPATH=old-tree .venv/bin/python
-m node.cli.main``), to measure before and after a change.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import free_port  # noqa: E402
from tests.dicomgen import mr_dataset  # noqa: E402
from tests.fuzz.dimse import (  # noqa: E402
    RawAssociation,
    command_set,
    store_rq_elements,
)
from tests.fuzz.harness import proc_status_kb, reset_peak_rss  # noqa: E402

MiB = 1 << 20
SARCNODE = str(Path(sys.executable).parent / "sarcnode")


class Serve:
    """One ``sarcnode serve`` with its config, folder and log."""

    def __init__(self, base: Path, command: list[str]) -> None:
        self.base = base
        self.port = free_port()
        settings: dict[str, Any] = {
            "dicom": {
                "ae_title": "SARCNODE",
                "bind": "127.0.0.1",
                "port": self.port,
                "accept_any_calling_ae": True,
            },
            "storage": {"root": str(base / "storage"), "min_free_mb": 50},
            "logging": {"level": "INFO"},
            "jobs": {"pipelines_dir": str(base / "no-pipelines")},
            "monitoring": {"port": free_port()},
        }
        base.mkdir(parents=True, exist_ok=True)
        self.config = base / "config.yaml"
        self.config.write_text(yaml.safe_dump(settings))
        self.log = base / "serve.log"
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        heartbeat = self.base / "storage" / "run" / "serve.json"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.command, "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while not heartbeat.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


# -- what the scenarios send ------------------------------------------------------------


def _associate(port: int, syntax: str = ExplicitVRLittleEndian) -> RawAssociation:
    assoc = RawAssociation.open(
        port, b"RSSBENCH", b"SARCNODE", [(MRImageStorage, syntax)], timeout_s=600
    )
    assert isinstance(assoc, RawAssociation), f"association refused: {assoc}"
    return assoc


def _mr_head(side: int, pixel_bytes: int) -> tuple[str, bytes]:
    """An MR header (Explicit VR LE) of ``side`` x ``side`` 16-bit pixels, up to and
    including the Pixel Data element's header; its SOP Instance UID."""
    ds = mr_dataset(generate_uid(), generate_uid(), 0)
    del ds.PixelData
    ds.Rows = ds.Columns = side
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = False, True
    write_dataset(buf, ds)
    head = buf.getvalue() + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    return str(ds.SOPInstanceUID), head


def _store(assoc: RawAssociation, sop_uid: str, parts: list[bytes | memoryview]) -> object:
    cid = assoc.context_id(MRImageStorage, assoc_syntax(assoc))
    assert cid is not None
    message_id = assoc.take_message_id()
    command = command_set(store_rq_elements(MRImageStorage, sop_uid, message_id))
    return assoc.request(cid, command, parts, message_id)


def assoc_syntax(assoc: RawAssociation) -> str:
    """The one transfer syntax this bench proposed on the association."""
    return next(iter(assoc.proposed))[1]


def scenario_pdu(port: int, args: argparse.Namespace) -> list[object]:
    assoc = _associate(port)
    assoc.sock.sendall(struct.pack(">BBL", 0x04, 0, 512 * MiB))
    chunk, sent = bytes(MiB), 0
    try:
        while sent < 64 * MiB:
            assoc.sock.sendall(chunk)
            sent += MiB
    except OSError:
        return [f"closed after {sent // MiB} MiB sent"]
    finally:
        assoc.close()
    return [f"not closed after {sent // MiB} MiB"]


def scenario_bomb(port: int, args: argparse.Namespace) -> list[object]:
    side = 23170  # 23170^2 x 2 bytes: 1 GiB of zero pixels
    pixel_bytes = side * side * 2
    sop_uid, head = _mr_head(side, pixel_bytes)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [z.compress(head)]
    zeros = bytes(16 * MiB)
    for _ in range(pixel_bytes // len(zeros)):
        out.append(z.compress(zeros))
    out.append(z.compress(bytes(pixel_bytes % len(zeros))) + z.flush())
    deflated = b"".join(out)
    assoc = _associate(port, DeflatedExplicitVRLittleEndian)
    try:
        status = _store(assoc, sop_uid, [deflated])
    finally:
        assoc.release()
    return [f"{len(deflated) / MiB:.2f} MiB deflated: {_shown(status)}"]


def _concurrent(port: int, count: int, megabytes: int) -> list[object]:
    """``count`` associations at once, each storing one MR data set of ``megabytes``."""
    side = int((megabytes * MiB / 2) ** 0.5)
    pixel_bytes = side * side * 2
    zeros = memoryview(bytes(pixel_bytes))  # shared by every sender: never copied
    results: list[object] = [None] * count

    def send(i: int) -> None:
        sop_uid, head = _mr_head(side, pixel_bytes)
        assoc = _associate(port)
        try:
            results[i] = _shown(_store(assoc, sop_uid, [head, zeros]))
        finally:
            assoc.release()

    workers = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [f"{pixel_bytes / MiB:.0f} MiB: {r}" for r in results]


def scenario_oversize(port: int, args: argparse.Namespace) -> list[object]:
    return _concurrent(port, args.senders, args.over_mb)


def scenario_large(port: int, args: argparse.Namespace) -> list[object]:
    return _concurrent(port, args.senders, args.large_mb)


def _shown(outcome: object) -> str:
    return f"0x{outcome:04X}" if isinstance(outcome, int) else str(outcome)


SCENARIOS: dict[str, Callable[[int, argparse.Namespace], list[object]]] = {
    "pdu": scenario_pdu,
    "bomb": scenario_bomb,
    "oversize": scenario_oversize,
    "large": scenario_large,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="*", choices=sorted(SCENARIOS), default=None)
    parser.add_argument("--senders", type=int, default=4, help="concurrent associations")
    parser.add_argument("--over-mb", type=int, default=600, help="oversize data set (MiB)")
    parser.add_argument("--large-mb", type=int, default=400, help="legitimate data set (MiB)")
    parser.add_argument("--serve", default=SARCNODE, help="command that runs sarcnode")
    parser.add_argument("--keep", action="store_true", help="keep the node's folder")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="sarcnode-rss-"))
    node = Serve(base / "node", shlex.split(args.serve))
    pid = node.start()
    print(f"{'scenario':<10} {'RSS':>6} {'peak':>6} {'after':>6} {'s':>6}  outcomes")
    try:
        for name in args.scenarios or list(SCENARIOS):
            time.sleep(1.0)
            before = proc_status_kb(pid, "VmRSS") / 1024
            reset_peak_rss(pid)
            started = time.monotonic()
            outcomes = SCENARIOS[name](node.port, args)
            time.sleep(1.0)  # let the node finish aborting and freeing
            peak = proc_status_kb(pid, "VmHWM") / 1024
            after = proc_status_kb(pid, "VmRSS") / 1024
            seconds = time.monotonic() - started
            shown = "; ".join(str(o) for o in outcomes)
            print(f"{name:<10} {before:>6.0f} {peak:>6.0f} {after:>6.0f} {seconds:>6.1f}  {shown}")
            sys.stdout.flush()
    finally:
        node.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
