"""TID 1500 Measurement Report (Comprehensive 3D SR) of the tumour and its scores.

Correct DICOM that OHIF 3.12 shows in full. What OHIF does with a report
(read in its 3.12.10 build, ``extensions/cornerstone-dicom-sr``, and seen in
the browser, ``tests/integration/test_viewer.py``): it reads only the
Imaging Measurements container; every group there must have a SCOORD on an
image (a volumetric group, TID 1411, or one without geometry, TID 1501,
throws ``reading 'ReferencedSOPSequence'`` and blacks out the viewport); a
planar group is drawn on its image with a text box of its first five NUMs,
each as ``<concept meaning>: <value to 2 decimals> <unit code>``, anchored
at the right edge of the outline; qualitative evaluations (CODE) and TEXT
items are not shown. Groups on one image are all drawn at once, so groups
that share an outline overlap and cannot be read. Hence:

- the tumour's planar group ("Tumour", TID 1410), its outline a closed
  SCOORD POLYLINE on the key slice (largest tumour area), the only group on
  that slice. Its NUMs come in the order OHIF draws them: the volume (ml);
  when the mask is flagged for review, the ensemble agreement under a
  concept that says so; one headline per scored card
  (:func:`pipelines.scoring.text.headline`: ``lungmets-t1 1.0.0 AUC 0.55,
  OUTSIDE range (NOT FOR CLINICAL USE)``, value the rad-score, made by the
  card: its algorithm identification); then, past what OHIF draws, the
  longest axial diameter, the key-slice area, mean and SD of the source
  intensities (UCUM ``[arb'U]``: MR signal has no physical unit) and an
  unflagged agreement. Coded evaluations: the review flag and "not for
  clinical use". The numbers are the whole tumour's (the outline marks
  where it is largest).
- one planar group per card that scored ("Tumour: <card> <version>"), on
  the tumour's outline on the next-largest cross-sections
  (:func:`card_slices`), so OHIF's measurement navigation shows each on its
  own: the rad-score, by how much the study lies outside the training range
  (widths of the range) or the predictions (survival at the card's time
  points, or the probability of a logistic endpoint, in %), the training
  cohort size, the card's feature values; coded: the risk group (absent
  outside the range), the applicability verdict, the training cohort (real
  or synthetic), the clinical use. Every NUM names its algorithm.

A root "Qualitative Evaluations" container (TID 1500 row 12) holds, per
card, scored or skipped, the lines the PDF and ``jobs show`` print. The
observer is the node as a device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import contourpy
import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy.spatial import ConvexHull
from scipy.spatial.distance import pdist

from pipelines.compare import Comparison
from pipelines.encode.seg import (
    DEVICE_SERIAL,
    MANUFACTURER,
    SARCNODE_SCHEME,
    Algorithm,
    EncodeError,
    declare_local_scheme,
    mask_array,
    series_description,
)
from pipelines.encode.uids import derived_uid
from pipelines.scoring.text import headline, score_lines, survival_probabilities

# OHIF prints a unit's code value after the number, so the codes are chosen to read well.
ML = hd.sr.CodedConcept("mL", "UCUM", "milliliter")
MM = codes.UCUM.Millimeter
MM2 = codes.UCUM.SquareMillimeter
PERCENT = codes.UCUM.Percent
NO_UNITS = codes.UCUM.NoUnits
# MR signal intensity has no physical unit: UCUM's arbitrary unit, not "1".
ARBITRARY_UNIT = hd.sr.CodedConcept("[arb'U]", "UCUM", "arbitrary unit")
# Dimensionless scores with a UCUM annotation (unity, named), so "0.43 {rad-score}".
RADSCORE_UNIT = hd.sr.CodedConcept("{rad-score}", "UCUM", "rad-score")
DICE_UNIT = hd.sr.CodedConcept("{Dice}", "UCUM", "Dice coefficient")


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
SEG_AGREEMENT_FLAGGED = local(
    "segagreementlow", "Segmentation REVIEW RECOMMENDED (agreement of views)"
)
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


def card_slices(mask: np.ndarray, n: int) -> list[int]:
    """Slices for ``n`` card groups: the tumour's next-largest cross-sections after the key slice.

    OHIF draws every group of a report on its image at once, each group's
    text box at the right edge of its outline: groups on one outline overlap
    and cannot be read. So the key slice carries the tumour's group only, and
    card ``i`` outlines the tumour on the slice with the ``i+1``-th largest
    area (shared, in turn, when the tumour spans fewer slices than cards).
    """
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    order = [int(k) for k in np.argsort(-areas, kind="stable") if areas[k] > 0]
    rest = order[1:] or order
    return [rest[i % len(rest)] for i in range(n)]


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


def prior_key(comparison: Comparison | None) -> str:
    """What of a comparison changes the objects' UIDs: the prior study compared with."""
    return f"/prior:{comparison.prior.study_instance_uid}" if comparison else ""


COMPARISON_NOTE = local("priorcomparison", "Comparison with the prior study")


