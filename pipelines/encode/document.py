"""The PDF report as a DICOM object: an Encapsulated PDF instance in the source study.

:func:`encode_pdf` wraps the document :func:`pipelines.encode.pdf.report_pdf`
typesets; its UIDs are derived like the SEG's and SR's, so a re-run gives
the PACS the same object again.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from pipelines.encode.seg import MANUFACTURER, SOFTWARE_VERSION, series_description
from pipelines.encode.uids import derived_uid

TITLE = "Tumour and radiomics report"
ENCAPSULATED_PDF = UID("1.2.840.10008.5.1.4.1.1.104.1")
_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "ReferringPhysicianName",
    "AccessionNumber",
)


def encode_pdf(
    sources: Sequence[Dataset],
    document: bytes,
    *,
    job_key: str,
    version_key: str,
    series_number: int = 9191,
    uid_root: str | None = None,
    title: str = TITLE,
    not_for_clinical_use: bool = True,
) -> FileDataset:
    """An Encapsulated PDF instance in the source study (UIDs derived like the SEG's and SR's)."""
    first = sources[0]
    kind_of = "PDF " + str(first.SeriesInstanceUID)
    sop_uid = derived_uid("instance", kind_of, version_key, job_key, root=uid_root)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 192")
    for keyword in _COPIED:
        setattr(ds, keyword, first.get(keyword))
    now = datetime.now()
    ds.SOPClassUID = ENCAPSULATED_PDF
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = derived_uid("series", kind_of, version_key, job_key, root=uid_root)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description(f"{title} (PDF)", not_for_clinical_use)
    ds.Manufacturer = MANUFACTURER
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"  # the PDF shows the patient's name, images and numbers
    ds.DocumentTitle = series_description(title, not_for_clinical_use)
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(document)
    ds.EncapsulatedDocument = document + (b"\0" if len(document) % 2 else b"")
    reference = Dataset()
    reference.ReferencedSOPClassUID = first.SOPClassUID
    reference.ReferencedSOPInstanceUID = first.SOPInstanceUID
    ds.SourceInstanceSequence = [reference]
    return ds
