"""DICOM-SEG (BINARY) of the tumour and its regions, on the source series' own frames.

One SEG per segmented source series (FS-T2, and the mask carried to T1),
made with highdicom. What viewers need and what was seen to break OHIF:
every source frame has a SEG frame (``omit_empty_frames=False``), the
ReferencedSeriesSequence is present (highdicom writes it), and each segment
has a display colour (RecommendedDisplayCIELabValue). Segments are
AUTOMATIC with the segmentation model's id and version as the algorithm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipelines.encode.uids import derived_uid

MANUFACTURER = "sarcnode"
SOFTWARE_VERSION = "0.1.0"
DEVICE_SERIAL = "sarcnode-1"
SARCNODE_SCHEME = "99SARCNODE"  # local coding scheme for concepts without a standard code
WARNING = "NOT FOR CLINICAL USE"


def series_description(what: str, not_for_clinical_use: bool = True) -> str:
    """A result's SeriesDescription: what it holds first, then the warning (64 characters).

    Viewers list series by their first 25 characters or so: the kind of
    object comes first, the clinical-use warning last.
    """
    warning = f" {WARNING}" if not_for_clinical_use else ""
    return f"{what[: 64 - len(warning)]}{warning}"


@dataclass(frozen=True)
class SegmentKind:
    """How one region is described: label, property category/type, display colour (RGB)."""

    label: str
    category: hd.sr.CodedConcept
    type: hd.sr.CodedConcept
    rgb: tuple[int, int, int]


_ABNORMAL = hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
SEGMENT_KINDS: dict[str, SegmentKind] = {
    "tumour": SegmentKind(
        "Tumour", _ABNORMAL, hd.sr.CodedConcept("108369006", "SCT", "Neoplasm"), (255, 140, 0)
    ),
    "ring": SegmentKind(
        "Peritumoral ring 10 mm",
        hd.sr.CodedConcept("91723000", "SCT", "Anatomical structure"),
        hd.sr.CodedConcept("ring10", SARCNODE_SCHEME, "Peritumoral region, 10 mm"),
        (250, 200, 30),
    ),
    **{
        f"habitat{h}": SegmentKind(
            f"Habitat {h}",
            _ABNORMAL,
            hd.sr.CodedConcept(f"habitat{h}", SARCNODE_SCHEME, f"Tumour habitat {h} (K-means)"),
            rgb,
        )
        for h, rgb in ((1, (60, 120, 240)), (2, (60, 200, 90)), (3, (200, 80, 220)))
    },
}


@dataclass(frozen=True)
class Algorithm:
    """The model that made a result: its id and version, from its card."""

    name: str
    version: str

    def identification(self) -> hd.AlgorithmIdentificationSequence:
        """The SEG's AlgorithmIdentificationSequence (family: artificial intelligence)."""
        return hd.AlgorithmIdentificationSequence(
            name=self.name, version=self.version, family=codes.DCM.ArtificialIntelligence
        )


class EncodeError(ValueError):
    """The inputs cannot be encoded (mask and series disagree, unsupported source)."""


def _normal(ds: Dataset) -> np.ndarray:
    orientation = np.array(_plane(ds).ImageOrientationPatient, dtype=float)
    return np.cross(orientation[:3], orientation[3:])


def _plane(ds: Dataset) -> Dataset:
    """The dataset (or first frame's functional groups) holding orientation."""
    if "ImageOrientationPatient" in ds:
        return ds
    shared = ds.get("SharedFunctionalGroupsSequence")
    group: Dataset = (
        shared[0]
        if shared and "PlaneOrientationSequence" in shared[0]
        else ds.PerFrameFunctionalGroupsSequence[0]
    )
    plane: Dataset = group.PlaneOrientationSequence[0]
    return plane


# Patient/study attributes derived objects copy from their source, all type 2
# (present, possibly empty) in the SEG, SR and Encapsulated PDF IODs.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "ReferringPhysicianName",
    "AccessionNumber",
)