def _volume_change(
    comparison: Comparison, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.Measurement:
    """The volume change as the NUM OHIF draws second: ``Volume vs prior <date> (+N d), PD``."""
    c = comparison
    when = c.prior.study_date.isoformat()
    meaning = f"Volume vs prior {when} ({c.days:+d} d), {c.category} (RECIST-like)"
    code = f"volchg-{c.prior.study_date:%Y%m%d}-{c.days}-{c.category}".lower()
    return _measurement(local(code, meaning), c.volume_pct, PERCENT, algorithm)


def _comparison_note(comparison: Comparison) -> hd.sr.TextContentItem:
    """The comparison's lines (TEXT in the root Qualitative Evaluations)."""
    return hd.sr.TextContentItem(
        name=COMPARISON_NOTE,
        value="\n".join(comparison.lines()),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _prior_evidence(comparison: Comparison) -> Dataset:
    """A Pertinent Other Evidence item naming the prior study and its series' instances."""
    item = Dataset()
    item.StudyInstanceUID = comparison.prior.study_instance_uid
    by_series: dict[str, list[Dataset]] = {}
    for series_uid, sop_class, sop_instance in comparison.prior.evidence:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class, sop_instance
        by_series.setdefault(series_uid, []).append(ref)
    series = []
    for series_uid, refs in by_series.items():
        s = Dataset()
        s.SeriesInstanceUID = series_uid
        s.ReferencedSOPSequence = refs
        series.append(s)
    item.ReferencedSeriesSequence = series
    return item


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


def _headline(score: Mapping[str, Any]) -> hd.sr.CodedConcept:
    """The concept of a card's headline NUM: its meaning is :func:`headline` (64 characters).

    The code value names card, version and result (a code has one meaning),
    so the same result of the same card gets the same code in every report.
    """
    words = headline(score)
    result = words.split(", ")[-1].split(" (")[0].replace(" ", "-").lower()
    return local(f"{score['signature']}-{score.get('version', '')}-{result}", words)


def _signature_group(
    score: Mapping[str, Any],
    region: hd.sr.ImageRegion,
    tracking_uid: str,
    not_for_clinical_use: bool,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """One card's measurements and evaluations of the tumour (see the module docstring)."""
    signature = hd.sr.AlgorithmIdentification(
        name=str(score["signature"]), version=str(score["version"])
    )
    measurements = [_measurement(RADSCORE, score["radscore"], RADSCORE_UNIT, signature)]
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


def _notes(scores: Sequence[Mapping[str, Any]]) -> Dataset:
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


def _tumour_measurements(
    facts: Mapping[str, float],
    quality: Mapping[str, Any] | None,
    scored: Sequence[Mapping[str, Any]],
    seg_algorithm: hd.sr.AlgorithmIdentification,
    comparison: Comparison | None = None,
) -> list[hd.sr.Measurement]:
    """The tumour group's NUMs, in the order OHIF shows them (it draws the first five).

    Volume, the volume change since the prior study (when compared), a
    flagged agreement, each card's headline rad-score, then the
    diameter, key-slice area, signal mean and SD, and an unflagged agreement.
    """
    volume = _measurement(codes.SCT.Volume, facts["volume_ml"], ML, seg_algorithm)
    flagged = quality is not None and bool(quality.get("review"))
    agreement = []
    if quality is not None and quality.get("score") is not None:
        concept = SEG_AGREEMENT_FLAGGED if flagged else SEG_AGREEMENT
        agreement = [_measurement(concept, quality["score"], DICE_UNIT, seg_algorithm)]
    headlines = [
        _measurement(
            _headline(score),
            score["radscore"],
            RADSCORE_UNIT,
            hd.sr.AlgorithmIdentification(
                name=str(score["signature"]), version=str(score["version"])
            ),
        )
        for score in scored
    ]
    change = [_volume_change(comparison, seg_algorithm)] if comparison else []
    return [
        volume,
        *change,
        *(agreement if flagged else []),
        *headlines,
        _measurement(codes.SCT.LongAxis, facts["longest_axial_diameter_mm"], MM, seg_algorithm),
        _measurement(codes.SCT.Area, facts["key_slice_area_mm2"], MM2, seg_algorithm),
        _measurement(codes.SCT.Mean, facts["mean_intensity"], ARBITRARY_UNIT, seg_algorithm),
        _measurement(
            codes.SCT.StandardDeviation, facts["sd_intensity"], ARBITRARY_UNIT, seg_algorithm
        ),
        *([] if flagged else agreement),
    ]


def _tumour_evaluations(
    quality: Mapping[str, Any] | None, not_for_clinical_use: bool
) -> list[hd.sr.QualitativeEvaluation]:
    """Whether a person should review the mask (when estimated), and the clinical-use warning."""
    evaluations = []
    if quality is not None:
        flagged = bool(quality.get("review"))
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                SEG_REVIEW, REVIEW_RECOMMENDED if flagged else NO_REVIEW_NEEDED
            )
        )
    if not_for_clinical_use:
        evaluations.append(hd.sr.QualitativeEvaluation(CLINICAL_USE, NOT_FOR_CLINICAL_USE))
    return evaluations


def _device(segmentation_model: Algorithm, uid_root: str | None) -> hd.sr.ObserverContext:
    """The observer: sarcnode as a device, named by the segmentation model."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", DEVICE_SERIAL, root=uid_root),
            name="sarcnode",
            manufacturer_name=MANUFACTURER,
            model_name=segmentation_model.name,
            serial_number=DEVICE_SERIAL,
        ),
    )


def _groups(
    sources: Sequence[Dataset],
    image: sitk.Image,
    mask: np.ndarray,
    scored: Sequence[Mapping[str, Any]],
    *,
    quality: Mapping[str, Any] | None,
    seg_algorithm: hd.sr.AlgorithmIdentification,
    tracking_uid: Callable[..., str],
    not_for_clinical_use: bool,
    comparison: Comparison | None = None,
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """The tumour's group on the key slice, then one group per scored card on its own slice."""
    k = key_slice(mask)
    groups = [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(), identifier="Tumour"),
            referenced_region=_region(outline(mask[k]), sources[k]),
            finding_type=codes.SCT.Neoplasm,
            algorithm_id=seg_algorithm,
            measurements=_tumour_measurements(
                tumour_measurements(image, mask), quality, scored, seg_algorithm, comparison
            ),
            qualitative_evaluations=_tumour_evaluations(quality, not_for_clinical_use) or None,
        )
    ]
    others = card_slices(mask, len(scored))
    for score, s in zip(scored, others, strict=True):
        tracking = tracking_uid(f"{score['signature']}:{score.get('version')}")
        groups.append(
            _signature_group(
                score, _region(outline(mask[s]), sources[s]), tracking, not_for_clinical_use
            )
        )
    return groups


