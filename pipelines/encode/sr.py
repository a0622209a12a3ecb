"""TID 1500 Measurement Report (Comprehensive 3D SR) of the tumour and its scores.

Designed to open in OHIF as well as to be correct DICOM: OHIF 3.12/3.13
crash on a report that holds a volumetric group (TID 1411) at all
(``Cannot read properties of undefined (reading 'ReferencedSOPSequence')``,
see ``../shared/notes/real-systems.md``) but draw planar groups. So the
report has planar groups (TID 1410) only, all on the tumour's outline as a
closed SCOORD POLYLINE on the key slice (the slice with the largest tumour
area):

- the tumour's group ("Tumour"): volume (ml), longest axial diameter (mm),
  area on the key slice (mm2), mean and SD of the source intensities, the
  segmentation's quality estimate (the agreement score as a NUM and whether
  a person should review the mask as a coded qualitative evaluation), and
  "not for clinical use" when a model is not;
- one group per signature card that scored the study ("Tumour: <card>
  <version>"), its measurements made by that card (its algorithm
  identification), in this order because OHIF draws only a group's first
  five NUMs: the rad-score, the predictions (survival probabilities at the
  card's time points, or the probability of a logistic endpoint), the
  training cohort size, the card's feature values; and, as coded
  qualitative evaluations, the risk group, the applicability verdict, the
  training cohort's kind (real or synthetic) and the clinical use. Outside
  the model's range the risk group and the predictions are left out (they
  would be extrapolations) and a NUM right after the rad-score says by how
  much the study lies outside (widths of the training range), so OHIF,
  which shows NUMs, shows it too. (OHIF anchors every group's text box at
  the right edge of its outline: on one outline the boxes overlap, the
  active group drawn on top.)

Every NUM carries an algorithm identification (OHIF throws on a NUM without
a ContentSequence). Free text stays out of the groups (OHIF is not known to
tolerate a TEXT item in one): a root "Qualitative Evaluations" container
(TID 1500 row 12, which OHIF does not read) holds, per card, scored or
skipped, the lines the PDF and ``jobs show`` print: which feature or score
lies outside the range and by how much, the nested-CV headline, why a card
was skipped. The observer is the node as a device.
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
from pipelines.scoring.text import score_lines, survival_probabilities

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
# Applicability domain (pipelines.scoring.domain) and the training cohort.
APPLICABILITY = local("applicability", "Applicability (training range of the model)")
VERDICTS = {
    "inside": local("inrange", "Within the model's range"),
    "outside": local("outsiderange", "Outside the model's range: no risk group given"),
    "unknown": local("domainunknown", "Applicability domain unknown"),
}
OUTSIDE_BY = local("outsideby", "OUTSIDE the model's range by (widths of training range)")
TRAINING_COHORT = local("trainingcohort", "Training cohort")
COHORTS = {
    "real": local("realcohort", "Real patients"),
    "synthetic": local("syntheticcohort", "SYNTHETIC patients (plumbing demo)"),
    "unknown": local("unknowncohort", "Patients of unstated origin"),
}
TRAINING_SIZE = local("trainingsize", "Training cohort size")
PATIENTS = hd.sr.CodedConcept("{patients}", "UCUM", "patients")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
SIGNATURE_NOTE = local("signaturenote", "Radiomics signature")


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


def scores_key(scores: Sequence[Mapping[str, Any]]) -> str:
    """What of the scores changes the objects' UIDs: each scored card, version and model."""
    return "".join(
        f"/{s['signature']}:{s.get('version')}:{s.get('model', '')}"
        for s in scores
        if "skipped" not in s
    )


def _region(outline_xy: np.ndarray, key: Dataset) -> hd.sr.ImageRegion:
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline_xy,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=key.SOPClassUID,
            referenced_sop_instance_uid=key.SOPInstanceUID,
        ),
    )


