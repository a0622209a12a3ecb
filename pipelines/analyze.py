"""One study from files to a score: segment, extract, score — what ``sarcnode analyze`` runs.

The node's jobs run the same steps as separate, resumable stages; this is
the single-process path for a researcher or an admin checking a study.
Outputs in OUT: ``<role>_tumour.nii.gz`` per sequence, ``features.csv``
(tidy), ``score.json`` and ``summary.txt``, each saying "not for clinical
use" when the models do; for a DICOM study also ``dicom/`` with a SEG per
segmented series, the TID 1500 SR and the Encapsulated PDF report
(:mod:`pipelines.encode.results`), ready for ``sarcnode deliver``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from pipelines.encode.results import write_results
from pipelines.io.roles import RoleRules
from pipelines.radiomics.extract import params_hash
from pipelines.radiomics.study import study_features, wide
from pipelines.scoring import score
from pipelines.segment.infer import Segmenter
from pipelines.segment.study import segment_input


def analyze_study(
    study: Path,
    out: Path,
    *,
    segmenter: Segmenter,
    card: dict[str, Any],
    params: Mapping[str, Any],
    rules: RoleRules,
    clinical: Mapping[str, Any] | None = None,
    workers: int | None = None,
    uid_root: str | None = None,
) -> dict[str, Any]:
    """Run the chain on ``study`` and write its outputs under ``out``; return the score report."""
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
    wanted = set(card.get("sequences") or seg.images)
    images = {r: im for r, im in seg.images.items() if r in wanted}
    tumours = {r: m for r, m in seg.masks.items() if r in wanted}
    t1 = time.perf_counter()
    wanted_regions = tuple(
        card.get("regions") or ("tumour", "ring", "habitat1", "habitat2", "habitat3")
    )
    table = study_features(
        images, tumours, params, study=study.name, workers=workers, regions_wanted=wanted_regions
    )
    seconds["radiomics"] = time.perf_counter() - t1
    table.to_csv(out / "features.csv", index=False)
    row = wide(table).iloc[0].to_dict()
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
    result = score(card, row, facts, params_sha256=params_hash(params))
    quality = seg.result.quality.as_dict() if seg.result.quality else None
    results: dict[str, str] = {}
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
            score=result,
            signature_card=card,
            features=row,
            clinical=clinical,
            uid_root=uid_root,
            quality=quality,
        )
        results = {kind: str(path) for kind, path in written.items()}
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
        "score": result,
        "dicom": results,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "clinical_use": "not for clinical use",
    }
    (out / "score.json").write_text(json.dumps(report, indent=2))
    (out / "summary.txt").write_text(summary(report))
    return report


def summary(report: dict[str, Any]) -> str:
    """Lines a person reads: tumour, mask quality, rad-score, risk group, predictions, warning."""
    s, seg = report["score"], report["segmentation"]
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
    lines += [
        f"Signature {s['signature']} ({s['endpoint']}): rad-score {s['radscore']:.3f}, "
        f"risk group {s['risk_group']}.",
    ]
    if "pfs_probability" in s:
        ordered = sorted(s["pfs_probability"].items(), key=lambda item: float(item[0]))
        probs = ", ".join(f"{t} d: {p:.0%}" for t, p in ordered)
        lines.append(f"Predicted progression-free survival ({s['model']} model): {probs}.")
        if s.get("missing_clinical"):
            lines.append(f"Clinical factors not given: {', '.join(s['missing_clinical'])}.")
    if "probability" in s:
        lines.append(f"Predicted probability: {s['probability']:.0%}.")
    if report.get("dicom"):
        lines.append("DICOM results: " + ", ".join(sorted(report["dicom"].values())))
    lines.append("NOT FOR CLINICAL USE: research models, demo models trained on synthetic data.")
    return "\n".join(lines) + "\n"