def _report_content(
    groups: Sequence[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations],
    device: hd.sr.ObserverContext,
    scores: Sequence[Mapping[str, Any]],
    comparison: Comparison | None,
) -> Dataset:
    """TID 1500's root container: the measurement groups, and the notes when there are any."""
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.MRIUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    if scores or comparison:
        notes = _notes(scores)
        if comparison is not None:
            notes.ContentSequence.insert(0, _comparison_note(comparison))
        report[0].ContentSequence.append(notes)
    return report[0]


def encode_sr(
    sources: Sequence[Dataset],
    image: sitk.Image,
    tumour: sitk.Image,
    *,
    segmentation_model: Algorithm,
    job_key: str,
    scores: Sequence[Mapping[str, Any]] = (),
    not_for_clinical_use: bool = True,
    series_number: int = 9190,
    uid_root: str | None = None,
    previous: Dataset | None = None,
    quality: Mapping[str, Any] | None = None,
    comparison: Comparison | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The report for the tumour on ``sources`` (the series ``tumour`` and ``image`` live on).

    ``scores`` are :func:`pipelines.scoring.score` results (one group each)
    and skip records (``skipped``: only a note). Without scores the report
    holds the tumour measurements only. ``quality`` is the segmentation's
    quality estimate (:meth:`pipelines.segment.quality.Quality.as_dict`):
    its score (when the model has one) and its review flag join the
    tumour's group. A report made with other inputs (a radiomics-only score
    now re-scored with the nomogram) gets new UIDs and names ``previous`` as
    its predecessor document. ``comparison`` (the study against its prior)
    puts the volume change in the tumour's group, its lines in a note, and
    the prior study's instances in the Pertinent Other Evidence Sequence.
    """
    mask = mask_array(tumour, sources)
    source_series = str(sources[0].SeriesInstanceUID)
    seg_algorithm = hd.sr.AlgorithmIdentification(
        name=segmentation_model.name, version=segmentation_model.version
    )
    scored = [score for score in scores if "skipped" not in score]
    version_key = segmentation_model.version + scores_key(scores) + prior_key(comparison)

    tracking_uid = partial(
        derived_uid,
        "track",
        source_series,
        segmentation_model.version,
        job_key,
        "tumour",
        root=uid_root,
    )
    groups = _groups(
        sources,
        image,
        mask,
        scored,
        quality=quality,
        seg_algorithm=seg_algorithm,
        tracking_uid=tracking_uid,
        not_for_clinical_use=not_for_clinical_use,
        comparison=comparison,
    )
    content = _report_content(groups, _device(segmentation_model, uid_root), scores, comparison)
    kind_of = "SR " + source_series
    instance_uid = derived_uid("instance", kind_of, version_key, job_key, root=uid_root)
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(sources),
        content=content,
        series_instance_uid=derived_uid("series", kind_of, version_key, job_key, root=uid_root),
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        previous_versions=[previous]
        if previous is not None and previous.SOPInstanceUID != instance_uid
        else None,
    )
    sr.SeriesDescription = series_description(
        "Tumour and radiomics results (SR)", not_for_clinical_use
    )
    if comparison is not None and comparison.prior.evidence:
        sr.PertinentOtherEvidenceSequence = [_prior_evidence(comparison)]
    declare_local_scheme(sr)
    return sr
