"""One study from files to scores: segment, extract, score — what ``sarcnode analyze`` runs.

The node's jobs run the same steps as separate, resumable stages; this is
the single-process path for a researcher or an admin checking a study.
Every card given scores the study when the study has its sequences; the
others are reported as skipped, with the reason. Outputs in OUT:
``<role>_tumour.nii.gz`` per sequence, ``features-<key>.csv`` (tidy) per
extraction (cards sharing parameters, sequences and regions share one),
``score.json`` and ``summary.txt``, each saying "not for clinical use" when
the models do; for a DICOM study also ``dicom/`` with a SEG per segmented
series, the TID 1500 SR and the Encapsulated PDF report
(:mod:`pipelines.encode.results`), ready for ``sarcnode deliver``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from pipelines.encode.results import write_results
from pipelines.io.roles import RoleRules
from pipelines.radiomics.study import wide
from pipelines.scoring.cards import Signature, plan
from pipelines.scoring.study import extract_all, first_scored, score_all
from pipelines.scoring.text import score_lines
from pipelines.segment.infer import Segmenter
from pipelines.segment.study import segment_input


def analyze_study(
    study: Path,
    out: Path,
    *,
    segmenter: Segmenter,
    signatures: Sequence[Signature],
    rules: RoleRules,
    clinical: Mapping[str, Any] | None = None,
    workers: int | None = None,
    uid_root: str | None = None,
) -> dict[str, Any]:
    """Run the chain on ``study`` and write its outputs under ``out``; return the report.

    The report's ``scores`` hold every card's result or skip record, in the
    order given; ``score`` is the first card that scored (what the one-card
    report held), None when none did.
    """
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    seg = segment_input(study, segmenter, rules, "T2FS")
    seconds["segment"] = time.perf_counter() - t0
    masks = {}
    for role, mask in seg.masks.items():
        path = out / f"{role}_tumour.nii.gz"
        sitk.WriteImage(mask, str(path), useCompression=True)
        masks[role] = str(path)
    t1 = time.perf_counter()
    extractions, skipped = plan(signatures, set(seg.images))
    tables, failed = extract_all(
        extractions, seg.images, seg.masks, study=study.name, workers=workers
    )
    seconds["radiomics"] = time.perf_counter() - t1
    rows: dict[str, dict[str, float]] = {}
    extracted = []
    for extraction in extractions:
        if extraction.key in tables:
            path = out / f"features-{extraction.key}.csv"
            tables[extraction.key].to_csv(path, index=False)
            row = wide(tables[extraction.key]).iloc[0].to_dict()
            rows |= {card: row for card in extraction.cards}
            extracted.append(extraction.as_dict() | {"features": str(path)})
    facts = dict(clinical or {})
    manufacturer = next(
        (
            ref.attributes.get("Manufacturer")
            for ref in seg.series.values()
            if ref.attributes.get("Manufacturer")
        ),
        None,
    )
    if manufacturer and "batch" not in facts:
        facts["batch"] = manufacturer
    results = score_all(signatures, rows, skipped | failed, facts)
    quality = seg.result.quality.as_dict() if seg.result.quality else None
    dicom: dict[str, str] = {}
    if seg.series:  # DICOM input: the objects a PACS receives
        t2 = time.perf_counter()
        written = write_results(
            out / "dicom",
            series=seg.series,
            images=seg.images,
            masks=seg.masks,
            primary=seg.sequence,
            segmentation_card=segmenter.card,
            job_key=f"analyze:{study.name}",
            scores=results,
            cards={s.id: dict(s.card) for s in signatures},
            clinical=clinical,
            uid_root=uid_root,
            quality=quality,
        )
        dicom = {kind: str(path) for kind, path in written.items()}
        seconds["encode"] = time.perf_counter() - t2
    report = {
        "study": study.name,
        "segmentation": {
            "model": segmenter.model_id,
            "sequence": seg.sequence,
            "volume_ml": round(seg.result.volume_ml, 2),
            "masks": masks,
            "registration_accepted": None
            if seg.registration is None
            else seg.registration.accepted,
            "quality": quality,
        },
        "extractions": extracted,
        "scores": results,
        "score": first_scored(results),
        "dicom": dicom,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "clinical_use": "not for clinical use",
    }
    (out / "score.json").write_text(json.dumps(report, indent=2))
    (out / "summary.txt").write_text(summary(report))
    return report


def summary(report: dict[str, Any]) -> str:
    """Lines a person reads: tumour, mask quality, each card's score or why none, warning."""
    seg = report["segmentation"]
    lines = [
        f"Study {report['study']}: tumour {seg['volume_ml']} ml segmented on {seg['sequence']} "
        f"({seg['model']}).",
    ]
    quality = seg.get("quality")
    if quality and quality.get("review"):
        reasons = "; ".join(quality.get("reasons") or []) or "no reason recorded"
        lines.append(f"Segmentation flagged for review: {reasons}.")
    elif quality and quality.get("score") is not None:
        lines.append(
            f"Segmentation quality {quality['score']:.2f} (agreement of ensemble views, "
            f"review below {quality['threshold']:.2f}): no review needed."
        )
    scores = report.get("scores")
    if scores is None:  # a report from before several cards
        scores = [report["score"]] if report.get("score") else []
    for result in scores:
        lines += score_lines(result)
    if report.get("dicom"):
        lines.append("DICOM results: " + ", ".join(sorted(report["dicom"].values())))
    lines.append(
        "NOT FOR CLINICAL USE: research models; the synthetic-cohort card is the plumbing demo."
    )
    return "\n".join(lines) + "\n"
