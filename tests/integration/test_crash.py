"""``kill -9`` of ``serve`` mid-transfer loses nothing that was answered Success."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.conftest import NodeProcess
from tests.dicomgen import write_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_SENT = 400
KILL_AFTER = 40


def test_every_success_survives_kill_9_mid_transfer(node_factory, tmp_path: Path) -> None:
    datasets = write_series(tmp_path / "study", N_SENT, size=128)
    uid_of = {
        tmp_path / "study" / f"{i:04d}.dcm": ds.SOPInstanceUID for i, ds in enumerate(datasets)
    }
    node: NodeProcess = node_factory()
    node.start()

    cmd = [*node.storescu_cmd("-v"), *map(str, sorted(uid_of))]
    if shutil.which("stdbuf"):  # line-buffered, so we see each response as it arrives
        cmd = ["stdbuf", "-oL", "-eL", *cmd]
    sender = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert sender.stdout is not None
    acknowledged: list[str] = []
    current: Path | None = None
    killed = False
    for line in sender.stdout:
        if line.startswith("I: Sending file: "):
            current = Path(line.removeprefix("I: Sending file: ").strip())
        elif "Received Store Response (Success)" in line:
            assert current is not None
            acknowledged.append(uid_of[current])
            if len(acknowledged) == KILL_AFTER and not killed:
                node.kill9()
                killed = True
    sender.wait(60)
    assert killed, "transfer finished before the kill"
    assert sender.returncode != 0, "the sender should have seen the node die"
    assert KILL_AFTER <= len(acknowledged) < N_SENT

    node.start()  # same config, same storage and database
    stored = {i["sop_instance_uid"]: i for i in node.json("instances")}
    storage = Path(node.settings["storage"]["root"])
    missing = [uid for uid in acknowledged if uid not in stored]
    assert not missing, f"{len(missing)} acknowledged instances were lost"
    for uid in acknowledged:
        on_disk = pydicom.dcmread(storage / stored[uid]["path"])
        assert on_disk.SOPInstanceUID == uid
        assert len(on_disk.PixelData) == 128 * 128 * 2
    assert not list((storage / "tmp").glob("*.part")), "partial files left after restart"
    assert node.cli("audit", "verify").returncode == 0
    started = node.json("audit", "--action", "node.started")
    assert len(started) == 2
