"""Indexing: stored, duplicate, series stability and re-open, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from node.db.models import AuditEvent, Instance, Series
from node.db.session import Database
from node.dicom.status import CannotUnderstand, DataSetMismatch, OutOfResources
from node.store.files import InstanceFiles
from node.store.ingest import Ingestor, Peer, StoreOutcome, mark_stable_series
from tests.dicomgen import mr_dataset

PEER = Peer(None, "TESTSCU", "127.0.0.1")


@pytest.fixture
def ingestor(db_url: str, tmp_path: Path) -> Ingestor:
    db = Database(db_url)
    yield Ingestor(db, InstanceFiles(tmp_path / "store"), min_free_mb=1)
    db.dispose()


def send(ing: Ingestor, ds, *, sop_uid: str | None = None) -> StoreOutcome:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False  # Explicit VR LE, as in file_meta
    write_dataset(buf, ds)
    return ing.store(
        command_sop_class_uid=str(ds.SOPClassUID),
        command_sop_instance_uid=sop_uid or str(ds.SOPInstanceUID),
        file_meta=ds.file_meta,
        dataset=buf.getvalue(),
        peer=PEER,
    )


def actions(ing: Ingestor) -> list[str]:
    with ing.db.session() as s:
        return list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)))


def test_store_then_duplicate_is_idempotent_and_counted(ingestor: Ingestor) -> None:
    study, series = generate_uid(), generate_uid()
    ds = mr_dataset(study, series, 0)
    assert send(ingestor, ds) is StoreOutcome.STORED
    assert send(ingestor, ds) is StoreOutcome.DUPLICATE
    with ingestor.db.session() as s:
        inst = s.scalars(select(Instance)).one()
        se = s.scalars(select(Series)).one()
        assert (inst.duplicate_count, se.instance_count, se.duplicate_count) == (1, 1, 1)
    assert (ingestor.files.root / inst.path).is_file()
    assert actions(ingestor) == ["instance.stored", "instance.duplicate"]


def test_series_becomes_stable_and_a_late_instance_reopens_it(ingestor: Ingestor) -> None:
    study, series = generate_uid(), generate_uid()
    for i in range(3):
        send(ingestor, mr_dataset(study, series, i))
    assert mark_stable_series(ingestor.db, stable_seconds=30) == []
    time.sleep(0.3)
    assert mark_stable_series(ingestor.db, stable_seconds=0.2) == [series]
    send(ingestor, mr_dataset(study, series, 3))  # late instance
    with ingestor.db.session() as s:
        se = s.scalars(select(Series)).one()
        assert (se.state, se.instance_count, se.reopened_count) == ("receiving", 4, 1)
    assert "series.reopened" in actions(ingestor)
    time.sleep(0.3)
    assert mark_stable_series(ingestor.db, stable_seconds=0.2) == [series]


def test_path_traversal_uid_writes_nothing(ingestor: Ingestor, tmp_path: Path) -> None:
    ds = mr_dataset(generate_uid(), "1.2/../../../escape", 0)
    with pytest.raises(CannotUnderstand, match="SeriesInstanceUID"):
        send(ingestor, ds)
    assert not list(tmp_path.rglob("*escape*"))
    assert not list((ingestor.files.root / "dicom").rglob("*.dcm"))


def test_command_and_dataset_uid_mismatch_is_refused(ingestor: Ingestor) -> None:
    ds = mr_dataset(generate_uid(), generate_uid(), 0)
    with pytest.raises(DataSetMismatch):
        send(ingestor, ds, sop_uid=generate_uid())


def test_disk_floor_refuses_with_out_of_resources(ingestor: Ingestor) -> None:
    ingestor.min_free_mb = 10**12
    with pytest.raises(OutOfResources) as info:
        send(ingestor, mr_dataset(generate_uid(), generate_uid(), 0))
    assert info.value.status == 0xA700


@pytest.mark.parametrize("junk", [b"", b"not DICOM at all " * 64, bytes(range(256)) * 8])
def test_non_dicom_bytes_cannot_be_understood(junk: bytes) -> None:
    from pydicom.uid import ExplicitVRLittleEndian

    from node.store.reader import read_dataset

    with pytest.raises(CannotUnderstand):
        read_dataset(junk, ExplicitVRLittleEndian)
