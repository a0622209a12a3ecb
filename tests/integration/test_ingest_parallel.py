"""Eight dcmtk storescu associations at once against a real ``sarcnode serve``.

Instances arriving together share group commits (node/store/group.py): what
must hold is what a sender relies on, every instance it was told Success for
is indexed exactly once, its file is on disk, and it has exactly one
``instance.stored`` audit event in an unbroken chain. Ten instances are sent
by all eight associations at the same time, so the same SOP Instance UID
races itself across groups: stored once, the seven others counted as
duplicates.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.audit.trail import record, verify
from node.db.models import AuditEvent
from node.db.session import Database
from node.store.group import GroupCommitter
from tests.conftest import NodeProcess
from tests.dicomgen import mr_dataset

pytestmark = pytest.mark.integration

ASSOCIATIONS = 8
PER_ASSOCIATION = 100
SHARED = 10


def write_series(folder: Path, study: str, count: int, sent: set[str]) -> list[Path]:
    """``count`` 64x64 MR instances of one new series in ``folder``; UIDs added to ``sent``."""
    folder.mkdir(parents=True)
    series = generate_uid()
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}.dcm"
        ds = mr_dataset(study, series, i, size=64)
        ds.save_as(path, enforce_file_format=True)
        sent.add(str(ds.SOPInstanceUID))
        paths.append(path)
    return paths


def test_eight_parallel_associations_index_every_acknowledged_instance_once(
    node: NodeProcess, tmp_path: Path
) -> None:
    study, sent = generate_uid(), set[str]()
    own = [
        write_series(tmp_path / "send" / f"a{k}", study, PER_ASSOCIATION, sent)
        for k in range(ASSOCIATIONS)
    ]
    shared = write_series(tmp_path / "send" / "shared", study, SHARED, sent)
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [*node.storescu_cmd("-v", calling=f"SCANNER{k}"), *map(str, shared + files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k, files in enumerate(own)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    elapsed = time.monotonic() - started
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-2000:]
        # storescu -v prints one line per response; every one must be Success.
        acks = re.findall(r"Received Store Response \((\w+)", out)
        assert acks == ["Success"] * (SHARED + PER_ASSOCIATION), out[-2000:]

    distinct = ASSOCIATIONS * PER_ASSOCIATION + SHARED
    storage = node.root / "storage"
    with sqlite3.connect(f"file:{storage / 'sarcnode.db'}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT sop_instance_uid, path, duplicate_count FROM instances"
        ).fetchall()
        stored_events = db.execute(
            "SELECT sop_instance_uid, COUNT(*) FROM audit_events "
            "WHERE action = 'instance.stored' GROUP BY sop_instance_uid"
        ).fetchall()
        duplicate_events = db.execute(
            "SELECT COUNT(*) FROM audit_events WHERE action = 'instance.duplicate'"
        ).fetchone()[0]
        series_counts = sorted(
            n for (n,) in db.execute("SELECT instance_count FROM series").fetchall()
        )
        stored_by_assoc = sum(
            n for (n,) in db.execute("SELECT instances_stored FROM associations").fetchall()
        )
    uids = [r[0] for r in rows]
    assert len(uids) == distinct and set(uids) == sent
    assert all((storage / r[1]).is_file() for r in rows)
    assert sum(1 for p in (storage / "dicom").rglob("*.dcm")) == distinct
    assert not list((storage / "tmp").glob("*.part"))
    assert {uid for uid, _ in stored_events} == set(uids)
    assert all(n == 1 for _, n in stored_events)
    # The shared ten were sent eight times each: stored once, seven duplicates each.
    assert duplicate_events == SHARED * (ASSOCIATIONS - 1)
    assert sum(r[2] for r in rows) == SHARED * (ASSOCIATIONS - 1)
    assert series_counts == [SHARED] + [PER_ASSOCIATION] * ASSOCIATIONS
    assert stored_by_assoc == distinct
    assert node.cli("audit", "verify").returncode == 0
    print(f"{ASSOCIATIONS} associations x {SHARED + PER_ASSOCIATION}: {elapsed:.1f} s")


def test_a_refused_instance_in_a_group_leaves_its_neighbours_committed(tmp_path: Path) -> None:
    """One group of three, the middle one failing: the other two commit, its file goes."""
    db = Database(f"sqlite:///{tmp_path / 'index.db'}")
    root = tmp_path / "root"
    root.mkdir()  # the folder its (pretend) files are placed in, fsynced per group
    removed: list[Path] = []
    committer: GroupCommitter[str] = GroupCommitter(db, root, removed.append)
    release = threading.Event()

    def work(name: str, fail: bool = False, hold: bool = False) -> Any:
        def run(s: Session, placed: list[Path]) -> str:
            if hold:  # the first group's leader waits until the others queued behind it
                release.wait(10)
            record(s, f"test.{name}", actor="node")
            placed.append(Path(f"{name}.dcm"))
            if fail:
                raise ValueError(f"{name} refused")
            return name

        return run

    results: dict[str, str | BaseException] = {}

    def call(name: str, **kw: bool) -> None:
        try:
            results[name] = committer.run(work(name, **kw))
        except ValueError as exc:
            results[name] = exc

    first = threading.Thread(target=call, args=("a",), kwargs={"hold": True})
    first.start()
    while not committer._busy:
        time.sleep(0.001)
    others = [threading.Thread(target=call, args=(n,), kwargs={"fail": n == "c"}) for n in "bcd"]
    for t in others:
        t.start()
    while len(committer._queue) < 3:
        time.sleep(0.001)
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert results["a"] == "a" and results["b"] == "b" and results["d"] == "d"
    assert isinstance(results["c"], ValueError)
    assert removed == [Path("c.dcm")]
    assert (committer.groups, committer.items) == (2, 4)
    with db.session() as s:
        actions = s.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)).all()
        assert actions == ["test.a", "test.b", "test.d"]
        assert verify(s).ok
