"""One accepted instance with an unconvertible header value must not stop job scheduling.

Found by the fuzz suite: (0018,0020) ScanningSequence re-typed FL with a
2-byte value is stored (the store checks structure, not every VR's length),
and pydicom raises ``BytesLengthException`` when the scheduler reads the
series' attributes for the pipeline rules. That used to end every tick, so
no study of the last 7 days got a job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from node.jobs import Scheduler

MR = UID("1.2.840.10008.5.1.4.1.1.4")


def _poisoned(path: Path) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MR
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = MR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.ScanningSequence = "EP"
    ds.SeriesDescription = "AX T1"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    good = b"\x18\x00\x20\x00CS\x02\x00EP"
    assert good in raw
    path.write_bytes(raw.replace(good, b"\x18\x00\x20\x00FL\x02\x00EP"))


def test_an_unconvertible_header_falls_back_to_the_modality(tmp_path: Path) -> None:
    _poisoned(tmp_path / "1.dcm")
    ds = pydicom.dcmread(tmp_path / "1.dcm", stop_before_pixels=True)
    try:  # the premise: pydicom cannot give this value
        _ = ds.ScanningSequence
        raised = False
    except Exception:
        raised = True
    assert raised
    scheduler = Scheduler(db=Any, settings=Any, pipelines=[])  # type: ignore[arg-type]
    attributes = scheduler._attributes(tmp_path, "1.2.3", "1.dcm", "MR")
    assert attributes == {"Modality": "MR"}
    # cached: the series is not read again on the next tick
    (tmp_path / "1.dcm").unlink()
    assert scheduler._attributes(tmp_path, "1.2.3", "1.dcm", "MR") == {"Modality": "MR"}
