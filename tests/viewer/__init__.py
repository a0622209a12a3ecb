"""OHIF viewer harness: what a radiologist would see of our SEG and SR in a real viewer.

The viewer is the product's (:mod:`node.viewer`, ``sarcnode viewer``): the
``ohif_viewer`` fixture serves it in-process in front of the ``orthanc``
fixture, ``viewer_command`` runs the console script as a user would.
``drive.mjs`` drives it in headless Chromium (playwright-core) and reports
what the segmentation and measurement services list and what is on screen;
``run_viewer`` runs ``drive.mjs`` and returns its JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from node.viewer import MissingDistError, ViewerServer, fetch_ohif, find_dist
from tests.conftest import SARCNODE
from tests.peers import require

HERE = Path(__file__).resolve().parent
DRIVE = HERE / "drive.mjs"
CHROMIUM = "/usr/bin/chromium"


def ohif_dist() -> Path:
    """The OHIF build ``sarcnode viewer`` serves (``make viewer`` fetches it; so does this,
    once, when npm is there); skip or fail (CI) without Chromium, Node.js or the build."""
    require(CHROMIUM, "Chromium (Debian chromium)")
    require("node", "Node.js (Debian nodejs)")
    try:
        return find_dist()
    except MissingDistError:
        require("npm", "npm (to fetch @ohif/app once: make viewer)")
        return fetch_ohif()


@pytest.fixture
def ohif_viewer(orthanc: Any) -> Iterator[ViewerServer]:
    """The product viewer in front of the ``orthanc`` fixture (import both into the module)."""
    with ViewerServer(ohif_dist(), orthanc.http_url) as server:
        yield server


@dataclass
class ViewerCommand:
    """A running ``sarcnode viewer``: its origin and the addresses it printed per study."""

    url: str
    study_urls: list[str]
    proc: subprocess.Popen[str]


@contextmanager
def viewer_command(pacs_url: str, studies: list[str]) -> Iterator[ViewerCommand]:
    """Run ``sarcnode viewer --pacs URL --port 0 --study ...`` until the block ends."""
    ohif_dist()
    args = [SARCNODE, "viewer", "--pacs", pacs_url, "--port", "0"]
    for uid in studies:
        args += ["--study", uid]
    env = {k: v for k, v in os.environ.items() if k != "SARCNODE_VIEWER_PACS"}
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        printed = [proc.stdout.readline() for _ in range(1 + len(studies))]
        if proc.poll() is not None or not printed[0].startswith("OHIF "):
            raise RuntimeError(
                f"sarcnode viewer: {printed} {proc.stderr.read() if proc.stderr else ''}"
            )
        url = printed[0].split(" on ", 1)[1].split()[0].rstrip("/")
        yield ViewerCommand(url, [line.split()[1] for line in printed[1:]], proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


def ensure_node_modules() -> None:
    """``npm ci`` in tests/viewer when playwright-core is not installed there yet."""
    if (HERE / "node_modules" / "playwright-core" / "package.json").is_file():
        return
    npm = require("npm", "npm (Debian npm)")
    proc = subprocess.run(
        [shutil.which(npm) or npm, "ci", "--no-audit", "--no-fund"],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"npm ci in {HERE} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )


def run_viewer(
    base_url: str,
    study: str,
    seg_series: str | None,
    sr_series: str | None,
    out_dir: Path,
    *,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Open ``study`` in OHIF at ``base_url`` and return what drive.mjs found.

    ``seg_series`` / ``sr_series`` (either may be None) are loaded one after
    the other, each as ``initialSeriesInstanceUID``. Screenshots (seg.png,
    sr.png, and one per failed attempt) and the findings (seen.json) go to
    ``out_dir``. Raises RuntimeError when the harness itself fails (not when
    the viewer shows nothing: the returned dict says what it showed).
    """
    node = require("node", "Node.js (Debian nodejs)")
    require(CHROMIUM, "Chromium (Debian chromium)")
    ensure_node_modules()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = {
        "base_url": base_url,
        "study": study,
        "seg_series": seg_series,
        "sr_series": sr_series,
        "out_dir": str(out_dir),
        # drive.mjs stops itself a little before we would kill it
        "timeout_s": max(10.0, timeout - 15.0),
    }
    try:
        proc = subprocess.run(
            [shutil.which(node) or node, str(DRIVE), json.dumps(args)],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else ""
        raise RuntimeError(f"drive.mjs ran past {timeout} s:\n{stderr[-3000:]}") from err
    (out_dir / "drive.log").write_text(proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"drive.mjs exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    (out_dir / "seen.json").write_text(json.dumps(result, indent=1))  # for a failure's story
    return result
