"""The Orthanc test peer itself: C-STORE in, QIDO-RS out, storage kept across a restart."""

from __future__ import annotations

import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from tests.dicomgen import mr_dataset
from tests.orthanc import Orthanc, orthanc  # noqa: F401 (the fixture)

pytestmark = pytest.mark.integration


def test_store_find_and_restart(orthanc: Orthanc) -> None:  # noqa: F811
    study, series = generate_uid(), generate_uid()
    ds = mr_dataset(study, series, 0)

    ae = AE(ae_title="SARCNODE")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(ds).Status) == 0
    finally:
        assoc.release()

    assert orthanc.instance_count() == 1
    assert len(orthanc.instances()) == 1
    found = orthanc.series_of_study(study)
    assert found == [
        {
            "modality": "MR",
            "series_uid": series,
            "description": "AX T2 FS",
            "number": 3,
            "instances": 1,
        }
    ]
    assert orthanc.series_of_study(generate_uid()) == []
    # DicomWeb.Host is unset: BulkDataURIs follow the request's Host (what a
    # same-origin proxy in front of Orthanc relies on).
    metadata = orthanc.get(
        f"/dicom-web/studies/{study}/series/{series}/metadata", accept="application/dicom+json"
    )
    assert metadata[0]["7FE00010"]["BulkDataURI"].startswith(orthanc.http_url + "/dicom-web/")

    orthanc.stop()
    orthanc.start()
    assert orthanc.instance_count() == 1
    assert [s["series_uid"] for s in orthanc.series_of_study(study)] == [series]