def source_datasets(files: Sequence[Path]) -> list[Dataset]:
    """The series' single-frame datasets, ordered along the slice normal (the volume's z order).

    This is the order :func:`pipelines.io.dicom.load_series` stacks slices in,
    so mask slice ``k`` belongs to dataset ``k``.
    """
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:
        for keyword in _TYPE2_COPIED:  # type 2 in the source may be absent; ours must exist
            if keyword not in ds:
                setattr(ds, keyword, None)
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise EncodeError("multi-frame (enhanced) source series are not encoded yet")
    normal = _normal(datasets[0])
    return sorted(datasets, key=lambda ds: float(np.dot(ds.ImagePositionPatient, normal)))


def mask_array(mask: sitk.Image, sources: Sequence[Dataset]) -> np.ndarray:
    """(frames, rows, columns) uint8 of ``mask``, checked against the source slices' geometry."""
    array = (sitk.GetArrayFromImage(mask) > 0).astype(np.uint8)
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if array.shape != (len(sources), rows, cols):
        raise EncodeError(
            f"mask {array.shape[::-1]} (x, y, z) does not match the series "
            f"({cols}, {rows}, {len(sources)})"
        )
    first = np.array(sources[0].ImagePositionPatient, dtype=float)
    if not np.allclose(first, mask.GetOrigin(), atol=0.01 * max(mask.GetSpacing())):
        raise EncodeError("mask origin is not the series' first slice: wrong series?")
    return array


def encode_seg(
    sources: Sequence[Dataset],
    regions: Mapping[str, sitk.Image],
    *,
    algorithm: Algorithm,
    job_key: str,
    series_number: int = 9101,
    instance_number: int = 1,
    uid_root: str | None = None,
) -> hd.seg.Segmentation:
    """A BINARY SEG of ``regions`` (name -> mask on the series grid, ``tumour`` first).

    UIDs derive from the source series, the algorithm version and ``job_key``.
    """
    if "tumour" not in regions:
        raise EncodeError("a SEG needs the tumour region")
    names = ["tumour", *[n for n in regions if n != "tumour"]]
    unknown = [n for n in names if n not in SEGMENT_KINDS]
    if unknown:
        raise EncodeError(f"no segment description for region(s) {', '.join(unknown)}")
    arrays = [mask_array(regions[n], sources) for n in names]
    stacked = np.stack(arrays, axis=-1)  # (frames, rows, cols, segments): regions may overlap
    source_series = str(sources[0].SeriesInstanceUID)
    descriptions = []
    for number, name in enumerate(names, start=1):
        kind = SEGMENT_KINDS[name]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=kind.label,
                segmented_property_category=kind.category,
                segmented_property_type=kind.type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm.identification(),
                tracking_uid=derived_uid(
                    "track", source_series, algorithm.version, job_key, name, root=uid_root
                ),
                tracking_id=f"{kind.label} ({algorithm.name})",
                display_color=hd.color.CIELabColor.from_rgb(*kind.rgb),
            )
        )
    kind_of = "SEG " + source_series
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=stacked,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(
            "series", kind_of, algorithm.version, job_key, root=uid_root
        ),
        series_number=series_number,
        sop_instance_uid=derived_uid(
            "instance", kind_of, algorithm.version, job_key, root=uid_root
        ),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.name,
        software_versions=f"sarcnode {SOFTWARE_VERSION}",
        device_serial_number=DEVICE_SERIAL,
        content_description="Tumour segmentation, NOT FOR CLINICAL USE",
        content_label="TUMOUR",
        omit_empty_frames=False,
    )
    source = str(sources[0].get("SeriesDescription") or "").strip()
    seg.SeriesDescription = series_description("Tumour SEG" + (f" on {source}" if source else ""))
    declare_local_scheme(seg)
    return seg


def declare_local_scheme(ds: Dataset) -> None:
    """Name the node's private coding scheme in CodingSchemeIdentificationSequence."""
    item = Dataset()
    item.CodingSchemeDesignator = SARCNODE_SCHEME
    item.CodingSchemeName = "sarcnode local concepts"
    item.CodingSchemeResponsibleOrganization = "sarcnode project"
    ds.CodingSchemeIdentificationSequence = [item]
