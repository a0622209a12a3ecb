"""The documented install runs jobs: wheel -> fresh venv outside the checkout -> a job.

The wheel is built from the checkout (no build isolation: the venv's
setuptools, no download) and installed with ``--no-deps`` into a new venv in
a temporary folder; that venv reaches the project's pinned dependencies
(torch included) through a ``.pth`` line naming this venv's site-packages,
so nothing is downloaded again. Everything then runs from outside the
checkout: ``config check`` on the shipped pipelines and models, ``sarcnode
synth study``, ``sarcnode serve`` on a free loopback port, dcmtk storescu,
and the job until it is done (segment, radiomics, score, encode).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port
from tests.peers import DCMTK_STORESCU, require

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 600


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def _modern_setuptools() -> bool:
    """Whether this venv's setuptools builds the project (PEP 639 license: 77 or newer)."""
    try:
        from importlib.metadata import version

        return int(version("setuptools").split(".")[0]) >= 77
    except (ImportError, ValueError, LookupError):
        return False


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """(bin folder, environment) of a fresh venv holding the built wheel."""
    base = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SARCNODE_", "PYTHON"))}
    env["PIP_NO_INDEX"] = "1"  # --no-deps and a local wheel: nothing to fetch
    wheels = base / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels)]
    if _modern_setuptools():  # else pip fetches one from the index into an isolated build
        build.append("--no-build-isolation")
    else:
        env.pop("PIP_NO_INDEX")
    _run([*build, str(REPO)], cwd=base, env=env)
    env["PIP_NO_INDEX"] = "1"
    (wheel,) = wheels.glob("sarcnode-*.whl")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base, env=env)
    py = venv / "bin" / "python"
    purelib = Path(
        subprocess.check_output(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    # The project's pinned dependencies (torch, ...) from this venv, after the new one's own.
    ours = [p for p in site.getsitepackages() if p == sysconfig.get_path("purelib")]
    (purelib / "_sarcnode_deps.pth").write_text("\n".join(ours) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(py)]
    _run(
        [*pip, "install", "-q", "--no-deps", str(wheel)],
        cwd=base,
        env=env,
    )
    yield venv / "bin", env
    shutil.rmtree(base, ignore_errors=True)


def test_the_wheel_carries_config_and_models_and_runs_a_job_outside_the_checkout(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    bindir, env = installed
    storescu = require(DCMTK_STORESCU, "dcmtk storescu")
    work = tmp_path / "site"  # outside the checkout: nothing relative to it resolves
    work.mkdir()
    sarcnode = str(bindir / "sarcnode")
    where = _run(
        [
            str(bindir / "python"),
            "-c",
            "import node, pipelines.share as s; print(node.__file__); print(s.share_root())",
        ],
        cwd=work,
        env=env,
    ).split()
    assert not where[0].startswith(str(REPO)), where
    assert where[1].endswith("sarcnode_data"), where

    port = free_port()
    config = work / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dicom": {"port": port, "allowed_calling_aes": ["SCANNER1", "SARCNODE-CLI"]},
                "storage": {"root": str(work / "var"), "min_free_mb": 50},
                "scheduler": {"series_stable_seconds": 1, "tick_seconds": 0.5},
                "jobs": {"device": "cpu"},
            }
        )
    )
    check = _run([sarcnode, "config", "check", "--config", str(config)], cwd=work, env=env)
    assert "pipeline sarcoma-mr" in check and "checksums OK" in check, check

    study = work / "study"
    _run([sarcnode, "synth", "study", str(study), "--seed", "3"], cwd=work, env=env)
    log = (work / "serve.log").open("wb")
    serve = subprocess.Popen(
        [sarcnode, "serve", "--config", str(config)],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        heartbeat = work / "var" / "run" / "serve.json"
        deadline = time.monotonic() + 60
        while not heartbeat.exists():
            assert serve.poll() is None, (work / "serve.log").read_text()
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.2)
        _run(
            [
                storescu,
                "+sd",
                "+r",
                "-aet",
                "SCANNER1",
                "-aec",
                "SARCNODE",
                "127.0.0.1",
                str(port),
                str(study / "dicom"),
            ],
            cwd=work,
            env=env,
        )
        deadline = time.monotonic() + JOB_TIMEOUT_S
        jobs: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            out = _run([sarcnode, "jobs", "--json", "--config", str(config)], cwd=work, env=env)
            jobs = json.loads(out)
            if jobs and all(j["state"] in {"done", "failed", "dead"} for j in jobs):
                break
            time.sleep(2)
        log_text = (work / "serve.log").read_text(errors="replace")
        assert jobs and jobs[0]["state"] == "done", f"{jobs}\n{log_text[-4000:]}"
        assert "no pipeline files" not in log_text
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        log.close()