def _signature_group(
    score: Mapping[str, Any],
    region: hd.sr.ImageRegion,
    tracking_uid: str,
    not_for_clinical_use: bool,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """One card's measurements and evaluations of the tumour (see the module docstring)."""
    signature = hd.sr.AlgorithmIdentification(
        name=str(score["signature"]), version=str(score.get("version") or "1")
    )
    # OHIF draws the first five NUMs of a group beside its outline: the rad-score, then
    # how far outside the range or the predictions, then the cohort size, then the inputs.
    measurements = [_measurement(RADSCORE, score["radscore"], NO_UNITS, signature)]
    verdict = score.get("applicability") or {"status": "unknown", "outside": []}
    if verdict["status"] == "outside":
        fractions = [e["by_fraction"] for e in verdict["outside"] if e["by_fraction"] is not None]
        if fractions:
            measurements.append(_measurement(OUTSIDE_BY, max(fractions), NO_UNITS, signature))
    else:  # inside (or unknown): the predictions are the model's to give
        endpoint = str(score["endpoint"])
        for days, p in survival_probabilities(score):
            concept = local(
                f"{endpoint}{int(float(days))}d",
                f"Predicted {endpoint.upper()} probability at {days} days",
            )
            measurements.append(_measurement(concept, 100.0 * p, PERCENT, signature))
        if "probability" in score:
            concept = local(f"p-{endpoint}", f"Predicted probability of {endpoint}")
            measurements.append(
                _measurement(concept, 100.0 * float(score["probability"]), PERCENT, signature)
            )
    n_train = (score.get("training_cohort") or {}).get("n")
    if n_train:
        measurements.append(_measurement(TRAINING_SIZE, n_train, PATIENTS, signature))
    measurements += [
        _measurement(local(name, name), value, NO_UNITS, signature)
        for name, value in sorted((score.get("features") or {}).items())
    ]
    evaluations = []
    if score.get("risk_group") is not None:
        risk = str(score["risk_group"])
        evaluations.append(
            hd.sr.QualitativeEvaluation(RISK_GROUP, local(risk, f"{risk.capitalize()} risk"))
        )
    evaluations.append(hd.sr.QualitativeEvaluation(APPLICABILITY, VERDICTS[verdict["status"]]))
    source = (score.get("training_cohort") or {}).get("source") or "unknown"
    evaluations.append(hd.sr.QualitativeEvaluation(TRAINING_COHORT, COHORTS[source]))
    if not_for_clinical_use or "not for clinical use" in str(score.get("clinical_use", "")):
        evaluations.append(hd.sr.QualitativeEvaluation(CLINICAL_USE, NOT_FOR_CLINICAL_USE))
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=f"Tumour: {score['signature']} {score.get('version', '')}"
        ),
        referenced_region=region,
        finding_type=codes.SCT.Neoplasm,
        algorithm_id=signature,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def _notes(scores: Sequence[Mapping[str, Any]]) -> hd.sr.ContainerContentItem:
    """TID 1500's root Qualitative Evaluations: per card, the lines people read (TEXT)."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=SIGNATURE_NOTE,
                value="\n".join(line.strip() for line in score_lines(score)),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for score in scores
        ]
    )
    return container


def encode_sr(
    sources: Sequence[Dataset],
    image: sitk.Image,
    tumour: sitk.Image,
    *,
    segmentation_model: Algorithm,
    job_key: str,
    scores: Sequence[Mapping[str, Any]] = (),
    not_for_clinical_use: bool = True,
    series_number: int = 9102,
    uid_root: str | None = None,
    previous: Dataset | None = None,
    quality: Mapping[str, Any] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The report for the tumour on ``sources`` (the series ``tumour`` and ``image`` live on).

    ``scores`` are :func:`pipelines.scoring.score` results (one group each)
    and skip records (``skipped``: only a note). Without scores the report
    holds the tumour measurements only. ``quality`` is the segmentation's
    quality estimate (:meth:`pipelines.segment.quality.Quality.as_dict`):
    its score (when the model has one) and its review flag join the
    tumour's group. A report made with other inputs (a radiomics-only score
    now re-scored with the nomogram) gets new UIDs and names ``previous`` as
    its predecessor document.
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
    if not_for_clinical_use:
        evaluations.append(hd.sr.QualitativeEvaluation(CLINICAL_USE, NOT_FOR_CLINICAL_USE))
    version_key = segmentation_model.version + scores_key(scores)
    xy = outline(mask[k])
    groups = [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid(
                    "track",
                    source_series,
                    segmentation_model.version,
                    job_key,
                    "tumour",
                    root=uid_root,
                ),
                identifier="Tumour",
            ),
            referenced_region=_region(xy, key),
            finding_type=codes.SCT.Neoplasm,
            algorithm_id=seg_algorithm,
            measurements=measurements,
            qualitative_evaluations=evaluations or None,
        )
    ]
    for score in scores:
        if "skipped" in score:
            continue
        tracking = derived_uid(
            "track",
            source_series,
            segmentation_model.version,
            job_key,
            "tumour",
            f"{score['signature']}:{score.get('version')}",
            root=uid_root,
        )
        groups.append(_signature_group(score, _region(xy, key), tracking, not_for_clinical_use))
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
        imaging_measurements=groups,
    )
    if scores:
        report[0].ContentSequence.append(_notes(scores))
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
