"""Scoring a model against expert or synthetic truth: Dice and HD95 per case, with CIs.

Cases come from the folders :func:`~.data.discover` understands (synthetic
studies, NIfTI image/mask pairs) and from DICOM studies carrying an RTSTRUCT
(the raw STS_001 pair): each RTSTRUCT's referenced series is segmented and
scored against the named ROI (``GTV_Mass``) rasterised on that series' grid.
When such a study has both a T2FS and a T1 series, the T2FS mask carried to T1
(what the node does) is scored as well.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from pipelines.io.dicom import ScanResult, load_series, scan
from pipelines.io.roles import RoleRules
from pipelines.io.rtstruct import rtstruct_mask
from pipelines.preprocess import carry_mask, register_rigid
from pipelines.segment.data import discover
from pipelines.segment.infer import Segmenter
from pipelines.segment.metrics import bootstrap_ci, dice, hd95
from pipelines.segment.study import rtstruct_references


@dataclass
class EvalCase:
    """One image with its truth mask."""

    case_id: str
    source: str
    sequence: str
    image: sitk.Image
    truth: sitk.Image


def dicom_cases(
    folder: Path, rules: RoleRules, roi: str, found: ScanResult | None = None
) -> list[EvalCase]:
    """(series, RTSTRUCT ROI) pairs of a DICOM folder, named ``<folder>/<role>``."""
    found = found or scan(folder)
    by_uid = {s.series_instance_uid: s for s in found.series}
    cases = []
    for rt in found.rtstructs:
        for uid in sorted(rtstruct_references(rt) & set(by_uid)):
            ref = by_uid[uid]
            image = load_series(ref)
            role = rules.classify(ref.attributes)
            truth = rtstruct_mask(rt, image, roi)
            cases.append(EvalCase(f"{folder.name}/{role}", "real-dicom", role, image, truth))
    return cases


def iter_cases(
    paths: list[Path], rules: RoleRules, roi: str, exclude: set[str] | None = None
) -> Iterator[EvalCase]:
    """Every case under ``paths``: DICOM+RTSTRUCT folders first, then discovered cases."""
    for path in paths:
        found = scan(path)
        if found.rtstructs:  # read the headers once: dicom_cases reuses this scan
            yield from dicom_cases(path, rules, roi, found)
            continue
        for ref in discover([path], set(exclude or ())):
            image, truth = ref.load()
            yield EvalCase(ref.case_id, ref.source, ref.sequence, image, truth)


def score(segmenter: Segmenter, cases: list[EvalCase]) -> list[dict[str, Any]]:
    """Segment every case at native resolution and score it; add carried-T1 rows for pairs."""
    rows: list[dict[str, Any]] = []
    masks: dict[str, sitk.Image] = {}
    for case in cases:
        result = segmenter.segment(case.image, case.sequence)
        masks[case.case_id] = result.mask
        rows.append(_row(case, result.mask, sum(result.seconds.values())))
    by_id = {c.case_id: c for c in cases}
    for case in cases:
        if case.source != "real-dicom" or case.sequence != "T2FS":
            continue
        t1 = by_id.get(case.case_id.rsplit("/", 1)[0] + "/T1")
        if t1 is None:
            continue
        registration = register_rigid(t1.image, case.image)
        carried = carry_mask(masks[case.case_id], t1.image, registration.transform)
        carried_case = EvalCase(
            t1.case_id + " (carried from T2FS)", "real-dicom-carried", "T1", t1.image, t1.truth
        )
        rows.append(_row(carried_case, carried, 0.0))
    return rows


def _row(case: EvalCase, mask: sitk.Image, seconds: float) -> dict[str, Any]:
    return {
        "case": case.case_id,
        "source": case.source,
        "sequence": case.sequence,
        "dice": round(dice(mask, case.truth), 4),
        "hd95_mm": round(hd95(mask, case.truth), 2),
        "seconds": round(seconds, 2),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and 95 % bootstrap CI of Dice and HD95 per source."""
    out: dict[str, Any] = {}
    for source in sorted({r["source"] for r in rows}):
        sub = [r for r in rows if r["source"] == source]
        d = bootstrap_ci([r["dice"] for r in sub])
        h = bootstrap_ci([r["hd95_mm"] for r in sub])
        out[source] = {
            "n": len(sub),
            "dice_mean": round(d[0], 4),
            "dice_ci95": [round(d[1], 4), round(d[2], 4)],
            "hd95_mm_mean": round(h[0], 2),
            "hd95_mm_ci95": [round(h[1], 2), round(h[2], 2)],
        }
    return out
