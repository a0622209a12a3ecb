"""OHIF viewer harness: what a radiologist would see of our SEG and SR in a real viewer.

``ohif.py`` serves the prebuilt OHIF app in front of a test Orthanc;
``drive.mjs`` drives it in headless Chromium (playwright-core) and reports
what the segmentation and measurement services list and what is on screen.
``run_viewer`` runs ``drive.mjs`` and returns its JSON.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.peers import require

HERE = Path(__file__).resolve().parent
DRIVE = HERE / "drive.mjs"
CHROMIUM = "/usr/bin/chromium"


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
    sr.png, and one per failed attempt) go to ``out_dir``. Raises
    RuntimeError when the harness itself fails (not when the viewer shows
    nothing: the returned dict says what it showed).
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
    return result
