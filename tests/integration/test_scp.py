"""The Storage SCP with real dcmtk senders on loopback: what a PACS admin relies on."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from tests.conftest import NodeProcess, shared_data
from tests.dicomgen import mr_dataset

pytestmark = pytest.mark.integration

# dcmtk 3.6.7's storescu proposes only uncompressed syntaxes by default (and
# its -R does not add a file's compressed one): each group needs its option.
TS_GROUPS = {
    "": ["1.dcm", "2.dcm"],  # explicit / implicit LE
    "-xb": ["3.dcm"],  # explicit BE
    "-xr": ["4.dcm"],  # RLE
    "-xs": ["5.dcm", "6.dcm"],  # JPEG lossless SV1
    "-xt": ["7.dcm", "8.dcm"],  # JPEG-LS lossless
    "-xv": ["9.dcm"],  # JPEG 2000 lossless
}


def storescu(
    node: NodeProcess,
    *paths: Path | str,
    options: tuple[str, ...] = (),
    calling: str = "SCANNER1",
    called: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Send files with dcmtk's storescu and wait for it."""
    return subprocess.run(
        [*node.storescu_cmd(*options, calling=calling, called=called), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def pynet_store(
    node: NodeProcess,
    ds: pydicom.Dataset,
    wire_bytes: bytes | None = None,
    monkeypatch: pytest.MonkeyPatch | None = None,
) -> int:
    """C-STORE ``ds`` with pynetdicom as the SCU; return the response status.

    With ``wire_bytes`` the client sends those bytes as the data set instead of
    encoding ``ds`` (which only addresses the request), as a broken sender would.
    Only the test's client is patched; the node under test is a real process.
    """
    if wire_bytes is not None:
        assert monkeypatch is not None
        monkeypatch.setattr("pynetdicom.association.encode", lambda *_a, **_k: wire_bytes)
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()
        if monkeypatch is not None:
            monkeypatch.undo()


def encode(ds: pydicom.Dataset) -> bytes:
    """The dataset's bytes in Explicit VR Little Endian (what its meta header says)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def test_real_t1_series_and_nine_transfer_syntaxes_are_stored_and_listed(
    node: NodeProcess,
) -> None:
    t1 = shared_data("sts-raw", "STS_001", "MR_T1", "image")
    ts_dir = shared_data("dicom", "transfer-syntaxes", "files")
    proc = storescu(node, t1, options=("+sd",))
    assert proc.returncode == 0, proc.stderr
    for option, names in TS_GROUPS.items():
        proc = storescu(node, *(ts_dir / n for n in names), options=(option,) if option else ())
        assert proc.returncode == 0, f"{option}: {proc.stderr}"

    series = {s["series_instance_uid"]: s for s in node.json("series")}
    t1_uid = pydicom.dcmread(next(t1.iterdir()), stop_before_pixels=True).SeriesInstanceUID
    ts_uid = pydicom.dcmread(ts_dir / "1.dcm", stop_before_pixels=True).SeriesInstanceUID
    assert series[t1_uid]["instances"] == 40
    assert series[t1_uid]["series_description"] == "AXIAL SE T1 - RESEARCH"
    assert series[ts_uid]["instances"] == 9
    studies = {s["study_instance_uid"]: s for s in node.json("studies")}
    t1_study = pydicom.dcmread(next(t1.iterdir()), stop_before_pixels=True).StudyInstanceUID
    assert (studies[t1_study]["series"], studies[t1_study]["instances"]) == (1, 40)
    assert sum(s["instances"] for s in studies.values()) == 49

    # Stored as received: each file keeps its own transfer syntax, pixels intact.
    stored = {i["sop_instance_uid"]: i for i in node.json("instances", "--series", ts_uid)}
    storage = Path(node.settings["storage"]["root"])
    for name in (n for names in TS_GROUPS.values() for n in names):
        original = pydicom.dcmread(ts_dir / name)
        row = stored[original.SOPInstanceUID]
        assert row["transfer_syntax_uid"] == original.file_meta.TransferSyntaxUID
        copy = pydicom.dcmread(storage / row["path"])
        assert copy.PixelData == original.PixelData
    reference = pydicom.dcmread(ts_dir / "1.dcm").pixel_array
    jp2 = pydicom.dcmread(
        storage / stored[pydicom.dcmread(ts_dir / "9.dcm").SOPInstanceUID]["path"]
    )
    assert (jp2.pixel_array == reference).all()  # compressed data decodes after storage

    # No patient name or ID in the service's log lines.
    first = pydicom.dcmread(next(t1.iterdir()), stop_before_pixels=True)
    log = node.log()
    assert "association" in log
    for value in (str(first.PatientName), str(first.PatientID)):
        if value:
            assert value not in log


def test_calling_ae_not_on_allow_list_is_refused_and_audited(node_factory) -> None:
    node = node_factory(
        {"dicom": {"allowed_calling_aes": ["SCANNER1"], "accept_any_calling_ae": False}}
    )
    node.start()
    t1 = shared_data("sts-raw", "STS_001", "MR_T1", "image", "1-01.dcm")
    refused = storescu(node, t1, calling="INTRUDER")
    assert refused.returncode != 0
    assert "Rejected" in refused.stdout + refused.stderr
    wrong_called = storescu(node, t1, calling="SCANNER1", called="OTHERNODE")
    assert wrong_called.returncode != 0
    assert storescu(node, t1, calling="SCANNER1").returncode == 0

    events = node.json("audit", "--action", "association.rejected")
    reasons = {(e["actor"], e["detail"]["reason"]) for e in events}
    assert ("ae:INTRUDER", "calling AE 'INTRUDER' is not in dicom.allowed_calling_aes") in reasons
    assert any("called AE 'OTHERNODE'" in r for _a, r in reasons)
    assert [s["instances"] for s in node.json("series")] == [1]
    rejected = [a for a in node.json("associations") if a["state"] == "rejected"]
    assert {a["calling_ae"] for a in rejected} == {"INTRUDER", "SCANNER1"}


def test_peer_ip_allow_list_refuses_other_addresses(node_factory) -> None:
    import time

    node = node_factory({"dicom": {"allowed_peers": ["10.99.0.0/16"]}})
    node.start()
    t1 = shared_data("sts-raw", "STS_001", "MR_T1", "image", "1-01.dcm")
    assert storescu(node, t1).returncode != 0
    # Refused at TCP accept, before any DICOM: audited by the guard's reaper.
    deadline = time.monotonic() + 5
    while not (events := node.json("audit", "--action", "connection.refused")):
        assert time.monotonic() < deadline, "refused connection not audited"
        time.sleep(0.2)
    assert "127.0.0.1 is not in dicom.allowed_peers" in events[-1]["detail"]["reason"]
    assert not node.json("audit", "--action", "association.rejected")


def test_traversal_uid_and_non_dicom_bytes_get_failure_and_write_nothing_outside(
    node: NodeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    evil = mr_dataset(generate_uid(), generate_uid(), 0, sop_uid="1.2/../../x")
    assert pynet_store(node, evil) == 0xC000
    addressed = mr_dataset(generate_uid(), generate_uid(), 0)
    junk = b"this is not a DICOM data set, just bytes " * 64
    assert pynet_store(node, addressed, junk, monkeypatch) == 0xC000
    # Nothing named after the evil UID anywhere under the node's folder or its parents' tree.
    assert not [p for p in node.root.parent.rglob("*") if p.name.startswith("x.dcm")]
    assert node.json("instances") == []
    refused = node.json("audit", "--action", "instance.refused")
    assert len(refused) == 2
    assert all(e["outcome"] == "failed" for e in refused)
    assert any("SOPInstanceUID" in e["detail"]["reason"] for e in refused)
    # A good instance on the same node still works afterwards.
    good = mr_dataset(generate_uid(), generate_uid(), 0)
    assert pynet_store(node, good) == 0x0000


def test_disk_floor_refuses_with_a700(node_factory) -> None:
    node = node_factory({"storage": {"min_free_mb": 10**9}})
    node.start()
    ds = mr_dataset(generate_uid(), generate_uid(), 0)
    assert pynet_store(node, ds) == 0xA700
    event = node.json("audit", "--action", "instance.refused")[-1]
    assert event["detail"]["status"] == "0xA700"
    assert "floor" in event["detail"]["reason"]


def test_duplicates_are_idempotent_and_counted(node: NodeProcess) -> None:
    t1 = shared_data("sts-raw", "STS_001", "MR_T1", "image")
    files = sorted(t1.iterdir())[:5]
    assert storescu(node, *files).returncode == 0
    assert storescu(node, *files).returncode == 0
    [series] = node.json("series")
    assert (series["instances"], series["duplicates"]) == (5, 5)
    assert len(node.json("instances")) == 5


def test_late_instance_reopens_a_stable_series(node: NodeProcess) -> None:
    import time

    t1 = shared_data("sts-raw", "STS_001", "MR_T1", "image")
    files = sorted(t1.iterdir())
    assert storescu(node, *files[:10]).returncode == 0
    deadline = time.monotonic() + 20
    while node.json("series")[0]["state"] != "stable":
        assert time.monotonic() < deadline, "series never became stable"
        time.sleep(0.3)
    assert storescu(node, files[10]).returncode == 0
    [series] = node.json("series")
    assert (series["state"], series["instances"], series["reopened"]) == ("receiving", 11, 1)
    assert node.json("audit", "--action", "series.reopened")


def test_association_limit_rejects_the_extra_one_and_audits_it(node_factory) -> None:
    node = node_factory({"dicom": {"max_associations": 2}})
    node.start()
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    held = [ae.associate("127.0.0.1", node.port, ae_title=node.ae_title) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        extra = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert extra.is_rejected
    finally:
        for a in held:
            a.release()
    event = node.json("audit", "--action", "association.rejected")[-1]
    assert "maximum associations (2)" in event["detail"]["reason"]
