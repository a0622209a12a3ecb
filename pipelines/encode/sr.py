"""TID 1500 Measurement Report (Comprehensive 3D SR) of the tumour and its scores.

Designed to open in OHIF as well as to be correct DICOM: OHIF 3.12/3.13
crash on a report that holds a volumetric group (TID 1411) at all
(``Cannot read properties of undefined (reading 'ReferencedSOPSequence')``,
see ``../shared/notes/real-systems.md``) but draw planar groups. So the report
has ONE planar group (TID 1410): the tumour's outline as a closed SCOORD
POLYLINE on the key slice (the slice with the largest tumour area), and all
measurements of that tumour in it: volume (ml), longest axial diameter (mm),
area on the key slice (mm2), mean and SD of the source intensities, the
signature's feature values, the rad-score, predicted PFS probabilities at
the card's time points, and the risk group as a coded qualitative
evaluation. The observer is the node as a device; the segmentation model
and signature appear as algorithm identifications. When either model is not
for clinical use, a coded qualitative evaluation says so. The segmentation's
quality estimate goes in the same group: the agreement score as a NUM (with
the segmentation model's algorithm identification, like every NUM here:
OHIF throws on a NUM without a ContentSequence) and whether a person should
review the mask as a coded qualitative evaluation. Its reasons, free text,
stay out of the SR (OHIF is not known to tolerate a TEXT item in a group):
the PDF and ``jobs show`` give them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import contourpy
import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy.spatial import ConvexHull
from scipy.spatial.distance import pdist

from pipelines.encode.seg import (
    DEVICE_SERIAL,
    MANUFACTURER,
    SARCNODE_SCHEME,
    Algorithm,
    EncodeError,
    declare_local_scheme,
    mask_array,
)
from pipelines.encode.uids import derived_uid

ML = hd.sr.CodedConcept("mL", "UCUM", "milliliter")  # OHIF prints the code as the unit
MM = codes.UCUM.Millimeter
MM2 = codes.UCUM.SquareMillimeter
PERCENT = codes.UCUM.Percent
NO_UNITS = codes.UCUM.NoUnits


def local(code: str, meaning: str) -> hd.sr.CodedConcept:
    """A concept of the node's own coding scheme (codes longer than 16 go to LongCodeValue)."""
    return hd.sr.CodedConcept(code, SARCNODE_SCHEME, meaning[:64])


RADSCORE = local("radscore", "Radiomics score (rad-score)")
RISK_GROUP = local("riskgroup", "Radiomics risk group")
CLINICAL_USE = local("clinicaluse", "Clinical use")
NOT_FOR_CLINICAL_USE = local("notclinical", "NOT FOR CLINICAL USE (research model)")
# Segmentation quality (pipelines.segment.quality). Local codes, like the risk
# group: the DCM quality concepts (Quality Assessment, Quality Finding, Quality
# Issue, Image Quality Rating, ...) rate an image or an acquisition, and none
# says "trust in this automatic segmentation" or "a person should review it".
SEG_AGREEMENT = local("segagreement", "Segmentation quality (agreement of ensemble views)")
SEG_REVIEW = local("segreview", "Segmentation review")
REVIEW_RECOMMENDED = local("reviewneeded", "Review recommended before trusting the numbers")
NO_REVIEW_NEEDED = local("noreviewneeded", "No review needed")


def key_slice(mask: np.ndarray) -> int:
    """Index of the slice (frames, rows, cols) with the largest tumour area."""
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    if not areas.any():
        raise EncodeError("the tumour mask is empty: nothing to report")
    return int(np.argmax(areas))


def outline(slice_mask: np.ndarray, max_points: int = 200) -> np.ndarray:
    """The longest closed outline of a 2D mask as (column, row) pixel coordinates, closed.

    Pixel coordinates follow DICOM SCOORD: (0, 0) is the top-left corner of
    the top-left pixel, so a pixel centre is (column + 0.5, row + 0.5).
    """
    padded = np.pad(slice_mask.astype(float), 1)
    lines = contourpy.contour_generator(z=padded).lines(0.5)
    line = max((np.asarray(a) for a in lines), key=lambda a: int(a.shape[0]))
    xy = np.asarray(line, dtype=float) - 1.0 + 0.5  # undo the padding; to pixel-corner origin
    if len(xy) > max_points:
        xy = xy[np.linspace(0, len(xy) - 1, max_points).astype(int)]
    if not np.allclose(xy[0], xy[-1]):
        xy = np.vstack([xy, xy[:1]])
    return xy.astype(np.float32)


def longest_axial_diameter_mm(mask: np.ndarray, spacing: tuple[float, float]) -> float:
    """Largest in-plane distance between two tumour pixels over all slices (mm).

    ``spacing`` is (column, row) spacing. Pixel corners are used (a one-pixel
    tumour is one pixel across), via each slice's convex hull.
    """
    best = 0.0
    for frame in mask:
        rows, cols = np.nonzero(frame)
        if rows.size == 0:
            continue
        corners = np.concatenate(
            [np.column_stack([cols + dx, rows + dy]) for dx in (0, 1) for dy in (0, 1)]
        ).astype(float) * np.array(spacing)
        points = corners[ConvexHull(corners).vertices]  # pixel squares: never degenerate
        best = max(best, float(pdist(points).max()))
    return best


def tumour_measurements(image: sitk.Image, mask: np.ndarray) -> dict[str, float]:
    """Volume, longest axial diameter, key-slice area, mean and SD of the source intensities."""
    sx, sy, sz = image.GetSpacing()
    values = sitk.GetArrayViewFromImage(image)[mask > 0]
    k = key_slice(mask)
    return {
        "volume_ml": float(mask.sum() * sx * sy * sz / 1000.0),
        "longest_axial_diameter_mm": longest_axial_diameter_mm(mask, (sx, sy)),
        "key_slice_area_mm2": float(mask[k].sum() * sx * sy),
        "mean_intensity": float(values.mean()),
        "sd_intensity": float(values.std()),
    }


