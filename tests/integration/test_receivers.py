"""``sarcnode serve`` with ``dicom.receivers: 2``: several SCP processes behind one port.

What a sender and an admin rely on: parallel associations are served by more
than one process, every instance answered Success is indexed once with one
audit event in an unbroken chain, the per-peer association limit counts over
all receivers, a receiver that dies is audited and replaced, and a ``kill -9``
of serve leaves no receiver behind holding the port.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from tests.conftest import NodeProcess
from tests.dicomgen import mr_dataset

pytestmark = pytest.mark.integration

RECEIVERS = {"receivers": 2, "shutdown_grace_s": 1}


def start_with_receivers(node: NodeProcess) -> list[int]:
    """Start serve and wait until both receivers accept; their pids."""
    node.start()
    return receivers_accepting(node, 2)


def receivers_accepting(node: NodeProcess, count: int, timeout: float = 60.0) -> list[int]:
    """The pids of the first ``count`` receivers that accepted (from the log), once there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = re.findall(r"receiver \d+ \(pid (\d+)\) accepting", node.log())
        if len(pids) >= count:
            return [int(p) for p in pids]
        time.sleep(0.2)
    raise AssertionError(f"receivers did not start:\n{node.log()[-3000:]}")


def gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (a zombie left to an init that does not reap counts)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def events(node: NodeProcess, action: str) -> list[dict[str, Any]]:
    """The audit events of ``action``, oldest first."""
    return node.json("audit", "--action", action)


def test_parallel_associations_spread_over_receivers_each_instance_indexed_once(
    node_factory: Any, tmp_path: Path
) -> None:
    node: NodeProcess = node_factory({"dicom": RECEIVERS})
    receiver_pids = start_with_receivers(node)
    study, sent = generate_uid(), set[str]()
    folders = []
    for k in range(4):
        folder, series = tmp_path / f"a{k}", generate_uid()
        folder.mkdir()
        for i in range(25):
            ds = mr_dataset(study, series, i, size=64)
            ds.save_as(folder / f"{i:03d}.dcm", enforce_file_format=True)
            sent.add(str(ds.SOPInstanceUID))
        folders.append(folder)
    procs = [
        subprocess.Popen(
            [*node.storescu_cmd("-v", calling=f"SCANNER{k}"), *map(str, sorted(f.iterdir()))],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k, f in enumerate(folders)
    ]
    for proc in procs:
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, out[-2000:]
        assert re.findall(r"Received Store Response \((\w+)", out) == ["Success"] * 25
    accepted = events(node, "association.accepted")
    served_by = {e["detail"]["pid"] for e in accepted}
    assert served_by == set(receiver_pids)  # both receivers, never serve itself
    assert node.proc is not None and node.proc.pid not in served_by
    db_path = node.root / "storage" / "sarcnode.db"
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        uids = [u for (u,) in db.execute("SELECT sop_instance_uid FROM instances")]
        stored = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT sop_instance_uid) FROM audit_events "
            "WHERE action = 'instance.stored'"
        ).fetchone()
    assert sorted(uids) == sorted(sent) and stored == (100, 100)
    assert node.cli("audit", "verify").returncode == 0
    port = node.settings["monitoring"]["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        health = json.load(r)
    assert health["checks"]["receivers"] == {
        "ok": True,
        "detail": "2 of 2 receiver processes alive",
    }
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert 'sarcnode_instances_received_total{outcome="stored"} 100.0' in metrics


def test_association_limit_per_peer_counts_over_all_receivers(node_factory: Any) -> None:
    node: NodeProcess = node_factory({"dicom": {**RECEIVERS, "max_associations_per_peer": 2}})
    start_with_receivers(node)
    greedy = AE(ae_title="GREEDY")
    greedy.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    held = [greedy.associate("127.0.0.1", node.port, ae_title=node.ae_title) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        # One on each receiver: a per-process count (1 each) would let a third in.
        assert len({e["detail"]["pid"] for e in events(node, "association.accepted")}) == 2
        extra = greedy.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert extra.is_rejected
    finally:
        for a in held:
            a.release()
    assert events(node, "association.rejected")[-1]["detail"]["reason"] == (
        "GREEDY from 127.0.0.1 already holds 2 associations (dicom.max_associations_per_peer)"
    )


def test_dead_receiver_is_replaced_and_kill9_of_serve_leaves_none(node_factory: Any) -> None:
    node: NodeProcess = node_factory({"dicom": RECEIVERS})
    first, second = start_with_receivers(node)
    os.kill(first, 9)
    third = receivers_accepting(node, 3)[2]
    died = events(node, "receiver.died")
    assert [(e["detail"]["pid"], e["detail"]["exitcode"]) for e in died] == [(first, -9)], died
    started = {e["detail"]["pid"] for e in events(node, "receiver.started")}
    assert started == {first, second, third}, node.log()[-3000:]
    node.kill9()
    deadline = time.monotonic() + 10
    while not (gone(second) and gone(third)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(second) and gone(third), Path(f"/proc/{second}/status").read_text()[:200]
    # What a restarted serve does first. Seen once under CI load: the port still held
    # just after the receivers were gone (by whom is unknown): allow a few seconds,
    # then name the holder.
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", node.port))
                s.listen(1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    holders = subprocess.run(
                        ["ss", "-ltnp", f"sport = :{node.port}"], capture_output=True, text=True
                    ).stdout
                    raise AssertionError(f"port {node.port} still held:\n{holders}") from None
        time.sleep(0.2)
