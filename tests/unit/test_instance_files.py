"""The folders fsynced before a placed instance's row commits: each one given a new entry, once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from node.dicom.status import OutOfResources
from node.store import files as files_module
from node.store.files import InstanceFiles


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The folders fsynced, in order (still really fsynced)."""
    calls: list[Path] = []
    real = files_module.fsync_dir

    def spy(path: Path) -> None:
        calls.append(path)
        real(path)

    monkeypatch.setattr(files_module, "fsync_dir", spy)
    return calls


@pytest.fixture
def synced_files(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files fsynced (still really fsynced)."""
    calls: list[Path] = []
    real = files_module.fsync_file

    def spy(path: Path) -> None:
        calls.append(path)
        real(path)

    monkeypatch.setattr(files_module, "fsync_file", spy)
    return calls


def place(files: InstanceFiles, study: str, series: str, sop: str) -> Path:
    rel = files.relative_path(study, series, sop)
    files.place(files.stage([b"DICM", sop.encode()], sync=False), rel, sync_folder=False)
    return rel


def test_placed_files_and_their_folders_are_fsynced_before_the_commit(
    tmp_path: Path, synced: list[Path], synced_files: list[Path]
) -> None:
    files = InstanceFiles(tmp_path / "store")
    rels = [place(files, "1.2", "1.2.3", f"1.2.3.{i}") for i in range(1, 6)]
    assert synced_files == []  # staged without an fsync: it comes once placed
    files.sync_placed(rels)
    assert sorted(synced_files) == sorted(files.root / rel for rel in rels)
    assert synced == [files.dicom_dir, files.dicom_dir / "1.2", files.dicom_dir / "1.2" / "1.2.3"]


def test_new_folders_make_their_parents_synced_once_then_only_the_series_folder(
    tmp_path: Path, synced: list[Path]
) -> None:
    files = InstanceFiles(tmp_path / "store")
    first = place(files, "1.2", "1.2.3", "1.2.3.1")
    files.sync_folders()
    dicom = files.dicom_dir
    study_dir, series_dir = dicom / "1.2", dicom / "1.2" / "1.2.3"
    # dicom/ got the new study folder, the study folder the new series folder,
    # the series folder the file.
    assert synced == [dicom, study_dir, series_dir]
    assert (files.root / first).read_bytes() == b"DICM1.2.3.1"

    synced.clear()
    place(files, "1.2", "1.2.3", "1.2.3.2")
    place(files, "1.2", "1.2.3", "1.2.3.3")
    place(files, "1.2", "1.2.4", "1.2.4.1")  # a new series in the same study
    files.sync_folders()
    assert synced == [study_dir, series_dir, study_dir / "1.2.4"]

    synced.clear()
    files.sync_folders()  # nothing placed since: nothing to sync
    assert synced == []


def test_a_placed_file_syncs_its_folder_at_once_by_default(
    tmp_path: Path, synced: list[Path]
) -> None:
    files = InstanceFiles(tmp_path / "store")
    files.place(files.stage([b"x"]), files.relative_path("1.2", "1.2.3", "1.2.3.1"))
    assert synced == [files.dicom_dir, files.dicom_dir / "1.2", files.dicom_dir / "1.2" / "1.2.3"]


def test_a_failed_folder_sync_is_retried_by_the_next(
    tmp_path: Path, synced: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    files = InstanceFiles(tmp_path / "store")
    place(files, "1.2", "1.2.3", "1.2.3.1")
    spy = files_module.fsync_dir

    def eio(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files_module, "fsync_dir", eio)
    with pytest.raises(OutOfResources, match="Input/output error"):
        files.sync_folders()
    monkeypatch.setattr(files_module, "fsync_dir", spy)
    files.sync_folders()
    assert synced == [files.dicom_dir, files.dicom_dir / "1.2", files.dicom_dir / "1.2" / "1.2.3"]


def test_a_forked_child_syncs_on_threads_of_its_own(tmp_path: Path) -> None:
    """The parent's fsync threads do not exist in a fork: the child must not wait on them."""
    import os

    files = InstanceFiles(tmp_path / "store")
    files.sync_placed([place(files, "1.2", "1.2.3", "1.2.3.1")])  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only when its sync completed
        code = 1
        try:
            files.sync_placed([place(files, "1.2", "1.2.3", "1.2.3.2")])
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the child's sync never finished (it waited on the parent's threads)")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