def _measurement(
    name: hd.sr.CodedConcept, value: float, unit: Any, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=unit, algorithm_id=algorithm)


def encode_sr(
    sources: Sequence[Dataset],
    image: sitk.Image,
    tumour: sitk.Image,
    *,
    segmentation_model: Algorithm,
    job_key: str,
    score: Mapping[str, Any] | None = None,
    features: Mapping[str, float] | None = None,
    not_for_clinical_use: bool = True,
    series_number: int = 9102,
    uid_root: str | None = None,
    previous: Dataset | None = None,
    quality: Mapping[str, Any] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The report for the tumour on ``sources`` (the series ``tumour`` and ``image`` live on).

    ``score`` is :func:`pipelines.scoring.score`'s result (rad-score, risk
    group, PFS probabilities, signature id and version); ``features`` the
    signature's input values by card name. Without a score the report holds
    the tumour measurements only. ``quality`` is the segmentation's quality
    estimate (:meth:`pipelines.segment.quality.Quality.as_dict`): its score
    (when the model has one) and its review flag join the tumour's group.
    A report made with other inputs (a radiomics-only score now re-scored
    with the nomogram) gets new UIDs and names ``previous`` as its
    predecessor document.
    """
    mask = mask_array(tumour, sources)
    facts = tumour_measurements(image, mask)
    k = key_slice(mask)
    key = sources[k]
    source_series = str(sources[0].SeriesInstanceUID)
    seg_algorithm = hd.sr.AlgorithmIdentification(
        name=segmentation_model.name, version=segmentation_model.version
    )
    measurements = [
        _measurement(codes.SCT.Volume, facts["volume_ml"], ML, seg_algorithm),
        _measurement(codes.SCT.LongAxis, facts["longest_axial_diameter_mm"], MM, seg_algorithm),
        _measurement(codes.SCT.Area, facts["key_slice_area_mm2"], MM2, seg_algorithm),
        _measurement(codes.SCT.Mean, facts["mean_intensity"], NO_UNITS, seg_algorithm),
        _measurement(codes.SCT.StandardDeviation, facts["sd_intensity"], NO_UNITS, seg_algorithm),
    ]
    evaluations = []
    if quality is not None:
        if quality.get("score") is not None:
            measurements.append(
                _measurement(SEG_AGREEMENT, quality["score"], NO_UNITS, seg_algorithm)
            )
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                SEG_REVIEW, REVIEW_RECOMMENDED if quality.get("review") else NO_REVIEW_NEEDED
            )
        )
    version_key = segmentation_model.version
    if score is not None:
        signature = hd.sr.AlgorithmIdentification(
            name=str(score["signature"]), version=str(score.get("version") or "1")
        )
        version_key += f"/{score['signature']}:{score.get('version')}:{score.get('model', '')}"
        for name, value in sorted((features or {}).items()):
            measurements.append(_measurement(local(name, name), value, NO_UNITS, signature))
        measurements.append(_measurement(RADSCORE, score["radscore"], NO_UNITS, signature))
        for days, p in sorted(
            (score.get("pfs_probability") or {}).items(), key=lambda kv: float(kv[0])
        ):
            concept = local(f"pfs{int(float(days))}d", f"Predicted PFS probability at {days} days")
            measurements.append(_measurement(concept, 100.0 * float(p), PERCENT, signature))
        if "probability" in score:
            concept = local(
                f"p-{score['endpoint']}", f"Predicted probability of {score['endpoint']}"
            )
            measurements.append(
                _measurement(concept, 100.0 * float(score["probability"]), PERCENT, signature)
            )
        risk = str(score["risk_group"])
        evaluations.append(
            hd.sr.QualitativeEvaluation(RISK_GROUP, local(risk, f"{risk.capitalize()} risk"))
        )
    if not_for_clinical_use:
        evaluations.append(hd.sr.QualitativeEvaluation(CLINICAL_USE, NOT_FOR_CLINICAL_USE))
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline(mask[k]),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=key.SOPClassUID,
            referenced_sop_instance_uid=key.SOPInstanceUID,
        ),
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(
                "track", source_series, segmentation_model.version, job_key, "tumour", root=uid_root
            ),
            identifier="Tumour",
        ),
        referenced_region=region,
        finding_type=codes.SCT.Neoplasm,
        algorithm_id=seg_algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", DEVICE_SERIAL, root=uid_root),
            name="sarcnode",
            manufacturer_name=MANUFACTURER,
            model_name=segmentation_model.name,
            serial_number=DEVICE_SERIAL,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.MRIUnspecifiedBodyRegion,
        imaging_measurements=[group],
    )
    kind_of = "SR " + source_series
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(sources),
        content=report[0],
        series_instance_uid=derived_uid("series", kind_of, version_key, job_key, root=uid_root),
        series_number=series_number,
        sop_instance_uid=derived_uid("instance", kind_of, version_key, job_key, root=uid_root),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        previous_versions=[previous]
        if previous is not None
        and previous.SOPInstanceUID
        != derived_uid("instance", kind_of, version_key, job_key, root=uid_root)
        else None,
    )
    suffix = " NOT FOR CLINICAL USE" if not_for_clinical_use else ""
    sr.SeriesDescription = f"sarcnode tumour report{suffix}"[:64]
    declare_local_scheme(sr)
    return sr
