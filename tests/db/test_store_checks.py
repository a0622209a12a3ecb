"""What enters a study: SOP class and context, series ownership, duplicates with other
content, and database failures, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom.dsutils import create_file_meta
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from node.db.models import Association, AuditEvent, Instance, Series, Study, utcnow
from node.db.session import Database
from node.dicom.status import (
    DataSetMismatch,
    DuplicateRefused,
    OutOfResources,
    SeriesConflict,
    ServiceError,
    SOPClassNotSupported,
)
from node.store import ingest
from node.store.files import InstanceFiles
from node.store.ingest import Ingestor, IngestPolicy, Peer, StoreOutcome
from node.store.spool import Spool
from tests.dicomgen import mr_dataset
from tests.unit.test_reader import encode

PEER = Peer(None, "TESTSCU", "127.0.0.1")


@pytest.fixture
def ingestor(db_url: str, tmp_path: Path) -> Ingestor:
    db = Database(db_url)
    yield Ingestor(db, InstanceFiles(tmp_path / "store", fsync=False), min_free_mb=1)
    db.dispose()


def send(
    ing: Ingestor, ds: Dataset, *, context: str | None = MRImageStorage, peer: Peer = PEER
) -> StoreOutcome:
    return ing.store(
        command_sop_class_uid=str(ds.SOPClassUID),
        command_sop_instance_uid=str(ds.SOPInstanceUID),
        file_meta=ds.file_meta,
        dataset=encode(ds),
        peer=peer,
        context_sop_class_uid=context,
    )


def events(ing: Ingestor, action: str) -> list[AuditEvent]:
    with ing.db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def files_under(ing: Ingestor) -> list[Path]:
    return sorted(p for p in ing.files.dicom_dir.rglob("*") if p.is_file())


def test_a_ct_object_is_refused_by_class_and_by_context(ingestor: Ingestor) -> None:
    ct = mr_dataset(generate_uid(), generate_uid(), 0)
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    with pytest.raises(SOPClassNotSupported, match="CT Image Storage is not in") as info:
        send(ingestor, ct, context=CTImageStorage)
    assert info.value.status == 0x0122
    # An MR command on a CT context (a context the node would only accept if configured).
    ingestor.policy = IngestPolicy(storage_sop_classes=frozenset({MRImageStorage, CTImageStorage}))
    with pytest.raises(SOPClassNotSupported, match="sent on a MR Image Storage presentation"):
        send(ingestor, ct, context=MRImageStorage)
    mr = mr_dataset(generate_uid(), generate_uid(), 0)
    with pytest.raises(DataSetMismatch, match="SOPClassUID differs"):
        ingestor.store(  # command says MR, the data set is CT
            command_sop_class_uid=MRImageStorage,
            command_sop_instance_uid=str(ct.SOPInstanceUID),
            file_meta=mr.file_meta,
            dataset=encode(ct),
            peer=PEER,
            context_sop_class_uid=MRImageStorage,
        )
    assert files_under(ingestor) == []


def test_a_series_known_under_another_study_is_refused_and_nothing_is_filed(
    ingestor: Ingestor,
) -> None:
    series = generate_uid()
    first_study, other_study = generate_uid(), generate_uid()
    send(ingestor, mr_dataset(first_study, series, 0))
    with pytest.raises(SeriesConflict, match="another study") as info:
        send(ingestor, mr_dataset(other_study, series, 1))
    assert info.value.status == 0xC000
    assert info.value.detail == {
        "series_instance_uid": series,
        "study_instance_uid": other_study,
        "filed_under_study": first_study,
    }
    with ingestor.db.session() as s:
        assert list(s.scalars(select(Study.study_instance_uid))) == [first_study]
        assert s.scalars(select(Series.instance_count)).one() == 1
    assert [p.parent.parent.name for p in files_under(ingestor)] == [first_study]


def test_same_content_again_is_a_duplicate_other_content_a_warned_conflict(
    ingestor: Ingestor,
) -> None:
    ds = mr_dataset(generate_uid(), generate_uid(), 0)
    assert send(ingestor, ds) is StoreOutcome.STORED
    [stored] = files_under(ingestor)
    first_bytes = stored.read_bytes()
    assert send(ingestor, ds) is StoreOutcome.DUPLICATE
    ds.SeriesDescription = "AX T2 FS (edited)"
    assert send(ingestor, ds) is StoreOutcome.CONFLICT
    assert stored.read_bytes() == first_bytes  # the first copy is kept
    [conflict] = events(ingestor, "instance.duplicate_conflict")
    detail = json.loads(conflict.detail)
    with ingestor.db.session() as s:
        row = s.scalars(select(Instance)).one()
    assert detail["stored_sha256"] == row.sha256
    assert detail["received_sha256"] != row.sha256 and len(detail["received_sha256"]) == 64
    assert (detail["policy"], detail["status"], conflict.outcome) == ("warn", "0xB006", "warning")
    assert conflict.sop_instance_uid == ds.SOPInstanceUID


def test_refuse_policy_answers_0111_and_still_audits_both_hashes(ingestor: Ingestor) -> None:
    ingestor.policy = IngestPolicy(duplicate_conflict="refuse")
    ds = mr_dataset(generate_uid(), generate_uid(), 0)
    send(ingestor, ds)
    ds.InstanceNumber = 99
    with pytest.raises(DuplicateRefused) as info:
        send(ingestor, ds)
    assert info.value.status == 0x0111
    [conflict] = events(ingestor, "instance.duplicate_conflict")
    assert json.loads(conflict.detail)["received_sha256"] == info.value.detail["received_sha256"]
    assert conflict.outcome == "refused"


def test_conflict_is_counted_on_the_association(ingestor: Ingestor) -> None:
    with ingestor.db.session() as s:
        row = Association(
            calling_ae="SCU",
            called_ae="SARCNODE",
            peer_ip="127.0.0.1",
            peer_port=1,
            state="open",
            started_at=utcnow(),
            instances_stored=0,
            duplicates=0,
            failures=0,
        )
        s.add(row)
        s.flush()
        peer = Peer(row.id, "SCU", "127.0.0.1")
    ds = mr_dataset(generate_uid(), generate_uid(), 0)
    send(ingestor, ds, peer=peer)
    ds.InstanceNumber = 7
    send(ingestor, ds, peer=peer)
    with ingestor.db.session() as s:
        assoc = s.get(Association, peer.association_id)
        assert assoc is not None and (assoc.instances_stored, assoc.duplicates) == (1, 1)


def test_database_that_cannot_be_written_answers_a700_and_leaves_no_file(
    ingestor: Ingestor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*_a: object, **_k: object) -> None:
        raise OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(ingest, "index_instance", full)  # after the file was placed
    with pytest.raises(OutOfResources, match="database or disk is full") as info:
        send(ingestor, mr_dataset(generate_uid(), generate_uid(), 0))
    assert info.value.status == 0xA700
    assert files_under(ingestor) == []
    assert not list(ingestor.files.tmp_dir.iterdir())


def test_unwritable_storage_answers_a700(
    ingestor: Ingestor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def read_only(*_a: object, **_k: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "open", read_only)
    with pytest.raises(OutOfResources, match="Read-only file system"):
        send(ingestor, mr_dataset(generate_uid(), generate_uid(), 0))


@pytest.mark.parametrize(
    ("mutate", "status"),
    [
        (lambda ds: setattr(ds, "PixelData", ds.PixelData[:100]), 0xA900),
        (lambda ds: delattr(ds, "PixelData"), 0xC000),
        (lambda ds: delattr(ds, "StudyInstanceUID"), 0xC000),
    ],
    ids=["short-pixels", "header-only", "no-study-uid"],
)
def test_inconsistent_instances_are_refused_and_nothing_is_written(
    ingestor: Ingestor, mutate: object, status: int
) -> None:
    ds = mr_dataset(generate_uid(), generate_uid(), 0)
    mutate(ds)  # type: ignore[operator]
    with pytest.raises(ServiceError) as info:
        send(ingestor, ds)
    assert info.value.status == status
    assert files_under(ingestor) == []
    with ingestor.db.session() as s:
        assert s.scalars(select(Study)).all() == []


def spooled(ing: Ingestor, ds: Dataset, *, fragment: int = 1000) -> Spool:
    """``ds`` received into a spool as the SCP receives it: in fragments, as they come."""
    spool = ing.open_spool(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian)
    raw = encode(ds)
    for start in range(0, len(raw), fragment):
        spool.write(raw[start : start + fragment])
    return spool


def send_spool(ing: Ingestor, ds: Dataset, spool: Spool) -> StoreOutcome:
    return ing.store(
        command_sop_class_uid=str(ds.SOPClassUID),
        command_sop_instance_uid=str(ds.SOPInstanceUID),
        file_meta=ds.file_meta,
        dataset=spool,
        peer=PEER,
        context_sop_class_uid=MRImageStorage,
    )


def test_a_spooled_data_set_is_placed_as_the_file_the_bytes_would_make(
    ingestor: Ingestor,
) -> None:
    ds = mr_dataset(generate_uid(), generate_uid(), 0)
    spool = spooled(ingestor, ds)
    assert send_spool(ingestor, ds, spool) is StoreOutcome.STORED
    [placed] = files_under(ingestor)
    # What the SCP wrote for bytes: pynetdicom's Event.file_meta, then the data set as sent.
    meta = create_file_meta(
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax=ExplicitVRLittleEndian,
    )
    assert placed.read_bytes() == ingest.encode_meta(meta) + encode(ds)
    assert pydicom.dcmread(placed).PixelData == ds.PixelData
    assert not list(ingestor.files.tmp_dir.iterdir())  # renamed, not copied
    # Received again: the same content, a duplicate (not a conflict).
    assert send_spool(ingestor, ds, spooled(ingestor, ds, fragment=333)) is StoreOutcome.DUPLICATE
    assert not list(ingestor.files.tmp_dir.iterdir())


def test_a_spooled_data_set_that_is_refused_leaves_nothing(ingestor: Ingestor) -> None:
    ds = mr_dataset(generate_uid(), generate_uid(), 0)
    ds.PixelData = ds.PixelData[:100]
    spool = spooled(ingestor, ds)
    with pytest.raises(DataSetMismatch):
        send_spool(ingestor, ds, spool)
    spool.discard()  # what the SCP does after every request
    assert files_under(ingestor) == [] and not list(ingestor.files.tmp_dir.iterdir())


def test_a_spool_under_the_disk_floor_keeps_nothing_and_answers_a700(
    db_url: str, tmp_path: Path
) -> None:
    db = Database(db_url)
    try:
        ing = Ingestor(db, InstanceFiles(tmp_path / "store", fsync=False), min_free_mb=10**9)
        ds = mr_dataset(generate_uid(), generate_uid(), 0)
        spool = spooled(ing, ds)
        assert not list(ing.files.tmp_dir.iterdir())  # nothing was written
        assert spool.received == len(encode(ds))
        with pytest.raises(OutOfResources, match="floor") as info:
            send_spool(ing, ds, spool)
        assert info.value.status == 0xA700
    finally:
        db.dispose()


def test_a_file_that_cannot_be_fsynced_is_not_indexed_and_answers_a700(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's fsync runs with its folder's before the commit: a failure keeps the row out."""
    from node.store import files as files_module

    db = Database(db_url)
    ing = Ingestor(db, InstanceFiles(tmp_path / "store"), min_free_mb=1)
    try:
        send(ing, mr_dataset(generate_uid(), generate_uid(), 0))  # fsync works: stored

        def eio(path: Path) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(files_module, "fsync_file", eio)
        with pytest.raises(OutOfResources, match="Input/output error") as info:
            send(ing, mr_dataset(generate_uid(), generate_uid(), 0))
        assert info.value.status == 0xA700
        with db.session() as s:
            assert len(s.scalars(select(Instance)).all()) == 1
        assert len(files_under(ing)) == 1  # the second file was removed again
        assert len(events(ing, "instance.stored")) == 1
    finally:
        db.dispose()
