"""Start-up reconciliation of the instance tree with the index, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import delete, select

from node.db.models import AuditEvent, Instance
from node.db.session import Database
from node.store.files import InstanceFiles
from node.store.ingest import Ingestor, Peer
from node.store.reconcile import reconcile
from tests.dicomgen import mr_dataset
from tests.unit.test_reader import encode

PEER = Peer(None, "TESTSCU", "127.0.0.1")


@pytest.fixture
def ingestor(db_url: str, tmp_path: Path) -> Ingestor:
    db = Database(db_url)
    yield Ingestor(db, InstanceFiles(tmp_path / "store", fsync=False), min_free_mb=1)
    db.dispose()


def store(ing: Ingestor, study: str, series: str, index: int) -> Path:
    ds = mr_dataset(study, series, index)
    ing.store(
        command_sop_class_uid=str(ds.SOPClassUID),
        command_sop_instance_uid=str(ds.SOPInstanceUID),
        file_meta=ds.file_meta,
        dataset=encode(ds),
        peer=PEER,
    )
    return Path("dicom") / study / series / f"{ds.SOPInstanceUID}.dcm"


def actions(ing: Ingestor, action: str) -> list[dict[str, object]]:
    with ing.db.session() as s:
        rows = s.scalars(select(AuditEvent.detail).where(AuditEvent.action == action))
        return [json.loads(d) for d in rows]


def test_a_file_never_indexed_is_removed_and_audited(ingestor: Ingestor) -> None:
    study, series = generate_uid(), generate_uid()
    kept = store(ingestor, study, series, 0)
    root = ingestor.files.root
    # What a kill between the rename and the commit leaves: a complete, unindexed file.
    orphan_study = generate_uid()
    orphan = Path("dicom") / orphan_study / generate_uid() / f"{generate_uid()}.dcm"
    (root / orphan).parent.mkdir(parents=True)
    shutil.copy(root / kept, root / orphan)
    stray = Path("dicom") / study / "not-a-uid.txt"
    (root / stray).write_text("left by someone")

    report = reconcile(ingestor)
    assert (report.files, sorted(report.removed)) == (
        3,
        sorted([orphan.as_posix(), stray.as_posix()]),
    )
    assert (root / kept).is_file()
    assert not (root / orphan).exists() and not (root / "dicom" / orphan_study).exists()
    removed = actions(ingestor, "storage.orphan_removed")
    assert {d["path"] for d in removed} == {orphan.as_posix(), stray.as_posix()}
    assert reconcile(ingestor).removed == []  # idempotent


def test_an_acknowledged_file_whose_row_was_lost_is_indexed_again(ingestor: Ingestor) -> None:
    study, series = generate_uid(), generate_uid()
    rel = store(ingestor, study, series, 0)
    with ingestor.db.session() as s:
        sha = s.scalars(select(Instance.sha256)).one()
        s.execute(delete(Instance))  # e.g. an index restored from an older backup
    report = reconcile(ingestor)
    assert (report.reindexed, report.removed) == ([rel.as_posix()], [])
    with ingestor.db.session() as s:
        row = s.scalars(select(Instance)).one()
    assert (row.path, row.sha256) == (rel.as_posix(), sha)
    assert actions(ingestor, "instance.reindexed")[0]["sha256"] == sha


def test_an_acknowledged_file_that_cannot_be_read_is_quarantined(ingestor: Ingestor) -> None:
    rel = store(ingestor, generate_uid(), generate_uid(), 0)
    root = ingestor.files.root
    with ingestor.db.session() as s:
        s.execute(delete(Instance))
    data = (root / rel).read_bytes()
    (root / rel).write_bytes(data[: len(data) - 1000])  # damaged on disk
    report = reconcile(ingestor)
    assert report.quarantined == [rel.as_posix()]
    assert (root / "quarantine" / rel).is_file() and not (root / rel).exists()
    [event] = actions(ingestor, "storage.orphan_quarantined")
    assert "truncated" in str(event["reason"])
